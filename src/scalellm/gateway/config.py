"""The gateway's configuration: one frozen dataclass, built once from a TOML file
(`--config`), command-line flags (which win) and the environment (read here only:
SCALELLM_API_KEYS, SCALELLM_API_KEY_FILE, SCALELLM_ADMIN_KEY, and OpenTelemetry's
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT when neither the file
nor --otlp-endpoint names one). Unknown settings are errors that name them.

    host = "0.0.0.0"
    port = 8000
    policy = "adaptive"              # round_robin | least_load | power_of_two | prefix_affinity | adaptive
    max_retries = 2
    grpc_mux = true                  # all calls to a replica on one GenerateMux stream (false: a Generate call each)
    otlp_endpoint = "http://127.0.0.1:4317"   # OpenTelemetry traces (OTLP/gRPC); needs scalellm[otel]
    [policy_options]                 # passed to the policy, e.g. adaptive:
    threshold = 32                   #   in-flight requests below which the latency pool is used
    latency_pool = "latency"
    throughput_pool = "throughput"
    [[replicas]]
    address = "10.0.0.5:50051"
    pool = "latency"                 # default: "default"
    [auth]
    api_key_file = "/etc/scalellm/keys"   # lines `key_id:secret` (or `secret`)
    [limits]                         # per request; 0 = unlimited
    max_body_bytes = 1048576
    max_prompt_chars = 100000
    max_tokens = 4096
    max_n = 8
    [rate_limits]                    # default per key; 0 = unlimited
    requests_per_min = 600
    tokens_per_min = 200000
    max_concurrency = 32
    [rate_limits.keys.team-a]        # one key's own limits (by key id)
    requests_per_min = 60
    [admission]                      # whole gateway
    max_concurrency = 512
    max_queue = 1024
    queue_timeout = 30
    [[filters.input]]
    pattern = "forbidden phrase"     # literal, case-insensitive
    action = "reject"                # reject | redact
    [[filters.output]]
    pattern = '\\b\\d{3}-\\d{2}-\\d{4}\\b'
    regex = true
    max_len = 11                     # longest match (bounds how much streamed text is held back)
    action = "redact"
    replacement = "[REDACTED]"
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from typing import Any

from scalellm.api.admission import AdmissionConfig
from scalellm.api.safety import ApiKey, FilterRule, KeyLimits, RequestLimits, SafetyConfig, parse_keys
from scalellm.api.tracing import otlp_endpoint


@dataclass(frozen=True, slots=True)
class ReplicaSpec:
    address: str  # host:port of the replica's gRPC service
    pool: str = "default"

    def __post_init__(self) -> None:
        host, sep, port = self.address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"replica address must be HOST:PORT, got {self.address!r}")


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    replicas: tuple[ReplicaSpec, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8000
    policy: str = "least_load"
    policy_options: dict[str, Any] = field(default_factory=dict)
    max_retries: int = 2
    grpc_mux: bool = True  # calls to a replica over one GenerateMux stream (protocol/grpc/mux.py)
    drain_timeout: float = 30.0
    log_level: str = "WARNING"
    safety: SafetyConfig = SafetyConfig()
    admission: AdmissionConfig = AdmissionConfig()
    admin_key: str | None = None
    otlp_endpoint: str | None = None  # None: no tracing


_TOP = {"host", "port", "policy", "policy_options", "max_retries", "grpc_mux", "drain_timeout", "otlp_endpoint", "replicas",
        "auth", "limits", "rate_limits", "admission", "filters"}


def _strict(section: str, data: dict, allowed: set[str]) -> None:
    unknown = set(data) - allowed
    if unknown:
        raise ValueError(f"unknown setting(s) in [{section}]: {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(sorted(allowed))}")


def _names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


def _key_limits(section: str, data: dict) -> KeyLimits:
    _strict(section, data, _names(KeyLimits))
    return KeyLimits(**data)


def _filters(section: str, items: list[dict]) -> tuple[FilterRule, ...]:
    for item in items:
        _strict(section, item, _names(FilterRule))
    return tuple(FilterRule(**item) for item in items)


def load_config(path: str | None = None, *, env: dict[str, str] | None = None, **overrides: Any) -> GatewayConfig:
    """TOML file, then the environment's keys, then `overrides` (flags; None = not given)."""
    env = dict(os.environ) if env is None else env
    data: dict[str, Any] = {}
    if path:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    _strict("top level", data, _TOP)
    auth = data.get("auth", {})
    _strict("auth", auth, {"api_key_file"})
    rate = dict(data.get("rate_limits", {}))
    per_key = rate.pop("keys", {})
    default_limits = _key_limits("rate_limits", rate)
    filters = data.get("filters", {})
    _strict("filters", filters, {"input", "output"})
    limits = data.get("limits", {})
    _strict("limits", limits, _names(RequestLimits))
    admission = data.get("admission", {})
    _strict("admission", admission, _names(AdmissionConfig))

    # keys: file (config or env), then SCALELLM_API_KEYS, then --api-key
    key_text = []
    key_file = overrides.pop("api_key_file", None) or auth.get("api_key_file") or env.get("SCALELLM_API_KEY_FILE")
    if key_file:
        with open(key_file, encoding="utf-8") as f:
            key_text.append(f.read())
    if env.get("SCALELLM_API_KEYS"):
        key_text.append(env["SCALELLM_API_KEYS"])
    keys = parse_keys("\n".join(key_text))
    flag_key = overrides.pop("api_key", None)
    if flag_key:
        keys.append(ApiKey.from_secret(flag_key, "cli"))
    unknown_ids = set(per_key) - {k.key_id for k in keys}
    if unknown_ids:
        raise ValueError(f"[rate_limits.keys] names key ids that are not configured: {', '.join(sorted(unknown_ids))}")
    keys = [replace(k, limits=_key_limits(f"rate_limits.keys.{k.key_id}", per_key[k.key_id]))
            if k.key_id in per_key else k for k in keys]
    ids = [k.key_id for k in keys]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate API key ids: {', '.join(sorted({i for i in ids if ids.count(i) > 1}))}")
    safety = SafetyConfig(keys=tuple(keys), default_key_limits=default_limits, limits=RequestLimits(**limits),
                          input_filters=_filters("filters.input", filters.get("input", [])),
                          output_filters=_filters("filters.output", filters.get("output", [])))

    replicas = []
    for item in data.get("replicas", []):
        _strict("replicas", item, {"address", "pool"})
        replicas.append(ReplicaSpec(**item))
    flag_replicas = overrides.pop("replicas", None) or []
    replicas += [r if isinstance(r, ReplicaSpec) else ReplicaSpec(r) for r in flag_replicas]

    simple = {k: data[k] for k in ("host", "port", "policy", "policy_options", "max_retries", "grpc_mux", "drain_timeout",
                                   "otlp_endpoint") if k in data}
    simple.update({k: v for k, v in overrides.items() if v is not None})
    admin_key = simple.pop("admin_key", None) or env.get("SCALELLM_ADMIN_KEY")
    simple["otlp_endpoint"] = otlp_endpoint(simple.get("otlp_endpoint"), env)
    return GatewayConfig(replicas=tuple(replicas), safety=safety, admission=AdmissionConfig(**admission),
                         admin_key=admin_key, **simple)
