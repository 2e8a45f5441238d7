"""From the decode loop's thread to an asyncio stream of items, one stream per request.

The replica's Ray Serve handler yields these items back to the ingress: first
``{"ready": True}`` once the request is queued — or ``{"error": message, "kind": kind}`` if it
was refused at once (a full queue, a prompt too long), so the ingress can still answer with a
status code — then ``{"delta": text}`` as text is decoded, then one ``{"result": {...}}`` (a
``GenResult`` as a dict; its ``error`` and ``kind`` are set when the request failed). If the
consumer goes away (the client disconnected), the request is cancelled so its row leaves the
batch at the next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from storage.catalog.domain import AdapterVersion
from workers.serving.engine import GenRequest, GenResult, ServingEngine


async def stream(
    engine: ServingEngine, request: GenRequest, version: AdapterVersion | None = None
) -> AsyncIterator[dict[str, Any]]:
    """Submit ``request`` to ``engine``; yield its deltas as they come, then its result."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def on_delta(text: str) -> None:
        loop.call_soon_threadsafe(items.put_nowait, {"delta": text})

    def on_done(result: GenResult) -> None:
        loop.call_soon_threadsafe(items.put_nowait, {"result": dataclasses.asdict(result)})

    # submitting may read a host adapter from disk: not on the event loop
    ticket = await asyncio.to_thread(engine.submit, request, on_done, on_delta, version=version)
    if ticket is None:  # refused at once: on_done has put the result in the queue
        result = (await items.get())["result"]
        yield {"error": result["error"], "kind": result["kind"]}
        return
    yield {"ready": True}
    finished = False
    try:
        while True:
            item = await items.get()
            yield item
            if "result" in item:
                finished = True
                return
    finally:
        if not finished and ticket is not None:
            engine.cancel(ticket)
