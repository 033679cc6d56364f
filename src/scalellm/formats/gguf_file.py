"""A fast reader for GGUF v2/v3 files (llama.cpp's single-file model format).

What this module knows: the GGUF container layout (header, typed key/value metadata, tensor
infos, aligned tensor data) and the block geometry (values per block, bytes per block) of
the ggml tensor types, so it can say where every tensor's bytes are and how many there are.
What it does not know: what the metadata keys or tensors mean, or how to decode a quantized
block -- see `scalellm.loader.gguf_loader` and `scalellm.quant.gguf_dequant`.

A leaf module: stdlib + numpy only (no torch, no `gguf` package).

Why it exists: `gguf.GGUFReader` builds a numpy view per metadata element, which is ~2M
views (seconds) for a 49k-token vocab plus its merges. Here a whole file is memory-mapped
once, the header is walked with `struct.unpack_from` over the `mmap`, string arrays are
decoded in one tight loop, numeric arrays become one numpy array each, and tensor data is
never touched until `tensor_data` hands out a zero-copy view.

File layout (all little-endian; `str` = u64 byte length + UTF-8 bytes, no terminator):

    u32 magic "GGUF" | u32 version (2 or 3) | u64 n_tensors | u64 n_kv
    n_kv      x  str key | u32 value type | value
                 value = scalar | str | u32 element type, u64 count, count x element
                 (elements may themselves be arrays)
    n_tensors x  str name | u32 n_dims | n_dims x u64 ne (fastest-varying first)
                 | u32 ggml type | u64 offset (relative to the data section, aligned)
    padding to `general.alignment` (default 32), then the data section.

Value representation in `GGUFFile.metadata`:
    integers -> int, FLOAT32/FLOAT64 -> float (the exact stored value: a float32 1e-5 reads
    back as 9.99999974e-06), BOOL -> bool, STRING -> str;
    array of STRING -> list[str];
    array of a numeric type -> a 1-D numpy array of that type (native byte order, a copy
    that owns its memory, so it outlives `close()`); array of BOOL -> numpy bool array;
    array of arrays -> list of the inner values as above.
`GGUFFile.metadata_types[key]` keeps the GGUF value types: `(FLOAT32,)` for a scalar,
`(ARRAY, STRING)` for a string array, `(ARRAY, ARRAY, INT32)` for nested arrays (the inner
types are those of the first element), the same lists `gguf.GGUFReader` puts in
`ReaderField.types`.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np

from scalellm.protocol.errors import ModelLoadError, UnsupportedModelError

__all__ = [
    "DEFAULT_ALIGNMENT",
    "GGML_BLOCK_SIZES",
    "GGMLType",
    "GGUFFile",
    "GGUF_MAGIC",
    "SUPPORTED_VERSIONS",
    "TensorInfo",
    "ValueType",
    "ggml_type_name",
]

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
_HEADER_BYTES = 24  # magic, version, n_tensors, n_kv


class ValueType(IntEnum):
    """GGUF metadata value types (gguf_type in ggml's gguf.h)."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


class GGMLType(IntEnum):
    """ggml tensor types (ggml_type in ggml.h); the ids are fixed by the file format."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41


_QK_K = 256  # values per K-quant / i-quant super-block
_T = GGMLType

# ggml type -> (values per block, bytes per block). Float/int types are 1-value "blocks".
GGML_BLOCK_SIZES: dict[int, tuple[int, int]] = {
    _T.F32: (1, 4),
    _T.F16: (1, 2),
    _T.BF16: (1, 2),
    _T.F64: (1, 8),
    _T.I8: (1, 1),
    _T.I16: (1, 2),
    _T.I32: (1, 4),
    _T.I64: (1, 8),
    _T.Q4_0: (32, 2 + 16),
    _T.Q4_1: (32, 2 + 2 + 16),
    _T.Q5_0: (32, 2 + 4 + 16),
    _T.Q5_1: (32, 2 + 2 + 4 + 16),
    _T.Q8_0: (32, 2 + 32),
    _T.Q8_1: (32, 4 + 4 + 32),
    _T.Q2_K: (_QK_K, 2 + 2 + _QK_K // 16 + _QK_K // 4),
    _T.Q3_K: (_QK_K, 2 + _QK_K // 4 + _QK_K // 8 + 12),
    _T.Q4_K: (_QK_K, 2 + 2 + _QK_K // 2 + 12),
    _T.Q5_K: (_QK_K, 2 + 2 + _QK_K // 2 + _QK_K // 8 + 12),
    _T.Q6_K: (_QK_K, 2 + _QK_K // 2 + _QK_K // 4 + _QK_K // 16),
    _T.Q8_K: (_QK_K, 4 + _QK_K + _QK_K // 8),
    _T.IQ2_XXS: (_QK_K, 2 + _QK_K // 4),
    _T.IQ2_XS: (_QK_K, 2 + _QK_K // 4 + _QK_K // 32),
    _T.IQ3_XXS: (_QK_K, 2 + _QK_K // 4 + _QK_K // 8),
    _T.IQ1_S: (_QK_K, 2 + _QK_K // 8 + _QK_K // 16),
    _T.IQ4_NL: (32, 2 + 16),
    _T.IQ3_S: (_QK_K, 2 + _QK_K // 4 + _QK_K // 8 + _QK_K // 32 + 4),
    _T.IQ2_S: (_QK_K, 2 + _QK_K // 4 + _QK_K // 16),
    _T.IQ4_XS: (_QK_K, 2 + 2 + _QK_K // 2 + _QK_K // 64),
    _T.IQ1_M: (_QK_K, _QK_K // 8 + _QK_K // 16 + _QK_K // 32),
    _T.TQ1_0: (_QK_K, 2 + 4 * 13),
    _T.TQ2_0: (_QK_K, 2 + 64),
    _T.MXFP4: (32, 1 + 16),
    _T.NVFP4: (64, 4 + 32),
    _T.Q1_0: (128, 2 + 16),
}

# Types whose `tensor_data` is a typed view of the torch shape (the rest: raw uint8 bytes).
_TYPED_VIEWS: dict[int, np.dtype] = {
    _T.F32: np.dtype("<f4"),
    _T.F16: np.dtype("<f2"),
    _T.F64: np.dtype("<f8"),
    _T.I8: np.dtype("i1"),
    _T.I16: np.dtype("<i2"),
    _T.I32: np.dtype("<i4"),
    _T.I64: np.dtype("<i8"),
}

_V = ValueType
_SCALARS: dict[int, struct.Struct] = {
    _V.UINT8: struct.Struct("<B"),
    _V.INT8: struct.Struct("<b"),
    _V.UINT16: struct.Struct("<H"),
    _V.INT16: struct.Struct("<h"),
    _V.UINT32: struct.Struct("<I"),
    _V.INT32: struct.Struct("<i"),
    _V.FLOAT32: struct.Struct("<f"),
    _V.BOOL: struct.Struct("<B"),
    _V.UINT64: struct.Struct("<Q"),
    _V.INT64: struct.Struct("<q"),
    _V.FLOAT64: struct.Struct("<d"),
}
_ARRAY_DTYPES: dict[int, np.dtype] = {
    _V.UINT8: np.dtype("u1"),
    _V.INT8: np.dtype("i1"),
    _V.UINT16: np.dtype("<u2"),
    _V.INT16: np.dtype("<i2"),
    _V.UINT32: np.dtype("<u4"),
    _V.INT32: np.dtype("<i4"),
    _V.FLOAT32: np.dtype("<f4"),
    _V.BOOL: np.dtype("u1"),
    _V.UINT64: np.dtype("<u8"),
    _V.INT64: np.dtype("<i8"),
    _V.FLOAT64: np.dtype("<f8"),
}
_INT_TYPES = frozenset({_V.UINT8, _V.INT8, _V.UINT16, _V.INT16, _V.UINT32, _V.INT32, _V.UINT64, _V.INT64})
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def ggml_type_name(ggml_type: int) -> str:
    """The ggml name of a type id ("Q4_K", ...), or "unknown type N"."""
    try:
        return GGMLType(int(ggml_type)).name
    except ValueError:
        return f"unknown type {int(ggml_type)}"


def _value_type_name(vtype: int) -> str:
    try:
        return ValueType(vtype).name
    except ValueError:
        return f"unknown value type {vtype}"


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor's bytes are. `shape` is the torch (row-major) shape, i.e. the
    reversed GGUF `ne` list: ne = [in_features, out_features] -> (out_features, in_features)."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    n_elements: int
    n_bytes: int
    data_offset: int  # absolute offset in the file

    @property
    def type_name(self) -> str:
        return ggml_type_name(self.ggml_type)


class _Corrupt(Exception):
    """Internal: what is wrong, turned into a ModelLoadError with path and offset."""


class _Parser:
    """A cursor over the mapped file. Every read is bounds-checked (struct raises, slices
    are checked by hand) so a truncated file fails with a position, not garbage. Slicing an
    `mmap.mmap` gives `bytes`, and `bytes.decode` is the fastest way to a `str`."""

    __slots__ = ("mv", "pos", "size")

    def __init__(self, mv: mmap.mmap) -> None:
        self.mv = mv
        self.pos = 0
        self.size = len(mv)

    def need(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise _Corrupt(
                f"{what} needs {n} bytes at offset {self.pos} but the file ends at {self.size} "
                "(truncated?)"
            )

    def u32(self) -> int:
        v = _U32.unpack_from(self.mv, self.pos)[0]
        self.pos += 4
        return v

    def u64(self) -> int:
        v = _U64.unpack_from(self.mv, self.pos)[0]
        self.pos += 8
        return v

    def string(self, what: str) -> str:
        n = self.u64()
        self.need(n, what)
        end = self.pos + n
        try:
            s = self.mv[self.pos : end].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Corrupt(f"{what} at offset {self.pos} is not valid UTF-8 ({exc.reason})") from None
        self.pos = end
        return s

    def strings(self, count: int, what: str) -> list[str]:
        """`count` consecutive GGUF strings (the hot loop: vocabularies and merges)."""
        self.need(8 * count, what)  # every element has at least its length
        mv, pos, size = self.mv, self.pos, self.size
        unpack = _U64.unpack_from
        out: list[str] = []
        append = out.append
        i = 0
        try:
            for i in range(count):
                end = pos + 8 + unpack(mv, pos)[0]
                if end > size:
                    break
                append(mv[pos + 8 : end].decode("utf-8"))
                pos = end
        except UnicodeDecodeError as exc:
            raise _Corrupt(f"{what}: element {i} is not valid UTF-8 ({exc.reason})") from None
        finally:
            self.pos = pos
        if len(out) != count:
            raise _Corrupt(f"{what}: element {len(out)} of {count} runs past the end of the file (truncated?)")
        return out

    def value(self, vtype: int, types: list[int], what: str) -> Any:
        types.append(vtype)
        fmt = _SCALARS.get(vtype)
        if fmt is not None:
            v = fmt.unpack_from(self.mv, self.pos)[0]
            self.pos += fmt.size
            return v != 0 if vtype == _V.BOOL else v
        if vtype == _V.STRING:
            return self.string(what)
        if vtype == _V.ARRAY:
            return self.array(types, what)
        raise _Corrupt(f"{what} has unknown value type {vtype}")

    def array(self, types: list[int], what: str) -> Any:
        sub = self.u32()
        count = self.u64()
        if sub == _V.STRING:
            types.append(sub)
            return self.strings(count, what)
        dtype = _ARRAY_DTYPES.get(sub)
        if dtype is not None:
            types.append(sub)
            nbytes = count * dtype.itemsize
            self.need(nbytes, f"{what} ({count} x {_value_type_name(sub)})")
            if count == 0:
                arr = np.empty(0, dtype=dtype.newbyteorder("="))
            else:
                raw = np.frombuffer(self.mv, dtype=dtype, count=count, offset=self.pos)
                arr = raw != 0 if sub == _V.BOOL else raw.astype(dtype.newbyteorder("="))
                del raw  # drop the export of the mapping at once
            self.pos += nbytes
            return arr
        if sub == _V.ARRAY:
            types.append(sub)
            self.need(12 * count, what)  # each inner array has at least its type + count
            out = []
            for i in range(count):
                out.append(self.array(types if i == 0 else [], f"{what}[{i}]"))
            return out
        raise _Corrupt(f"{what} is an array of unknown value type {sub}")


class GGUFFile:
    """A memory-mapped, parsed GGUF v2/v3 file.

        with GGUFFile(path) as f:
            f.version, f.metadata["general.architecture"], f.tensors["token_embd.weight"]
            raw = f.tensor_data("token_embd.weight")   # zero-copy, read-only

    Attributes: `path`, `version`, `file_size`, `alignment`, `data_start` (absolute offset
    of the data section), `metadata` (key -> value, file order; representation in the
    module docstring), `metadata_types` (key -> GGUF value types), `tensors` (name ->
    TensorInfo, file order).

    Raises ModelLoadError when the file is missing, not GGUF, truncated or inconsistent
    (tensor data out of bounds or misaligned, duplicate keys/names, bad alignment), and
    UnsupportedModelError (a ModelLoadError) for a big-endian file, an unsupported
    version or a tensor of unknown ggml type. `close()` drops this object's mapping;
    arrays already returned by `tensor_data` keep the mapping alive until they are freed.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            self.file_size = os.path.getsize(self.path)
        except OSError as exc:
            raise ModelLoadError(f"{self.path}: cannot open GGUF file: {exc}") from exc
        if self.file_size < _HEADER_BYTES:
            raise ModelLoadError(
                f"{self.path}: not a GGUF file or truncated: {self.file_size} bytes, "
                f"the header alone is {_HEADER_BYTES}"
            )
        try:
            with open(self.path, "rb") as fh:
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{self.path}: cannot memory-map GGUF file: {exc}") from exc
        self.file_size = len(mm)
        # The mapping is never closed explicitly: this array (and every view handed out by
        # tensor_data) holds it, and it is unmapped when the last of them is freed.
        self._map: np.ndarray | None = np.frombuffer(mm, dtype=np.uint8)
        self.metadata: dict[str, Any] = {}
        self.metadata_types: dict[str, tuple[int, ...]] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self.alignment = DEFAULT_ALIGNMENT
        try:
            self._parse(_Parser(mm))
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------ parsing

    def _fail(self, message: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: truncated or corrupt GGUF file: {message}")

    def _parse(self, p: _Parser) -> None:
        magic = bytes(p.mv[:4])
        if magic != GGUF_MAGIC:
            raise ModelLoadError(f"{self.path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
        p.pos = 4
        version = p.u32()
        if version not in SUPPORTED_VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            if version & 0xFFFF == 0 and swapped in (1, 2, 3):
                raise UnsupportedModelError(
                    f"{self.path}: big-endian GGUF file (version {swapped}); only little-endian "
                    "GGUF files are supported"
                )
            raise UnsupportedModelError(
                f"{self.path}: GGUF version {version} is not supported (supported: 2, 3)"
            )
        self.version = version
        n_tensors = p.u64()
        n_kv = p.u64()
        what = "header"
        try:
            for i in range(n_kv):
                what = f"metadata key #{i}"
                key = p.string(what)
                what = f"metadata value of {key!r}"
                vtype = p.u32()
                types: list[int] = []
                value = p.value(vtype, types, what)
                if key in self.metadata:
                    raise _Corrupt(f"duplicate metadata key {key!r}")
                self.metadata[key] = value
                self.metadata_types[key] = tuple(types)
            self._read_alignment()
            infos = []
            for i in range(n_tensors):
                what = f"tensor info #{i}"
                name = p.string(what)
                what = f"tensor info of {name!r}"
                n_dims = p.u32()
                p.need(8 * n_dims + 12, what)
                ne = struct.unpack_from(f"<{n_dims}Q", p.mv, p.pos)
                p.pos += 8 * n_dims
                ggml_type = p.u32()
                offset = p.u64()
                infos.append((name, ne, ggml_type, offset))
        except struct.error:
            raise self._fail(
                f"{what} runs past the end of the file at offset {p.pos} ({self.file_size} bytes; truncated?)"
            ) from None
        except _Corrupt as exc:
            raise self._fail(str(exc)) from None
        self.data_start = -(-p.pos // self.alignment) * self.alignment
        self._build_tensors(infos)

    def _read_alignment(self) -> None:
        key = "general.alignment"
        if key not in self.metadata:
            return
        types, value = self.metadata_types[key], self.metadata[key]
        if len(types) != 1 or types[0] not in _INT_TYPES:
            raise _Corrupt(f"{key} must be an integer, got {_value_type_name(types[0])}")
        if value <= 0 or value & (value - 1):
            raise _Corrupt(f"{key} = {value} is not a power of two")
        self.alignment = int(value)

    def _build_tensors(self, infos: list[tuple[str, tuple[int, ...], int, int]]) -> None:
        for name, ne, ggml_type, offset in infos:
            sizes = GGML_BLOCK_SIZES.get(ggml_type)
            if sizes is None:
                raise UnsupportedModelError(
                    f"{self.path}: tensor {name!r} has {ggml_type_name(ggml_type)}, which this "
                    "reader cannot size"
                )
            if name in self.tensors:
                raise ModelLoadError(f"{self.path}: corrupt GGUF file: duplicate tensor {name!r}")
            block_size, type_size = sizes
            n_elements = 1
            for d in ne:
                n_elements *= d
            if ne and ne[0] % block_size:
                raise ModelLoadError(
                    f"{self.path}: corrupt GGUF file: tensor {name!r} row length {ne[0]} is not a "
                    f"multiple of the {ggml_type_name(ggml_type)} block size {block_size}"
                )
            n_bytes = n_elements // block_size * type_size
            start = self.data_start + offset
            if offset % self.alignment:
                raise ModelLoadError(
                    f"{self.path}: corrupt GGUF file: tensor {name!r} data offset {offset} is not "
                    f"aligned to {self.alignment}"
                )
            if start + n_bytes > self.file_size:
                raise ModelLoadError(
                    f"{self.path}: truncated or corrupt GGUF file: tensor {name!r} "
                    f"({n_bytes} bytes at offset {start}) runs past the end of the file "
                    f"({self.file_size} bytes)"
                )
            self.tensors[name] = TensorInfo(
                name, ggml_type, tuple(reversed(ne)), n_elements, n_bytes, start
            )

    # ------------------------------------------------------------------------ access

    def tensor_data(self, name: str) -> np.ndarray:
        """A zero-copy, read-only view of tensor `name`'s bytes in the mapped file.

        F32/F16/F64/I8/I16/I32/I64: a typed array of the torch shape. Every other type
        (BF16 and the block types): uint8 of shape (*shape[:-1], bytes per row) -- the same
        arrays `gguf.GGUFReader` hands out as `ReaderTensor.data`.
        """
        if self._map is None:
            raise ValueError(f"{self.path}: GGUF file is closed")
        info = self.tensors[name]
        raw = self._map[info.data_offset : info.data_offset + info.n_bytes]
        dtype = _TYPED_VIEWS.get(info.ggml_type)
        if dtype is not None:
            return raw.view(dtype).reshape(info.shape)
        block_size, type_size = GGML_BLOCK_SIZES[info.ggml_type]
        if not info.shape:
            return raw
        row_bytes = info.shape[-1] // block_size * type_size
        return raw.reshape(*info.shape[:-1], row_bytes)

    @property
    def closed(self) -> bool:
        return self._map is None

    def close(self) -> None:
        self._map = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._map is None else f"{len(self.metadata)} keys, {len(self.tensors)} tensors"
        return f"GGUFFile({self.path!r}, v{getattr(self, 'version', '?')}, {state})"
