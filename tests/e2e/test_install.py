"""lorafleet installed as users install it: a wheel built from the repo, in a fresh virtualenv,
run from a directory outside the checkout.

The wheel's own files must be enough: the demo data (``workers/assets``), the catalog's
migrations, the ``lorafleet`` command and a ``postgres`` extra. Third-party dependencies are
borrowed from the test environment (a path line, not a resolver run: CI has no index to
resolve against reliably), so what is checked is the wheel, not pip's resolver; the installed
wheel's own requirements (with the ``postgres`` extra) are checked against that borrowed set.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from infra.servers import fresh_database, postgres_server, require_postgres

REPO = Path(__file__).resolve().parents[2]
CHECK_REQUIREMENTS = """
from importlib.metadata import requires, version
from packaging.requirements import Requirement
for text in requires("lorafleet"):
    req = Requirement(text)
    if req.marker is None or req.marker.evaluate({"extra": "postgres"}):
        assert req.specifier.contains(version(req.name), prereleases=True), text
"""


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                       check=False)  # fmt: skip
    assert r.returncode == 0, f"{cmd}: {r.stdout[-3000:]}{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the sources (the checkout stays as it was)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "*.egg-info", "__pycache__", ".*_cache"))  # fmt: skip
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "-w", str(root / "dist"), str(src)], root, dict(os.environ))  # fmt: skip
    (built,) = (root / "dist").glob("lorafleet-*.whl")
    return built


def test_the_wheel_carries_its_data_migrations_and_a_postgres_extra(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
        entry = next(zf.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    for asset in ("corpus.txt", "demo_train.jsonl", "demo_heldout.jsonl"):
        assert f"workers/assets/{asset}" in names
    migrations = {p.name for p in (REPO / "storage/catalog/migrations/versions").glob("*.py")}
    assert {n.rsplit("/", 1)[-1] for n in names if "/migrations/versions/" in n} == migrations
    assert "storage/catalog/migrations/script.py.mako" in names
    assert "Provides-Extra: postgres" in meta and 'extra == "postgres"' in meta
    assert "lorafleet = orchestrator.cli:main" in entry
    assert not any(n.startswith(("tests/", "bench/", "infra/")) for n in names)


def test_installed_wheel_creates_a_base_migrates_postgres_and_trains(
    wheel: Path, tmp_path: Path
) -> None:
    with postgres_server() as pg:
        if pg is None:
            if require_postgres():
                pytest.fail("LORAFLEET_REQUIRE_POSTGRES is set but no PostgreSQL is reachable")
            pytest.skip("no PostgreSQL server")
        with fresh_database(pg) as catalog_url:
            _install_and_run(wheel, tmp_path, catalog_url)


def _install_and_run(wheel: Path, tmp_path: Path, catalog_url: str) -> None:
    venv, work = tmp_path / "venv", tmp_path / "work"
    work.mkdir()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py, lorafleet = venv / "bin/python", venv / "bin/lorafleet"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                     work, {}).strip())  # fmt: skip
    # dependencies from the test environment: a plain path entry (its .pth files, such as the
    # checkout's editable install, are not processed, so the checkout is not importable)
    (site / "zz_borrowed_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path / "home"),
           "LORAFLEET_HOME": str(tmp_path / "lfhome"), "LORAFLEET_CATALOG_URL": catalog_url,
           "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], work, env)
    # every requirement of the wheel (and of its postgres extra) is met by what it imports
    _run([str(py), "-c", CHECK_REQUIREMENTS], work, env)
    code = "import orchestrator, workers.demo_task as d; print(orchestrator.__file__, d.TRAIN_FILE)"
    where = _run([str(py), "-c", code], work, env).split()
    assert all(p.startswith(str(site)) for p in where), where  # the installed copy, not REPO

    _run([str(lorafleet), "base", "create-tiny", str(work / "tiny")], work, env)
    assert (work / "tiny" / "model.safetensors").is_file()
    out = _run([str(lorafleet), "db", "upgrade"], work, env)
    head = max(
        p.stem.split("_")[0] for p in (REPO / "storage/catalog/migrations/versions").glob("0*.py")
    )
    assert f"empty → {head}" in out, out  # every migration shipped and applied
    # the catalog and the object store through the installed CLI, then a short training run
    # in this process (the Ray path is the other e2e tests'; here it would only add start-up)
    out = _run([str(lorafleet), "files", "upload", where[1], "--namespace", "demo"], work, env)
    assert "file-" in out, out
    out = _run([str(lorafleet), "train", "--base", str(work / "tiny"), "--data", where[1],
                "--out", str(work / "adapter"), "--max-steps", "4", "--batch-size", "4",
                "--seq-len", "32"], work, env, timeout=600)  # fmt: skip
    assert (work / "adapter" / "adapter_model.safetensors").is_file(), out[-2000:]
    assert (work / "adapter" / "metrics.json").is_file()
