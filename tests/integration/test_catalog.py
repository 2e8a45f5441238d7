"""The catalog on SQLite and PostgreSQL: schema, versions, aliases, errors."""

from __future__ import annotations

import itertools
import threading

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from infra.servers import free_port
from storage.catalog import promotion
from storage.catalog import repository as repo
from storage.catalog.db import Catalog, open_catalog
from storage.catalog.domain import FileDigest
from storage.catalog.models import Base
from storage.errors import AdapterNotFound, CatalogUnavailable, InUse, SchemaOutOfDate
from storage.gates import GateRefused
from storage.names import parse_ref


@pytest.fixture()
def catalog(catalog_url):  # type: ignore[no-untyped-def]
    cat = open_catalog(catalog_url, auto_upgrade=True)
    yield cat
    cat.dispose()


def _base(cat):  # type: ignore[no-untyped-def]
    return repo.register_base_model(
        cat,
        name="tiny",
        source="/x",
        architecture="LlamaForCausalLM",
        parameter_count=10,
        fingerprint="f" * 64,
    )


def _new_version(cat, base_id, name="adapter", ns="team", tags=(), metrics=None):  # type: ignore[no-untyped-def]
    return repo.create_adapter_version(
        cat,
        namespace=ns,
        name=name,
        base_model_id=base_id,
        object_prefix=f"adapters/{ns}/{name}/x",
        files=[FileDigest("adapter_model.safetensors", "a" * 64, 10)],
        r=8,
        alpha=16,
        target_modules=["q_proj", "v_proj"],
        use_rslora=False,
        tags=tags,
        metrics=metrics or {"eval_loss": 0.1},
    )


def test_migrations_match_models(catalog_url):
    cat = Catalog(catalog_url)
    cat.upgrade()
    with cat.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
    assert cat.current_revision() == cat.head_revision()
    cat.dispose()


def test_schema_behind_is_a_clear_error(catalog_url):
    with pytest.raises(SchemaOutOfDate, match="lorafleet db upgrade"):
        open_catalog(catalog_url)


def test_unreachable_catalog_is_catalog_unavailable():
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nothing"
    with pytest.raises(CatalogUnavailable, match="unavailable"):
        open_catalog(url)


def test_versions_resolve_and_aliases_move(catalog):
    base = _base(catalog)
    v1 = _new_version(catalog, base.id)
    v2 = _new_version(catalog, base.id)
    assert (v1.version, v2.version) == (1, 2)
    assert repo.resolve_adapter(catalog, ref=parse_ref("team/adapter")).version == 2
    assert repo.resolve_adapter(catalog, ref=parse_ref("team/adapter:1")).version == 1
    promotion.promote(catalog, ref=parse_ref("team/adapter:1"), alias="production")
    assert repo.resolve_adapter(catalog, ref=parse_ref("team/adapter@production")).version == 1
    promotion.promote(catalog, ref=parse_ref("team/adapter:2"), alias="production")
    prod = repo.resolve_adapter(catalog, ref=parse_ref("team/adapter@production"))
    assert prod.version == 2 and prod.aliases == ("production",)
    with pytest.raises(InUse, match="@production"):  # an alias protects its version
        repo.delete_adapter_version(catalog, ref=parse_ref("team/adapter:2"))
    assert repo.resolve_adapter(catalog, ref=parse_ref("team/adapter@production")).version == 2
    repo.delete_adapter_version(catalog, ref=parse_ref("team/adapter:2"), force=True,
                                actor="admin token")  # fmt: skip
    assert repo.resolve_adapter(catalog, ref=parse_ref("team/adapter")).version == 1
    gone = promotion.events(catalog, namespace="team", name="adapter")[0]
    assert (gone.kind, gone.version, gone.actor, gone.data) == (
        "deleted_forced",
        2,
        "admin token",
        {"aliases": ["production"]},
    )
    for ref in ("team/adapter@production", "team/adapter:2", "team/other", "team/adapter:9"):
        with pytest.raises(AdapterNotFound):
            repo.resolve_adapter(catalog, ref=parse_ref(ref))


def test_a_deleted_version_cannot_open_a_relative_gate(catalog):
    """The walk-around of the review: delete @prod's version, then promote a worse one through
    ``eval_loss<=current+2%``. The delete is refused (409 in the API); forced, the alias is gone
    and the relative rule fails, since the alias was promoted before; every delete is an
    event."""
    base = _base(catalog)
    for loss in (0.5, 0.9, 0.4):
        _new_version(catalog, base.id, metrics={"eval_loss": loss})
    promotion.set_gate(catalog, namespace="team", name="adapter", alias="prod",
                       rules=["eval_loss<=current+2%"])  # fmt: skip
    first = promotion.promote(catalog, ref=parse_ref("team/adapter:1"), alias="prod")[1]
    assert first.passed and "first promotion ever" in first.results[0].message
    with pytest.raises(InUse, match="@prod"):
        repo.delete_adapter_version(catalog, ref=parse_ref("team/adapter:1"))
    repo.delete_adapter_version(catalog, ref=parse_ref("team/adapter:1"), force=True)
    with pytest.raises(GateRefused, match="points at no version"):
        promotion.promote(catalog, ref=parse_ref("team/adapter:2"), alias="prod")
    repo.delete_adapter_version(catalog, ref=parse_ref("team/adapter:2"))  # no alias: allowed
    kinds = [e.kind for e in promotion.events(catalog, namespace="team", name="adapter")]
    assert kinds[:2] == ["deleted", "deleted_forced"] and "promoted" in kinds
    promoted = next(e for e in promotion.events(catalog, namespace="team", name="adapter")
                    if e.kind == "promoted")  # fmt: skip
    assert promoted.data["first_promotion"] is True


def test_list_filters(catalog):
    base = _base(catalog)
    _new_version(catalog, base.id, name="a", tags=("chat",))
    _new_version(catalog, base.id, name="b")
    _new_version(catalog, base.id, name="c", ns="other")
    assert [v.name for v in repo.list_adapter_versions(catalog, namespace="team")] == ["a", "b"]
    assert [v.name for v in repo.list_adapter_versions(catalog, tag="chat")] == ["a"]
    assert len(repo.list_adapter_versions(catalog, base_model="tiny")) == 3
    assert repo.list_adapter_versions(catalog, base_model="other-base") == []


def test_concurrent_publishes_get_consecutive_versions(catalog):
    base = _base(catalog)
    results: list[int] = []
    errors: list[Exception] = []

    def worker() -> None:
        try:
            for _ in range(3):
                results.append(_new_version(catalog, base.id, name="hot").version)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(results) == list(range(1, 25))


def test_sixteen_concurrent_first_promotions_make_one_alias(catalog):
    """Sixteen promotions of one new alias at once: no error, exactly one alias row, pointing
    at one of the promoted versions (the last writer's)."""
    from sqlalchemy import func, select

    from storage.catalog.models import AliasRow
    from storage.names import AdapterRef

    base = _base(catalog)
    versions = [_new_version(catalog, base.id, name="race").version for _ in range(16)]
    barrier, errors = threading.Barrier(16), []

    def promote(v: int) -> None:
        barrier.wait()
        try:
            promotion.promote(catalog, ref=AdapterRef("team", "race", v, None), alias="prod")
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with catalog.session() as s:
        assert s.scalar(select(func.count()).select_from(AliasRow)) == 1
    # each promotion judged against (and recorded) the version the one before it put in place
    moves = promotion.events(catalog, namespace="team", name="race")[::-1]
    assert len(moves) == 16 and moves[0].data["from_version"] is None
    for before, after in itertools.pairwise(moves):
        assert after.data["from_version"] == before.version
    resolved = repo.resolve_adapter(catalog, ref=AdapterRef("team", "race", None, "prod"))
    assert resolved.version in versions


def test_tokens_are_stored_hashed(catalog):
    token = repo.create_token(catalog, namespace="team", name="ci")
    assert repo.token_owner(catalog, token=token).namespace == "team"
    assert repo.token_owner(catalog, token=token + "x") is None
    from sqlalchemy import text

    with catalog.engine.connect() as conn:
        stored = conn.execute(text("select token_sha256 from api_tokens")).scalar_one()
    assert token not in stored and stored == repo.token_digest(token)


def _measured(cat, base_id, eval_loss, name="gated"):  # type: ignore[no-untyped-def]
    v = _new_version(cat, base_id, name=name)
    from storage.catalog.models import AdapterVersionRow

    with cat.session() as s:  # metrics as a job's publish records them
        s.get(AdapterVersionRow, v.id).metrics = {"eval_loss": eval_loss}
    return v


def test_gated_promotion_refuses_forces_and_rolls_back(catalog):
    from storage.gates import GateRefused, GateRuleError

    base = _base(catalog)
    v1, v2, v3 = (_measured(catalog, base.id, x) for x in (0.4, 0.8, 0.41))
    asked = ["eval_loss <= 0.5", "eval_loss<=current+5%"]
    rules = promotion.set_gate(catalog, namespace="team", name="gated", alias="production",
                               rules=asked, actor="t")  # fmt: skip
    assert rules == ["eval_loss<=0.5", "eval_loss<=current+5%"]
    assert promotion.gates(catalog, namespace="team", name="gated") == {"production": rules}
    with pytest.raises(GateRuleError):
        promotion.set_gate(catalog, namespace="team", name="gated", alias="production",
                           rules=["eval_loss<"])  # fmt: skip
    assert promotion.gates(catalog, namespace="team", name="gated") == {"production": rules}

    promotion.promote(catalog, ref=parse_ref("team/gated:1"), alias="production", actor="t")
    with pytest.raises(GateRefused, match=r"team/gated:2 has eval_loss 0\.8 > 0\.5") as refused:
        promotion.promote(catalog, ref=parse_ref("team/gated:2"), alias="production")
    assert not refused.value.verdict.passed
    assert repo.resolve_adapter(catalog, ref=parse_ref("team/gated@production")).version == 1
    # 0.41 is within 5 % of 0.4: passes both rules
    check = promotion.check(catalog, ref=parse_ref("team/gated:3"), alias="production")
    assert check.passed and check.current == "team/gated:1"
    promotion.promote(catalog, ref=parse_ref("team/gated:3"), alias="production", actor="t")
    forced, verdict = promotion.promote(catalog, ref=parse_ref("team/gated:2"),
                                        alias="production", force=True, actor="admin")  # fmt: skip
    assert forced.version == 2 and not verdict.passed
    back, _ = promotion.rollback(catalog, namespace="team", name="gated", alias="production",
                                 force=True, actor="admin")  # fmt: skip
    assert back.version == 3
    kinds = [(e.kind, e.version, e.data.get("from_version"))
             for e in promotion.events(catalog, namespace="team", name="gated")]  # fmt: skip
    assert kinds == [("promoted", 3, 2), ("promoted_forced", 2, 3), ("promoted", 3, 1),
                     ("promoted", 1, None), ("gate_set", None, None)]  # fmt: skip
    # rolling back through the gate: 3 → 2 is refused (0.8 fails), nothing moves
    with pytest.raises(GateRefused):
        promotion.rollback(catalog, namespace="team", name="gated", alias="production")
    promotion.set_gate(catalog, namespace="team", name="gated", alias="production", rules=[])
    assert promotion.gates(catalog, namespace="team", name="gated") == {}
    assert v1.version == 1 and v2.version == 2 and v3.version == 3
    with pytest.raises(promotion.NothingToRollBack):
        promotion.rollback(catalog, namespace="team", name="gated", alias="canary")


def test_usage_buckets_sum_across_flushes_and_find_idle_versions(catalog):
    from datetime import timedelta

    from sqlalchemy import update

    from storage.catalog import usage
    from storage.catalog.models import AdapterVersionRow, utcnow

    base = _base(catalog)
    used, idle = _new_version(catalog, base.id, name="used"), _new_version(catalog, base.id)
    now = usage.minute_of(utcnow())
    earlier = now - timedelta(minutes=3)
    one = [usage.UsageCount(now, "team", used.ref, 2, 10, 4),
           usage.UsageCount(earlier, "team", used.ref, 1, 5, 5),
           usage.UsageCount(now, "", "tiny", 1, 3, 1)]  # fmt: skip
    assert usage.add_usage(catalog, one) == 3
    usage.add_usage(catalog, [usage.UsageCount(now, "team", used.ref, 1, 1, 1)])  # a 2nd replica
    total = usage.query_usage(catalog, namespace="team")
    assert [(u.model, u.requests, u.prompt_tokens, u.completion_tokens) for u in total] == [
        (used.ref, 4, 16, 10)]  # fmt: skip
    per_minute = usage.query_usage(catalog, adapter="team/used", group="minute")
    assert [(u.minute, u.requests) for u in per_minute] == [(earlier, 1), (now, 3)]
    assert usage.query_usage(catalog, adapter="team/used", since=now)[0].requests == 3
    assert usage.query_usage(catalog, adapter="tiny")[0].requests == 1
    assert usage.query_usage(catalog, adapter="team/other") == []
    # both versions are new: neither is idle; made 40 days old, only the unused one is
    assert usage.idle_versions(catalog, days=30) == []
    with catalog.session() as s:
        s.execute(update(AdapterVersionRow).values(created_at=utcnow() - timedelta(days=40)))
    found = usage.idle_versions(catalog, days=30)
    assert [(v.ref, last) for v, last in found] == [(idle.ref, None)]
    assert usage.idle_versions(catalog, days=30, now=utcnow() + timedelta(days=31))[-1][0].ref \
        == used.ref  # fmt: skip


def test_replica_snapshots_are_replaced_and_age_out(catalog):
    from storage.catalog import usage

    usage.record_replica(catalog, replica_id="r1", base="tiny", node="n1", stats={"a": 1})
    usage.record_replica(catalog, replica_id="r1", base="tiny", node="n1", stats={"a": 2})
    usage.record_replica(catalog, replica_id="r2", base="tiny", node=None, stats={})
    live = usage.live_replicas(catalog)
    assert [(r.replica_id, r.stats) for r in live] == [("r1", {"a": 2}), ("r2", {})]
    assert usage.live_replicas(catalog, max_age_s=-1) == []
    usage.forget_replica(catalog, replica_id="r2")
    assert [r.replica_id for r in usage.live_replicas(catalog)] == ["r1"]
