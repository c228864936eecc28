"""What a worklist source gives the worklist service: a current snapshot per called AE."""

from __future__ import annotations

from abc import ABC, abstractmethod

from dicomd.worklist.index import EntryIndex


class SourceUnavailable(Exception):
    """The source cannot answer now (answered with 0xA700, Refused: Out of Resources)."""


class WorklistSource(ABC):
    name: str
    kind: str

    @abstractmethod
    async def snapshot(self, ae_title: str) -> EntryIndex:
        """The entries of ``ae_title``'s worklist as they are now."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release files, watches and connections."""
