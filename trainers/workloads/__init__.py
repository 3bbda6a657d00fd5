"""Registry of workload specs (one per data kind), chosen by the prepared data's manifest format.

``for_manifest(manifest)`` on the driver, ``get(plan.kind)`` on the workers, ``for_export(folder)`` in the
model registry. A new data kind registers its :class:`WorkloadSpec` here.
"""

from __future__ import annotations

from pathlib import Path

from trainers.workloads.base import DataError, DataFacts, Workload, WorkloadSpec
from trainers.workloads.image import ImageSpec
from trainers.workloads.text import TextSpec

_SPECS: dict[str, WorkloadSpec] = {}


def register(spec: WorkloadSpec) -> WorkloadSpec:
    if spec.kind in _SPECS:
        raise ValueError(f"workload kind {spec.kind!r} is registered twice")
    _SPECS[spec.kind] = spec
    return spec


register(TextSpec())
register(ImageSpec())


def available() -> list[str]:
    return sorted(_SPECS)


def get(kind: str) -> WorkloadSpec:
    if kind not in _SPECS:
        raise ValueError(f"unknown workload kind {kind!r}; registered: {', '.join(available())}")
    return _SPECS[kind]


def for_manifest(manifest) -> WorkloadSpec:
    """The spec whose manifest format ``manifest`` carries."""
    for spec in _SPECS.values():
        if spec.manifest_format == manifest.format:
            return spec
    raise DataError(f"manifest format {manifest.format!r} has no workload; known: "
                    f"{', '.join(s.manifest_format for s in _SPECS.values())}")


def for_prepare_kind(kind: str | None) -> WorkloadSpec:
    """The spec whose data ``data.prepare.kind`` builds (no kind: text)."""
    for spec in _SPECS.values():
        if spec.prepare_kind == kind:
            return spec
    allowed = ", ".join(repr(s.prepare_kind) for s in _SPECS.values() if s.prepare_kind)
    raise ValueError(f"data.prepare.kind={kind!r} is not allowed; allowed: {allowed}, or leave it out for text "
                     "(tokenized, packed shards)")


def for_objective(objective) -> WorkloadSpec:
    """The spec whose data ``objective`` (an instance) trains on."""
    for spec in _SPECS.values():
        if spec.owns(type(objective)):
            return spec
    raise ValueError(f"objective {objective.name!r} belongs to no registered workload ({', '.join(available())})")


def for_export(directory: str | Path) -> WorkloadSpec | None:
    """The spec of an export (checkpoint or pulled model) folder, by its marker file; None if none matches."""
    for spec in _SPECS.values():
        if spec.is_export(Path(directory)):
            return spec
    return None


__all__ = ["DataError", "DataFacts", "Workload", "WorkloadSpec", "available", "for_export", "for_manifest",
           "for_objective", "for_prepare_kind", "get", "register"]
