"""How long the CLI takes to answer: ``lorafleet --help`` and list commands on an empty local
catalog, in paired rounds (``ROUNDS``) with two baselines: a bare ``python -c pass``, and
importing the libraries any catalog-reading command needs (SQLAlchemy's ORM, typer, rich,
pydantic). The
ratio of a list command to the second says how much of its time is lorafleet's own, whatever
the machine's speed that day.

    python bench/cli_startup.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import environment, median, write_result

ROUNDS = 7
LIBRARIES = "import sqlalchemy.orm, typer, rich.table, pydantic"  # typer 0.29 parses with pydantic
COMMANDS = {"help": ["--help"], "adapters_list": ["adapters", "list"],
            "jobs_list": ["jobs", "list"], "files_list": ["files", "list"]}  # fmt: skip


def _timed(args: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(args, env=env, capture_output=True, check=True, timeout=120)
    return time.perf_counter() - t0


def main() -> None:
    home = Path(tempfile.mkdtemp(prefix="lorafleet-cli-"))
    env = {**os.environ, "LORAFLEET_HOME": str(home)}
    # PYTHONDONTWRITEBYTECODE (set on some CI and sandbox images) would make every start compile
    # lorafleet's own modules anew; an installed CLI keeps its bytecode, so the bench does too
    for k in ("LORAFLEET_CATALOG_URL", "LORAFLEET_OBJECT_STORE", "LORAFLEET_CONFIG",
              "PYTHONDONTWRITEBYTECODE"):  # fmt: skip
        env.pop(k, None)
    cli = [sys.executable, "-m", "orchestrator.cli"]
    subprocess.run([*cli, "db", "upgrade"], env=env, capture_output=True, check=True)
    times: dict[str, list[float]] = {"python": [], "libraries": [], **{k: [] for k in COMMANDS}}
    for _ in range(ROUNDS + 1):
        row = {"python": _timed([sys.executable, "-c", "pass"], env),
               "libraries": _timed([sys.executable, "-c", LIBRARIES], env)}  # fmt: skip
        row.update({k: _timed([*cli, *a], env) for k, a in COMMANDS.items()})
        for k, v in row.items():
            times[k].append(v)
    out: dict[str, Any] = {"rounds": ROUNDS, "seconds": {}, "over_libraries": {}}
    for k, v in times.items():
        v = v[1:]  # the first round warms the file cache
        out["seconds"][k] = {"median": median(v), "min": min(v), "max": max(v)}
    for k in COMMANDS:
        r = [a / b for a, b in zip(times[k][1:], times["libraries"][1:], strict=True)]
        out["over_libraries"][k] = {"median": median(r), "min": min(r), "max": max(r)}
    out["environment"] = environment(threads=1)
    for k in COMMANDS:
        s = out["seconds"][k]
        r = out["over_libraries"][k]
        print(
            f"lorafleet {' '.join(COMMANDS[k])}: {s['median']:.2f} s ({s['min']:.2f}–"
            f"{s['max']:.2f}), {r['median']:.2f}× ({r['min']:.2f}–{r['max']:.2f}) the libraries'"
            f" import; python -c pass {out['seconds']['python']['median']:.2f} s, libraries "
            f"{out['seconds']['libraries']['median']:.2f} s"
        )
    print(f"wrote {write_result('cli_startup', out)}")


if __name__ == "__main__":
    main()
