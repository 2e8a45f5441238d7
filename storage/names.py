"""Names and adapter references, validated at every boundary.

A name matches ``^[a-z0-9][a-z0-9._-]{0,63}$``: no slashes, no leading dot, so no name can
climb out of a directory or object prefix. References:

- ``namespace/name``          the latest ready version
- ``namespace/name:VERSION``  an exact version (1, 2, 3 …)
- ``namespace/name@ALIAS``    whatever version the alias points at now
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from storage.errors import InvalidName, InvalidReference

MAX_VERSION = 2**63 - 1
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_REF_RE = re.compile(
    r"^(?P<namespace>[^/:@]+)/(?P<name>[^/:@]+)(?::(?P<version>[^/:@]+)|@(?P<alias>[^/:@]+))?$"
)


def validate_name(value: str, *, kind: str = "name") -> str:
    """Return ``value`` if it is a valid name, else raise ``InvalidName`` naming ``kind``."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise InvalidName(
            f"invalid {kind} {value!r}: use 1-64 characters of a-z, 0-9, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


@dataclass(frozen=True)
class AdapterRef:
    """A parsed adapter reference."""

    namespace: str
    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        base = f"{self.namespace}/{self.name}"
        if self.version is not None:
            return f"{base}:{self.version}"
        if self.alias is not None:
            return f"{base}@{self.alias}"
        return base

    @property
    def repo(self) -> str:
        """``namespace/name`` without version or alias."""
        return f"{self.namespace}/{self.name}"


def parse_ref(text: str) -> AdapterRef:
    """Parse ``ns/name``, ``ns/name:3`` or ``ns/name@alias``.

    Raises:
        InvalidReference: anything else (including path tricks such as ``../x``).
    """
    m = _REF_RE.fullmatch(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise InvalidReference(
            f"invalid adapter reference {text!r}: expected namespace/name, "
            "namespace/name:VERSION or namespace/name@ALIAS"
        )
    try:
        namespace = validate_name(m["namespace"], kind="namespace")
        name = validate_name(m["name"], kind="adapter name")
        alias = validate_name(m["alias"], kind="alias") if m["alias"] else None
    except InvalidName as exc:
        raise InvalidReference(str(exc)) from None
    version = None
    if m["version"] is not None:
        digits = m["version"]
        # ASCII digits only: str.isdigit() is also true for '²' and '١' (int() takes the second,
        # not the first); and a version is a 64-bit column
        if not (digits.isascii() and digits.isdigit()) or not 1 <= int(digits) <= MAX_VERSION:
            raise InvalidReference(f"invalid version in {text!r}: use a positive integer")
        version = int(digits)
    return AdapterRef(namespace, name, version, alias)
