"""The catalog on SQLite and PostgreSQL: schema, versions, aliases, errors."""

from __future__ import annotations

import threading

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from infra.servers import free_port
from storage.catalog import repository as repo
from storage.catalog.db import Catalog, open_catalog
from storage.catalog.domain import FileDigest
from storage.catalog.models import Base
from storage.errors import AdapterNotFound, CatalogUnavailable, SchemaOutOfDate
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


def _new_version(cat, base_id, name="adapter", ns="team", tags=()):  # type: ignore[no-untyped-def]
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
        metrics={"eval_loss": 0.1},
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
    repo.set_alias(catalog, ref=parse_ref("team/adapter:1"), alias="production")
    assert repo.resolve_adapter(catalog, ref=parse_ref("team/adapter@production")).version == 1
    repo.set_alias(catalog, ref=parse_ref("team/adapter:2"), alias="production")
    prod = repo.resolve_adapter(catalog, ref=parse_ref("team/adapter@production"))
    assert prod.version == 2 and prod.aliases == ("production",)
    repo.delete_adapter_version(catalog, ref=parse_ref("team/adapter:2"))
    assert repo.resolve_adapter(catalog, ref=parse_ref("team/adapter")).version == 1
    for ref in ("team/adapter@production", "team/adapter:2", "team/other", "team/adapter:9"):
        with pytest.raises(AdapterNotFound):
            repo.resolve_adapter(catalog, ref=parse_ref(ref))


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
            repo.set_alias(catalog, ref=AdapterRef("team", "race", v, None), alias="prod")
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
