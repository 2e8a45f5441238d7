"""The replica's decode loop: requests join the running batch at the next step.

One thread owns the model. Between steps it admits queued requests, in arrival order, while
the ``StepDecoder`` has rows and KV budget for them and their adapter gets a device slot
(pinned until the request leaves); then it runs one step and hands each request its text and,
when it ends, its output. A request that cannot get a slot because every slot is pinned by
other adapters' running requests waits without blocking requests behind it that can run;
after ``slot_wait_s`` it fails as busy. The queue is bounded: beyond ``max_queue`` waiting
requests ``submit`` raises ``Overloaded`` at once (the HTTP layer answers 429), so memory
and latency stay bounded under any load.

Compared with a static batch, a newcomer waits for one step, not for the slowest row of the
batch before it (``bench/serving.py`` measures time to first token under Poisson arrivals
against the previous static batcher, kept there as the baseline).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from workers.serving.decode import DecodeRow, RowOutput
from workers.serving.multi_lora import BASE_SLOT
from workers.serving.slots import AdapterSlots, NoFreeSlot
from workers.serving.stepper import Live, StepDecoder

log = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """The request queue is full: try again later."""


@dataclass(eq=False)
class Ticket:
    """One request handed to the loop, with the callbacks that deliver its answer.

    ``on_delta(text)`` is called for new text; ``on_done(output, error)`` once at the end,
    with ``error = (message, kind)`` when the request failed (``output`` may be None then).
    Both are called on the loop thread and must not block.
    """

    row: DecodeRow
    on_delta: Callable[[str], None]
    on_done: Callable[[RowOutput | None, tuple[str, str] | None], None]
    adapter: str | None = None  # slot key (exact version); None: the base
    load: Callable[[int], None] | None = None  # fills a slot with the adapter
    queued_at: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    seq: Live | None = None
    slot: int = BASE_SLOT  # the slot acquired for ``adapter`` (else the row's own slot)


@dataclass
class LoopStats:
    steps: int = 0
    forwards: int = 0
    rows: int = 0  # rows summed over forwards
    max_rows: int = 0
    max_adapters: int = 0  # most distinct slots (the base counted as one) in one forward
    admitted: int = 0
    rejected: int = 0  # refused with Overloaded
    waiting: int = 0
    running: int = 0


class ContinuousScheduler:
    """Admits, steps and delivers; ``submit`` and ``cancel`` may be called from any thread."""

    def __init__(
        self,
        decoder: StepDecoder,
        slots: AdapterSlots | None = None,
        *,
        max_queue: int = 256,
        slot_wait_s: float = 30.0,
        name: str = "lorafleet-decode",
    ) -> None:
        self.decoder, self.slots = decoder, slots
        self.max_queue, self.slot_wait_s = max_queue, slot_wait_s
        self.stats = LoopStats()
        self._queue: deque[Ticket] = deque()
        self._running: list[Ticket] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # -- any thread ------------------------------------------------------------------------
    def submit(self, ticket: Ticket) -> None:
        """Queue ``ticket``; its callbacks report the answer.

        Raises:
            ValueError: the request can never run here (too long for the context or budget).
            Overloaded: ``max_queue`` requests are already waiting.
        """
        reason = self.decoder.too_big(ticket.row)
        if reason is not None:
            raise ValueError(reason)
        with self._cond:
            if self._closed:
                raise RuntimeError("the decode loop is closed")
            if len(self._queue) >= self.max_queue:
                self.stats.rejected += 1
                raise Overloaded(f"{len(self._queue)} requests are waiting; try again shortly")
            self._queue.append(ticket)
            self.stats.waiting = len(self._queue)
            self._cond.notify()

    def cancel(self, ticket: Ticket) -> None:
        """The caller went away: stop decoding ``ticket`` at the next step."""
        with self._cond:
            ticket.cancelled = True
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=10)

    # -- the loop thread -------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._queue and self.decoder.idle:
                    self._cond.wait()
                if self._closed:
                    return
                admit = self._pick()
            for ticket in admit:
                self._start(ticket)
            for ticket in self._running:
                if ticket.cancelled and ticket.seq is not None:
                    self.decoder.cancel(ticket.seq)
            if self.decoder.idle:
                if not admit:  # waiting for slots only: do not spin
                    with self._cond:
                        self._cond.wait(timeout=0.01)
                continue
            try:
                report = self.decoder.step()
            except Exception:  # never let the loop die: fail what was running, go on
                log.exception("decode step failed")
                self.decoder.reset()
                for ticket in list(self._running):
                    self._finish(ticket, RowOutput(error="the decode step failed",
                                                   finish_reason="error"))  # fmt: skip
                continue
            self._account(report.forwards)
            for seq, delta in report.deltas:
                seq.tag.on_delta(delta)
            for seq in report.finished:
                self._finish(seq.tag, seq.out)

    def _pick(self) -> list[Ticket]:
        """Tickets to admit now, in arrival order (called with the lock held)."""
        admit: list[Ticket] = []
        now = time.monotonic()
        for ticket in list(self._queue):
            if ticket.cancelled:
                self._queue.remove(ticket)
                self._deliver(ticket, None, ("cancelled", "invalid"))
                continue
            if not self.decoder.fits(ticket.row, [t.row for t in admit]):
                break  # the budget is first come, first served: no overtaking a big request
            if ticket.adapter is not None and self.slots is not None:
                try:
                    assert ticket.load is not None
                    ticket.slot = self.slots.acquire(ticket.adapter, ticket.load)
                except NoFreeSlot:
                    if now - ticket.queued_at > self.slot_wait_s:
                        self._queue.remove(ticket)
                        self._deliver(ticket, None, ("no free adapter slot", "busy"))
                    continue  # others behind it may use adapters already in slots
                except Exception as exc:  # its load failed: this request only
                    self._queue.remove(ticket)
                    self._deliver(ticket, None, (str(exc), "internal"))
                    continue
            self._queue.remove(ticket)
            admit.append(ticket)
        self.stats.waiting = len(self._queue)
        return admit

    def _start(self, ticket: Ticket) -> None:
        row = ticket.row
        if ticket.adapter is not None:
            row = dataclasses.replace(row, slot=ticket.slot)
        ticket.seq = self.decoder.add(row, tag=ticket)
        self._running.append(ticket)
        self.stats.admitted += 1
        self.stats.running = len(self._running)

    def _finish(self, ticket: Ticket, out: RowOutput) -> None:
        self._running.remove(ticket)
        self.stats.running = len(self._running)
        if ticket.adapter is not None and self.slots is not None:
            self.slots.release(ticket.slot)
        error = (out.error, "internal") if out.error is not None else None
        self._deliver(ticket, out, error)

    def _deliver(
        self, ticket: Ticket, out: RowOutput | None, error: tuple[str, str] | None
    ) -> None:
        try:
            ticket.on_done(out, error)
        except Exception:  # a broken callback must not stop the loop
            log.exception("delivering a result failed")

    def _account(self, forwards: list[tuple[str, int, int]]) -> None:
        s = self.stats
        s.steps += 1
        for _, rows, adapters in forwards:
            s.forwards += 1
            s.rows += rows
            s.max_rows = max(s.max_rows, rows)
            s.max_adapters = max(s.max_adapters, adapters)
