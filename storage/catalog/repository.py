"""The catalog's repository functions, by concept: ``namespaces``, ``tokens``, ``bases`` and
``versions`` (aliases and gates are ``promotion``'s, jobs ``jobs``', files ``files``'). This
module gathers them under one name for the callers that use ``repo.…``; each function lives in
its concept's module.

Every function takes a ``Catalog`` as keyword-only arguments, is one short transaction, and
returns domain objects (rows never leave the store).
"""

from __future__ import annotations

from storage.catalog.bases import _base, get_base_model, list_base_models, register_base_model
from storage.catalog.namespaces import (
    DEFAULT_MAX_PRIORITY,
    _namespace_row,
    _ns,
    ensure_namespace,
    get_namespace,
    list_namespaces,
    set_namespace_limits,
)
from storage.catalog.tokens import (
    MIN_TOKEN_LIFETIME_S,
    create_token,
    list_tokens,
    revoke_token,
    token_digest,
    token_owner,
)
from storage.catalog.versions import (
    DELETED,
    DELETED_EVENT,
    DELETED_FORCED,
    PENDING,
    READY,
    _repo,
    _resolve_row,
    _version,
    _versions_query,
    create_adapter_version,
    delete_adapter_version,
    drop_publish_lease,
    leased_prefixes,
    list_adapter_versions,
    live_blob_digests,
    live_object_prefixes,
    page_adapter_versions,
    ready_versions,
    resolve_adapter,
    resolve_version_number,
    take_publish_lease,
)

__all__ = [
    "DEFAULT_MAX_PRIORITY", "DELETED", "DELETED_EVENT", "DELETED_FORCED", "MIN_TOKEN_LIFETIME_S",
    "PENDING", "READY", "_base", "_namespace_row", "_ns", "_repo", "_resolve_row", "_version",
    "_versions_query", "create_adapter_version", "create_token", "delete_adapter_version",
    "drop_publish_lease", "ensure_namespace", "get_base_model", "get_namespace",
    "leased_prefixes", "list_adapter_versions", "list_base_models", "list_namespaces",
    "list_tokens", "live_blob_digests", "live_object_prefixes", "page_adapter_versions",
    "ready_versions", "register_base_model", "resolve_adapter", "resolve_version_number",
    "revoke_token", "set_namespace_limits", "take_publish_lease", "token_digest",
    "token_owner",
]  # fmt: skip
