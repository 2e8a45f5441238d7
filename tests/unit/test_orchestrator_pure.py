"""Job specs, the job state machine and admission decisions (pure, no Ray, no database)."""

from __future__ import annotations

import itertools
import json

import pytest
import yaml

from orchestrator.lifecycle import STATES, TERMINAL, IllegalTransition, check_transition
from orchestrator.scheduling import (
    ActiveJob,
    Gang,
    Limits,
    NodeFree,
    QueuedJob,
    RunningPack,
    decide,
)
from orchestrator.spec import SpecError, load_spec, parse_spec, read_spec_file
from orchestrator.uploads import DATA_FIELDS

FILE_ID = "file-" + "0" * 24
BASE = dict(
    name="j", namespace="team", base_model="tiny", training_data=FILE_ID, output_adapter="team/a"
)


@pytest.mark.parametrize("path", ["examples/digits.yaml", "examples/chat-7b-multinode.yaml"])
def test_examples_are_valid(path):
    # CLI specs name local data files; `lorafleet submit` uploads them and puts ids in
    data = read_spec_file(path)
    for field in DATA_FIELDS:
        if field in data:
            assert not data[field].startswith("s3://")
            data[field] = FILE_ID
    spec = parse_spec(data)
    assert spec.output_adapter.startswith(spec.namespace + "/")


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"training_data": "d.jsonl"}, "training_data"),
        ({"training_data": "/etc/hostname"}, "training_data"),
        ({"training_data": "file:///other/team/creds.json"}, "training_data"),
        ({"validation_data": "../../etc/hostname"}, "validation_data"),
        ({"training_data": "file-../../x"}, "training_data"),
        ({"base_model": "/models/llama"}, "base_model"),
        ({"base_model": "../base"}, "base_model"),
    ],
)
def test_specs_name_data_not_paths(patch, field):
    with pytest.raises(SpecError, match="never read") as info:
        parse_spec({**BASE, **patch})
    assert info.value.field == field


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"trainig": {}}, "trainig"),
        ({"training": {"lr": 2}}, "training.lr"),
        ({"training": {"max_steps": 5, "epochs": 1}}, "training"),
        ({"lora": {"r": 0}}, "lora.r"),
        ({"lora": {"targets": []}}, "lora.targets"),
        ({"resources": {"gpus": 1}}, "resources.gpus"),
        ({"name": "../x"}, "name"),
        ({"output_adapter": "other/a"}, "output_adapter"),
        ({"output_adapter": "team/a:2"}, "output_adapter"),
        ({"priority": 1000}, "priority"),
        ({"training": {"epochs": float("inf")}}, "training.epochs"),
        ({"training": {"epochs": float("nan")}}, "training.epochs"),
        ({"training": {"epochs": 1e308}}, "training.epochs"),
        ({"training": {"max_steps": 10**12}}, "training.max_steps"),
        ({"training": {"batch_size": 10**9}}, "training.batch_size"),
        ({"training": {"seed": 2**64}}, "training.seed"),
        ({"lora": {"alpha": float("inf")}}, "lora.alpha"),
        ({"resources": {"cpus_per_worker": float("inf")}}, "resources.cpus_per_worker"),
        ({"resources": {"nodes": 10**6}}, "resources.nodes"),
        ({"tags": ["Bad Tag"]}, "tags"),
    ],
)
def test_bad_specs_name_the_field(patch, field):
    with pytest.raises(SpecError) as info:
        parse_spec({**BASE, **patch})
    assert info.value.field == field


def test_missing_field_and_bad_files(tmp_path):
    with pytest.raises(SpecError, match=r"^namespace: Field required"):
        parse_spec({"name": "x"})
    (tmp_path / "s.yaml").write_text("name: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(tmp_path / "s.yaml")
    (tmp_path / "s.json").write_text(json.dumps(BASE))
    assert load_spec(tmp_path / "s.json").name == "j"
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(["a", "list"]))
    with pytest.raises(SpecError, match="mapping"):
        load_spec(tmp_path / "t.yaml")


def test_idempotency_keys_behave_like_client_tokens():
    from orchestrator.spec import IdempotencyKeyError, idempotency_key

    assert idempotency_key(None, None) is None
    assert idempotency_key("k", None) == idempotency_key(None, "k") == idempotency_key("k", "k")
    with pytest.raises(IdempotencyKeyError, match="empty"):
        idempotency_key("", None)
    with pytest.raises(IdempotencyKeyError, match="differ") as info:
        idempotency_key("a", "b")
    assert info.value.field == "idempotency_key"
    # the key is not part of what a retry is compared on
    with_key = parse_spec({**BASE, "idempotency_key": "k"})
    assert with_key.canonical_json() == parse_spec(BASE).canonical_json()


def test_canonical_json_ignores_key_order():
    a = parse_spec({**BASE, "priority": 1})
    b = parse_spec(dict(reversed(list({**BASE, "priority": 1}.items()))))
    assert a.canonical_json() == b.canonical_json()
    assert a.canonical_json() != parse_spec({**BASE, "priority": 2}).canonical_json()


def test_state_machine():
    path = ["queued", "starting", "running", "retrying", "starting", "running", "succeeded"]
    for cur, nxt in itertools.pairwise(path):
        check_transition("j", cur, nxt)
    for terminal in TERMINAL:
        for target in STATES:
            with pytest.raises(IllegalTransition):
                check_transition("j", terminal, target)
    with pytest.raises(IllegalTransition, match="queued to running"):
        check_transition("j", "queued", "running")
    for state in ("queued", "starting", "running", "retrying"):
        check_transition("j", state, "cancelled")


def _q(i, ns="a", prio=0, t=None, **gang):  # type: ignore[no-untyped-def]
    return QueuedJob(f"j{i}", ns, prio, float(i if t is None else t), Gang(**gang))


def test_priority_then_submission_order():
    d = decide([_q(1), _q(2, prio=5), _q(3)], [], [NodeFree(cpus=1)])
    assert d.admit == ["j2"]
    assert "waiting for resources" in d.waiting["j1"]


def test_namespace_concurrency_limit_serialises_jobs():
    limits = {"a": Limits(max_concurrent_jobs=1)}
    d = decide([_q(1), _q(2), _q(3)], [], [NodeFree(cpus=8)], limits)
    assert d.admit == ["j1"] and "limit of 1" in d.waiting["j2"]
    d = decide([_q(2), _q(3)], [ActiveJob("j1", "a", Gang())], [NodeFree(cpus=7)], limits)
    assert d.admit == []


def test_two_namespaces_share_fairly():
    queued = [_q(i, "a") for i in range(4)] + [_q(10 + i, "b", t=100 + i) for i in range(4)]
    d = decide(queued, [], [NodeFree(cpus=4)])
    assert sorted(d.admit) == ["j0", "j1", "j10", "j11"]


def test_gang_must_fit_whole_and_on_distinct_nodes():
    big = _q(1, nodes=2, workers_per_node=2)
    d = decide([big], [], [NodeFree(cpus=4), NodeFree(cpus=1, total_cpus=2)])
    assert d.admit == [] and "waiting for resources" in d.waiting["j1"]
    d = decide([big], [], [NodeFree(cpus=2), NodeFree(cpus=2)])
    assert d.admit == ["j1"]


def test_job_that_never_fits_blocks_nobody():
    huge = _q(1, prio=9, gpus_per_worker=8)
    d = decide([huge, _q(2)], [], [NodeFree(cpus=4, gpus=1)])
    assert d.admit == ["j2"] and "cannot fit the cluster" in d.waiting["j1"]


def test_blocked_high_priority_holds_back_its_own_namespace_only():
    nodes = [NodeFree(cpus=2, total_cpus=4)]
    big, mine, theirs = _q(1, prio=5, workers_per_node=3), _q(2, prio=0), _q(3, "b", prio=0)
    d = decide([big, mine, theirs], [], nodes)
    # the team's small job does not overtake its big one; another team's job backfills
    assert d.admit == ["j3"] and "higher-priority job of namespace a" in d.waiting["j2"]
    assert "waiting for resources" in d.waiting["j1"]


def test_priority_counts_only_up_to_the_namespace_maximum():
    nodes = [NodeFree(cpus=1)]
    loud, quiet = _q(1, "a", prio=100), _q(2, "b", prio=0, t=0.5)
    # a default maximum of 0 for both: equal, so submission time decides
    equal = {"a": Limits(max_priority=0), "b": Limits(max_priority=0)}
    assert decide([loud, quiet], [], nodes, equal).admit == ["j2"]
    # an admin raised a's maximum: its priority counts now
    raised = {"a": Limits(max_priority=10), "b": Limits(max_priority=0)}
    assert decide([loud, quiet], [], nodes, raised).admit == ["j1"]


def test_gpu_quota():
    limits = {"a": Limits(max_gpus=1)}
    d = decide(
        [_q(1, gpus_per_worker=1, workers_per_node=2)], [], [NodeFree(cpus=8, gpus=8)], limits
    )
    assert d.admit == [] and "GPU quota" in d.waiting["j1"]


def _p(i, key="tiny", ns="a", t=None):  # type: ignore[no-untyped-def]
    return QueuedJob(f"j{i}", ns, 0, float(i if t is None else t), Gang(), pack_key=key)


def test_compatible_jobs_pack_into_one_gang():
    # one node with room for one gang: four compatible jobs run as one pack of four
    d = decide([_p(1), _p(2), _p(3, ns="b"), _p(4)], [], [NodeFree(cpus=1)], max_pack=4)
    assert sorted(d.admit) == ["j1", "j2", "j3", "j4"]
    assert d.packs == {"j1": ["j3", "j2", "j4"]}  # fair order: b's first job before a's second
    # a fifth waits for a slot or a gang; an incompatible job (another base) gets no slot
    d = decide([_p(1), _p(2), _p(3), _p(4), _p(5), _p(6, key="other")], [],
               [NodeFree(cpus=1)], max_pack=4)  # fmt: skip
    assert sorted(d.admit) == ["j1", "j2", "j3", "j4"]
    assert "waiting for resources" in d.waiting["j5"] and "waiting" in d.waiting["j6"]


def test_an_opted_out_job_never_packs_and_limits_still_count():
    alone = QueuedJob("j2", "a", 0, 2.0, Gang(), pack_key=None)
    d = decide([_p(1), alone], [], [NodeFree(cpus=1)])
    assert d.admit == ["j1"] and d.packs == {"j1": []}
    # a packed job counts against its namespace as if alone: a limit of 1 admits one
    d = decide([_p(1), _p(2)], [], [NodeFree(cpus=1)], {"a": Limits(max_concurrent_jobs=1)})
    assert d.admit == ["j1"] and "limit of 1" in d.waiting["j2"]


def test_a_queued_job_joins_a_running_pack_with_a_free_slot():
    running = [RunningPack("pack-1", "tiny", free_slots=1)]
    active = [ActiveJob("j0", "a", Gang(), pack="pack-1", pack_key="tiny")]
    d = decide([_p(1), _p(2)], active, [NodeFree(cpus=0, total_cpus=1)],
               running_packs=running)  # fmt: skip
    assert d.joins == {"j1": "pack-1"} and d.admit == ["j1"]
    assert "waiting for resources" in d.waiting["j2"]  # the pack is full now


def test_token_lifetimes_parse_or_say_what_is_accepted():
    from orchestrator.durations import parse_duration

    assert parse_duration("30d") == 30 * 86400 and parse_duration("12h") == 43200
    assert parse_duration("15m") == 900 and parse_duration("90s") == 90
    for bad in ("0d", "30", "1w", "-1d", "1.5h", "d"):
        with pytest.raises(ValueError, match="30d"):
            parse_duration(bad)


def test_a_pack_holds_one_namespace_and_no_job_too_big_to_share_it() -> None:
    from datetime import UTC, datetime

    from orchestrator.service import PACK_MAX_TOKENS_PER_JOB, pack_key_of
    from storage.catalog.jobs import Job

    def job(ns: str, **training: int) -> Job:
        spec = {"name": "j", "namespace": ns, "base_model": "tiny", "training": training}
        return Job("j", ns, "j", spec, "queued", 0, 0, 0, None, None, None, None,
                   datetime.now(UTC), None, None)  # fmt: skip

    a, b = pack_key_of(job("team"), "fp"), pack_key_of(job("blue"), "fp")
    assert a is not None and b is not None and a != b  # the same shape, two namespaces
    assert a == pack_key_of(job("team", lr=1), "fp")
    side = int(PACK_MAX_TOKENS_PER_JOB**0.5)
    assert pack_key_of(job("team", batch_size=side, seq_len=side), "fp") is not None
    assert pack_key_of(job("team", batch_size=side + 1, seq_len=side + 1), "fp") is None
