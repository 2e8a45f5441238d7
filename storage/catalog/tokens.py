"""Bearer tokens of namespaces: created (shown once, stored as SHA-256), listed, revoked,
and looked up by their secret."""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from storage.catalog.db import Catalog
from storage.catalog.domain import (
    TOKEN_SCOPES,
    ApiToken,
)
from storage.catalog.models import (
    ApiTokenRow,
    NamespaceRow,
    utcnow,
)
from storage.catalog.namespaces import _namespace_row
from storage.errors import (
    InvalidName,
    NotFound,
)
from storage.names import validate_name

MIN_TOKEN_LIFETIME_S = 60  # shorter ones expire before a client could use them


def token_digest(token: str) -> str:
    """What the catalog stores for a token: its SHA-256 (tokens are high-entropy secrets)."""
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(
    db: Catalog,
    *,
    namespace: str,
    name: str,
    scope: str = "write",
    expires_in_s: float | None = None,
    not_after: datetime | None = None,
) -> str:
    """Create a bearer token for ``namespace``; returns the only copy of the plaintext (the
    catalog keeps its SHA-256). ``scope``: read (list and download), write (also submit,
    cancel, upload, promote, delete), admin (also manage the namespace's tokens).
    ``not_after``: the latest the token may expire (its maker's own expiry)."""
    validate_name(name, kind="token name")
    validate_name(namespace, kind="namespace")
    if scope not in TOKEN_SCOPES:
        raise InvalidName(f"invalid scope {scope!r}: use one of {', '.join(TOKEN_SCOPES)}")
    if expires_in_s is not None and not expires_in_s >= MIN_TOKEN_LIFETIME_S:
        raise InvalidName(f"a token's lifetime must be at least {MIN_TOKEN_LIFETIME_S} s")
    expires = utcnow() + timedelta(seconds=expires_in_s) if expires_in_s is not None else None
    if not_after is not None:  # a token made by an expiring one ends no later than it
        cap = not_after if not_after.tzinfo else not_after.replace(tzinfo=UTC)
        expires = cap if expires is None else min(expires, cap)
    token = "lf_" + secrets.token_urlsafe(32)
    with db.session() as s:
        ns = _namespace_row(s, namespace, create=True)
        s.add(ApiTokenRow(namespace_id=ns.id, name=name, token_sha256=token_digest(token),
                          scope=scope, expires_at=expires))  # fmt: skip
    return token


def _token(row: ApiTokenRow, namespace: str) -> ApiToken:
    return ApiToken(row.id, namespace, row.name, row.scope, row.created_at, row.expires_at,
                    row.revoked_at)  # fmt: skip


def list_tokens(db: Catalog, *, namespace: str | None = None) -> list[ApiToken]:
    """Tokens (never their secrets), oldest first; revoked and expired ones included."""
    with db.session() as s:
        q = select(ApiTokenRow, NamespaceRow.name).join(NamespaceRow)
        if namespace is not None:
            q = q.where(NamespaceRow.name == namespace)
        return [_token(row, ns) for row, ns in s.execute(q.order_by(ApiTokenRow.id))]


def revoke_token(db: Catalog, *, token_id: int, namespace: str | None = None) -> ApiToken:
    """Revoke a token at once (idempotent). Raises ``NotFound`` (also for another namespace's
    token when ``namespace`` is given)."""
    with db.session() as s:
        q = select(ApiTokenRow, NamespaceRow.name).join(NamespaceRow)
        q = q.where(ApiTokenRow.id == token_id)
        if namespace is not None:
            q = q.where(NamespaceRow.name == namespace)
        found = s.execute(q).first()
        if found is None:
            raise NotFound(f"token {token_id} not found")
        row, ns = found
        if row.revoked_at is None:
            row.revoked_at = utcnow()
        s.flush()
        return _token(row, ns)


def token_owner(db: Catalog, *, token: str) -> ApiToken | None:
    """The live (neither revoked nor expired) token with this secret, or None."""
    with db.session() as s:
        found = s.execute(
            select(ApiTokenRow, NamespaceRow.name)
            .join(NamespaceRow)
            .where(
                ApiTokenRow.token_sha256 == token_digest(token), ApiTokenRow.revoked_at.is_(None)
            )
        ).first()
        if found is None:
            return None
        row, ns = found
        expires = row.expires_at
        if expires is not None and expires.tzinfo is None:  # SQLite drops the zone: it is UTC
            expires = expires.replace(tzinfo=UTC)
        if expires is not None and expires <= utcnow():
            return None
        return _token(row, ns)
