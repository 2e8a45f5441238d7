"""The REST API under load on PostgreSQL with 100 and with 100,000 jobs, page latency at both
sizes in paired rounds, and fuzzing counts (parts 3 and 4 of ``bench/control_plane.py``)."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench.common import median

CLIENTS = 64
NAMESPACES = 20
ADMIN = "bench-admin-token"
MIX = (("list", 0.5), ("submit", 0.2), ("stream", 0.2), ("show", 0.1))


def seed(home: Path, url: str, jobs_n: int, base_dir: Path) -> dict[str, Any]:
    """``jobs_n`` jobs over 20 namespaces (bulk insert), 200 of them finished with events, a
    registered base and an uploaded dataset per namespace (what a submit names); returns the
    namespaces' tokens, files and finished jobs."""
    from sqlalchemy import insert

    from orchestrator.uploads import upload_dataset
    from storage.catalog import repository as repo
    from storage.catalog.db import Catalog
    from storage.catalog.models import JobEventRow, JobRow, NamespaceRow, utcnow
    from storage.registry import Registry
    from storage.settings import load_settings
    from workers.demo_task import TRAIN_FILE

    Catalog(url).upgrade()
    registry = Registry.from_settings(load_settings({"LORAFLEET_HOME": str(home),
                                                     "LORAFLEET_CATALOG_URL": url}))  # fmt: skip
    registry.register_base(name="tiny", path=base_dir)
    catalog = registry.catalog
    tokens = {f"ns{i}": repo.create_token(catalog, namespace=f"ns{i}", name="bench")
              for i in range(NAMESPACES)}  # fmt: skip
    files = {ns: upload_dataset(registry, TRAIN_FILE, namespace=ns, filename="train.jsonl",
                                max_bytes=1 << 30)[0].id for ns in tokens}  # fmt: skip
    with catalog.session() as s:
        ns_ids = {n.name: n.id for n in s.query(NamespaceRow)}
    start = utcnow() - timedelta(days=30)
    finished: dict[str, list[str]] = {ns: [] for ns in tokens}
    spec = {"name": "seeded", "base_model": "tiny", "training_data": "file-x",
            "output_adapter": "x/y", "training": {"max_steps": 10}}  # fmt: skip
    batch: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []

    def flush() -> None:
        with catalog.session() as s:
            if batch:
                s.execute(insert(JobRow), batch)
            if events:
                s.execute(insert(JobEventRow), events)
        batch.clear()
        events.clear()

    for i in range(jobs_n):
        ns = f"ns{i % NAMESPACES}"
        done = (i // NAMESPACES) % max(1, jobs_n // 200) == 0  # ~200, spread over namespaces
        job_id = f"ftjob-{uuid.UUID(int=random.getrandbits(128)).hex[:24]}"
        at = start + timedelta(milliseconds=10 * i)  # distinct times, oldest first
        batch.append({"id": job_id, "namespace_id": ns_ids[ns], "name": f"seed{i}", "spec": spec,
                      "state": "succeeded" if done else "queued", "priority": 0, "attempts": 0,
                      "max_failures": 0, "created_at": at, "updated_at": at})  # fmt: skip
        if done:
            finished[ns].append(job_id)
            events += [{"job_id": job_id, "ts": at, "kind": "metrics",
                        "data": {"step": k, "loss": 1.0 / (k + 1)}} for k in range(5)]  # fmt: skip
        if len(batch) >= 10_000:
            flush()
    flush()
    catalog.dispose()
    return {"tokens": tokens, "finished": finished, "files": files}


@contextmanager
def api_server(home: Path, url: str) -> Iterator[str]:
    """``lorafleet server`` in its own process over ``url``; yields its base URL."""
    import httpx

    from infra.servers import free_port, wait_until

    port = free_port()
    env = {**os.environ, "LORAFLEET_HOME": str(home), "LORAFLEET_CATALOG_URL": url,
           "LORAFLEET_API_TOKEN": ADMIN}  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "server", "--port",
                             str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{base}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return proc.poll() is not None

    try:
        wait_until(up, timeout_s=60, what="the API server")
        if proc.poll() is not None:
            raise RuntimeError(proc.communicate()[1].decode()[-2000:])
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def _load(base: str, world: dict[str, Any], seconds: float, seed: int) -> list[tuple]:
    """64 clients for ``seconds``: (op, latency s, status) per request."""
    import httpx

    rng = random.Random(seed)
    names, weights = zip(*MIX, strict=True)
    out: list[tuple[str, float, int | str]] = []
    end = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)

    async def client(i: int, http: httpx.AsyncClient) -> None:
        ns = f"ns{i % NAMESPACES}"
        hdr = {"Authorization": f"Bearer {world['tokens'][ns]}"}
        finished = world["finished"][ns]
        n = 0
        while time.perf_counter() < end:
            op = rng.choices(names, weights)[0]
            t0 = time.perf_counter()
            try:
                if op == "list":
                    r = await http.get("/v1/fine_tuning/jobs", params={"limit": 20}, headers=hdr)
                elif op == "submit":
                    n += 1
                    body = {"name": f"load{i}-{n}", "namespace": ns, "base_model": "tiny",
                            "training_data": world["files"][ns],
                            "output_adapter": f"{ns}/load"}  # fmt: skip
                    r = await http.post("/v1/fine_tuning/jobs", json=body, headers=hdr)
                elif op == "stream" and finished:
                    job = rng.choice(finished)
                    url = f"/v1/fine_tuning/jobs/{job}/events"
                    params = {"stream": "true"}
                    async with http.stream("GET", url, params=params, headers=hdr) as r:
                        async for _ in r.aiter_lines():
                            pass
                else:
                    job = rng.choice(finished) if finished else "ftjob-none"
                    r = await http.get(f"/v1/fine_tuning/jobs/{job}", headers=hdr)
                status: int | str = r.status_code
            except httpx.HTTPError as exc:  # counted as an error, named
                status = type(exc).__name__
            out.append((op, time.perf_counter() - t0, status))

    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as http:
        await asyncio.gather(*(client(i, http) for i in range(CLIENTS)))
    return out


def _summary(samples: list[tuple], seconds: float) -> dict[str, Any]:
    def pct(xs: list[float], q: float) -> float:
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else 0.0

    ok = (200, 201)
    per_op = {}
    for op, _ in MIX:
        lat = [t for o, t, _ in samples if o == op]
        per_op[op] = {"requests": len(lat), "p50_ms": pct(lat, 0.5) * 1e3,
                      "p99_ms": pct(lat, 0.99) * 1e3}  # fmt: skip
    lat = [t for _, t, _ in samples]
    return {"requests": len(samples), "requests_per_s": len(samples) / seconds,
            "p50_ms": pct(lat, 0.5) * 1e3, "p99_ms": pct(lat, 0.99) * 1e3,
            "errors": sum(s not in ok for *_, s in samples), "by_op": per_op,
            "error_statuses": dict(Counter(f"{o} {s}" for o, _, s in samples
                                           if s not in ok))}  # fmt: skip


def _drop_load_jobs(url: str) -> None:
    """Remove the jobs the load submitted, so each segment starts at its size."""
    from sqlalchemy import delete

    from storage.catalog.db import Catalog
    from storage.catalog.models import JobRow

    catalog = Catalog(url)
    with catalog.session() as s:
        s.execute(delete(JobRow).where(JobRow.name.like("load%")))
    catalog.dispose()


def _page_latency(bases: dict[str, str], worlds: dict[str, Any], rounds: int) -> dict[str, Any]:
    """Pages of equal length at both sizes, interleaved: the admin's list of every job (20
    rows) and a namespace's own (3 rows: the 100-job catalog has 5 per namespace, so 3 are
    left behind its halfway cursor), each first and behind a cursor halfway down."""
    import httpx

    views = {"all": (ADMIN, 20), "namespace": (None, 3)}

    def token(world: dict[str, Any], view: str) -> str:
        return views[view][0] or world["tokens"]["ns0"]

    def cursor(base: str, world: dict[str, Any], view: str, size: int) -> str:
        hdr = {"Authorization": f"Bearer {token(world, view)}"}
        target = max(1, (size if view == "all" else size // NAMESPACES) // 2)
        after, seen = None, 0
        with httpx.Client(base_url=base, timeout=60, headers=hdr) as http:
            while seen < target:
                params: dict[str, Any] = {"limit": min(100, target - seen)}
                if after:
                    params["after"] = after
                page = http.get("/v1/fine_tuning/jobs", params=params).json()
                seen += len(page["data"])
                after = page["last_id"]
        return str(after)

    def timed(base: str, world: dict[str, Any], view: str, after: str | None) -> float:
        hdr = {"Authorization": f"Bearer {token(world, view)}"}
        limit = views[view][1]
        params: dict[str, Any] = {"limit": limit, **({"after": after} if after else {})}
        times = []
        with httpx.Client(base_url=base, timeout=30, headers=hdr) as http:
            for _ in range(40):
                t0 = time.perf_counter()
                r = http.get("/v1/fine_tuning/jobs", params=params)
                times.append(time.perf_counter() - t0)
                assert r.status_code == 200 and len(r.json()["data"]) == limit, r.text
        return median(times)

    small, big = sorted(bases, key=int)
    out: dict[str, Any] = {}
    for view in views:
        cursors = {n: cursor(bases[n], worlds[n], view, int(n)) for n in (small, big)}
        for deep in (False, True):
            ratios, a_ms, b_ms = [], [], []
            for _ in range(rounds):  # A B A B …
                a = timed(bases[small], worlds[small], view, cursors[small] if deep else None)
                b = timed(bases[big], worlds[big], view, cursors[big] if deep else None)
                ratios.append(b / a)
                a_ms.append(a * 1e3)
                b_ms.append(b * 1e3)
            out[f"{view}_{'deep' if deep else 'first'}_page"] = {
                f"ms_at_{small}": median(a_ms), f"ms_at_{big}": median(b_ms),
                "rows": views[view][1], "ratio_median": median(ratios),
                "ratio_min": min(ratios), "ratio_max": max(ratios), "rounds": rounds,
            }  # fmt: skip
    return out


def bench_api(work: Path, *, seconds: float = 60.0, sizes: tuple[int, ...] = (100, 100_000),
              segments: int = 4, rounds: int = 7) -> dict[str, Any]:  # fmt: skip
    """Part 3: load at each catalog size (alternating segments), then page latency."""
    from infra.servers import fresh_database, postgres_server
    from workers.tiny_base import create_tiny_base

    random.seed(0)
    base_dir = create_tiny_base(work / "tiny")
    with ExitStack() as stack:
        pg = stack.enter_context(postgres_server())
        if pg is None:
            raise RuntimeError("no PostgreSQL server")
        urls, worlds, bases = {}, {}, {}
        for n in sizes:
            urls[str(n)] = stack.enter_context(fresh_database(pg))
            t0 = time.perf_counter()
            worlds[str(n)] = seed(work / f"home-{n}", urls[str(n)], n, base_dir)
            print(f"seeded {n:,} jobs in {time.perf_counter() - t0:.1f} s", flush=True)
            bases[str(n)] = stack.enter_context(api_server(work / f"home-{n}", urls[str(n)]))
        samples: dict[str, list[tuple]] = {str(n): [] for n in sizes}
        per = seconds / segments
        for k in range(segments):  # A B A B …: the machine's noise falls on both
            for n in sizes:
                samples[str(n)] += asyncio.run(_load(bases[str(n)], worlds[str(n)], per, k))
                _drop_load_jobs(urls[str(n)])
        out: dict[str, Any] = {"clients": CLIENTS, "seconds": seconds, "segments": segments,
                               "mix": dict(MIX), "database": "postgresql"}  # fmt: skip
        for n in sizes:
            out[f"jobs_{n}"] = s = _summary(samples[str(n)], seconds)
            print(f"{n:>7,} jobs: {s['requests_per_s']:.0f} req/s, p50 {s['p50_ms']:.0f} ms, "
                  f"p99 {s['p99_ms']:.0f} ms, errors {s['errors']}", flush=True)  # fmt: skip
        out["page_latency"] = pl = _page_latency(bases, worlds, rounds)
        for kind, v in pl.items():
            print(f"{kind}: {v['ratio_median']:.2f}× ({v['ratio_min']:.2f}–{v['ratio_max']:.2f}) "
                  f"at {sizes[-1]:,} vs {sizes[0]:,} jobs", flush=True)  # fmt: skip
        return out


def bench_fuzz(work: Path, examples: int = 25) -> dict[str, Any]:
    """Part 4: the REST API fuzzed in process, every response counted (5xx must be 0)."""
    import schemathesis

    from orchestrator.api import create_app
    from storage.registry import Registry
    from storage.settings import load_settings
    from tests.integration.fuzzing import fuzz
    from workers.tiny_base import create_tiny_base

    s = load_settings({"LORAFLEET_HOME": str(work / "fuzz-home"), "LORAFLEET_API_TOKEN": ADMIN})
    registry = Registry.from_settings(s)
    registry.register_base(name="tiny", path=create_tiny_base(work / "fuzz-base"))
    app = create_app(s, registry)
    statuses: list[int] = []

    def count(ctx: Any, response: Any, case: Any) -> None:
        statuses.append(response.status_code)
        return None

    auth = {"Authorization": f"Bearer {ADMIN}"}
    schema = schemathesis.openapi.from_asgi("/v1/openapi.json", app, headers=auth)
    ran = fuzz(schema, [count], headers=auth, examples=examples,
               skip=lambda m, p: p.endswith("/events"))  # fmt: skip
    out = {"operations_x_modes": len(ran), "requests": len(statuses),
           "status_5xx": sum(c >= 500 for c in statuses),
           "status_4xx": sum(400 <= c < 500 for c in statuses),
           "status_2xx": sum(200 <= c < 300 for c in statuses)}  # fmt: skip
    print(f"fuzzed {out['requests']:,} requests over {len(ran)} operation×modes: "
          f"{out['status_5xx']} 5xx", flush=True)  # fmt: skip
    return out
