"""Which bytes answered: the sha256 of the adapter and of the base, on every response.

- ``X-Lorafleet-Adapter-Sha256``: the sha256 of the adapter version's stored
  ``adapter_model.safetensors`` (absent for the bare base). ``sha256sum`` of the file a
  client downloads (``lorafleet adapters pull``, or the PEFT directory it exported) gives the
  same hex digest.
- ``X-Lorafleet-Base-Sha256``: for a base whose weights are one ``.safetensors`` file, that
  file's sha256; for a sharded base, the sha256 of the text made of one line
  ``"<file name> <sha256>\\n"`` per weight file, sorted by name (what
  ``sha256sum *.safetensors | awk '{print $2" "$1}' | sort | sha256sum`` prints).
- ``system_fingerprint`` (in the body): ``lf-`` and the first 16 hex digits of
  ``sha256("<base sha256>:<adapter sha256 or empty>")`` — one value that changes whenever
  either set of bytes does.

Digests come from the catalog, where every one was verified when the bytes were stored, and
every node verifies again when it downloads them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from storage.catalog.domain import AdapterVersion, FileDigest

ADAPTER_HEADER = "X-Lorafleet-Adapter-Sha256"
BASE_HEADER = "X-Lorafleet-Base-Sha256"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def base_sha256(files: Iterable[FileDigest]) -> str:
    """The base's weights digest (see the module docstring)."""
    weights = sorted((f for f in files if f.name.endswith(".safetensors")), key=lambda f: f.name)
    if len(weights) == 1:
        return weights[0].sha256
    lines = "".join(f"{f.name} {f.sha256}\n" for f in weights)
    return hashlib.sha256(lines.encode()).hexdigest()


def adapter_sha256(version: AdapterVersion) -> str | None:
    """The sha256 of the version's stored ``adapter_model.safetensors`` (None: it has none)."""
    return next((f.sha256 for f in version.files if f.name == ADAPTER_WEIGHTS), None)


def system_fingerprint(base: str, adapter: str | None) -> str:
    return "lf-" + hashlib.sha256(f"{base}:{adapter or ''}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Provenance:
    """The digests of one answer's bytes, as headers and a fingerprint."""

    base: str
    adapter: str | None = None

    @property
    def fingerprint(self) -> str:
        return system_fingerprint(self.base, self.adapter)

    def headers(self) -> dict[str, str]:
        out = {BASE_HEADER: self.base}
        if self.adapter is not None:
            out[ADAPTER_HEADER] = self.adapter
        return out
