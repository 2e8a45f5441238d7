"""Spectra of published adapters and their compression (``lorafleet adapters inspect|compress``).

The math is ``workers.lora.spectrum``; this module reads an adapter directory, stores the
spectrum with a version at publish (the catalog keeps it per layer; ``rank_90`` / ``rank_99``
also go into the metrics, where filters and gates see them), and publishes a compressed
version with its lineage (``compressed_from``).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.catalog.domain import AdapterVersion
from storage.registry import Registry


def spectrum_of_dir(adapter_dir: str | Path) -> dict[str, Any]:
    """The spectrum summary of a PEFT adapter directory (``Spectrum.summary``)."""
    from storage.adapter_files import inspect_adapter_dir
    from workers.lora.io import read_adapter_config, read_adapter_weights
    from workers.lora.spectrum import adapter_spectrum

    inspect_adapter_dir(adapter_dir)  # refuses a bad adapter (NaN weights too) before the math
    config = read_adapter_config(adapter_dir)
    return adapter_spectrum(read_adapter_weights(adapter_dir), config).summary()


def spectrum_metrics(spectrum: dict[str, Any]) -> dict[str, Any]:
    """The numbers of a spectrum that go into a version's metrics."""
    return {"rank_90": spectrum["rank_90"], "rank_99": spectrum["rank_99"]}


def version_spectrum(registry: Registry, version: AdapterVersion) -> dict[str, Any]:
    """A version's spectrum: as stored at publish, or computed from its (verified) files for a
    version published before spectra were stored."""
    if version.spectrum:
        return version.spectrum
    _, directory = registry.fetch(version)
    return spectrum_of_dir(directory)


@dataclass(frozen=True)
class CompressResult:
    """The new version and what the compression kept."""

    version: AdapterVersion
    source: AdapterVersion
    rank: int
    energy_kept_min: float
    size_ratio: float


def compress_version(
    registry: Registry,
    ref: str,
    *,
    rank: int | None = None,
    energy: float | None = None,
    out_ref: str | None = None,
) -> CompressResult:
    """Publish the best rank-K approximation of ``ref`` as a new version (of ``out_ref``,
    default the same adapter), lineage ``compressed_from`` the exact source version.

    Raises:
        LoraConfigError: neither or both of ``rank`` / ``energy``, or a rank not below r.
    """
    from workers.lora.io import read_adapter_config, read_adapter_weights, save_adapter_state
    from workers.lora.spectrum import compress

    source, directory = registry.fetch(ref)
    config = read_adapter_config(directory)
    done = compress(read_adapter_weights(directory), config, rank=rank, energy=energy)
    with tempfile.TemporaryDirectory(prefix="lorafleet-compress-") as tmp:
        out = save_adapter_state(done.weights, done.config, Path(tmp) / "adapter")
        spectrum = spectrum_of_dir(out)
        lineage = {
            **source.hyperparameters,
            "lora": done.config.as_dict(),
            "compressed_from": source.ref,
            "compression": {"rank": done.rank, "energy": energy,
                            "energy_kept_min": done.energy_kept_min,
                            "size_ratio": done.size_ratio},
        }  # fmt: skip
        metrics = {"compressed_from_r": config.r, "energy_kept_min": done.energy_kept_min,
                   "size_ratio": done.size_ratio, **spectrum_metrics(spectrum)}  # fmt: skip
        version = registry.publish(
            adapter_dir=out, ref=out_ref or f"{source.namespace}/{source.name}",
            base_model=source.base_model.name, job_id=source.job_id,
            dataset_sha256=source.dataset_sha256, metrics=metrics, hyperparameters=lineage,
            tags=[*source.tags, "compressed"], created_by=f"compress:{source.ref}",
            spectrum=spectrum,
        )  # fmt: skip
    return CompressResult(version, source, done.rank, done.energy_kept_min, done.size_ratio)
