"""`scalellm` command line. Subcommands: generate (offline). Flags map to EngineConfig."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from scalellm.protocol.errors import ScaleLLMError


# NOTE: online serving bounds inter-token latency by default (issue 7: ITL p99 <= 150 ms):
# at c=64 on the 2-core reference machine it cut ITL p99 from 3.6 s to 0.31 s and mean e2e
# by 21%, for 6% less throughput and a longer TTFT for queued prompts (benchmarks/README.md).
# Offline generation has no one waiting between tokens: it keeps the full budget.
# NOTE: 100, not 150: steps overrun the cost model's prediction by up to ~1.35x at p99 on a
# shared 2-core machine, and serving adds its own delay; 100 ms steps kept c=64 ITL p99 <= 150 ms.
SERVE_TARGET_STEP_MS = 100.0
# NOTE: with the step goal alone a c=64 burst of 128-token prompts queued behind ~40 capped
# steps: TTFT p99 3.7-4.3 s served, against vLLM's 2.2-2.7 s. Letting the step goal yield
# while a first token would miss 1 s (with the 4,096-token budget below): TTFT p99 1.2-1.6 s,
# ITL p99 78-107 ms (benchmarks/README.md, "session 9").
SERVE_TARGET_TTFT_MS = 1000.0
# NOTE: online serving's token budget is 4,096 (offline: 2,048). A burst past the TTFT goal
# runs full-budget steps and each stalls every running stream once: at c=64 (128-token
# prompts) 2,048-token steps stalled ~240 token intervals (1.5%: ITL p99 ~340 ms), 4,096-
# token steps ~100 (0.6%: ITL p99 ~85 ms), with TTFT p99 1.45 -> 1.2 s and +3% throughput.
# The longest stall grows from ~0.3 to ~0.6 s (benchmarks/README.md, "session 9").
SERVE_MAX_NUM_BATCHED_TOKENS = 4096


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help=f"token budget of one step (serve/replica default: {SERVE_MAX_NUM_BATCHED_TOKENS})")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-memory", type=float, default=1.0, help="GiB for the KV cache (of each rank)")
    p.add_argument("--kv-cache-resident", type=float, default=None,
                   help="CPU: GiB of the KV cache the prefix cache may keep in memory (default: a quarter of "
                        "--kv-cache-memory); the cache is mapped lazily and grows past this only while live "
                        "requests need it. Equal to --kv-cache-memory: the prefix cache may use the whole pool")
    p.add_argument("--kv-cache-dtype", choices=["auto", "int8"], default="auto",
                   help="auto: the model's dtype; int8 (CPU, one rank): 8-bit codes with a float32 scale per token "
                        "and KV head, about half the bytes of bf16 (twice the tokens in --kv-cache-memory)")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="ranks of one replica: rank 0 in the engine process, the others in worker processes")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="MoE models: whole experts per rank (attention stays tensor-parallel)")
    p.add_argument("--quantization", choices=["int8", "int4", "fp8"], default=None,
                   help="int8: dynamic W8A8 linears, int8 rows with a scale each (CPU: oneDNN's int8 GEMM with bf16 "
                        "activations where AMX/VNNI, else torch._int_mm or fbgemm; perplexity +0.7-1.0%% against bf16 on "
                        "SmolLM2); "
                        "int4: a 4-bit copy of each bf16 linear (groups of 32, a scale and a zero each) for decode "
                        "steps of up to 8 rows, where reading the weights bounds a step, bf16 for larger ones (CPU "
                        "with bf16 units; on a Q4_1 GGUF the copy holds the file's own 4-bit codes); "
                        "fp8: e4m3 W8A8 linears on torch._scaled_mm (GPU with compute capability 8.9+, e.g. H100)")
    p.add_argument("--enforce-eager", action="store_true", help="GPU: no CUDA graphs for decode steps")
    p.add_argument("--target-step-ms", type=float, default=None,
                   help="inter-token latency goal: while requests decode, size steps to about this many ms and "
                        "start new requests only while that still holds (a burst queues instead of slowing "
                        "every stream); 0: off, full token budget, no admission limit. serve/replica default: "
                        f"{SERVE_TARGET_STEP_MS:g}; generate: off")
    p.add_argument("--target-ttft-ms", type=float, default=None,
                   help="time-to-first-token goal, with --target-step-ms: while a waiting request would get its "
                        "first token later than this many ms after arriving at the capped steps' rate, steps "
                        "take the full token budget; 0: off (the step goal always holds). serve/replica default: "
                        f"{SERVE_TARGET_TTFT_MS:g}")


def _engine_kwargs(a: argparse.Namespace) -> dict:
    return dict(
        dtype=a.dtype, device=a.device, max_model_len=a.max_model_len,
        max_num_batched_tokens=a.max_num_batched_tokens, max_num_seqs=a.max_num_seqs,
        block_size=a.block_size, kv_cache_memory=int(a.kv_cache_memory * (1 << 30)), kv_cache_dtype=a.kv_cache_dtype,
        kv_cache_resident=None if a.kv_cache_resident is None else int(a.kv_cache_resident * (1 << 30)),
        enable_prefix_caching=not a.no_prefix_caching, seed=a.seed,
        tensor_parallel_size=a.tensor_parallel_size, enable_expert_parallel=a.enable_expert_parallel,
        quantization=a.quantization, target_step_ms=a.target_step_ms or None,
        target_ttft_ms=a.target_ttft_ms or None, enforce_eager=a.enforce_eager,
    )


def _read_prompts(path: str) -> list[str]:
    prompts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                prompts.append(json.loads(line)["prompt"])
            else:
                prompts.append(line)
    return prompts


def cmd_generate(a: argparse.Namespace) -> int:
    from scalellm import LLM, SamplingParams

    if not a.prompt and not a.prompts_file:
        print("error: give --prompt TEXT or --prompts-file FILE", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    llm = LLM(a.model, **_engine_kwargs(a))
    load_s = time.perf_counter() - t0
    params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p,
                            top_k=a.top_k, seed=a.sampling_seed, ignore_eos=a.ignore_eos)
    if a.prompts_file:
        prompts = _read_prompts(a.prompts_file)
        t1 = time.perf_counter()
        outs = (llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=True)
                if a.chat else llm.generate(prompts, params, use_tqdm=True))
        dt = time.perf_counter() - t1
        n_in = sum(len(o.prompt_token_ids) for o in outs)
        n_out = sum(len(c.token_ids) for o in outs for c in o.outputs)
        for o in outs:
            print(json.dumps({"prompt": o.prompt, "text": o.outputs[0].text, "finish_reason": str(o.outputs[0].finish_reason)}))
        print(f"{len(outs)} requests in {dt:.2f}s: {len(outs) / dt:.2f} req/s, {n_out / dt:.1f} output tok/s, "
              f"{(n_in + n_out) / dt:.1f} total tok/s (model load {load_s:.1f}s)", file=sys.stderr)
        return 0
    outs = llm.chat([{"role": "user", "content": a.prompt}], params) if a.chat else llm.generate(a.prompt, params)
    print(outs[0].outputs[0].text)
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    from scalellm.loader.convert import convert_gguf_to_hf
    from scalellm.loader.model_source import resolve_model

    src = resolve_model(a.gguf)
    if not src.is_gguf:
        print(f"error: {src.path} is not a GGUF file", file=sys.stderr)
        return 2
    print(convert_gguf_to_hf(src.path, a.out_dir, a.dtype))
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from scalellm.bench.cli import run

    return run(a)


def _replica_args(a: argparse.Namespace) -> list[str]:
    """Engine flags to pass on to `scalellm replica` processes."""
    out = ["--dtype", a.dtype, "--device", a.device, "--max-num-batched-tokens", str(a.max_num_batched_tokens),
           "--max-num-seqs", str(a.max_num_seqs), "--block-size", str(a.block_size),
           "--kv-cache-memory", str(a.kv_cache_memory), "--kv-cache-dtype", a.kv_cache_dtype,
           "--seed", str(a.seed), "--drain-timeout", str(a.drain_timeout),
           "--tensor-parallel-size", str(a.tensor_parallel_size)]
    for flag, value in (("--model", a.model), ("--max-model-len", a.max_model_len),
                        ("--served-model-name", a.served_model_name), ("--kv-cache-resident", a.kv_cache_resident)):
        if value is not None:
            out += [flag, str(value)]
    if a.no_prefix_caching:
        out.append("--no-prefix-caching")
    if a.enable_expert_parallel:
        out.append("--enable-expert-parallel")
    if a.enforce_eager:
        out.append("--enforce-eager")
    if a.quantization:
        out += ["--quantization", a.quantization]
    if a.target_step_ms is not None:
        out += ["--target-step-ms", str(a.target_step_ms)]
    if a.target_ttft_ms is not None:
        out += ["--target-ttft-ms", str(a.target_ttft_ms)]
    if a.otlp_endpoint:
        out += ["--otlp-endpoint", a.otlp_endpoint]
    return out


def _gateway_config(a: argparse.Namespace, replicas: list[str]):  # type: ignore[no-untyped-def]
    from scalellm.gateway.config import load_config

    return load_config(getattr(a, "config", None), replicas=replicas, host=a.host, port=a.port,
                       policy=a.policy, api_key=a.api_key, api_key_file=a.api_key_file, admin_key=a.admin_key,
                       max_retries=getattr(a, "max_retries", None), drain_timeout=a.drain_timeout,
                       grpc_mux=False if a.no_grpc_mux else None,
                       log_level=a.log_level, otlp_endpoint=a.otlp_endpoint)


def cmd_serve(a: argparse.Namespace) -> int:
    """`serve`: a gateway in front of --replicas local replica processes (default), or with
    --no-gateway one replica answering HTTP itself. `replica`: the latter, for a remote gateway."""
    if a.command == "serve" and not a.no_gateway:
        from scalellm.gateway.launcher import ReplicaGroup

        config = _gateway_config(a, [])
        group = ReplicaGroup(a.replicas, _replica_args(a) + ["--max-pending", str(a.max_pending)],
                             global_args=["--log-level", a.log_level, "--log-format", a.log_format])
        group.start()  # NOTE: before importing the gateway's server: the replicas load meanwhile
        try:
            from scalellm.gateway.serve import run_gateway
        except BaseException:
            group.stop()
            raise
        return run_gateway(config, group)
    if a.command == "serve" and a.replicas != 1:
        print("error: --no-gateway serves one replica; drop --replicas", file=sys.stderr)
        return 2
    from scalellm.engine.config import EngineConfig
    from scalellm.server.core_client import CoreClient

    engine_config = EngineConfig(model=a.model, **_engine_kwargs(a))
    # NOTE: the engine core first: it imports torch and loads weights (~3.5 s) while this
    # process imports and builds the frontend (~1 s) on the other core.
    client = CoreClient(engine_config, log_level=a.log_level)
    client.spawn()
    from scalellm.api.tracing import otlp_endpoint
    from scalellm.server.serve import ServeConfig, run_server

    port = None if getattr(a, "no_http", False) else a.port
    serve = ServeConfig(host=a.host, port=port, grpc_port=a.grpc_port, served_model_name=a.served_model_name,
                        api_key=a.api_key, drain_timeout=a.drain_timeout, max_pending=a.max_pending,
                        log_level=a.log_level, otlp_endpoint=otlp_endpoint(a.otlp_endpoint, os.environ))
    return run_server(engine_config, serve, client)


def cmd_gateway(a: argparse.Namespace) -> int:
    from scalellm.gateway.serve import run_gateway

    return run_gateway(_gateway_config(a, a.replica))


_POLICIES = ["round_robin", "least_load", "power_of_two", "prefix_affinity", "adaptive"]


def _add_gateway_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", default=None, choices=_POLICIES, help="routing policy (default: least_load)")
    p.add_argument("--api-key-file", default=None, help="file of API keys, one `key_id:secret` per line "
                   "(also SCALELLM_API_KEY_FILE / SCALELLM_API_KEYS)")
    p.add_argument("--admin-key", default=None, help="key for the /admin API (also SCALELLM_ADMIN_KEY)")
    p.add_argument("--no-grpc-mux", action="store_true",
                   help="one gRPC Generate call per request to the replicas, not one GenerateMux stream for all")


def _add_tracing_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--otlp-endpoint", default=None,
                   help="send OpenTelemetry traces over OTLP/gRPC, e.g. http://127.0.0.1:4317 (also "
                        "OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT); needs `pip install scalellm[otel]`")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scalellm", description="ScaleLLM: end-to-end LLM serving")
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="json: one object per line (time, level, logger, message, request_id where known)")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="offline generation")
    _add_engine_args(g)
    g.add_argument("--prompt", default=None)
    g.add_argument("--prompts-file", default=None, help="one prompt per line (or JSONL with a 'prompt' field)")
    g.add_argument("--chat", action="store_true", help="apply the model's chat template to each prompt")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--sampling-seed", type=int, default=None)
    g.add_argument("--ignore-eos", action="store_true")
    g.set_defaults(func=cmd_generate)
    for name, help_text, grpc_default in (
        ("serve", "serve the OpenAI API (engine process + HTTP frontend, optional gRPC)", None),
        ("replica", "one replica for use behind the gateway (gRPC, optional HTTP)", 50051),
    ):
        s = sub.add_parser(name, help=help_text)
        _add_engine_args(s)
        s.set_defaults(target_step_ms=SERVE_TARGET_STEP_MS, target_ttft_ms=SERVE_TARGET_TTFT_MS,
                       max_num_batched_tokens=SERVE_MAX_NUM_BATCHED_TOKENS)
        s.add_argument("--host", default="127.0.0.1")
        s.add_argument("--port", type=int, default=8000, help="HTTP port of the OpenAI API")
        s.add_argument("--grpc-port", type=int, default=grpc_default, help="gRPC port (Replica service)")
        if name == "replica":
            s.add_argument("--no-http", action="store_true", help="serve gRPC only")
        else:
            s.add_argument("--replicas", type=int, default=1, help="local replica processes behind the gateway")
            s.add_argument("--no-gateway", action="store_true",
                           help="no gateway: one replica process answers HTTP directly")
            _add_gateway_args(s)
        s.add_argument("--served-model-name", default=None)
        s.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1 routes")
        s.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to finish in-flight work on SIGTERM")
        s.add_argument("--max-pending", type=int, default=4096, help="requests in flight before 503 + Retry-After")
        _add_tracing_args(s)
        s.set_defaults(func=cmd_serve)
    gw = sub.add_parser("gateway", help="OpenAI front routing over replicas' gRPC services (no torch)")
    gw.add_argument("--replica", action="append", default=[], help="HOST:PORT of a replica's gRPC service (repeat)")
    gw.add_argument("--config", default=None, help="TOML file: replicas and pools, keys, limits, filters "
                    "(see scalellm.gateway.config); flags win over it")
    gw.add_argument("--host", default=None)
    gw.add_argument("--port", type=int, default=None)
    _add_gateway_args(gw)
    gw.add_argument("--api-key", default=None, help="one API key (id `cli`)")
    gw.add_argument("--max-retries", type=int, default=None, help="retries on another replica before the first token")
    gw.add_argument("--drain-timeout", type=float, default=None)
    _add_tracing_args(gw)
    gw.set_defaults(func=cmd_gateway)
    c = sub.add_parser("convert-gguf", help="write a GGUF model as an HF directory (config, safetensors, tokenizer)")
    c.add_argument("out_dir")
    c.add_argument("--gguf", default=None, help="GGUF file (default: the embedded model)")
    c.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    c.set_defaults(func=cmd_convert)
    b = sub.add_parser("bench", help="measure latency and throughput of an OpenAI-compatible endpoint")
    from scalellm.bench.cli import add_arguments as add_bench_arguments  # argparse only: cheap

    add_bench_arguments(b)
    b.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.log_format == "json":
        from scalellm.api.logs import JSONFormatter

        handler = logging.StreamHandler()
        handler.setFormatter(JSONFormatter())
        logging.basicConfig(level=a.log_level.upper(), handlers=[handler])
    else:
        logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return a.func(a)
    except ScaleLLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
