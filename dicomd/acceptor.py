"""The acceptor: route an A-ASSOCIATE-RQ to a local AE, decide, negotiate, serve.

A ``Generation`` is one loaded configuration with its service instances. New connections
use the current generation; a reload (SIGHUP) makes a new one current while associations
already open finish on the one they started with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dicomd.access import AssociationFacts, decide
from dicomd.association import Association
from dicomd.net import events as ev
from dicomd.net.negotiation import (
    APPLICATION_CONTEXT_NAME,
    RJ_PERMANENT,
    RJ_PRESENTATION_LOCAL_LIMIT_EXCEEDED,
    RJ_SOURCE_PRESENTATION,
    RJ_SOURCE_USER,
    RJ_TRANSIENT,
    RJ_USER_APPLICATION_CONTEXT_NOT_SUPPORTED,
    RJ_USER_CALLED_AE_NOT_RECOGNIZED,
    AssociationRequest,
    ContextOffer,
    build_accept,
    build_reject,
    negotiate_contexts,
    parse_request,
)

if TYPE_CHECKING:
    from dicomd.association import Request
    from dicomd.config import Config, LocalAE
    from dicomd.services.base import Service


@dataclass
class LocalAEHandle:
    config: LocalAE
    services: dict[str, Service]
    # abstract syntax → (offer, service); the first service that offers a syntax wins.
    by_syntax: dict[str, tuple[ContextOffer, Service]] = field(default_factory=dict)
    active: int = 0

    def __post_init__(self) -> None:
        for service in self.services.values():
            for offer in service.offers():
                self.by_syntax.setdefault(
                    offer.abstract_syntax,
                    (
                        ContextOffer(
                            offer.abstract_syntax,
                            offer.transfer_syntaxes,
                            offer.scu_role,
                            offer.scp_role,
                        ),
                        service,
                    ),
                )


@dataclass
class Counters:
    """Process-wide association counts, shared by every generation."""

    active: int = 0
    accepted: int = 0
    rejected: int = 0


class Generation:
    def __init__(
        self, config: Config, services: dict[str, dict[str, Service]], counters: Counters
    ) -> None:
        self.config = config
        self.counters = counters
        self.local_aes = {
            ae.ae_title: LocalAEHandle(ae, services.get(ae.ae_title, {})) for ae in config.local_aes
        }
        self.open_associations = 0

    def local_ae_for(self, called_ae: str, listener: str) -> LocalAEHandle | None:
        handle = self.local_aes.get(called_ae)
        if handle is None:
            return None
        if handle.config.listeners is not None and listener not in handle.config.listeners:
            return None
        return handle


class AcceptorAssociation(Association):
    role = "acceptor"

    def __init__(self, generation: Generation, listener: str) -> None:
        super().__init__()
        self.generation = generation
        self.listener = listener
        self.local_ae: LocalAEHandle | None = None
        # What the A-ASSOCIATE-RQ proposed (roles, extended negotiation, user identity).
        self.negotiation: AssociationRequest | None = None
        self.permitted: frozenset[str] = frozenset()
        self._counted = False
        generation.open_associations += 1

    def connection_started(self, link):  # type: ignore[no-untyped-def]
        super().connection_started(link)
        self.log = self.log.bind(dicom_listener=self.listener)

    def on_associate_indication(self, event: ev.AssociateIndication) -> None:
        gen = self.generation
        request = parse_request(event.request)
        self.negotiation = request
        self.calling_ae, self.called_ae = request.calling_ae, request.called_ae
        self.peer_max_pdu_length = request.max_pdu_length
        self.peer_implementation = (
            request.implementation_class_uid,
            request.implementation_version_name,
        )
        self.log = self.log.bind(dicom_calling_ae=self.calling_ae, dicom_called_ae=self.called_ae)

        def reject(result: int, source: int, reason: int, why: str, **facts: object) -> None:
            gen.counters.rejected += 1
            self._end_reason = f"rejected: {why}"
            self.log.warning("association_rejected", reason=why, **facts)
            self.link.associate_reject(build_reject(result, source, reason))

        if request.application_context != APPLICATION_CONTEXT_NAME:
            reject(
                RJ_PERMANENT,
                RJ_SOURCE_USER,
                RJ_USER_APPLICATION_CONTEXT_NOT_SUPPORTED,
                f"application context {request.application_context!r} not supported",
            )
            return
        handle = gen.local_ae_for(request.called_ae, self.listener)
        if handle is None:
            known = ", ".join(sorted(gen.local_aes)) or "none"
            reject(
                RJ_PERMANENT,
                RJ_SOURCE_USER,
                RJ_USER_CALLED_AE_NOT_RECOGNIZED,
                f"called AE title {request.called_ae!r} is not served on listener "
                f"{self.listener!r} (local AEs: {known})",
            )
            return
        cert = self.link.tls_peer_certificate or {}
        subject = _cert_common_name(cert)
        names = tuple(v for k, v in cert.get("subjectAltName", ()) if k in ("DNS", "IP Address"))
        identity = None
        if request.user_identity is not None and request.user_identity.kind in (1, 2):
            identity = request.user_identity.primary.decode("utf-8", "replace")
        facts = AssociationFacts(
            address=self.link.peer[0],
            calling_ae=request.calling_ae,
            called_ae=request.called_ae,
            listener=self.listener,
            tls_subject=subject,
            tls_names=names,
            user_identity=identity,
        )
        decision = decide(gen.config, facts)
        if not decision.allowed:
            reject(
                RJ_PERMANENT,
                RJ_SOURCE_USER,
                decision.reject_reason,
                f"refused by {decision.rule}",
                rule=decision.rule,
            )
            return
        limits = gen.config.limits
        if gen.counters.active >= limits.max_associations:
            reject(
                RJ_TRANSIENT,
                RJ_SOURCE_PRESENTATION,
                RJ_PRESENTATION_LOCAL_LIMIT_EXCEEDED,
                f"limit of {limits.max_associations} associations reached",
            )
            return
        ae_limit = handle.config.max_associations
        if ae_limit is not None and handle.active >= ae_limit:
            reject(
                RJ_TRANSIENT,
                RJ_SOURCE_PRESENTATION,
                RJ_PRESENTATION_LOCAL_LIMIT_EXCEEDED,
                f"limit of {ae_limit} associations for {handle.config.ae_title} reached",
            )
            return
        self.permitted = decision.services
        offers = [
            offer
            for offer, service in handle.by_syntax.values()
            if any(p in decision.services for p in service.permissions)
        ]
        negotiated = negotiate_contexts(request, offers)
        self.local_ae = handle
        handle.active += 1
        gen.counters.active += 1
        gen.counters.accepted += 1
        self._counted = True
        accept = build_accept(request, negotiated, max_pdu_length=limits.max_pdu_length)
        self._set_established(negotiated.accepted)
        self.link.associate_accept(accept)
        self.log.info(
            "association_accepted",
            rule=decision.rule,
            contexts=[
                f"{cx.context_id}:{cx.abstract_syntax}/{cx.transfer_syntax}"
                for cx in negotiated.accepted.values()
            ],
            rejected_contexts=sum(1 for d in negotiated.decisions if d.result != 0),
            peer_max_pdu=request.max_pdu_length,
            peer_implementation=request.implementation_version_name
            or request.implementation_class_uid,
        )

    def service_for(self, request: Request) -> Service | None:
        if self.local_ae is None:
            return None
        entry = self.local_ae.by_syntax.get(request.context.abstract_syntax)
        return entry[1] if entry is not None else None

    def on_closed(self) -> None:
        self.generation.open_associations -= 1
        if self._counted:
            self._counted = False
            self.generation.counters.active -= 1
            if self.local_ae is not None:
                self.local_ae.active -= 1
            self.log.info(
                "association_closed",
                reason=self._end_reason or "connection closed",
                **self.summary(),
            )
        elif not self._end_reason.startswith("rejected"):
            self.log.info(
                "connection_closed",
                reason=self._end_reason or "closed before association",
                **self.summary(),
            )


def _cert_common_name(cert: dict) -> str | None:
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None
