"""The main job end to end: submit → train on Ray → publish → serve → query, on one command.

``make quickstart`` runs this module on embedded defaults (a local Ray, SQLite and a local
object store under ``LORAFLEET_HOME``); with ``LORAFLEET_RAY_ADDRESS``,
``LORAFLEET_CATALOG_URL`` and ``LORAFLEET_OBJECT_STORE`` set it runs the same flow on a real
cluster, PostgreSQL and S3 (``make demo-cluster``). Stages:

1. create the tiny base (reused when present) and register it: its files go to the object
   store, which is all the cluster's nodes share with this machine (with the catalog);
2. upload the train/held-out data as files (``file-…``), submit a fine-tune job (2 workers)
   naming them, and follow it live;
3. the job publishes the adapter to the catalog (digests, lineage);
4. start the Ray Serve app and ask the held-out prompts of the base and of the adapter
   through the OpenAI-compatible endpoint;
5. print answers, exact-match scores and the adapter's lineage, check the served answers
   against local generation, and shut everything down.

The browser console (``lorafleet server``'s page) runs alongside from the start: its URL and a
sign-in token are printed first, so the job's curve can be watched as it trains. In a
terminal it stays up at the end until Enter is pressed.

Set-up is idempotent, so running it twice works (the second run publishes version 2).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from storage.registry import Registry
    from storage.settings import Settings

console = Console()
BASE_NAME = "tiny"


@dataclass
class QuickstartResult:
    """What the quickstart measured (also written to ``<home>/quickstart/result.json``)."""

    job_id: str
    job_state: str
    adapter: str | None
    prompts: list[str]
    expected: list[str]
    base_answers: list[str]
    adapter_answers: list[str]
    local_answers: list[str]
    base_exact_match: float
    adapter_exact_match: float
    served_equals_local: bool
    url: str | None
    console_url: str | None = None
    console_ok: bool = False  # the page loaded, and the job was readable through its API


def _ensure_tiny_base(base_dir: Path) -> bool:
    """Create the tiny base unless an identical one is already there; True if created."""
    from workers.tiny_base import create_tiny_base

    marker = base_dir / "lorafleet-tiny.json"
    if marker.is_file() and (base_dir / "model.safetensors").is_file():
        return False
    create_tiny_base(base_dir)
    marker.write_text(json.dumps({"spec": "default"}) + "\n")
    return True


def _port(preferred: int) -> int:
    """``preferred`` if it is free, else any free port (0 asks for any)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_console(settings: Settings, registry: Registry, port: int) -> tuple[str, Any]:
    """The REST API and console (``lorafleet server``'s app) in a thread; (url, server)."""
    import threading

    import uvicorn

    from orchestrator.api import create_app

    app = create_app(settings, registry)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, name="console", daemon=True).start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


def _console_answers(url: str, token: str, job_id: str) -> bool:
    """The console's page loads and the job is readable with the printed token."""
    try:
        with urllib.request.urlopen(f"{url}/", timeout=10) as page:
            ok = b"console/app.js" in page.read()
        req = urllib.request.Request(f"{url}/v1/fine_tuning/jobs/{job_id}",
                                     headers={"Authorization": f"Bearer {token}"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=10) as resp:
            return ok and json.loads(resp.read())["id"] == job_id
    except (OSError, ValueError, KeyError):
        return False


def _ask(url: str, token: str, model: str, prompt: str) -> str:
    """One greedy completion through the OpenAI-compatible endpoint (plain HTTP)."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0})
    req = urllib.request.Request(
        f"{url}/v1/completions", data=body.encode(), method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{model}: HTTP {exc.code}: {exc.read().decode()[:300]}") from None
    return str(answer["choices"][0]["text"])


def run_quickstart(
    *, max_steps: int = 300, nodes: int = 1, workers_per_node: int = 2, port: int = 8000
) -> QuickstartResult:
    """Run every stage; returns the measurements (the caller decides what is a failure)."""
    import ray

    from orchestrator.cli.jobs import follow
    from orchestrator.scheduler import (
        SchedulerCore,
        SchedulerLoop,
        ray_hooks,
        start_scheduler_actor,
    )
    from orchestrator.service import submit_job
    from orchestrator.spec import JobSpec
    from orchestrator.uploads import upload_dataset
    from storage.catalog import jobs
    from storage.catalog import repository as repo
    from storage.registry import Registry
    from storage.settings import load_settings, settings_for_nodes
    from workers.base_model import load_base
    from workers.datasets import read_jsonl
    from workers.demo_task import HELDOUT_FILE, TRAIN_FILE, exact_match
    from workers.generate import greedy_generate
    from workers.lora import load_adapter
    from workers.serving import deployments

    settings = load_settings()
    registry = Registry.from_settings(settings)
    embedded = settings.ray_address is None
    root = settings.home / "quickstart"
    base_dir = root / "tiny-base"
    root.mkdir(parents=True, exist_ok=True)
    console.print(
        f"catalog {settings.catalog_url.split('@')[-1]} · objects {settings.object_store} · "
        f"Ray {settings.ray_address or 'local (embedded)'}",
        highlight=False,
    )

    console.rule("[bold]1. base model")
    created = _ensure_tiny_base(base_dir)
    base = registry.register_base(name=BASE_NAME, path=base_dir)
    console.print(f"{'created' if created else 'reusing'} tiny Llama base at {base_dir}; "
                  f"registered as {base.name} ({base.fingerprint[:12]}, "
                  f"{len(base.files)} files in the object store)")  # fmt: skip

    heldout = read_jsonl(HELDOUT_FILE)
    prompts = [r["prompt"] for r in heldout]
    expected = [r["completion"] for r in heldout]
    uploaded = {}
    for path in (TRAIN_FILE, HELDOUT_FILE):
        record, _ = upload_dataset(registry, path, namespace="demo", filename=path.name,
                                   max_bytes=settings.max_upload_bytes)  # fmt: skip
        uploaded[path] = record.id
        console.print(f"{path.name}: {record.id} ({record.rows} rows, sha256 "
                      f"{record.sha256[:12]})")  # fmt: skip
    spec = JobSpec.model_validate({
        "name": "digits-quickstart", "namespace": "demo", "base_model": BASE_NAME,
        "training_data": uploaded[TRAIN_FILE], "validation_data": uploaded[HELDOUT_FILE],
        "output_adapter": "demo/digits",
        "lora": {"r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]},
        "training": {"max_steps": max_steps, "lr": 3e-3, "batch_size": 16 // workers_per_node
                     // nodes or 1, "seq_len": 64, "eval_every": 50, "checkpoint_every": 100},
        "resources": {"nodes": nodes, "workers_per_node": workers_per_node},
        "max_failures": 1, "tags": ["quickstart"],
    })  # fmt: skip

    result = QuickstartResult("", "", None, prompts, expected, [], [], [], 0.0, 0.0, False, None)
    loop = None
    served = False
    console_token = repo.create_token(registry.catalog, namespace="demo", scope="admin",
                                      name=f"console-{int(time.time())}",
                                      expires_in_s=86400.0)  # fmt: skip
    token_file = root / "console-token"  # a secret: in a private file, never on the screen
    token_file.touch(mode=0o600)
    token_file.write_text(console_token + "\n")
    result.console_url, console_server = _start_console(
        settings, registry, _port(port + 1 if port else 0)
    )
    console.print(f"console: [bold]{result.console_url}/[/] — sign in with the token in "
                  f"{token_file} (demo namespace, valid 24 h)", highlight=False)  # fmt: skip
    console.rule(f"[bold]2. fine-tune on Ray ({spec.resources.workers} workers)")
    with console.status(f"starting Ray ({settings.ray_address or 'local'})…"):
        ray.init(address=settings.ray_address or "local", include_dashboard=False,
                 logging_level=logging.ERROR, log_to_driver=False)  # fmt: skip
    try:
        if embedded:
            loop = SchedulerLoop(SchedulerCore(registry.catalog, ray_hooks(settings)), 0.5)
            loop.start()
        else:
            start_scheduler_actor(settings)
        job = submit_job(registry.catalog, spec).job
        result.job_id = job.id
        console.print(f"submitted {job.id} (demo/digits-quickstart)")
        result.job_state = follow(registry.catalog, job.id, total=max_steps)
        if loop is not None:
            loop.stop()
            loop = None
        if result.job_state != "succeeded":
            failed = jobs.get_job(registry.catalog, job_id=job.id)
            console.print(f"[bold red]job {result.job_state}[/]: {failed.error or '-'}")
            return result
        adapter_events = jobs.iter_events(registry.catalog, job_id=job.id, kinds=["adapter"])
        ref = str(next(adapter_events).data["ref"])
        result.adapter = ref

        console.rule("[bold]3. published to the catalog")
        version = registry.resolve(ref)
        for f in version.files:
            console.print(f"  {f.name:28s} {f.size:>9,d} B  sha256 {f.sha256[:16]}…")

        console.rule("[bold]4. serve with Ray Serve, ask through the OpenAI API")
        opts = deployments.ServeOptions(
            base_name=BASE_NAME, settings_json=settings_for_nodes(settings),
            slots=4, max_rank=64, num_cpus=1.0,
        )  # fmt: skip
        with console.status("deploying the serving app…"):
            url = deployments.start(opts, port=_port(port), quiet=True)
            served = True
        result.url = url
        token = repo.create_token(registry.catalog, namespace="demo",
                                  name=f"quickstart-{int(time.time())}")  # fmt: skip
        console.print(f"serving at {url}/v1 — asking {len(prompts)} held-out prompts of "
                      f"{BASE_NAME} and of {ref} (one batched pass per step)")  # fmt: skip
        with ThreadPoolExecutor(32) as pool:
            base_f = [pool.submit(_ask, url, token, BASE_NAME, p) for p in prompts]
            adapter_f = [pool.submit(_ask, url, token, ref, p) for p in prompts]
            result.base_answers = [f.result() for f in base_f]
            result.adapter_answers = [f.result() for f in adapter_f]
        result.console_ok = _console_answers(result.console_url, console_token, result.job_id)
    finally:
        if served:
            with console.status("stopping the serving app…"):
                deployments.stop()
        if loop is not None:
            loop.stop()
        ray.shutdown()
        if sys.stdin.isatty() and not os.environ.get("CI"):
            console.print(f"the console stays up at {result.console_url}/ — press Enter to stop")
            with contextlib.suppress(EOFError):
                input()
        console_server.should_exit = True

    console.rule("[bold]5. results")
    result.base_exact_match = exact_match(result.base_answers, expected)
    result.adapter_exact_match = exact_match(result.adapter_answers, expected)
    table = Table("prompt", "base", "adapter", "expected")
    rows = zip(prompts, result.base_answers, result.adapter_answers, expected, strict=True)
    for p, b, a, e in list(rows)[:8]:
        table.add_row(p, repr(b.strip())[:24], a.strip(), e.strip())
    console.print(table)
    console.print(f"exact match on {len(expected)} held-out prompts: base "
                  f"[bold]{result.base_exact_match:.0%}[/], adapter "
                  f"[bold]{result.adapter_exact_match:.0%}[/]")  # fmt: skip
    # the served answers must be what the adapter gives locally (our LoRA layer, HF generate)
    _, directory = registry.fetch(result.adapter)
    model, tok = load_base(base_dir)
    load_adapter(model, directory)
    result.local_answers = greedy_generate(model, tok, prompts, max_new_tokens=8)
    result.served_equals_local = result.local_answers == result.adapter_answers
    console.print(f"served answers equal local generation: {result.served_equals_local}")
    v = registry.resolve(result.adapter)
    lineage = Table(title=f"lineage of {v.ref}", show_header=False)
    for k, val in (
        ("job", v.job_id), ("base", f"{v.base_model.name} ({v.base_model.fingerprint[:16]})"),
        ("dataset sha256", (v.dataset_sha256 or "-")[:16]),
        ("lora", f"r={v.r} alpha={v.alpha} targets={v.target_modules}"),
        ("metrics", ", ".join(f"{k2}={val2:.4g}" if isinstance(val2, float) else f"{k2}={val2}"
                              for k2, val2 in sorted(v.metrics.items()) if k2 in
                              ("eval_loss_initial", "eval_loss_final", "world_size", "nodes",
                               "tokens_per_s"))),
    ):  # fmt: skip
        lineage.add_row(k, str(val))
    console.print(lineage)
    (root / "result.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the quickstart; non-zero exit unless the served adapter is clearly better."""
    import argparse

    from transformers.utils import logging as hf_logging

    parser = argparse.ArgumentParser(prog="quickstart", description=__doc__)
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--nodes", type=int, default=1, help="Ray nodes for the job")
    parser.add_argument("--workers-per-node", type=int, default=2, help="workers per node")
    parser.add_argument("--port", type=int, default=8000, help="serving port (if free)")
    args = parser.parse_args(argv)

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # our stages say what happens
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    t0 = time.perf_counter()
    try:
        result = run_quickstart(max_steps=args.steps, nodes=args.nodes,
                                workers_per_node=args.workers_per_node, port=args.port)  # fmt: skip
    except Exception as exc:  # a stage failed: say which, in one line, and where to look
        console.print(f"[bold red]quickstart FAILED[/]: {type(exc).__name__}: {exc}")
        return 1
    ok = (
        result.job_state == "succeeded"
        and result.adapter_exact_match >= result.base_exact_match + 0.5
        and result.served_equals_local
        and result.console_ok
    )
    verdict = "[bold green]quickstart passed" if ok else "[bold red]quickstart FAILED"
    console.print(f"{verdict}[/] in {time.perf_counter() - t0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
