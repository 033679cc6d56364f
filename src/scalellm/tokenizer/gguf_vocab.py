"""Build a `tokenizers.Tokenizer` from the vocabulary stored in a GGUF file's metadata.

A GGUF carries no `tokenizer.json`: llama.cpp's converter writes the tokens, their types, the
merges (or scores) and the special token ids as `tokenizer.ggml.*` metadata. This module reads
those keys with `gguf.GGUFReader` and rebuilds an equivalent Hugging Face `tokenizers` pipeline:

* `tokenizer.ggml.model == "gpt2"`: byte-level BPE. `tokenizer.ggml.pre` picks the
  pre-tokenizer (how text is cut before merging), see `_BPE_PRE_TOKENIZERS`.
* `tokenizer.ggml.model == "llama"`: SentencePiece-style BPE with byte fallback; merges are
  taken from the file or derived from the token scores.

Token types (llama.cpp's `llama_token_type`): 1 normal, 2 unknown, 3 control, 4 user-defined,
5 unused, 6 byte. Control and unknown tokens become special added tokens, user-defined ones
plain added tokens, so they are matched whole in text and keep their ids.

What this module does NOT know: models, weights, tensors, torch, devices, chat templates
rendering, or how the engine uses the ids. It only reads `tokenizer.*` metadata.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from scalellm.protocol.errors import ModelLoadError, UnsupportedModelError

# llama.cpp token types.
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

# Tokens llama.cpp treats as end-of-generation by their text (llama-vocab.cpp, "special_eog_ids"),
# in addition to the eos / eot / eom ids named in the metadata.
_EOG_TEXTS = frozenset(
    {
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|eom_id|>",
        "<EOT>",
        "_<EOT>",
        "<|end_of_text|>",
        "<end_of_utterance>",
    }
)

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class _PreKind:
    """How one `tokenizer.ggml.pre` value cuts text, and llama.cpp's defaults for it."""

    split: str | None = None  # a Split regex before a regex-less ByteLevel; None: GPT-2's regex
    individual_digits: bool = False  # Digits(individual_digits=True) before ByteLevel
    ignore_merges: bool = False  # whole-word vocab hit wins over merges (llama3)
    add_bos: bool = False  # llama.cpp's default when tokenizer.ggml.add_bos_token is absent


_GPT2 = _PreKind()
_DIGITS = _PreKind(individual_digits=True)
_LLAMA3 = _PreKind(split=_LLAMA3_SPLIT, ignore_merges=True, add_bos=True)
_QWEN2 = _PreKind(split=_QWEN2_SPLIT)
_GPT4O = _PreKind(split=_GPT4O_SPLIT)

_BPE_PRE_TOKENIZERS: dict[str, _PreKind] = {
    "default": _GPT2,
    "gpt-2": _GPT2,
    "gpt2": _GPT2,
    "smollm": _DIGITS,
    "starcoder": _DIGITS,
    "refact": _DIGITS,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "llama-bpe": _LLAMA3,
    "falcon3": _LLAMA3,
    "qwen2": _QWEN2,
    "deepseek-r1-qwen": _QWEN2,
    "gpt-4o": _GPT4O,
    "llama4": _GPT4O,
}


@dataclass
class GGUFVocab:
    """Everything the tokenizer layer needs from a GGUF's `tokenizer.*` metadata."""

    backend: HFTokenizer
    kind: str  # tokenizer.ggml.model
    pre: str | None  # tokenizer.ggml.pre
    num_tokens: int
    bos_token_id: int | None
    eos_token_ids: list[int]
    pad_token_id: int | None
    unk_token_id: int | None
    add_bos_token: bool
    add_eos_token: bool
    chat_template: str | None
    special_tokens_map: dict[str, str] = field(default_factory=dict)


def read_gguf_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The `tokenizer.*` and `general.architecture` metadata of a GGUF file, as Python values."""
    from scalellm.formats.gguf_file import GGUFFile

    if not os.path.isfile(path):
        raise ModelLoadError(f"GGUF file not found: {os.fspath(path)}")
    # NOTE: our own parser: gguf.GGUFReader spent ~3 s building views of a 49k-token vocab.
    with GGUFFile(os.fspath(path)) as f:
        return {
            key: (value.tolist() if hasattr(value, "tolist") else value)
            for key, value in f.metadata.items()
            if key.startswith("tokenizer.") or key == "general.architecture"
        }


def build_gguf_vocab(meta: Mapping[str, Any]) -> GGUFVocab:
    """Build the tokenizer described by GGUF metadata (`read_gguf_metadata`'s result)."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise ModelLoadError("GGUF file has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens missing)")
    tokens = list(tokens)
    token_types = _token_types(meta, len(tokens))
    pre = meta.get("tokenizer.ggml.pre")
    if kind == "gpt2":
        backend, default_bos = _build_byte_level_bpe(meta, tokens, token_types)
    elif kind == "llama":
        backend, default_bos = _build_sentencepiece_bpe(meta, tokens, token_types)
    else:
        raise UnsupportedModelError(
            f"unsupported GGUF tokenizer kind tokenizer.ggml.model={kind!r} (supported: 'gpt2', 'llama')"
        )
    _add_special_tokens(backend, tokens, token_types)
    return _finish_vocab(meta, backend, kind, pre, tokens, token_types, default_bos)


def load_gguf_vocab(path: str | os.PathLike[str]) -> GGUFVocab:
    """`build_gguf_vocab(read_gguf_metadata(path))`."""
    return build_gguf_vocab(read_gguf_metadata(path))


# --------------------------------------------------------------------------------------------
# Vocabulary kinds
# --------------------------------------------------------------------------------------------


def _token_types(meta: Mapping[str, Any], n: int) -> list[int]:
    types = meta.get("tokenizer.ggml.token_type")
    if types is None:
        return [TOKEN_NORMAL] * n
    types = [int(t) for t in types]
    if len(types) != n:
        raise ModelLoadError(f"GGUF tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")
    return types


def _vocab_dict(tokens: list[str]) -> dict[str, int]:
    """token -> id; for a token listed twice the first id wins (llama.cpp does the same)."""
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    return vocab


def _split_merges(merges: Iterable[str]) -> list[tuple[str, str]]:
    """'a b' -> ('a', 'b'); the separator is the first space after the first character."""
    pairs = []
    for merge in merges:
        pos = merge.find(" ", 1)
        if pos < 0:
            raise ModelLoadError(f"malformed GGUF merge {merge!r}")
        pairs.append((merge[:pos], merge[pos + 1 :]))
    return pairs


def _bpe_pre_kind(pre: str | None) -> _PreKind:
    if pre is None:
        return _GPT2
    kind = _BPE_PRE_TOKENIZERS.get(pre)
    if kind is None:
        raise UnsupportedModelError(
            f"unsupported GGUF pre-tokenizer tokenizer.ggml.pre={pre!r} "
            f"(supported: {', '.join(sorted(_BPE_PRE_TOKENIZERS))})"
        )
    return kind


def _byte_level_pre_tokenizer(kind: _PreKind) -> pre_tokenizers.PreTokenizer:
    if kind.split is not None:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(kind.split), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
            ]
        )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if kind.individual_digits:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def _build_byte_level_bpe(
    meta: Mapping[str, Any], tokens: list[str], token_types: list[int]
) -> tuple[HFTokenizer, bool]:
    """GPT-2 style byte-level BPE; returns (tokenizer, llama.cpp's default add_bos)."""
    merges = meta.get("tokenizer.ggml.merges")
    if merges is None:
        raise ModelLoadError("GGUF byte-level BPE tokenizer has no tokenizer.ggml.merges")
    kind = _bpe_pre_kind(meta.get("tokenizer.ggml.pre"))
    model = models.BPE(
        vocab=_vocab_dict(tokens),
        merges=_split_merges(merges),
        ignore_merges=kind.ignore_merges,
    )
    backend = HFTokenizer(model)
    backend.pre_tokenizer = _byte_level_pre_tokenizer(kind)
    backend.decoder = decoders.ByteLevel()
    return backend, kind.add_bos


def _build_sentencepiece_bpe(
    meta: Mapping[str, Any], tokens: list[str], token_types: list[int]
) -> tuple[HFTokenizer, bool]:
    """SentencePiece-style BPE ('llama'): '▁' for spaces, byte fallback via <0xAB> tokens."""
    vocab = _vocab_dict(tokens)
    merges_meta = meta.get("tokenizer.ggml.merges")
    if merges_meta is not None:
        merges = _split_merges(merges_meta)
    else:
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None:
            raise ModelLoadError("GGUF 'llama' tokenizer has neither tokenizer.ggml.merges nor tokenizer.ggml.scores")
        merges = _merges_from_scores(tokens, [float(s) for s in scores], token_types)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) else None
    model = models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    backend = HFTokenizer(model)
    add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_space_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend, True


def _merges_from_scores(tokens: list[str], scores: list[float], token_types: list[int]) -> list[tuple[str, str]]:
    """Recover BPE merges from SentencePiece scores.

    SentencePiece BPE merges, at each step, the adjacent pair whose union has the highest score.
    Ranking every (left, right) split of every normal token by the union's score, best first,
    gives HF BPE the same choice.
    """
    mergeable = {tok: i for i, tok in enumerate(tokens) if token_types[i] in (TOKEN_NORMAL, TOKEN_USER_DEFINED)}
    ranked: list[tuple[float, int, int, str, str]] = []
    for tok, tok_id in mergeable.items():
        if token_types[tok_id] != TOKEN_NORMAL:
            continue
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-scores[tok_id], mergeable[left], mergeable[right], left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def _add_special_tokens(backend: HFTokenizer, tokens: list[str], token_types: list[int]) -> None:
    """Control/unknown tokens -> special added tokens; user-defined -> plain added tokens.

    Their text is in the model vocabulary at the same id, so `tokenizers` reuses those ids.
    """
    special = [
        AddedToken(tok, special=True, normalized=False)
        for tok, typ in zip(tokens, token_types)
        if typ in (TOKEN_CONTROL, TOKEN_UNKNOWN) and tok
    ]
    user = [
        AddedToken(tok, special=False, normalized=False)
        for tok, typ in zip(tokens, token_types)
        if typ == TOKEN_USER_DEFINED and tok
    ]
    if special:
        backend.add_special_tokens(special)
    if user:
        backend.add_tokens(user)


# --------------------------------------------------------------------------------------------
# Special ids, BOS/EOS policy, chat template
# --------------------------------------------------------------------------------------------


def _token_id(meta: Mapping[str, Any], key: str, n: int) -> int | None:
    value = meta.get(key)
    if value is None:
        return None
    value = int(value)
    return value if 0 <= value < n else None


def _eos_ids(meta: Mapping[str, Any], tokens: list[str], token_types: list[int]) -> list[int]:
    """eos first, then eot / eom, then control tokens llama.cpp treats as end-of-generation."""
    n = len(tokens)
    ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        tid = _token_id(meta, key, n)
        if tid is not None and tid not in ids:
            ids.append(tid)
    for tid, (tok, typ) in enumerate(zip(tokens, token_types)):
        if typ == TOKEN_CONTROL and tok in _EOG_TEXTS and tid not in ids:
            ids.append(tid)
    return ids


def _post_processor(
    bos: tuple[str, int] | None, eos: tuple[str, int] | None
) -> processors.PostProcessor | None:
    if bos is None and eos is None:
        return None
    single = (["[BOS]"] if bos else []) + ["$A"] + (["[EOS]"] if eos else [])
    pair = single + (["[BOS]:1"] if bos else []) + ["$B:1"] + (["[EOS]:1"] if eos else [])
    special = []
    if bos:
        special.append({"id": "[BOS]", "ids": [bos[1]], "tokens": [bos[0]]})
    if eos:
        special.append({"id": "[EOS]", "ids": [eos[1]], "tokens": [eos[0]]})
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _finish_vocab(
    meta: Mapping[str, Any],
    backend: HFTokenizer,
    kind: str,
    pre: str | None,
    tokens: list[str],
    token_types: list[int],
    default_bos: bool,
) -> GGUFVocab:
    n = len(tokens)
    bos_id = _token_id(meta, "tokenizer.ggml.bos_token_id", n)
    eos_ids = _eos_ids(meta, tokens, token_types)
    pad_id = _token_id(meta, "tokenizer.ggml.padding_token_id", n)
    unk_id = _token_id(meta, "tokenizer.ggml.unknown_token_id", n)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", default_bos)) and bos_id is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and bool(eos_ids)
    backend.post_processor = _post_processor(
        (tokens[bos_id], bos_id) if add_bos and bos_id is not None else None,
        (tokens[eos_ids[0]], eos_ids[0]) if add_eos else None,
    )
    named = {
        "bos_token": bos_id,
        "eos_token": eos_ids[0] if eos_ids else None,
        "unk_token": unk_id,
        "pad_token": pad_id,
    }
    template = meta.get("tokenizer.chat_template")
    return GGUFVocab(
        backend=backend,
        kind=kind,
        pre=pre,
        num_tokens=n,
        bos_token_id=bos_id,
        eos_token_ids=eos_ids,
        pad_token_id=pad_id,
        unk_token_id=unk_id,
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        chat_template=str(template) if template else None,
        special_tokens_map={name: tokens[i] for name, i in named.items() if i is not None},
    )
