"""The cross-adapter batcher: concurrent requests share a batch; deltas then a result each."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from workers.serving.batcher import MixedBatcher


def _run(reqs: Sequence[str], on_step) -> list[dict]:  # type: ignore[no-untyped-def]
    for step in range(2):
        on_step([f"{r}{step}" for r in reqs])
    return [{"text": f"{r}01", "thread": threading.current_thread().name} for r in reqs]


async def _collect(batcher: MixedBatcher[str], req: str) -> list[dict]:
    return [item async for item in batcher.submit(req)]


def test_concurrent_requests_share_one_batch_and_stream_in_order() -> None:
    batcher: MixedBatcher[str] = MixedBatcher(_run, max_batch_size=8, wait_s=0.05)

    async def main() -> list[list[dict]]:
        return await asyncio.gather(*[_collect(batcher, f"adapter{i}:") for i in range(5)])

    outs = asyncio.run(main())
    assert batcher.batches == [5]
    for i, items in enumerate(outs):
        assert [x.get("delta") for x in items[:2]] == [f"adapter{i}:0", f"adapter{i}:1"]
        assert items[2]["result"]["text"] == f"adapter{i}:01"
        assert items[2]["result"]["thread"] != threading.main_thread().name  # decoded off-loop


def test_batches_never_exceed_the_maximum() -> None:
    batcher: MixedBatcher[str] = MixedBatcher(_run, max_batch_size=3, wait_s=0.05)

    async def main() -> None:
        await asyncio.gather(*[_collect(batcher, str(i)) for i in range(7)])

    asyncio.run(main())
    assert sum(batcher.batches) == 7 and max(batcher.batches) <= 3


def test_a_failing_batch_reports_to_every_caller() -> None:
    def broken(reqs, on_step):  # type: ignore[no-untyped-def]
        raise RuntimeError("decoder exploded")

    batcher: MixedBatcher[str] = MixedBatcher(broken, wait_s=0.01)

    async def main() -> list[list[dict]]:
        return await asyncio.gather(_collect(batcher, "a"), _collect(batcher, "b"))

    for items in asyncio.run(main()):
        assert items == [{"error": "RuntimeError: decoder exploded", "kind": "internal"}]


def test_bad_size_is_refused() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        MixedBatcher(_run, max_batch_size=0)


def test_a_request_that_breaks_its_batch_fails_alone() -> None:
    """The poisoned request breaks any batch it is in; its batch-mates get their solo answer,
    and text already streamed to them is not sent twice."""
    runs: list[list[str]] = []

    def run(reqs, on_step):  # type: ignore[no-untyped-def]
        runs.append(list(reqs))
        on_step([f"{r}-a" for r in reqs])  # one step streams before the failure
        if "poison" in reqs:
            raise RuntimeError("bad row")
        on_step([f"{r}-b" for r in reqs])
        return [{"text": f"{r}-a{r}-b"} for r in reqs]

    batcher: MixedBatcher[str] = MixedBatcher(run, max_batch_size=8, wait_s=0.05)

    async def main() -> list[list[dict]]:
        return await asyncio.gather(*[_collect(batcher, r) for r in ("x", "poison", "y")])

    x, poison, y = asyncio.run(main())
    assert runs[0] == ["x", "poison", "y"] and sorted(map(tuple, runs[1:])) == [
        ("poison",), ("x",), ("y",)]  # fmt: skip
    for name, items in (("x", x), ("y", y)):
        deltas = "".join(i["delta"] for i in items if "delta" in i)
        assert deltas == f"{name}-a{name}-b"  # streamed once each, in order
        assert items[-1] == {"result": {"text": f"{name}-a{name}-b"}}
    assert poison[-1] == {"error": "RuntimeError: bad row", "kind": "internal"}
