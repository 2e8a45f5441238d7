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

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

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

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

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


def on_this_node(settings: Settings, env: Mapping[str, str] | None = None) -> Settings:
    """``settings`` as handed to another node, with that node's own home (its cache).

    Nodes share the catalog and the object store, never a disk: a path under the home of the
    process that sent the settings means nothing here.
    """
    env = os.environ if env is None else env
    home = Path(env.get("LORAFLEET_HOME") or Path.home() / ".lorafleet").expanduser()
    return settings.model_copy(update={"home": home})


def settings_to_json(settings: Settings) -> str:
    """The settings as JSON for another process (a Ray actor); the token travels in clear."""
    data = settings.model_dump(mode="json")
    if settings.api_token is not None:
        data["api_token"] = settings.api_token.get_secret_value()
    return json.dumps(data)
