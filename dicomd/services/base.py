"""The contract between a service plug-in and the rest of dicomd.

A service declares:
- ``name``: its key under ``local_aes[].services`` in the configuration;
- ``Options``: a pydantic model of its own options there (unknown keys are errors);
- ``permissions``: the verbs the access policy grants for it (``echo``, ``store``, ...);
- ``offers()``: the presentation contexts it serves, so the acceptor can negotiate;
- ``offer_for()``: optionally, an offer for an abstract syntax no ``offers()`` names;
- ``extended_negotiation()``: optionally, the reply to a SOP Class Extended Negotiation item;
- ``handle()``: one DIMSE request on an association (``answer_inline()``: at once, for
  requests answered without waiting, such as C-ECHO);
- ``run()``: optional background work for the life of the process (a writer, a watcher).
  The supervisor restarts it with backoff if it fails, without touching other services.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from dicomd.association import Association, Request
    from dicomd.config import Config, LocalAE


class ServiceOptions(BaseModel):
    """Base of every service's options: strict, unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True, slots=True)
class Offer:
    """One abstract syntax a service serves, with transfer syntaxes in preference order.

    ``scu_role``/``scp_role`` are what we accept if the requestor proposes SCP/SCU role
    selection (PS3.7 D.3.3.4); None means role selection is not supported for it.
    """

    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]
    scu_role: bool | None = None
    scp_role: bool | None = None
    # The access-policy verb this context needs (``move`` for a C-MOVE SOP class of a
    # query/retrieve service); None: the service's first ``permissions`` entry.
    permission: str | None = None


@dataclass(slots=True)
class ServiceContext:
    """What a service instance may use: the whole config, the local AE it serves, and
    ``shared``: one dict for the whole process (the same object across reloads), where
    services keep resources several instances use, such as the archive and its index.
    """

    config: Config
    local_ae: LocalAE
    shared: dict[str, Any] = field(default_factory=dict)


class Service(ABC):
    name: ClassVar[str]
    Options: ClassVar[type[ServiceOptions]] = ServiceOptions
    permissions: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: ServiceOptions, context: ServiceContext) -> None:
        self.options = options
        self.context = context

    @abstractmethod
    def offers(self) -> list[Offer]:
        """Presentation contexts this service accepts on its local AE."""

    def offer_for(self, abstract_syntax: str) -> Offer | None:
        """An offer for a proposed abstract syntax that no service's ``offers()`` names, or
        None (the default). Negotiation asks each permitted service of the local AE in turn;
        the storage service uses it to accept unknown (private, newer) storage SOP classes.
        """
        return None

    def extended_negotiation(self, abstract_syntax: str, proposed: bytes) -> bytes | None:
        """The reply to a SOP Class Extended Negotiation item (PS3.7 D.3.3.5) the requestor
        proposed for an abstract syntax of this service that was accepted, or None (the
        default): no reply item, which means none of the proposed options is supported.
        The acceptor puts the reply in the A-ASSOCIATE-AC; the request's items stay on
        ``association.negotiation.extended_negotiation``, so a service can recompute what
        was agreed. Must be pure in its arguments (the AC is remembered per request)."""
        return None

    def permission_for(self, request: Request) -> str:
        """The access-policy verb a request needs; services with one verb need not override."""
        return self.permissions[0]

    def answer_inline(self, association: Association, request: Request) -> bool:
        """Answer a request that has no data set at once, inside the callback that read
        it, or return False (the default) to have ``handle()`` run in a task of its own.

        For requests answered without waiting on anything (C-ECHO): answer with
        ``association.respond_now()`` and return True. Must not block or await."""
        return False

    @abstractmethod
    async def handle(self, association: Association, request: Request) -> None:
        """Serve one DIMSE request (the association calls this per request)."""

    async def run(self) -> None:
        """Background work for the life of the process. The default has none."""
        await asyncio.Event().wait()
