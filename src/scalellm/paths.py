"""Where ScaleLLM keeps files between runs: $SCALELLM_CACHE_DIR, else $XDG_CACHE_HOME/scalellm,
else ~/.cache/scalellm (int8 calibration statistics, compiled C kernels). Everything there
only saves time and may be deleted."""

from __future__ import annotations

import os


def cache_dir() -> str:
    explicit = os.environ.get("SCALELLM_CACHE_DIR")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "scalellm")
