"""Messages between the driver (tensor-parallel rank 0, in the engine's process) and the
worker ranks 1..N-1 (msgpack via msgspec over ZMQ; the model's own collectives go over
torch.distributed).

    driver ──StepInput (per step, one copy per rank)──► rank r: same forward, no sampling
    driver ◄──RankReady / RankFailed─────────────────── rank r

A step crosses as the SchedulerOutput itself (token ids and block ids, a few bytes per
running request), not as prepared tensors: each rank rebuilds the tensors from its
own copy of the request state (measured in benchmarks/README.md).
"""

from __future__ import annotations

import msgspec

from scalellm.protocol.step import SchedulerOutput


# driver -> rank
class StepInput(msgspec.Struct, tag="step"):
    sched: SchedulerOutput
    # what the driver sampled in the previous step: followers append these to their
    # request state before running `sched` (they never sample themselves)
    sampled_token_ids: dict[str, int]


class StopRank(msgspec.Struct, tag="stop"):
    pass


ToRank = StepInput | StopRank


# rank -> driver
class RankReady(msgspec.Struct, tag="ready"):
    rank: int


class RankFailed(msgspec.Struct, tag="failed"):
    rank: int
    message: str


FromRank = RankReady | RankFailed

_encoder = msgspec.msgpack.Encoder()
_to_rank = msgspec.msgpack.Decoder(ToRank)
_from_rank = msgspec.msgpack.Decoder(FromRank)


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def decode_to_rank(data: bytes) -> ToRank:
    return _to_rank.decode(data)


def decode_from_rank(data: bytes) -> FromRank:
    return _from_rank.decode(data)
