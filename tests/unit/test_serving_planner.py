"""The serving planner on synthetic states: fairness, caps, the KV budget, prefix reuse,
n-sharing, slots and preemption. No model, no threads: ``schedule`` is a pure function."""

from __future__ import annotations

import itertools

from workers.serving.planner import (
    Budget,
    EngineState,
    Running,
    SlotState,
    Waiting,
    choose_prefill,
    kv_positions,
    schedule,
)

_ids = itertools.count(1000)


def wait(gid: int, ns: str, *, n: int = 1, need: int = 100, prefill: int = 10,
         adapter: str | None = None, reusable: int = 0, order: int | None = None,
         waited_s: float = 0.0) -> Waiting:  # fmt: skip
    rids = tuple(next(_ids) for _ in range(n))
    return Waiting(gid, rids, ns, adapter, need, prefill, reusable,
                   gid if order is None else order, waited_s)  # fmt: skip


def run(rid: int, gid: int, ns: str, *, need: int = 100, adapter: str | None = None,
        order: int | None = None) -> Running:  # fmt: skip
    return Running(rid, gid, ns, adapter, need, decoding=True,
                   order=gid if order is None else order)  # fmt: skip


def test_the_next_request_comes_from_the_namespace_with_fewest_rows() -> None:
    waiting = [wait(i, "x") for i in range(5)] + [wait(9, "y")]
    plan = schedule(EngineState(waiting, []), Budget(max_rows=3, kv_tokens=10_000))
    # y arrived last but goes second: x had one row running by then, y none
    assert [a.gid for a in plan.admit] == [0, 9, 1]


def test_admission_respects_rows_and_the_kv_budget_and_nobody_overtakes() -> None:
    waiting = [wait(0, "x", need=300), wait(1, "x", need=400), wait(2, "x", need=10)]
    plan = schedule(EngineState(waiting, []), Budget(max_rows=8, kv_tokens=700))
    # rows × longest: 300 fits; 2 × 400 = 800 does not, and the small one may not overtake
    assert [a.gid for a in plan.admit] == [0]
    waiting = [wait(0, "x", need=300), wait(1, "x", need=300)]
    plan = schedule(EngineState(waiting, [run(1, 50, "x", need=100)]),
                    Budget(max_rows=8, kv_tokens=900))  # fmt: skip
    assert [a.gid for a in plan.admit] == [0, 1] and kv_positions([100, 300, 300]) == 900


def test_the_prefix_cache_gives_way_to_running_rows() -> None:
    plan = schedule(EngineState([wait(0, "x", need=600)], [run(1, 7, "x", need=200)],
                                cache_tokens=400), Budget(max_rows=4, kv_tokens=1000))  # fmt: skip
    # two rows of 600 = 1200 > 1000: no admission, and the cache keeps what rows leave it
    assert plan.admit == [] and plan.evict_cache_tokens == 0
    plan = schedule(EngineState([wait(0, "x", need=400)], [run(1, 7, "x", need=200)],
                                cache_tokens=400), Budget(max_rows=4, kv_tokens=1000))  # fmt: skip
    assert [a.gid for a in plan.admit] == [0]
    assert plan.evict_cache_tokens == 200  # 2 × 400 = 800 for rows leaves 200 of 400 cached


def test_a_cached_prefix_is_not_prefilled_again_and_n_rows_prefill_once() -> None:
    w = wait(0, "x", n=4, prefill=100, reusable=96)
    plan = schedule(EngineState([w], []), Budget(max_rows=8, kv_tokens=10_000))
    assert plan.admit[0].reuse == 96
    assert plan.prefill == [(w.rids[0], 4)]  # one row prefills the rest; three copy it
    whole = wait(1, "x", prefill=64, reusable=64)  # the last token is always prefilled
    plan = schedule(EngineState([whole], []), Budget(max_rows=8, kv_tokens=10_000))
    assert plan.admit[0].reuse == 63 and plan.prefill == [(whole.rids[0], 1)]


def test_a_request_with_n_rows_is_admitted_whole_or_not_at_all() -> None:
    plan = schedule(EngineState([wait(0, "x", n=4)], [run(1, 9, "x"), run(2, 9, "x")]),
                    Budget(max_rows=5, kv_tokens=10_000))  # fmt: skip
    assert plan.admit == []


def test_a_namespace_below_its_share_preempts_the_newest_of_one_above_it() -> None:
    running = [run(i, i, "x", order=i) for i in range(4)]  # x holds every row
    plan = schedule(EngineState([wait(10, "y", order=10)], running),
                    Budget(max_rows=4, kv_tokens=10_000))  # fmt: skip
    assert plan.preempt == [3] and [a.gid for a in plan.admit] == [10]
    assert 3 not in plan.decode  # a preempted row does not decode this step


def test_preemption_never_takes_a_namespace_below_its_share() -> None:
    running = [run(0, 0, "x"), run(1, 1, "x"), run(2, 2, "y"), run(3, 3, "y")]
    plan = schedule(EngineState([wait(10, "z")], running), Budget(max_rows=4, kv_tokens=10_000))
    # share = 4 rows / 3 namespaces = 1: x and y may each give one row; the newest goes
    assert plan.preempt == [3] and [a.gid for a in plan.admit] == [10]
    plan = schedule(EngineState([wait(10, "x")], [run(0, 0, "x"), run(1, 1, "y")]),
                    Budget(max_rows=2, kv_tokens=10_000))  # fmt: skip
    assert plan.preempt == [] and plan.admit == []  # x is at its share of 1: it waits


def test_a_namespace_at_its_cap_waits_for_itself_only() -> None:
    running = [run(0, 0, "x"), run(1, 1, "x")]
    waiting = [wait(5, "x"), wait(6, "y")]
    budget = Budget(max_rows=8, kv_tokens=10_000, rows_per_namespace=2)
    assert [a.gid for a in schedule(EngineState(waiting, running), budget).admit] == [6]
    budget = Budget(max_rows=8, kv_tokens=10_000, kv_per_namespace=250)
    assert [a.gid for a in schedule(EngineState(waiting, running), budget).admit] == [6]


def test_slots_load_evict_and_cap_per_namespace() -> None:
    slots = SlotState(2, frozenset({"x/a:1", "x/b:1"}))
    running = [run(0, 0, "x", adapter="x/a:1")]
    # x/b is resident and unpinned: y's new adapter takes its slot
    plan = schedule(EngineState([wait(5, "y", adapter="y/c:1")], running, slots),
                    Budget(max_rows=8, kv_tokens=10_000))  # fmt: skip
    assert [a.gid for a in plan.admit] == [5] and plan.preempt == []
    # at x's slot cap of 1, a request on a second adapter waits; one on its own adapter goes
    waiting = [wait(6, "x", adapter="x/b:1"), wait(7, "x", adapter="x/a:1")]
    budget = Budget(max_rows=8, kv_tokens=10_000, slots_per_namespace=1)
    assert [a.gid for a in schedule(EngineState(waiting, running, slots), budget).admit] == [7]


def test_all_slots_pinned_by_one_namespace_give_way_to_another() -> None:
    slots = SlotState(2, frozenset({"x/a:1", "x/b:1"}), free=0)
    running = [run(0, 0, "x", adapter="x/a:1"), run(1, 1, "x", adapter="x/b:1"),
               run(2, 2, "x", adapter="x/b:1")]  # fmt: skip
    plan = schedule(EngineState([wait(9, "y", adapter="y/c:1")], running, slots),
                    Budget(max_rows=8, kv_tokens=10_000))  # fmt: skip
    # x holds 2 adapters above its share of 1: the one with fewer rows (x/a) is preempted
    assert plan.preempt == [0] and [a.gid for a in plan.admit] == [9]


def test_a_request_that_waited_too_long_for_a_slot_fails_busy_and_others_go_on() -> None:
    slots = SlotState(1, frozenset({"x/a:1"}), free=0)
    running = [run(0, 0, "x", adapter="x/a:1")]
    waiting = [wait(5, "x", adapter="x/b:1", waited_s=31), wait(6, "x", adapter="x/a:1")]
    plan = schedule(EngineState(waiting, running, slots),
                    Budget(max_rows=8, kv_tokens=10_000, slot_wait_s=30))  # fmt: skip
    assert plan.fail == [(5, "no free adapter slot", "busy")]
    assert [a.gid for a in plan.admit] == [6]


def test_prefill_chunks_are_bounded_and_interleave_namespaces() -> None:
    rows = [Running(1, 1, "x", None, 900, to_prefill=500, order=1),
            Running(2, 2, "x", None, 900, to_prefill=500, order=2),
            Running(3, 3, "y", None, 900, to_prefill=30, order=3)]  # fmt: skip
    # y's row goes before x's second; the padded work (rows × widest) stays ≤ 2 × chunk
    assert choose_prefill(rows, 256) == [(1, 256)]
    assert choose_prefill(rows, 1024) == [(1, 500), (3, 30), (2, 494)]
    small = [Running(i, i, ns, None, 99, to_prefill=8, order=i)
             for i, ns in enumerate("xxxy")]  # fmt: skip
    assert [rid for rid, _ in choose_prefill(small, 64)] == [0, 3, 1, 2]
