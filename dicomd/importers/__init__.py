"""Importers for migrating sites: TCP-wrapper host rules and DCMTK's dcmqrscp.cfg.

Each importer turns the old configuration into a dicomd YAML fragment (for
``/etc/dicomd/conf.d/``) and lists, line by line, what it could not convert.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml


@dataclass(frozen=True)
class Note:
    """Something not converted, or converted with a caveat, and where it came from."""

    where: str  # file:line
    text: str
    converted: bool = False  # True: converted, with a caveat worth reading

    def __str__(self) -> str:
        return f"{self.where}: {self.text}"


class _NoAliases(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_yaml(data: Any) -> str:
    """YAML for a configuration fragment: flow style for short lists, no anchors."""
    return yaml.dump(data, Dumper=_NoAliases, sort_keys=False, default_flow_style=None, width=96)
