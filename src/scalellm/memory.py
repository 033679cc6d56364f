"""Handing freed heap memory back to the OS (glibc keeps it in its arenas until told)."""

from __future__ import annotations

import ctypes
import gc


def trim_heap() -> None:
    """Collect garbage, then ask glibc to return the free pages of every arena
    (`malloc_trim(0)`); a no-op where libc is not glibc."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit


def keep_freed_heap() -> bool:
    """Make glibc keep freed memory for reuse: blocks up to 32 MiB come from the heap (not
    a fresh mmap each time) and the heap is never trimmed on free (only by `trim_heap`).
    For a process that repeats the same allocations every step (the engine core): a page
    handed back to the kernel must be faulted in again when next used, and on these VMs
    that costs 10-300 us a page. Returns whether it took effect (glibc only)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and \
            bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


_MADV_DONTNEED = 4
_MADV_PAGEOUT = 21  # Linux 5.4+


def drop_library_pages(name_fragment: str, code_only: bool = False) -> int:
    """Drop this process's resident pages of the read-only mappings of shared libraries
    whose path contains `name_fragment`; returns the bytes of the ranges advised. Nothing is
    lost: a page touched again is read back from its file.

    - `code_only=False` (a library needed at start-up only: LLVM, once numba's kernels are
      compiled): every read-only mapping, reclaimed (MADV_PAGEOUT): the kernel may also
      evict the pages from the page cache, and it keeps what it cannot reclaim (the
      relocated, copy-on-write pages of a RELRO segment).
    - `code_only=True` (a library whose start-up code is large but some of it runs later:
      torch): executable mappings only, unmapped (MADV_DONTNEED): the page cache keeps them,
      so a page touched again costs a minor fault, not a read.

    NOTE: never MADV_DONTNEED on a non-executable private mapping: a RELRO segment is
    read-only but holds pages the loader wrote (relocations); dropping them would map the
    file's unrelocated bytes back. A no-op off Linux."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return 0
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    advised = 0
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or name_fragment not in parts[5] or "w" in parts[1]:
            continue  # NOTE: never writable mappings: their private pages may hold modified data
        executable = "x" in parts[1]
        if code_only and not executable:
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        if code_only:
            ok = libc.madvise(start, end - start, _MADV_DONTNEED) == 0
        else:
            ok = libc.madvise(start, end - start, _MADV_PAGEOUT) == 0 or \
                (executable and libc.madvise(start, end - start, _MADV_DONTNEED) == 0)
        if ok:
            advised += end - start
    return advised


_MADV_NOHUGEPAGE = 15


def _madvise(start: int, length: int, advice: int) -> bool:
    """madvise(2) on [start, start + length) (start page-aligned); False off Linux or on error."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return False
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise(start, length, advice) == 0


def no_huge_pages(address: int, length: int) -> bool:
    """Ask the kernel to back [address, address + length) with 4 KiB pages only (no
    transparent huge pages); returns whether it took (Linux only).

    NOTE: numpy advises huge pages (MADV_HUGEPAGE) for its large arrays, and where THP is
    in `madvise` mode a first write then maps 2 MiB at once: a lazily filled cache (the KV
    cache, whose pool hands out blocks in order) grew in 2 MiB steps at each of its 60
    halves' edges, ~100 MiB more resident than its blocks in use on SmolLM2."""
    start = address // 4096 * 4096
    return _madvise(start, address + length - start, _MADV_NOHUGEPAGE)


def release_pages(address: int, length: int) -> int:
    """Hand back the anonymous pages lying wholly inside [address, address + length)
    (MADV_DONTNEED: a private anonymous page then reads as zeros); returns the bytes advised
    (0 off Linux). The partial pages at either end are left alone."""
    page = 4096
    start = -(-address // page) * page
    end = (address + length) // page * page
    return end - start if end > start and _madvise(start, end - start, _MADV_DONTNEED) else 0
