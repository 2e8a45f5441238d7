"""Configuration: environment variables over an optional ``lorafleet.toml``, typed and checked.

With nothing configured everything is embedded under ``LORAFLEET_HOME`` (``~/.lorafleet``):
a SQLite catalog, a local-directory object store and the node cache.

| setting          | env                        | toml key        |
|------------------|----------------------------|-----------------|
| home             | LORAFLEET_HOME             | home            |
| catalog_url      | LORAFLEET_CATALOG_URL      | catalog_url     |
| object_store     | LORAFLEET_OBJECT_STORE     | object_store    |
| s3_endpoint      | LORAFLEET_S3_ENDPOINT      | s3_endpoint     |
| ray_address      | LORAFLEET_RAY_ADDRESS      | ray_address     |
| api_token        | LORAFLEET_API_TOKEN        | api_token       |
| cache_max_bytes  | LORAFLEET_CACHE_MAX_BYTES  | cache_max_bytes |
| max_upload_bytes | LORAFLEET_MAX_UPLOAD_BYTES | max_upload_bytes |
| max_line_bytes   | LORAFLEET_MAX_LINE_BYTES   | max_line_bytes  |
| max_uploads_per_namespace | LORAFLEET_MAX_UPLOADS_PER_NAMESPACE | max_uploads_per_namespace |
| tinker_models    | LORAFLEET_TINKER_MODELS    | tinker_models   |
| tinker_heartbeat_s | LORAFLEET_TINKER_HEARTBEAT_S | tinker_heartbeat_s |

The toml file is ``LORAFLEET_CONFIG`` if set, else ``./lorafleet.toml``, else
``$LORAFLEET_HOME/lorafleet.toml``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_serializer

from storage.errors import StorageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ENV_KEYS = {
    "home": "LORAFLEET_HOME",
    "catalog_url": "LORAFLEET_CATALOG_URL",
    "object_store": "LORAFLEET_OBJECT_STORE",
    "s3_endpoint": "LORAFLEET_S3_ENDPOINT",
    "ray_address": "LORAFLEET_RAY_ADDRESS",
    "api_token": "LORAFLEET_API_TOKEN",
    "cache_max_bytes": "LORAFLEET_CACHE_MAX_BYTES",
    "max_upload_bytes": "LORAFLEET_MAX_UPLOAD_BYTES",
    "max_line_bytes": "LORAFLEET_MAX_LINE_BYTES",
    "max_uploads_per_namespace": "LORAFLEET_MAX_UPLOADS_PER_NAMESPACE",
    "tinker_models": "LORAFLEET_TINKER_MODELS",
    "tinker_heartbeat_s": "LORAFLEET_TINKER_HEARTBEAT_S",
}


class SettingsError(StorageError, ValueError):
    """Configuration is invalid (the message names the key)."""


class Settings(BaseModel):
    """Resolved configuration."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    home: Path
    catalog_url: str
    object_store: str
    s3_endpoint: str | None = None
    ray_address: str | None = None
    api_token: SecretStr | None = None
    cache_max_bytes: int = Field(default=10 * 1024**3, gt=0)
    max_upload_bytes: int = Field(default=512 * 1024**2, gt=0)
    max_line_bytes: int = Field(default=8 * 1024**2, gt=0)  # one JSONL row of an upload
    max_uploads_per_namespace: int = Field(default=4, gt=0)  # at once; then 429
    # Tinker base names the training API accepts, each mapped to a registered base
    # ("meta-llama/Llama-3.2-1B=smollm2,..."); a registered base's own name always works
    tinker_models: str | None = None
    tinker_heartbeat_s: float = Field(default=120.0, gt=0)  # a silent session ends after it

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @field_serializer("catalog_url", when_used="json")
    def _masked_url(self, url: str) -> str:
        # JSON leaves the process (logs, Ray arguments, API answers): never with the password
        return mask_url(url)

    def __repr_args__(self) -> Any:
        # repr() and str() reach logs and tracebacks: never show the catalog's password (the
        # token is a SecretStr already)
        for name, value in super().__repr_args__():
            yield name, mask_url(value) if name == "catalog_url" else value

    @property
    def embedded_catalog(self) -> bool:
        """True for the default SQLite file under home (safe to migrate automatically)."""
        return self.catalog_url == default_catalog_url(self.home)


def mask_url(url: str) -> str:
    """``url`` with the password of its user part replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}{slash}{path}"


def default_catalog_url(home: Path) -> str:
    return f"sqlite:///{home / 'catalog.db'}"


def _toml(env: Mapping[str, str], home: Path) -> dict[str, Any]:
    candidates = (
        [Path(env["LORAFLEET_CONFIG"])]
        if env.get("LORAFLEET_CONFIG")
        else [
            Path("lorafleet.toml"),
            home / "lorafleet.toml",
        ]
    )
    for path in candidates:
        if path.is_file():
            try:
                with open(path, "rb") as fh:
                    data = tomllib.load(fh)
            except tomllib.TOMLDecodeError as exc:
                raise SettingsError(f"{path}: {exc}") from None
            return dict(data.get("lorafleet", data))
    if env.get("LORAFLEET_CONFIG"):
        raise SettingsError(f"LORAFLEET_CONFIG={env['LORAFLEET_CONFIG']} does not exist")
    return {}


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read settings from ``env`` (default ``os.environ``) and the toml file.

    Raises:
        SettingsError: an unknown toml key or an invalid value, named.
    """
    env = os.environ if env is None else env
    home = Path(env.get("LORAFLEET_HOME") or Path.home() / ".lorafleet").expanduser()
    values: dict[str, Any] = _toml(env, home)
    for key, var in ENV_KEYS.items():
        if env.get(var):
            values[key] = env[var]
    home = Path(values.get("home", home)).expanduser()
    values["home"] = home
    values.setdefault("catalog_url", default_catalog_url(home))
    values.setdefault("object_store", (home / "objects").as_uri())
    try:
        return Settings(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise SettingsError(f"configuration {field}: {err['msg']}") from None


def is_masked(url: str) -> bool:
    """True when ``url``'s password was replaced by ``***`` (it crossed from another node)."""
    return mask_url(url) == url and ":***@" in url


def settings_for_nodes(settings: Settings) -> str:
    """The settings as JSON for another node (a Ray actor, task, Train worker or replica).

    No secret is in it: Ray keeps arguments in its control store and may print them, so the
    token is left out and the catalog URL's password is masked. The receiving node completes
    them from its own configuration (``settings_on_node``), as ``infra/`` mounts them.
    """
    return json.dumps(settings.model_dump(mode="json", exclude={"api_token"}))  # URL masked


def node_catalog_url(sent: str, env: Mapping[str, str] | None = None) -> str:
    """The catalog URL to use on this node for a URL sent by another one.

    A masked password is filled from this node's own configured catalog URL (same user, host
    and database).

    Raises:
        SettingsError: a secret was sent in clear, or this node lacks the password.
    """
    if mask_url(sent) != sent:
        raise SettingsError("a catalog password was sent to another node in clear; send "
                            "settings_for_nodes(settings) instead")  # fmt: skip
    if not is_masked(sent):
        return sent
    own = load_settings(env).catalog_url
    if mask_url(own) != sent:
        raise SettingsError(
            f"this node has no password for the catalog {sent}: set LORAFLEET_CATALOG_URL "
            "on every node from your secret store (infra/ mounts it as lorafleet-secrets)"
        )
    return own


def settings_on_node(text: str, env: Mapping[str, str] | None = None) -> Settings:
    """Settings sent by another node (``settings_for_nodes``), completed on this one.

    The home (its cache) and the secrets are this node's own: nodes share the catalog and the
    object store, never a disk, and secrets never travel as Ray arguments.

    Raises:
        SettingsError: the text carries a secret, or this node lacks one it needs.
    """
    env = os.environ if env is None else env
    sent = Settings.model_validate_json(text)
    if sent.api_token is not None:
        raise SettingsError("an API token was sent to another node; send "
                            "settings_for_nodes(settings) instead")  # fmt: skip
    own = load_settings(env)
    return sent.model_copy(update={
        "home": own.home,
        "catalog_url": node_catalog_url(sent.catalog_url, env),
        "api_token": own.api_token,
    })  # fmt: skip
