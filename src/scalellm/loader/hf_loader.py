"""HF model directories: config.json and safetensors weights (single file or a
sharded index). Knows files, not models or scheduling."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from safetensors import safe_open

from scalellm.protocol.errors import ModelLoadError

if TYPE_CHECKING:
    import torch


def read_hf_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ModelLoadError(f"{path} has no config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    gen_path = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen_path):
        with open(gen_path, encoding="utf-8") as f:
            gen = json.load(f)
        if gen.get("eos_token_id") is not None:
            cfg["eos_token_id"] = gen["eos_token_id"]  # generation config's list wins
    return cfg


def safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map", {})
        files = sorted(set(weight_map.values()))
        missing = [n for n in files if not os.path.isfile(os.path.join(path, n))]
        if missing:
            raise ModelLoadError(f"{path}: shards listed in the index are missing: {missing}")
        return [os.path.join(path, n) for n in files]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    found = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if found:
        return [os.path.join(path, n) for n in found]
    raise ModelLoadError(f"{path} has no model.safetensors, no model.safetensors.index.json and no *.safetensors files")


def iter_hf_weights(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    for file in safetensors_files(path):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
