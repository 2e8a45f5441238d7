"""The README's benchmark table says what ``bench/results/*.json`` measured."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _get(name: str, *path: str) -> Any:
    value: Any = json.loads((ROOT / "bench" / "results" / f"{name}.json").read_text())
    for key in path:
        value = value[key]
    return value


def _x(v: float, digits: int = 3) -> str:
    return f"{v:.{digits}f}×"


def _train(ratio: str, digits: int = 3) -> str:
    qv, al = (_get("train_throughput", "targets", t, "ratios", ratio) for t in TARGETS)
    return f"{_x(qv, digits)} · {_x(al, digits)}"


def _shared(k: int, key: str) -> float:
    return float(_get("node_memory", "runs", f"K={k} shared_memory", key))


def _submit() -> str:
    ratio = _get("control_plane", "submit_to_first_step", "ratio")
    seconds = _get("control_plane", "submit_to_first_step", "orchestrated_first_step_s")
    return f"{_x(ratio, 2)} ({seconds:.1f} s"


def _admission() -> str:
    per_s = _get("control_plane", "admission", "pure_decisions_per_s")
    return f"{per_s:,.0f}/s · {_get('control_plane', 'admission', 'full_tick_s') * 1000:.0f} ms"


def _resolve() -> str:
    ms = [
        _get("storage", "resolve", e, "alias_resolve_ms_median") for e in ("sqlite", "postgresql")
    ]
    return f"{ms[0]:.2f} ms · {ms[1]:.2f} ms"


def _cold() -> str:
    c = _get("serving", "cold_load")
    return f"{_x(c['ratio'], 2)} ({c['ready_ms']:.1f} vs {c['raw_ms']:.1f} ms)"


def _base_fetch() -> str:
    c = _get("base_fetch", "cold_fetch")
    return f"{_x(c['ratio_median'], 2)} ({c['ratio_min']:.2f}–{c['ratio_max']:.2f})"


def _per_node() -> str:
    return " · ".join(f"{_get('base_fetch', 'bytes_per_node', k, 'bases'):.2f}"
                      for k in ("1", "2", "4"))  # fmt: skip


def _resume() -> str:
    lost, seconds = _get("resume", "steps_lost_max"), _get("resume", "kill_to_next_step_s_median")
    return f"{lost} · {seconds:.1f} s"


TARGETS = ("q_proj,v_proj", "all-linear")
FIGURES: list[tuple[str, Callable[[], str]]] = [
    ("train vs PEFT", lambda: _train("ours_vs_peft")),
    ("floor", lambda: _train("floor_time_ratio")),
    ("vs full", lambda: _train("ours_vs_full", 2)),
    ("memory", lambda: _train("memory_ours_vs_full")),
    ("storage", lambda: _x(_get("storage", "transfer_moto_s3", "ratio_vs_raw"))),
    ("resolve", _resolve),
    ("base per node", lambda: " · ".join(
        _x(_shared(k, "base_mapping_pss_over_base")) for k in (2, 4))),
    ("private/shared", lambda: _x(_get("node_memory", "runs", "K=4 ratio",
                                       "private_over_shared"), 2)),
    ("allreduce", lambda: f"{_shared(4, 'allreduce_over_lora_bytes'):.4f}"),
    ("submit", _submit),
    ("admission", _admission),
    ("serving 16 vs 1", lambda: _x(_get("serving", "ratios", "ours16_vs_ours1"))),
    ("serving vs PEFT", lambda: _x(_get("serving", "ratios", "ours16_vs_peft16"), 2)),
    ("merged", lambda: _x(_get("serving", "ratios", "merged_vs_base_latency"))),
    ("cold load", _cold),
    ("base fetch", _base_fetch),
    ("bytes per node", _per_node),
    ("resume", _resume),
]  # fmt: skip


@pytest.mark.parametrize("name, figure", FIGURES, ids=[n for n, _ in FIGURES])
def test_benchmark_table_matches_results(name: str, figure: Callable[[], str]) -> None:
    table = (ROOT / "README.md").read_text().split("## Benchmarks", 1)[1]
    assert figure() in table, f"README's {name} figure differs from bench/results"


def test_readme_names_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    assert "make quickstart" in text and "make test" in text
