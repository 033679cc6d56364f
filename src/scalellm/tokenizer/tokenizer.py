"""Text <-> token ids for one model: encode, decode, chat templates.

`Tokenizer` wraps a Hugging Face `tokenizers.Tokenizer` (the Rust backend) together with the
facts the serving engine needs around it: BOS policy, every id that ends generation, the pad id,
and the chat template. It is built either from a Hugging Face model directory
(`tokenizer.json`, `tokenizer_config.json`, `generation_config.json`, `chat_template.jinja`) or
from a GGUF file's `tokenizer.*` metadata (see `gguf_vocab`).

Chat templates are rendered the way transformers renders them: a jinja2
`ImmutableSandboxedEnvironment` with `trim_blocks`, `lstrip_blocks`, the `loopcontrols`
extension, a non-HTML-escaping `tojson`, `raise_exception` and `strftime_now`.

What this module does NOT know: models, weights, torch, devices, sampling, or the request
lifecycle. It does not decide whether a chat prompt should be encoded with special tokens --
a rendered template usually already contains BOS, so callers encode it with
`add_special_tokens=False` (as transformers' `apply_chat_template(tokenize=True)` does).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from scalellm.protocol.errors import InvalidParameterError, ModelLoadError
from scalellm.tokenizer.gguf_vocab import GGUFVocab, load_gguf_vocab

_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer:
    """One model's tokenizer. Immutable after construction; safe to share between threads."""

    def __init__(
        self,
        backend: HFTokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
        pad_token_id: int | None = None,
        add_bos_token: bool,
        chat_template: str | None = None,
        special_tokens_map: Mapping[str, str] | None = None,
        vocab_size: int | None = None,
        source: str = "",
    ) -> None:
        self._backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids: list[int] = list(dict.fromkeys(int(i) for i in eos_token_ids))
        self.pad_token_id = pad_token_id
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template
        self.special_tokens_map: dict[str, str] = dict(special_tokens_map or {})
        self.source = source
        self.vocab_size: int = max(vocab_size or 0, _backend_vocab_size(backend))
        self.all_special_ids: frozenset[int] = _special_ids(backend, bos_token_id, self.eos_token_ids, pad_token_id)
        # "<0xAB>" tokens of a byte-fallback decoder: a run of them decodes all-or-nothing.
        self.byte_fallback_ids: frozenset[int] = _byte_fallback_ids(backend)

    # ---------------------------------------------------------------- constructors

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load `tokenizer.json` (+ `tokenizer_config.json`, `generation_config.json`, chat template).

        BOS/EOS are added as tokenizer.json's post-processor says; `add_bos_token` in
        tokenizer_config.json does not override it (transformers 5 behaves the same).
        """
        root = Path(path)
        if not root.is_dir():
            raise ModelLoadError(f"tokenizer directory not found: {root}")
        tok_file = root / "tokenizer.json"
        if not tok_file.is_file():
            raise ModelLoadError(f"tokenizer.json not found in {root} (only fast-tokenizer directories are supported)")
        try:
            backend = HFTokenizer.from_file(str(tok_file))
        except Exception as exc:  # noqa: BLE001 - the Rust error text is the useful part
            raise ModelLoadError(f"cannot parse {tok_file}: {exc}") from exc
        config = _read_json(root / "tokenizer_config.json")
        names = _named_special_tokens(config)
        _ensure_added_special(backend, names.values())
        bos_id = _id_of(backend, names.get("bos_token"))
        eos_ids = _hf_eos_ids(backend, names.get("eos_token"), _read_json(root / "generation_config.json"))
        return cls(
            backend,
            bos_token_id=bos_id,
            eos_token_ids=eos_ids,
            pad_token_id=_id_of(backend, names.get("pad_token")),
            add_bos_token=_adds_bos(backend, bos_id),
            chat_template=_hf_chat_template(root, config),
            special_tokens_map=names,
            source=str(root),
        )

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Build from the `tokenizer.*` metadata of a GGUF file."""
        return cls.from_gguf_vocab(load_gguf_vocab(path), source=os.fspath(path))

    @classmethod
    def from_gguf_vocab(cls, vocab: GGUFVocab, source: str = "") -> Tokenizer:
        """Wrap a vocabulary built by `gguf_vocab.build_gguf_vocab` (e.g. from a metadata dict)."""
        return cls(
            vocab.backend,
            bos_token_id=vocab.bos_token_id,
            eos_token_ids=vocab.eos_token_ids,
            pad_token_id=vocab.pad_token_id,
            add_bos_token=vocab.add_bos_token,
            chat_template=vocab.chat_template,
            special_tokens_map=vocab.special_tokens_map,
            vocab_size=vocab.num_tokens,
            source=source,
        )

    # ---------------------------------------------------------------- properties

    @property
    def backend(self) -> HFTokenizer:
        """The wrapped `tokenizers.Tokenizer` (do not mutate)."""
        return self._backend

    @property
    def eos_token_id(self) -> int | None:
        """The primary EOS id (the tokenizer's own), or None."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens_map.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens_map.get("eos_token")

    def __repr__(self) -> str:
        return (
            f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, bos={self.bos_token_id}, "
            f"eos={self.eos_token_ids}, add_bos={self.add_bos_token})"
        )

    # ---------------------------------------------------------------- encode / decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token text in it (e.g. "<|im_start|>") maps to its id.

        With `add_special_tokens`, BOS (and EOS where the model asks for it) is added exactly as
        the model's own tokenizer would.
        """
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. Bytes that do not form valid UTF-8 come out as U+FFFD."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str | None]:
        """Vocabulary strings (e.g. 'Ġworld'); None for an id outside the vocabulary."""
        return [self._backend.id_to_token(int(i)) for i in ids]

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def get_vocab(self) -> dict[str, int]:
        return self._backend.get_vocab(with_added_tokens=True)

    # ---------------------------------------------------------------- chat template

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        """Render `messages` with the model's chat template, like transformers' `tokenize=False`.

        `extra` reaches the template as variables (e.g. `tools=`, `documents=`,
        `enable_thinking=`); they override the special-token variables.
        Raises `InvalidParameterError("messages", ...)` when the model has no chat template,
        the messages are malformed, or the template rejects them (`raise_exception`).
        """
        if not self.chat_template:
            raise InvalidParameterError(
                "messages", f"this model has no chat template ({self.source or 'tokenizer'}); use a plain prompt"
            )
        _check_messages(messages)
        variables: dict[str, Any] = {"tools": None, "documents": None, **self.special_tokens_map}
        variables.update(extra)
        return render_chat_template(
            self.chat_template, messages=messages, add_generation_prompt=add_generation_prompt, **variables
        )


def load_tokenizer(path: str) -> Tokenizer:
    """A model's tokenizer from a `.gguf` file or a Hugging Face model directory.

    A directory without `tokenizer.json` but with exactly one `.gguf` file uses that file.
    """
    p = Path(path)
    if p.is_dir():
        if not (p / "tokenizer.json").is_file():
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return Tokenizer.from_gguf(ggufs[0])
        return Tokenizer.from_hf_dir(p)
    if p.is_file():
        if p.suffix.lower() == ".gguf" or _has_gguf_magic(p):
            return Tokenizer.from_gguf(p)
        raise ModelLoadError(f"{p} is neither a .gguf file nor a model directory")
    raise ModelLoadError(f"tokenizer path not found: {p}")


# -------------------------------------------------------------------- chat template rendering


def render_chat_template(template: str, **variables: Any) -> str:
    """Render a chat template in transformers' sandbox; template errors -> InvalidParameterError."""
    import jinja2

    compiled = _compile_template(template)
    try:
        return compiled.render(**variables)
    except jinja2.TemplateError as exc:
        raise InvalidParameterError("messages", f"chat template error: {exc}") from exc


@lru_cache(maxsize=16)
def _compile_template(template: str) -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
    ) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise InvalidParameterError("messages", f"the model's chat template does not compile: {exc}") from exc


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidParameterError("messages", "must be a non-empty list of messages")
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or "role" not in msg:
            raise InvalidParameterError("messages", f"message {i} must be an object with a 'role'")


# -------------------------------------------------------------------- HF directory helpers


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot parse {path}: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    """tokenizer_config values are a string or an AddedToken dict {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _named_special_tokens(config: Mapping[str, Any]) -> dict[str, str]:
    names: dict[str, str] = {}
    for name in _NAMED_SPECIAL_TOKENS:
        text = _token_text(config.get(name))
        if text is not None:
            names[name] = text
    return names


def _ensure_added_special(backend: HFTokenizer, texts: Iterable[str]) -> None:
    """Named special tokens missing from the added vocabulary become special added tokens (as transformers does)."""
    present = {t.content for t in backend.get_added_tokens_decoder().values()}
    missing = [AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(texts) if t not in present]
    if missing:
        backend.add_special_tokens(missing)


def _id_of(backend: HFTokenizer, token: str | None) -> int | None:
    return backend.token_to_id(token) if token is not None else None


def _hf_eos_ids(backend: HFTokenizer, eos_token: str | None, gen_config: Mapping[str, Any]) -> list[int]:
    """The tokenizer's eos first, then generation_config.json's eos_token_id (int or list)."""
    ids: list[int] = []
    eos = _id_of(backend, eos_token)
    if eos is not None:
        ids.append(eos)
    extra = gen_config.get("eos_token_id")
    if isinstance(extra, int):
        extra = [extra]
    if isinstance(extra, list):
        ids.extend(int(i) for i in extra if isinstance(i, int) and int(i) not in ids)
    return ids


def _adds_bos(backend: HFTokenizer, bos_id: int | None) -> bool:
    """Whether the post-processor puts BOS in front (probed, so any processor kind works)."""
    if bos_id is None:
        return False
    plain = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    return len(full) > len(plain) and full[0] == bos_id


def _hf_chat_template(root: Path, config: Mapping[str, Any]) -> str | None:
    """chat_template.jinja, else tokenizer_config.json's chat_template, else chat_template.json."""
    jinja_file = root / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = _pick_template(config.get("chat_template"))
    if template is None:
        template = _pick_template(_read_json(root / "chat_template.json").get("chat_template"))
    return template


def _pick_template(value: Any) -> str | None:
    """A template string, or the 'default' one of a [{"name", "template"}] list."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, list):
        named = {d.get("name"): d.get("template") for d in value if isinstance(d, Mapping)}
        chosen = named.get("default")
        return chosen if isinstance(chosen, str) else None
    return None


def _has_gguf_magic(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _backend_vocab_size(backend: HFTokenizer) -> int:
    size = backend.get_vocab_size(with_added_tokens=True)
    added = backend.get_added_tokens_decoder()
    return max(size, max(added) + 1 if added else 0)


def _special_ids(
    backend: HFTokenizer, bos: int | None, eos: Iterable[int], pad: int | None
) -> frozenset[int]:
    ids = {i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
    ids.update(eos)
    ids.update(i for i in (bos, pad) if i is not None)
    return frozenset(ids)


def _byte_fallback_ids(backend: HFTokenizer) -> frozenset[int]:
    """Ids of "<0xAB>" tokens when the decoder uses ByteFallback, else empty."""
    if "ByteFallback" not in repr(backend.decoder):
        return frozenset()
    vocab = backend.get_vocab(with_added_tokens=False)
    return frozenset(i for t, i in vocab.items() if len(t) == 6 and t.startswith("<0x") and t.endswith(">"))
