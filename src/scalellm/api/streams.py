"""Async stream plumbing shared by the OpenAI app and the replica's gRPC service:
a deadline on a stream of chunks, and the interleaving of several prompts' streams."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from scalellm.protocol.generation import GenerateChunk


def until(deadline_unix: float, items: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """`items`, or with a deadline a relay of them that raises TimeoutError past it
    (closing `items` aborts upstream). No deadline: no extra generator per chunk."""
    return until_deadline(deadline_unix, items) if deadline_unix else items


async def until_deadline(deadline_unix: float, items: AsyncIterator[Any]) -> AsyncIterator[Any]:
    # NOTE: the timeout covers only the waits for the next item, never the `yield`: one
    # that fired while the consumer was writing to the client would cancel that write
    # instead of ending this stream with TimeoutError (seen as gRPC calls that hung until
    # the client's own timeout).
    try:
        deadline = asyncio.get_running_loop().time() + max(deadline_unix - time.time(), 0.0)
        it = aiter(items)
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    item = await anext(it)
            except StopAsyncIteration:
                return
            yield item
    finally:
        await items.aclose()


async def merge(streams: list[AsyncIterator[GenerateChunk]], n: int) -> AsyncIterator[tuple[int, GenerateChunk]]:
    """Interleave several prompts' streams; yields (choice index base, chunk)."""
    if len(streams) == 1:
        try:
            async for chunk in streams[0]:
                yield 0, chunk
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s: AsyncIterator[GenerateChunk]) -> None:
        try:
            async for chunk in s:
                await queue.put((i * n, chunk))
        except Exception as e:  # noqa: BLE001
            await queue.put(e)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            await s.aclose()
