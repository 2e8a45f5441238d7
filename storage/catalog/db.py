"""Engine, sessions and schema checks for the catalog (SQLite by default, PostgreSQL at scale).

One ``session_scope`` commits, rolls back and maps driver errors to domain errors, so a
database outage surfaces as ``CatalogUnavailable`` and never as a raw driver trace.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from storage.errors import CatalogDriverMissing, CatalogUnavailable, SchemaOutOfDate

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"


def _sqlite_pragmas(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy own transactions, so BEGIN IMMEDIATE below takes effect.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Writers take the database lock up front: read-then-write transactions (version
        # numbering, idempotency keys) cannot interleave and lose an update.
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    """An engine with ``pool_pre_ping``; SQLite gets WAL, foreign keys and a busy timeout."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, pool_pre_ping=True, connect_args={"timeout": 30, "check_same_thread": False}
        )
        _sqlite_pragmas(engine)
        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        # str(URL) masks the password (SQLAlchemy 2): render it in full for the driver
        url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    try:
        return create_engine(
            url,
            pool_pre_ping=True,
            pool_size=10,
            max_overflow=20,
            connect_args={"connect_timeout": 5} if "postgresql" in url else {},
        )
    except ImportError as exc:  # the driver is an extra: say which one to install
        extra = " (pip install 'lorafleet[postgres]')" if "postgresql" in url else ""
        raise CatalogDriverMissing(f"the catalog's database driver is not installed: "
                                   f"{exc.name or exc}{extra}") from None  # fmt: skip


def _unavailable(exc: Exception, url: Any) -> CatalogUnavailable:
    safe = make_url(str(url)).render_as_string(hide_password=True)
    reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0] if str(exc) else repr(exc)
    return CatalogUnavailable(f"catalog {safe} is unavailable: {reason}")


class Catalog:
    """The catalog database: an engine, a session factory and schema management."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: commit on success, roll back on error; driver errors mapped."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except (sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
            session.rollback()
            if isinstance(exc, sa_exc.OperationalError) and "no such table" in str(exc):
                raise SchemaOutOfDate(
                    "the catalog has no schema yet: run `lorafleet db upgrade`"
                ) from None
            raise _unavailable(exc, self.engine.url) from None
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    # -- schema ---------------------------------------------------------------------------
    # Alembic (and the import of every migration script it makes) is needed to migrate only;
    # checking a schema reads the scripts' revision lines and the database's version row, so
    # every command that opens the catalog starts without it.
    def _alembic_config(self) -> Any:
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.attributes["engine"] = self.engine
        return cfg

    def head_revision(self) -> str | None:
        return head_of(MIGRATIONS / "versions")

    def current_revision(self) -> str | None:
        try:
            with self.engine.connect() as conn:
                if not sa_inspect(conn).has_table("alembic_version"):
                    return None
                return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except (sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
            raise _unavailable(exc, self.engine.url) from None

    def upgrade(self) -> str | None:
        """Apply every pending migration (``lorafleet db upgrade``); returns the new revision."""
        from alembic import command

        try:
            command.upgrade(self._alembic_config(), "head")
        except (sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
            raise _unavailable(exc, self.engine.url) from None
        return self.current_revision()

    def check_schema(self) -> None:
        """Raise ``SchemaOutOfDate`` unless the database is at the code's head revision."""
        current, head = self.current_revision(), self.head_revision()
        if current != head:
            raise SchemaOutOfDate(
                f"catalog schema is at {current or 'nothing'}, the code needs {head}: "
                "run `lorafleet db upgrade`"
            )

    def dispose(self) -> None:
        self.engine.dispose()


_REVISION = re.compile(r'^(down_revision|revision)\s*(?::[^=]*)?=\s*(None|["\']([^"\']+)["\'])',
                       re.M)  # fmt: skip


@functools.cache
def head_of(versions: Path) -> str | None:
    """The head revision of a folder of Alembic migration scripts: the one no other script
    names as its ``down_revision`` (read from the scripts' text, nothing imported).

    Raises:
        SchemaOutOfDate: the scripts do not form one line of history.
    """
    revisions, parents = set(), set()
    for script in versions.glob("*.py"):
        found = {m.group(1): m.group(3) for m in _REVISION.finditer(script.read_text())}
        if found.get("revision"):
            revisions.add(found["revision"])
            if found.get("down_revision"):
                parents.add(found["down_revision"])
    heads = revisions - parents
    if len(heads) > 1:
        raise SchemaOutOfDate(f"the migration scripts have several heads: {sorted(heads)}")
    return next(iter(heads), None)


def open_catalog(url: str, *, auto_upgrade: bool = False) -> Catalog:
    """Open the catalog and check its schema.

    Args:
        url: a SQLAlchemy URL (``sqlite:///…`` or ``postgresql://…``).
        auto_upgrade: migrate a behind schema instead of failing (the embedded default, where
            nobody else shares the file).

    Raises:
        CatalogUnavailable, SchemaOutOfDate.
    """
    catalog = Catalog(url)
    if auto_upgrade:
        if catalog.current_revision() != catalog.head_revision():
            shown = make_url(url).render_as_string(hide_password=True)
            log.info("migrating catalog %s to %s", shown, catalog.head_revision())
            catalog.upgrade()
    else:
        catalog.check_schema()
    return catalog
