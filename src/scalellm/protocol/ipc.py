"""Messages between the server frontend and the engine-core process (msgpack via msgspec).

Token ids only; one CoreOutputs message carries every request's tokens of one step.
"""

from __future__ import annotations

import msgspec

from scalellm.protocol.step import CoreRequest, EngineCoreOutput


class EngineLoad(msgspec.Struct):
    """What a router needs, refreshed with every step."""

    num_running: int = 0
    num_waiting: int = 0
    num_kv_blocks_used: int = 0
    num_kv_blocks_total: int = 0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_steps: int = 0
    num_tokens_in_flight: int = 0
    # cumulative seconds of the engine-core process per phase, in CORE_PHASES order
    phase_seconds: list[float] = []
    # the scheduler's fitted step cost in ms: (per step, per decode, per prefill token); empty before a step
    step_cost_ms: list[float] = []
    # the step time the scheduler aims at in ms (target_step_ms or the 16-decode floor's); 0: no target
    step_target_ms: float = 0.0


# Where the engine-core process's wall time goes: the model runner's prepare (step ->
# tensors), forward (model + LM head), sample; the scheduler's schedule and update
# (outputs, stop checks, freeing); ipc (receiving/decoding requests, encoding/sending
# outputs); idle (waiting for work). Exported as scalellm_engine_phase_seconds_total.
CORE_PHASES = ("schedule", "prepare", "forward", "sample", "update", "ipc", "idle")


# frontend -> core
class AddRequests(msgspec.Struct, tag="add"):
    requests: list[CoreRequest]


class AbortRequests(msgspec.Struct, tag="abort"):
    request_ids: list[str]


class Shutdown(msgspec.Struct, tag="shutdown"):
    pass


ToCore = AddRequests | AbortRequests | Shutdown


# core -> frontend
class CoreReady(msgspec.Struct, tag="ready"):
    load: EngineLoad


class CoreOutputs(msgspec.Struct, tag="outputs"):
    outputs: list[EngineCoreOutput]
    load: EngineLoad
    # MoE models: tokens routed per expert since the last report, {layer: [count per expert]};
    # attached at most about once a second and when the engine goes idle
    expert_load: dict[int, list[int]] | None = None


class CoreFailed(msgspec.Struct, tag="failed"):
    message: str


FromCore = CoreReady | CoreOutputs | CoreFailed

_encoder = msgspec.msgpack.Encoder()
_to_core = msgspec.msgpack.Decoder(ToCore)
_from_core = msgspec.msgpack.Decoder(FromCore)


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def decode_to_core(data: bytes) -> ToCore:
    return _to_core.decode(data)


def decode_from_core(data: bytes) -> FromCore:
    return _from_core.decode(data)
