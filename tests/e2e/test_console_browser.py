"""The console in a real browser: Debian's Chromium driven by Playwright, against
``lorafleet server`` started as a user starts it.

The test plays the scheduler's part for one job (moves it to running, appends metrics events
while the page watches) so the curve's growth is seen point by point; everything the page
shows comes through the server's routes. Every request the page makes must go to the server
itself: the console must work with no network beyond it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from infra.servers import free_port, wait_until
from storage.catalog import jobs, promotion
from storage.registry import Registry
from storage.settings import load_settings
from workers.base_model import load_base
from workers.lora import LoraConfig, inject_lora, save_adapter

ADMIN = "console-admin-token-0123456789"
DATA = b'{"prompt": "spell 1 =", "completion": " one"}\n' * 4


def _chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        if os.environ.get("LORAFLEET_REQUIRE_BROWSER"):
            pytest.fail("LORAFLEET_REQUIRE_BROWSER is set but Debian's chromium is not installed")
        pytest.skip("no chromium (make install puts Debian's chromium on a Debian machine)")
    return found


@pytest.fixture()
def server(tmp_path: Path, tiny_base_dir: Path):  # type: ignore[no-untyped-def]
    env = {**os.environ, "LORAFLEET_HOME": str(tmp_path / "home"), "LORAFLEET_API_TOKEN": ADMIN}
    for key in ("LORAFLEET_RAY_ADDRESS", "LORAFLEET_CATALOG_URL", "LORAFLEET_OBJECT_STORE"):
        env.pop(key, None)
    registry = Registry.from_settings(load_settings(env))
    registry.register_base(name="tiny", path=tiny_base_dir)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "server", "--port",
                             str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return proc.poll() is not None

    wait_until(up, timeout_s=60, what="lorafleet server")
    assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
    yield url, registry
    proc.terminate()
    proc.wait(timeout=20)


def _api(url: str, method: str, path: str, body: object = None) -> dict:
    import json

    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{url}{path}", data=data, method=method,
                                 headers={"Authorization": f"Bearer {ADMIN}",
                                          "Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=10) as r:
        return dict(json.loads(r.read()))


def _upload(url: str) -> str:
    import httpx

    r = httpx.post(f"{url}/v1/files", headers={"Authorization": f"Bearer {ADMIN}"},
                   data={"purpose": "fine-tune", "namespace": "demo"},
                   files={"file": ("digits.jsonl", DATA, "application/jsonl")})  # fmt: skip
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def test_console_jobs_curves_cancel_lineage_and_gated_promotion(
    server, tiny_base_dir: Path, tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    url, registry = server
    db = registry.catalog
    file_id = _upload(url)
    spec = {"name": "digits", "namespace": "demo", "base_model": "tiny",
            "training_data": file_id, "output_adapter": "demo/digits",
            "training": {"max_steps": 40}}  # fmt: skip
    job = _api(url, "POST", "/v1/fine_tuning/jobs", spec)
    for to in ("starting", "running"):  # the scheduler's part
        jobs.transition_job(db, job_id=job["id"], allowed_from={"queued", "starting"}, to=to)
    stop = threading.Event()

    def train() -> None:  # metrics as rank 0 reports them, one step at a time
        for step in range(1, 41):
            if stop.is_set():
                return
            data = {"step": step, "loss": 3.0 / step, "lr": 1e-3, "tokens_per_s": 100.0,
                    "eval_loss": 3.2 / step if step % 5 == 0 else None,
                    # a DPO member's rewards ride along (TRL's names): their own chart
                    "rewards/accuracies": min(1.0, step / 20),
                    "rewards/margins": step / 10}  # fmt: skip
            jobs.add_event(db, job_id=job["id"], kind="metrics", data=data)
            time.sleep(0.25)

    seen: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("request", lambda r: seen.append(r.url))
        page.on("pageerror", lambda e: seen.append(f"pageerror {e}"))
        try:
            page.goto(f"{url}/")
            page.fill("#token", "wrong-token")
            page.click("button[type=submit]")
            expect(page.get_by_role("alert")).to_contain_text("invalid")
            page.fill("#token", ADMIN)
            page.click("button[type=submit]")
            expect(page.locator(f"tr[data-job='{job['id']}']")).to_contain_text("running")

            # -- a running job's curve gains points as its events arrive --------------------
            trainer = threading.Thread(target=train, daemon=True)
            trainer.start()
            page.click(f"tr[data-job='{job['id']}']")
            chart = page.locator("#loss-chart")
            points = "+document.querySelector('#loss-chart').dataset.points"
            page.wait_for_function(f"() => {points} >= 3")
            first = int(chart.get_attribute("data-points") or 0)
            page.wait_for_function(f"() => {points} >= {first + 4}")  # more came, drawn live
            expect(page.locator("#event-log")).to_contain_text("metrics")
            page.wait_for_function("() => +document.querySelector('#method-chart')"
                                   ".dataset.points >= 3")  # fmt: skip
            expect(page.locator("main .card").first).not_to_contain_text("null")
            if os.environ.get("LORAFLEET_SCREENSHOT"):  # the README's picture of the job page
                page.wait_for_function(f"() => {points} >= 30")
                page.screenshot(path=os.environ["LORAFLEET_SCREENSHOT"], full_page=False)

            # -- cancel from the page -----------------------------------------------------------
            page.click("#cancel")
            expect(page.locator("#job-state")).to_have_text("cancelled")
            assert jobs.get_job(db, job_id=job["id"]).state == "cancelled"
            stop.set()
            trainer.join()

            # -- two versions from the job: one fails the gate, one passes ---------------------
            model, _ = load_base(tiny_base_dir)
            inject_lora(model, LoraConfig(r=4))
            save_adapter(model, LoraConfig(r=4), tmp_path / "ad")
            lineage = {"data": {"training_file": file_id}}
            for loss in (0.8, 0.4):
                registry.publish(adapter_dir=tmp_path / "ad", ref="demo/digits", base_model="tiny",
                                 job_id=job["id"], dataset_sha256="d" * 64,
                                 metrics={"eval_loss": loss}, hyperparameters=lineage)  # fmt: skip
            _api(url, "PUT", "/v1/adapters/demo/digits/gates/production",
                 {"require": ["eval_loss<=0.5"]})  # fmt: skip

            page.click("nav a[data-view=adapters]")
            page.click("a.version >> text=v1")
            svg = page.locator("#lineage")
            expect(svg).to_contain_text("demo/digits:1")
            expect(svg).to_contain_text(job["id"])
            expect(svg).to_contain_text(file_id)
            expect(svg).to_contain_text(registry.base("tiny").fingerprint[:12])
            expect(page.locator("#gate-verdict")).to_contain_text("gate fails")
            expect(page.locator("#gate-verdict")).to_contain_text(
                "eval_loss<=0.5: demo/digits:1 has eval_loss 0.8 > 0.5")  # fmt: skip
            page.click("#promote")
            expect(page.locator("#promote-result")).to_contain_text("0.8 > 0.5")
            assert promotion.gates(db, namespace="demo", name="digits") == {
                "production": ["eval_loss<=0.5"]}  # fmt: skip
            assert "production" not in registry.resolve("demo/digits:1").aliases

            page.select_option("#compare", "2")
            expect(page.locator("#compare-box")).to_contain_text("eval_loss")

            page.goto(f"{url}/#/adapters/demo/digits/2")
            expect(page.locator("#gate-verdict")).to_contain_text("gate passes")
            page.click("#promote")
            expect(page.locator("h1")).to_have_text("demo/digits:2")
            expect(page.get_by_text("aliases: @production")).to_be_visible()
            assert registry.resolve("demo/digits@production").version == 2

            page.click("nav a[data-view=serving]")
            expect(page.locator("h1")).to_have_text("Serving")
        except Exception:
            page.screenshot(path=str(tmp_path / "failed.png"))  # what the page showed
            print("console page at the failure:", tmp_path / "failed.png")
            raise
        finally:
            stop.set()
            browser.close()
    errors = [s for s in seen if s.startswith("pageerror")]
    assert errors == []
    assert seen and all(s.startswith(url) for s in seen), [s for s in seen if not s.startswith(url)]
