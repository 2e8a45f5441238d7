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


def _spread(d: dict[str, float], digits: int) -> str:
    return f"{_x(d['ratio'], digits)} ({d['min']:.{digits}f}–{d['max']:.{digits}f})"


def _traffic(at: str, key: str, digits: int = 2) -> str:
    return _spread(_get("serving", "traffic", at, key), digits)


def _rate(at: str) -> str:
    return f"{_get('serving', 'traffic', at, 'rate_per_s'):g}/s"


def _ladder() -> list[str]:
    rows = []
    for rate, run in _get("serving", "traffic", "ladder").items():
        s, c = run["static"], run["continuous"]
        rows.append(f"| {rate} | {s['ttft_p99_s']:.2f} s · {c['ttft_p99_s']:.2f} s | "
                    f"{s['itl_p99_ms']:.0f} ms · {c['itl_p99_ms']:.0f} ms | "
                    f"{s['tokens_per_s']:,.0f} · {c['tokens_per_s']:,.0f} |")  # fmt: skip
    return rows


def _static_ttft(at: str) -> str:
    return f"static's p99 is {_get('serving', 'traffic', at, 'ttft_p99_s', 'static_median'):.2f} s"


def _offline(key: str, digits: int) -> str:
    r = _get("serving", "offline", "ratios")
    return f"{_x(r[key], digits)} ({r[key + '_min']:.{digits}f}–{r[key + '_max']:.{digits}f})"


def _batch(key: str, digits: int) -> str:
    r = _get("serving", "ratios")
    return f"{_x(r[key], digits)} ({r[key + '_min']:.{digits}f}–{r[key + '_max']:.{digits}f})"


def _api(size: str) -> str:
    a = _get("control_plane", "api", f"jobs_{size}")
    return (f"{a['requests_per_s']:.0f} req/s · p50 {a['p50_ms']:.0f} ms · "
            f"p99 {a['p99_ms']:,.0f} ms · {a['errors']} errors")  # fmt: skip


def _page(view: str) -> str:
    p = _get("control_plane", "api", "page_latency")
    return " · ".join(_spread({"ratio": p[f"{view}_{k}_page"]["ratio_median"],
                               "min": p[f"{view}_{k}_page"]["ratio_min"],
                               "max": p[f"{view}_{k}_page"]["ratio_max"]}, 2)
                      for k in ("first", "deep"))  # fmt: skip


def _fuzzed() -> str:
    f = _get("control_plane", "fuzz")
    return f"{f['requests']:,} requests · {f['status_5xx']} 5xx"


def _packed() -> str:
    s = _get("packed_training", "step")
    return " · ".join(_spread(s[f"K={k}"], 2) for k in (1, 2, 4, 8))


def _fleet(key: str) -> str:
    r = _get("packed_fleet", key)
    return _spread({"ratio": r["median"], "min": r["min"], "max": r["max"]}, 2)


def _spectrum() -> str:
    s = _get("spectrum")
    return (f"rank {s['rank_90']} · {s['rank_99']}; {s['exact_match_full']:.0%} → "
            f"{s['exact_match_compressed']:.0%}, {_x(s['size_ratio'])}")  # fmt: skip


def _qlora_memory() -> str:
    m = _get("qlora", "memory", "smollm2-135m")
    return (f"{_x(m['nf4']['vs_fp32'])} · {_x(m['int8']['vs_fp32'])} of fp32; "
            f"{_x(m['nf4']['vs_bf16'])} · {_x(m['int8']['vs_bf16'])} of bf16")  # fmt: skip


def _qlora(key: str) -> str:
    s = _get("qlora", "summary")
    if key == "time":
        return " · ".join(_spread({"ratio": s[k]["step_time_ratio_median"],
                                   "min": s[k]["step_time_ratio_min"],
                                   "max": s[k]["step_time_ratio_max"]}, 2)
                          for k in ("nf4", "int8"))  # fmt: skip
    return " · ".join(f"{s[k]['eval_loss_final']:.4f}" for k in ("nf4", "int8", "none"))


def _adalora() -> str:
    b = _get("adalora", "best")
    return f"{b['adalora']['eval_loss_final']:.4f} · {b['lora']['eval_loss_final']:.4f}"


def _merged() -> str:
    m = _get("serving", "merged_vs_base")
    return f"{_x(m['ratio'])} ({m['ratio_min']:.3f}–{m['ratio_max']:.3f})"


def _feature(*path: str, digits: int = 2) -> str:
    r = _get("serving_features", *path)
    return _spread({"ratio": r["median"], "min": r["min"], "max": r["max"]}, digits)


def _http(kind: str) -> str:
    r = _get("serving_http", f"{kind}_vs_engine")
    return _spread({"ratio": r["median"], "min": r["min"], "max": r["max"]}, 2)


def _r(ratio: dict[str, float]) -> str:
    """A paired-rounds ratio as the README writes it: median (min–max)."""
    return "{median:.2f}× ({min:.2f}–{max:.2f})".format(**ratio)


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
    ("serving 16 vs 1", lambda: _batch("ours16_vs_ours1", 3)),
    ("serving vs PEFT", lambda: _batch("ours16_vs_peft16", 2)),
    ("merged", _merged),
    ("TTFT at 4/s", lambda: _traffic("at_4_per_s", "ttft_p99_s", 3)),
    ("TTFT at 8/s", lambda: _traffic("at_8_per_s", "ttft_p99_s", 3)),
    ("tokens/s at 4/s", lambda: _traffic("at_4_per_s", "tokens_per_s")),
    ("tokens/s at 8/s", lambda: _traffic("at_8_per_s", "tokens_per_s")),
    ("static TTFT at 4/s", lambda: _static_ttft("at_4_per_s")),
    ("saturated rate", lambda: _rate("saturated")),
    ("tokens/s saturated", lambda: _traffic("saturated", "tokens_per_s")),
    ("TTFT saturated", lambda: _traffic("saturated", "ttft_p99_s", 3)),
    ("vs generate_batch", lambda: _offline("base_vs_generate_batch", 2)),
    ("16 adapters vs base", lambda: _offline("adapters16_vs_base", 3)),
    ("cold load", _cold),
    ("base fetch", _base_fetch),
    ("bytes per node", _per_node),
    ("resume", _resume),
    ("API at 100 jobs", lambda: _api("100")),
    ("API at 100,000 jobs", lambda: _api("100000")),
    ("page, all jobs", lambda: _page("all")),
    ("page, one namespace", lambda: _page("namespace")),
    ("fuzzed", _fuzzed),
    ("packed step", _packed),
    ("packed fleet vs sequential", lambda: _fleet("wall_packed_over_sequential")),
    ("packed fleet vs side by side", lambda: _fleet("wall_packed_over_side_by_side")),
    ("packed fleet memory", lambda: _fleet("pss_packed_over_side_by_side")),
    ("spectrum", _spectrum),
    ("QLoRA memory", _qlora_memory),
    ("QLoRA step time", lambda: _qlora("time")),
    ("QLoRA eval loss", lambda: _qlora("loss")),
    ("AdaLoRA vs LoRA", _adalora),
    ("prefix cache TTFT", lambda: _feature("prefix_cache", "warm_vs_cold", digits=3)),
    ("n=8 without the cache", lambda: _feature("n8", "prefix_cache_off", "n8_vs_separate")),
    ("n=8 with the cache", lambda: _feature("n8", "prefix_cache_on", "n8_vs_separate")),
    ("logprobs on/off", lambda: _feature("logprobs", "on_vs_off", digits=3)),
    ("fairness", lambda: _feature("fairness", "flooded_vs_alone")),
    ("HTTP vs engine", lambda: _http("http")),
    ("CLI start-up", lambda: " · ".join(
        "{median:.2f} s ({min:.2f}–{max:.2f})".format(**_get("cli_startup", "seconds", k))
        for k in ("help", "adapters_list", "jobs_list"))),
    ("CLI over its libraries", lambda: " · ".join(
        "{median:.2f}× ({min:.2f}–{max:.2f})".format(**_get("cli_startup", "over_libraries", k))
        for k in ("adapters_list", "jobs_list"))),
    ("HTTP streamed vs engine", lambda: _http("http_stream")),
    ("DPO vs SFT", lambda: " · ".join(_r(_get("dpo", k))
                                      for k in ("dpo_over_sft", "dpo_first_epoch_over_sft"))),
    ("TRL vs ours", lambda: " · ".join(_r(_get("dpo", k))
                                       for k in ("trl_over_dpo_first_epoch", "trl_over_dpo"))),
    ("DPO memory", lambda: " · ".join(f"{_get('dpo', 'peak_rss_growth_mib', k):,.0f} MiB"
                                      for k in ("dpo_first_epoch", "trl"))),
    ("GRPO rollouts", lambda: _r(_get("grpo", "trainer_over_engine"))),
    ("packing end to end", lambda: _r(_get("packed_e2e", "packed_over_sequential"))),
    ("Tinker SDK vs in process", lambda: _r(_get("tinker_api", "sdk_over_in_process"))),
    ("Tinker sessions at once", lambda: _r(_get("tinker_api", "concurrent_over_solo"))),
    ("Tinker vs train", lambda: f"{_get('tinker_api', 'max_abs_diff_vs_train'):.1e}"),
    ("structured vs free", lambda: _r(_get("structured", "constrained_over_free"))),
    ("tools auto vs free", lambda: _r(_get("structured", "tools_auto_over_free"))),
    ("grammar compile · mask", lambda: f"{_get('grammar', 'compile_ms_p50', 'llguidance'):.2f} ms"
                                       f" · {_get('grammar', 'mask_us_p50', 'llguidance'):.0f} µs"),
    ("grammar cache", lambda: f"{_get('grammar', 'cache', 'hit_rate'):.2f} |"),
    ("AdaLoRA budget", lambda: " · ".join(f"{_get('adalora', 'best', m, 'final_params'):,}"
                                          for m in ("adalora", "lora"))),
]  # fmt: skip


@pytest.mark.parametrize("name, figure", FIGURES, ids=[n for n, _ in FIGURES])
def test_benchmark_table_matches_results(name: str, figure: Callable[[], str]) -> None:
    table = (ROOT / "README.md").read_text().split("## Benchmarks", 1)[1]
    assert figure() in table, f"README's {name} figure differs from bench/results"


def test_serving_rate_table_matches_results() -> None:
    table = (ROOT / "README.md").read_text().split("## Benchmarks", 1)[1]
    for row in _ladder():
        assert row in table, f"README's serving rate table lacks {row}"


def test_readme_names_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    assert "make quickstart" in text and "make test" in text
