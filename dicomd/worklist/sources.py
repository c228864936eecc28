"""Worklist sources by configured name, one instance per process (kept across reloads)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dicomd.worklist.folder import FolderSource
from dicomd.worklist.source import WorklistSource
from dicomd.worklist.sql import SqlSource

if TYPE_CHECKING:
    from dicomd.config import Config

SHARED_KEY = "worklist_sources"


def open_source(config: Config, name: str, shared: dict[str, Any] | None = None) -> WorklistSource:
    """The source named ``name`` in ``config.worklist_sources``.

    With ``shared`` (ServiceContext.shared), one instance per kind and location is kept for
    the life of the process, so a reload does not throw the loaded entries away.
    """
    spec = next((s for s in config.worklist_sources if s.name == name), None)
    if spec is None:
        known = ", ".join(s.name for s in config.worklist_sources) or "none"
        raise KeyError(f"unknown worklist source {name!r} (known: {known})")
    location = str(spec.path) if spec.kind == "folder" else config.archive.index_url
    key = (spec.kind, location)
    cache: dict[tuple[str, str], WorklistSource] = (
        shared.setdefault(SHARED_KEY, {}) if shared is not None else {}
    )
    source = cache.get(key)
    if source is None:
        if spec.kind == "folder":
            assert spec.path is not None
            source = FolderSource(name, spec.path)
        else:
            source = SqlSource(name, config.archive.index_url)
        cache[key] = source
    return source
