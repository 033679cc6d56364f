"""On-disk cache of int8 calibration statistics, so that a restart skips the calibration pass.

The statistics (max |input| per channel of every int8 linear, ~0.4 MB for SmolLM2)
come from a seeded forward pass over fixed random tokens, so they are a pure
function of the weights, the dtype, the calibration settings and the torch build:
the key hashes exactly those (the model files' paths, sizes and mtimes stand in
for their bytes). Files live in $SCALELLM_CACHE_DIR, else $XDG_CACHE_HOME/scalellm,
else ~/.cache/scalellm. Any failure to read or write is logged and ignored: the
cache only saves time.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import tempfile

import torch

from scalellm.paths import cache_dir

logger = logging.getLogger(__name__)

VERSION = 1  # bump when the statistics or their calibration pass change meaning


def _model_files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    return sorted(glob.glob(os.path.join(path, "*.safetensors")) + glob.glob(os.path.join(path, "config.json")))


def cache_key(model_path: str, **settings: object) -> str:
    """A hex key for the model at `model_path` (file or HF directory) and `settings`."""
    files = []
    for f in _model_files(os.path.abspath(model_path)):
        st = os.stat(f)
        files.append([f, st.st_size, st.st_mtime_ns])
    blob = json.dumps({"version": VERSION, "torch": torch.__version__, "files": files,
                       "settings": {k: str(v) for k, v in sorted(settings.items())}}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _path(key: str) -> str:
    return os.path.join(cache_dir(), f"int8-calibration-{key}.safetensors")


def load(key: str) -> dict[str, torch.Tensor] | None:
    path = _path(key)
    if not os.path.isfile(path):
        return None
    try:
        from safetensors.torch import load_file

        return load_file(path)
    except Exception as e:  # noqa: BLE001 - a damaged cache file only costs a recalibration
        logger.warning("ignoring unreadable int8 calibration cache %s: %s", path, e)
        return None


def save(key: str, stats: dict[str, torch.Tensor]) -> None:
    path = _path(key)
    try:
        from safetensors.torch import save_file

        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        os.close(fd)
        save_file({k: v.contiguous() for k, v in stats.items()}, tmp)
        os.replace(tmp, path)  # atomic: concurrent starts never read half a file
    except OSError as e:
        logger.warning("could not write the int8 calibration cache %s: %s", path, e)
