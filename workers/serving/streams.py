"""From the decode loop's thread to an asyncio stream of items, one stream per API request.

The replica's Ray Serve handler yields these items back to the ingress: first
``{"ready": True}`` once the request is queued — or ``{"error": message, "kind": kind}`` if it
was refused at once (a full queue, a prompt too long), so the ingress can still answer with a
status code — then, for a streamed request, ``{"deltas": [(choice, text, logprobs), …]}``, and
finally ``{"results": [GenResult, …]}`` (one per choice, their ``error`` and ``kind`` set when
the request failed). Everything decoded since the last item travels in one item, and a stream
sends at most one item every ``STREAM_INTERVAL_S``: each item is a remote object and an HTTP
chunk, so under load a stream costs one per interval, not one per token (a reader sees text
arrive in pieces a few tokens long, at least every interval). If the
consumer goes away (the client disconnected), the request is cancelled so its rows leave the
batch at the next step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

from storage.catalog.domain import AdapterVersion
from workers.serving.engine import GenRequest, GenResult, ServingEngine
from workers.serving.logprobs import TokenLogprob

STREAM_INTERVAL_S = 0.05


async def stream(
    engine: ServingEngine, requests: Sequence[GenRequest], version: AdapterVersion | None = None,
    *, deltas: bool = True,
) -> AsyncIterator[dict[str, Any]]:  # fmt: skip
    """Submit ``requests`` (one API request's prompts) to ``engine``; yield what is decoded
    (``deltas``: text as it comes, else only the results), then the results."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def on_delta(choice: int, text: str, logprobs: list[TokenLogprob]) -> None:
        loop.call_soon_threadsafe(items.put_nowait, ("delta", (choice, text, logprobs)))

    def on_done(results: list[GenResult]) -> None:
        loop.call_soon_threadsafe(items.put_nowait, ("results", results))

    # submitting may read an adapter into host memory: then not on the event loop
    args = (list(requests), on_done, on_delta if deltas else None)
    # and compiling a grammar it has not seen neither
    if engine.submits_quickly(requests[0].adapter, version) and engine.grammars_ready(requests):
        tickets = engine.submit(*args, version=version)
    else:
        tickets = await asyncio.to_thread(engine.submit, *args, version=version)
    if tickets is None:  # refused at once: on_done has put the result in the queue
        first = (await items.get())[1][0]
        yield {"error": first.error, "kind": first.kind}
        return
    yield {"ready": True}
    finished = False
    last = 0.0
    try:
        while True:
            batch: list[tuple[int, str, list[TokenLogprob]]] = []
            results = None
            kind, value = await items.get()
            wait = STREAM_INTERVAL_S - (loop.time() - last)
            if kind == "delta" and wait > 0:
                await asyncio.sleep(wait)  # more deltas (or the end) arrive meanwhile
            while True:
                if kind == "delta":
                    batch.append(value)
                else:
                    results = value
                if results is not None or items.empty():
                    break
                kind, value = items.get_nowait()
            item: dict[str, Any] = {}
            if batch:
                item["deltas"] = batch
            if results is not None:
                item["results"] = results
            yield item
            last = loop.time()
            if results is not None:
                finished = True
                return
    finally:
        if not finished:
            engine.cancel(tickets)
