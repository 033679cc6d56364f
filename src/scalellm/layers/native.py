"""Building and loading the C kernels of `layers/csrc` (prefill attention, AMX GEMM, AVX-512 GEMMs).

Each C file is compiled once per machine with the system's C compiler (`$CC`, else gcc, else
cc; about a second) into the cache directory ($SCALELLM_CACHE_DIR, else
$XDG_CACHE_HOME/scalellm, else ~/.cache/scalellm), keyed by the source and the flags, and
loaded with ctypes. The AMX kernels need AMX (Linux x86-64, `amx_bf16` and friends in
/proc/cpuinfo) and the kernel's permission for the tile state (`sl_amx_init`), the others
AVX-512 VNNI (and BF16 for the bf16 ones); where any of that is missing the loaders return
None and callers keep their torch paths.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from typing import Any

from scalellm.paths import cache_dir

logger = logging.getLogger(__name__)

CSRC = os.path.join(os.path.dirname(__file__), "csrc")
AMX_FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-mamx-int8",
             "-fopenmp", "-shared", "-fPIC")
_CPU_FLAGS = ("amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512f", "avx512bw", "avx512vl")


VNNI_FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-fopenmp", "-shared", "-fPIC")
_VNNI_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo) on Linux x86-64; empty elsewhere."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return frozenset()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_amx() -> bool:
    flags = cpu_flags()
    return all(flag in flags for flag in _CPU_FLAGS)


def cpu_has_vnni() -> bool:
    """AVX-512 with VNNI (VPDPBUSD): Intel since Cascade Lake, AMD since Zen 4."""
    flags = cpu_flags()
    return all(flag in flags for flag in _VNNI_CPU_FLAGS)


def compiler() -> str | None:
    for name in (os.environ.get("CC"), "gcc", "cc"):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def build(source: str, cc: str, flags: tuple[str, ...] = AMX_FLAGS) -> str | None:
    """The shared library of `source` (a path), compiling it into the cache directory unless
    it is there already (keyed by the source, the headers beside it and the flags); None if
    the compiler failed."""
    with open(source, "rb") as f:
        text = f.read()
    for header in sorted(glob.glob(os.path.join(os.path.dirname(source), "*.h"))):  # what it may include
        with open(header, "rb") as f:
            text += f.read()
    key = hashlib.sha256(text + " ".join([os.path.basename(cc), *flags]).encode()).hexdigest()[:16]
    directory = cache_dir()
    name = os.path.splitext(os.path.basename(source))[0]
    path = os.path.join(directory, f"{name}-{key}.so")
    if os.path.isfile(path):
        return path
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
    os.close(fd)
    try:
        res = subprocess.run([cc, *flags, source, "-o", tmp], capture_output=True, text=True, timeout=120,
                             check=False)
        if res.returncode != 0:
            logger.info("%s not built (%s): %s", name, cc, res.stderr.strip()[-500:])
            return None
        os.replace(tmp, path)  # atomic: a concurrent server loads one whole file or the other
        return path
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build_and_load(filename: str, what: str, flags: tuple[str, ...]) -> ctypes.CDLL | None:
    """csrc/`filename` built with `flags` (once per machine) and loaded; None, logged at INFO
    naming `what`, where no compiler is found or the build or the load fails."""
    cc = compiler()
    if cc is None:
        logger.info("%s off: no C compiler ($CC, gcc, cc)", what)
        return None
    try:
        path = build(os.path.join(CSRC, filename), cc, flags)
        return ctypes.CDLL(path) if path is not None else None
    except (OSError, subprocess.SubprocessError) as e:
        logger.info("%s off: %s", what, e)
        return None


def load_amx_library(filename: str, what: str) -> ctypes.CDLL | None:
    """Build (once per machine) and load csrc/`filename`, which exports `sl_amx_init`, where
    the CPU has AMX, a compiler is found and Linux grants the tile state; None otherwise
    (why is logged at INFO, naming `what`)."""
    if not cpu_has_amx():
        return None
    lib = _build_and_load(filename, what, AMX_FLAGS)
    if lib is not None and lib.sl_amx_init() != 0:  # Linux refused this process the AMX tile state
        logger.info("%s off: arch_prctl(ARCH_REQ_XCOMP_PERM) failed", what)
        return None
    return lib


def load_vnni_library(filename: str, what: str, bf16: bool = False) -> ctypes.CDLL | None:
    """Build (once per machine) and load csrc/`filename`, an AVX-512 VNNI kernel (bf16: an
    AVX-512 BF16 one), where the CPU has it and a compiler is found; None otherwise (why is
    logged at INFO, naming `what`)."""
    if not cpu_has_vnni() or (bf16 and "avx512_bf16" not in cpu_flags()):
        return None
    return _build_and_load(filename, what, VNNI_FLAGS + (("-mavx512bf16",) if bf16 else ()))


def lazy_vnni_function(filename: str, what: str, symbol: str, argtypes: list[Any], restype: Any = None,
                       bf16: bool = False, off_env: str = "") -> Callable[[], Any]:
    """A getter for `symbol` of csrc/`filename` (`load_vnni_library`), built and loaded on its
    first call and kept: the ctypes function, or None where it does not load or `off_env` is
    set. (Two threads racing on the first call both load it: harmless, `build` is atomic.)"""

    @functools.cache
    def get() -> Any:
        if off_env and os.environ.get(off_env):
            return None
        lib = load_vnni_library(filename, what, bf16)
        if lib is None:
            return None
        fn = getattr(lib, symbol)
        fn.restype, fn.argtypes = restype, argtypes
        return fn

    return get
