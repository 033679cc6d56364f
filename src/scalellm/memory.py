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
