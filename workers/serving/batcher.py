"""Collect concurrent requests — for any mix of adapters — into one batch, stream results back.

Why not ``@serve.batch``: Ray Serve (2.60) splits every batch by multiplexed model id, so
requests for different adapters would never share a forward pass, which is the point of the
slotted multi-LoRA layer. This batcher is plain asyncio: requests queue, a batch forms when
``max_batch_size`` requests wait or ``wait_s`` has passed since the first, and runs in a
worker thread (decoding must not block the event loop) while the next batch queues behind it.
Each request gets its own stream of ``{"delta": text}`` items and a final ``{"result": ...}``.
A batch that raises is run again one request at a time: a request that breaks the forward
pass fails alone, and the others get the answer they get alone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)
R = TypeVar("R")
StepCallback = Callable[[list[str | None]], None]


class MixedBatcher(Generic[R]):
    """Batches requests for ``run(requests, on_step) -> results`` (one result per request)."""

    def __init__(
        self,
        run: Callable[[Sequence[R], StepCallback], Sequence[Any]],
        *,
        max_batch_size: int = 32,
        wait_s: float = 0.005,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be ≥ 1")
        self._run = run
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self._pending: asyncio.Queue[tuple[R, asyncio.Queue[dict[str, Any] | None]]] | None = None
        self._task: asyncio.Task[None] | None = None
        self.batches: list[int] = []  # batch sizes, for stats and tests

    async def submit(self, request: R) -> AsyncIterator[dict[str, Any]]:
        """Queue ``request``; yields its deltas as they are decoded, then its result."""
        if self._pending is None:
            self._pending = asyncio.Queue()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())
        out: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._pending.put_nowait((request, out))
        while (item := await out.get()) is not None:
            yield item

    async def _collect(self) -> list[tuple[R, asyncio.Queue[dict[str, Any] | None]]]:
        assert self._pending is not None
        batch = [await self._pending.get()]
        deadline = asyncio.get_running_loop().time() + self.wait_s
        while len(batch) < self.max_batch_size:
            timeout = deadline - asyncio.get_running_loop().time()
            if timeout <= 0:
                while len(batch) < self.max_batch_size and not self._pending.empty():
                    batch.append(self._pending.get_nowait())
                break
            try:
                batch.append(await asyncio.wait_for(self._pending.get(), timeout))
            except TimeoutError:
                break
        return batch

    async def _loop(self) -> None:
        while True:
            batch = await self._collect()
            self.batches.append(len(batch))
            items = await self._answer(batch)
            for (_, o), item in zip(batch, items, strict=True):
                o.put_nowait(item)
                o.put_nowait(None)

    async def _answer(
        self, batch: list[tuple[R, asyncio.Queue[dict[str, Any] | None]]]
    ) -> list[dict[str, Any]]:
        """Run a batch; if it raises, run its requests one at a time, so a request that breaks
        the forward pass fails alone and its batch-mates get the answer they get alone."""
        loop = asyncio.get_running_loop()
        outs = [o for _, o in batch]
        sent = [0] * len(batch)  # characters already streamed to each caller

        def on_step(deltas: list[str | None]) -> None:
            for j, d in enumerate(deltas):
                if d:
                    sent[j] += len(d)
                    loop.call_soon_threadsafe(outs[j].put_nowait, {"delta": d})

        try:
            results = await loop.run_in_executor(None, self._run, [r for r, _ in batch], on_step)
            return [{"result": _plain(r)} for r in results]
        except Exception as exc:
            log.exception("batch of %d failed", len(batch))
            if len(batch) == 1:
                return [{"error": f"{type(exc).__name__}: {exc}", "kind": "internal"}]
        return [await self._alone(j, r, outs[j], sent) for j, (r, _) in enumerate(batch)]

    async def _alone(
        self, j: int, request: R, out: asyncio.Queue[dict[str, Any] | None], sent: list[int]
    ) -> dict[str, Any]:
        """Re-run one request by itself; the text its caller already received is not sent
        again (decoding is deterministic for greedy and seeded requests)."""
        loop = asyncio.get_running_loop()
        already, seen = sent[j], 0

        def on_step(deltas: list[str | None]) -> None:
            nonlocal seen
            d = deltas[0]
            if not d:
                return
            start, seen = seen, seen + len(d)
            fresh = d[max(0, already - start) :]
            if fresh:
                loop.call_soon_threadsafe(out.put_nowait, {"delta": fresh})

        try:
            (result,) = await loop.run_in_executor(None, self._run, [request], on_step)
            return {"result": _plain(result)}
        except Exception as exc:  # this one breaks even alone: it fails, alone
            log.exception("request failed alone")
            return {"error": f"{type(exc).__name__}: {exc}", "kind": "internal"}


def _plain(result: Any) -> Any:
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        return dataclasses.asdict(result)
    return result
