"""``lorafleet serve`` as a user runs it: starts, answers, stops cleanly on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from infra.servers import free_port, processes_with_env, wait_until

ADMIN = "serve-cli-admin-token-0123456789"


def _env(home: Path) -> dict[str, str]:
    env = {**os.environ, "LORAFLEET_HOME": str(home), "LORAFLEET_API_TOKEN": ADMIN,
           "COLUMNS": "200"}  # fmt: skip
    env.pop("LORAFLEET_RAY_ADDRESS", None)
    return env


def _get(url: str, token: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
        return dict(json.loads(r.read()))


def test_serve_starts_answers_and_stops_cleanly(tmp_path: Path, tiny_base_dir: Path) -> None:
    home, port = tmp_path / "home", free_port()
    cmd = [sys.executable, "-m", "orchestrator.cli", "serve", "--base", str(tiny_base_dir),
           "--port", str(port), "--slots", "2", "--cpus-per-replica", "0.5"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            try:
                return _get(f"{url}/health")["status"] == "ok"
            except OSError:
                return False

        wait_until(lambda: up() or proc.poll() is not None, timeout_s=180, what="lorafleet serve")
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        models = [m["id"] for m in _get(f"{url}/v1/models", ADMIN)["data"]]
        assert models and models[0].startswith("tiny-")  # the directory, registered on the fly
        body = json.dumps({"model": models[0], "prompt": "spell 1 =", "max_tokens": 4,
                           "temperature": 0}).encode()  # fmt: skip
        req = urllib.request.Request(f"{url}/v1/completions", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {ADMIN}",
                                              "Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=60) as r:
            assert json.loads(r.read())["usage"]["completion_tokens"] >= 1
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped" in out
    assert processes_with_env(f"LORAFLEET_HOME={home}") == []


def test_serve_bad_base_is_one_clear_line(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "serve", "--base", "nope"],
                       env=_env(tmp_path), capture_output=True, text=True, timeout=120,
                       check=False)  # fmt: skip
    assert r.returncode == 1 and "neither a registered base nor a directory" in r.stderr
    assert "Traceback" not in r.stderr


def test_servers_refuse_a_placeholder_or_short_admin_token(tmp_path: Path) -> None:
    """The manifests' placeholder, or any token under 24 characters, is never an admin token:
    both servers refuse to start and say how to make one."""
    for cmd, token in ((["serve", "--base", "nope"], "CHANGE-ME"), (["server"], "short-token")):
        env = {**_env(tmp_path), "LORAFLEET_API_TOKEN": token}
        r = subprocess.run([sys.executable, "-m", "orchestrator.cli", *cmd], env=env,
                           capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
        assert r.returncode == 1, r.stderr[-2000:]
        assert "LORAFLEET_API_TOKEN" in r.stderr and "secrets.token_urlsafe" in r.stderr
        assert "Traceback" not in r.stderr
