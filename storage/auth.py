"""Bearer tokens: the admin token sees every namespace, a namespace token only its own.

Shared by the REST API and the serving ingress, so both answer the same token the same way.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from datetime import datetime

from storage.catalog import repository as repo
from storage.catalog.db import Catalog


class Unauthorized(Exception):
    """No bearer token, or one that matches neither the admin token nor a namespace."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: ``namespace`` None is the admin; ``scope`` what the token may do."""

    namespace: str | None
    scope: str = "admin"  # read < write < admin (the admin token: admin of every namespace)
    expires_at: datetime | None = None  # a namespace token's end (the admin token: none)

    def can_see(self, namespace: str) -> bool:
        return self.namespace is None or self.namespace == namespace

    @property
    def can_write(self) -> bool:
        """Submit, cancel, upload, promote, delete (a read token lists and downloads only)."""
        return self.scope in ("write", "admin")

    def can_manage_tokens(self, namespace: str | None) -> bool:
        """The admin token: any namespace's tokens; a namespace admin token: its own."""
        if self.namespace is None:
            return True
        return self.scope == "admin" and namespace == self.namespace


def authenticate(catalog: Catalog, admin_token: str | None, authorization: str | None) -> Principal:
    """The principal for an ``Authorization`` header.

    Raises:
        Unauthorized: missing or unknown token.
    """
    if not authorization or not authorization.lower().startswith("bearer "):
        raise Unauthorized("missing bearer token")
    token = authorization.split(" ", 1)[1].strip()
    if not token or not token.isascii() or not token.isprintable():
        # compare_digest raises TypeError on non-ASCII text: such a token matches nothing
        raise Unauthorized("malformed bearer token")
    if admin_token is not None and hmac.compare_digest(token, admin_token):
        return Principal(None)
    owner = repo.token_owner(catalog, token=token)
    if owner is None:
        raise Unauthorized("invalid, revoked or expired token")
    return Principal(owner.namespace, owner.scope, owner.expires_at)


MIN_ADMIN_TOKEN_CHARS = 24
_PLACEHOLDERS = ("change-me", "changeme", "change_me", "replace-me", "secret", "password",
                 "admin", "token", "xxx")  # fmt: skip


def admin_token_problem(token: str | None) -> str | None:
    """Why ``token`` must not be the admin token a server starts with (None: it may be).

    A placeholder from a manifest (``CHANGE-ME``) or any short token is refused: the admin
    token sees and changes every namespace.
    """
    if token is None:
        return None
    lowered = token.strip().lower()
    if any(p in lowered for p in _PLACEHOLDERS[:4]) or lowered in _PLACEHOLDERS:
        why = "is a placeholder"
    elif len(token) < MIN_ADMIN_TOKEN_CHARS:
        why = f"has {len(token)} characters (at least {MIN_ADMIN_TOKEN_CHARS})"
    else:
        return None
    return (f"LORAFLEET_API_TOKEN {why}: make one with "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'` and set it in "
            "the server's environment (or leave it unset: only namespace tokens work "
            "then)")  # fmt: skip


def scope_rank(scope: str) -> int:
    """read < write < admin."""
    from storage.catalog.domain import TOKEN_SCOPES

    return TOKEN_SCOPES.index(scope)
