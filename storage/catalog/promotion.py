"""Aliases and their gates: the one path that moves ``namespace/name@alias``.

A promotion reads the alias's gate rules and the version the alias points at now, judges the
candidate (``storage.gates``), and moves the alias — all in one transaction that holds the
adapter's repo row locked, so two promotions of one alias cannot both judge against the same
"current" version. A refused promotion changes nothing; a forced one (``force``: the caller
checked the actor may) passes and is recorded. Every move and every gate change is a
catalog event, which is also what a roll back reads: the version the alias pointed at before.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from storage.catalog.db import Catalog
from storage.catalog.domain import AdapterVersion
from storage.catalog.models import (
    AdapterRepoRow,
    AdapterVersionRow,
    AliasGateRow,
    AliasRow,
    CatalogEventRow,
    utcnow,
)
from storage.catalog.repository import READY, _repo, _resolve_row, _version
from storage.errors import AdapterNotFound, StorageError
from storage.gates import GateVerdict, evaluate, parse_rule, refusal
from storage.names import AdapterRef, validate_name

PROMOTED, FORCED, GATE_SET, GATE_CLEARED = "promoted", "promoted_forced", "gate_set", "gate_cleared"
MAX_RULES = 16


class NothingToRollBack(StorageError):
    """The alias has no earlier version (still ready) to go back to."""


@dataclass(frozen=True)
class CatalogEvent:
    """A promotion or gate change of one adapter."""

    id: int
    namespace: str
    name: str
    ts: datetime
    kind: str
    alias: str | None
    version: int | None
    actor: str | None
    data: dict[str, Any]


def _locked_repo(s: Session, namespace: str, name: str) -> AdapterRepoRow:
    repo = _repo(s, namespace, name)
    # PostgreSQL: a row lock serialises promotions of this adapter (SQLite: BEGIN IMMEDIATE)
    s.execute(select(AdapterRepoRow.id).where(AdapterRepoRow.id == repo.id).with_for_update())
    return repo


def _rules(s: Session, repo_id: int, alias: str) -> list[str]:
    q = select(AliasGateRow.rule).where(
        AliasGateRow.repo_id == repo_id, AliasGateRow.alias == alias
    )
    return list(s.scalars(q.order_by(AliasGateRow.id)))


def _current(s: Session, repo_id: int, alias: str) -> AdapterVersionRow | None:
    return s.scalar(
        select(AdapterVersionRow)
        .join(AliasRow, AliasRow.version_id == AdapterVersionRow.id)
        .where(AliasRow.repo_id == repo_id, AliasRow.alias == alias)
    )


def _ever_moved(s: Session, repo_id: int, alias: str) -> bool:
    """Whether ``alias`` has ever pointed at a version (a promotion event exists)."""
    return s.scalar(
        select(CatalogEventRow.id).where(
            CatalogEventRow.repo_id == repo_id, CatalogEventRow.alias == alias,
            CatalogEventRow.kind.in_((PROMOTED, FORCED))).limit(1)
    ) is not None  # fmt: skip


def _verdict(s: Session, row: AdapterVersionRow, alias: str, ns: str) -> GateVerdict:
    current = _current(s, row.repo_id, alias)
    ref = f"{ns}/{row.repo.name}:{row.version}"
    now = (f"{ns}/{row.repo.name}:{current.version}", dict(current.metrics or {})) if (
        current is not None and current.id != row.id) else None  # fmt: skip
    first = current is None and not _ever_moved(s, row.repo_id, alias)
    return evaluate(alias, _rules(s, row.repo_id, alias), (ref, dict(row.metrics or {})), now,
                    first=first)  # fmt: skip


def _point(s: Session, row: AdapterVersionRow, alias: str) -> None:
    moved = s.execute(
        update(AliasRow)
        .where(AliasRow.repo_id == row.repo_id, AliasRow.alias == alias)
        .values(version_id=row.id, updated_at=utcnow())
    ).rowcount  # type: ignore[attr-defined]
    if moved:
        return
    try:
        with s.begin_nested():  # a first promotion: another may insert at once
            s.add(AliasRow(repo_id=row.repo_id, alias=alias, version_id=row.id))
            s.flush()
    except sa_exc.IntegrityError:  # it did: the alias exists now, move it to ours
        s.execute(
            update(AliasRow)
            .where(AliasRow.repo_id == row.repo_id, AliasRow.alias == alias)
            .values(version_id=row.id, updated_at=utcnow())
        )


def check(db: Catalog, *, ref: AdapterRef, alias: str) -> GateVerdict:
    """What promoting ``ref`` to ``alias`` would meet at the gate now (changes nothing)."""
    validate_name(alias, kind="alias")
    with db.session() as s:
        row = _resolve_row(s, ref)
        return _verdict(s, row, alias, ref.namespace)


def promote(
    db: Catalog, *, ref: AdapterRef, alias: str, force: bool = False, actor: str | None = None
) -> tuple[AdapterVersion, GateVerdict]:
    """Point ``alias`` at the version ``ref`` resolves to, through the alias's gate.

    Args:
        force: pass a failing gate (the caller has checked the actor is an admin); the
            promotion is recorded as ``promoted_forced`` with the failed rules.
        actor: who promotes, for the event (``token:7``, ``admin``, ``cli``).

    Raises:
        GateRefused: the version fails a rule and ``force`` is off (nothing changed).
        AdapterNotFound: no such ready version.
    """
    validate_name(alias, kind="alias")
    with db.session() as s:
        _locked_repo(s, ref.namespace, ref.name)
        row = _resolve_row(s, ref)
        verdict = _verdict(s, row, alias, ref.namespace)
        if not verdict.passed and not force:
            raise refusal(verdict)
        before = _current(s, row.repo_id, alias)
        first = before is None and not _ever_moved(s, row.repo_id, alias)
        _point(s, row, alias)
        kind = PROMOTED if verdict.passed else FORCED
        s.add(CatalogEventRow(
            repo_id=row.repo_id, kind=kind, alias=alias, version=row.version, actor=actor,
            data={"from_version": before.version if before is not None else None,
                  "first_promotion": first, "gate": verdict.as_dict()}))  # fmt: skip
        s.flush()
        return _version(s, row), verdict


def rollback(
    db: Catalog, *, namespace: str, name: str, alias: str, force: bool = False,
    actor: str | None = None,
) -> tuple[AdapterVersion, GateVerdict]:  # fmt: skip
    """Point ``alias`` back at the version it pointed at before its last move (gated too).

    Raises:
        NothingToRollBack: the alias was never moved from a version that is still ready.
    """
    validate_name(alias, kind="alias")
    with db.session() as s:
        repo = _repo(s, namespace, name)
        last = s.scalar(
            select(CatalogEventRow)
            .where(CatalogEventRow.repo_id == repo.id, CatalogEventRow.alias == alias,
                   CatalogEventRow.kind.in_((PROMOTED, FORCED)))
            .order_by(CatalogEventRow.id.desc()).limit(1)
        )  # fmt: skip
        previous = (last.data or {}).get("from_version") if last is not None else None
        if previous is None:
            raise NothingToRollBack(f"{namespace}/{name}@{alias} has no earlier version")
        state = s.scalar(
            select(AdapterVersionRow.state).where(
                AdapterVersionRow.repo_id == repo.id, AdapterVersionRow.version == previous
            )
        )
        if state != READY:
            raise NothingToRollBack(
                f"{namespace}/{name}@{alias} pointed at version {previous} before, which is "
                f"{state or 'gone'} now"
            )
    return promote(db, ref=AdapterRef(namespace, name, int(previous)), alias=alias, force=force,
                   actor=actor)  # fmt: skip


def set_gate(
    db: Catalog, *, namespace: str, name: str, alias: str, rules: list[str],
    actor: str | None = None,
) -> list[str]:  # fmt: skip
    """Replace ``alias``'s rules with ``rules`` (parsed; stored in canonical form); ``[]``
    clears the gate. Returns the stored rules.

    Raises:
        GateRuleError: a rule does not parse (nothing changed).
    """
    validate_name(alias, kind="alias")
    parsed = list(dict.fromkeys(parse_rule(r).text for r in rules))
    if len(parsed) > MAX_RULES:
        raise StorageError(f"an alias has at most {MAX_RULES} gate rules")
    with db.session() as s:
        repo = _locked_repo(s, namespace, name)
        s.execute(delete(AliasGateRow).where(AliasGateRow.repo_id == repo.id,
                                             AliasGateRow.alias == alias))  # fmt: skip
        for rule in parsed:
            s.add(AliasGateRow(repo_id=repo.id, alias=alias, rule=rule))
        s.add(CatalogEventRow(repo_id=repo.id, kind=GATE_SET if parsed else GATE_CLEARED,
                              alias=alias, actor=actor, data={"rules": parsed}))  # fmt: skip
        s.flush()
    return parsed


def gates(db: Catalog, *, namespace: str, name: str) -> dict[str, list[str]]:
    """Every gated alias of an adapter and its rules."""
    with db.session() as s:
        repo = _repo(s, namespace, name)
        found: dict[str, list[str]] = {}
        rows = s.execute(select(AliasGateRow.alias, AliasGateRow.rule)
                         .where(AliasGateRow.repo_id == repo.id)
                         .order_by(AliasGateRow.alias, AliasGateRow.id))  # fmt: skip
        for alias, rule in rows:
            found.setdefault(alias, []).append(rule)
        return found


def events(db: Catalog, *, namespace: str, name: str, limit: int = 100) -> list[CatalogEvent]:
    """An adapter's promotions and gate changes, newest first."""
    with db.session() as s:
        repo = _repo(s, namespace, name)
        rows = s.scalars(select(CatalogEventRow).where(CatalogEventRow.repo_id == repo.id)
                         .order_by(CatalogEventRow.id.desc()).limit(limit))  # fmt: skip
        return [CatalogEvent(r.id, namespace, name, r.ts, r.kind, r.alias, r.version, r.actor,
                             dict(r.data or {})) for r in rows]  # fmt: skip


__all__ = ["AdapterNotFound", "CatalogEvent", "NothingToRollBack", "check", "events", "gates",
           "promote", "rollback", "set_gate"]  # fmt: skip
