"""Discovery of service plug-ins through the ``dicomd.services`` entry-point group."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points

from dicomd.services.base import Service

ENTRY_POINT_GROUP = "dicomd.services"

# Built-ins, importable even when dicomd runs from a source tree without installed
# metadata (entry points come from the installed distribution).
BUILTIN_SERVICES: dict[str, str] = {
    "verification": "dicomd.services.verification:VerificationService",
    "storage": "dicomd.services.storage:StorageService",
    "worklist": "dicomd.services.worklist:WorklistService",
    "query_retrieve": "dicomd.services.query_retrieve:QueryRetrieveService",
}


class ServiceLoadError(Exception):
    """A configured service plug-in could not be imported or is not a Service."""


@dataclass(frozen=True)
class Registry:
    services: dict[str, type[Service]]

    def permissions(self) -> set[str]:
        return {p for cls in self.services.values() for p in cls.permissions}


def _load(spec: str) -> type[Service]:
    from importlib import import_module

    module_name, _, attr = spec.partition(":")
    try:
        obj = getattr(import_module(module_name), attr)
    except Exception as exc:  # any import failure is the plug-in's fault, reported by name
        raise ServiceLoadError(f"cannot load {spec}: {exc}") from exc
    if not (isinstance(obj, type) and issubclass(obj, Service)):
        raise ServiceLoadError(f"{spec} is not a dicomd Service subclass")
    return obj


def discover() -> tuple[Registry, list[str]]:
    """All loadable services, and a message for each plug-in that failed to load."""
    specs = dict(BUILTIN_SERVICES)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        specs.setdefault(ep.name, ep.value)
    services: dict[str, type[Service]] = {}
    problems: list[str] = []
    for name, spec in sorted(specs.items()):
        try:
            cls = _load(spec)
        except ServiceLoadError as exc:
            problems.append(f"service plug-in {name!r}: {exc}")
            continue
        services[name] = cls
    return Registry(services), problems
