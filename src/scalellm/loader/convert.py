"""GGUF file -> HF model directory (config.json, model.safetensors, tokenizer files),
so other engines (transformers, vLLM) can load exactly the weights we serve."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from scalellm.loader.gguf_loader import iter_gguf_weights, read_gguf_config

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def convert_gguf_to_hf(gguf_path: str, out_dir: str, dtype: str = "bfloat16") -> str:
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    os.makedirs(out_dir, exist_ok=True)
    cfg = read_gguf_config(gguf_path)
    cfg["torch_dtype"] = dtype
    tensors = {name: t.to(_DTYPES[dtype]).contiguous() for name, t in iter_gguf_weights(gguf_path)}
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token_id": cfg.get("bos_token_id"), "eos_token_id": cfg.get("eos_token_id")}, f, indent=2)
    _save_tokenizer(gguf_path, out_dir)
    return out_dir


def _save_tokenizer(gguf_path: str, out_dir: str) -> None:
    from scalellm.tokenizer import load_tokenizer

    tok = load_tokenizer(gguf_path)
    tok.backend.save(os.path.join(out_dir, "tokenizer.json"))
    special = {}
    for key, tid in (("bos_token", tok.bos_token_id), ("eos_token", tok.eos_token_id), ("pad_token", tok.pad_token_id)):
        if tid is not None:
            special[key] = tok.id_to_token(tid)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": tok.chat_template,
                   "add_bos_token": tok.add_bos_token, "model_max_length": 1 << 30, **special}, f, indent=2)
