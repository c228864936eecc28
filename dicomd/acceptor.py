"""The acceptor: route an A-ASSOCIATE-RQ to a local AE, decide, negotiate, serve.

A ``Generation`` is one loaded configuration with its service instances. New connections
use the current generation; a reload (SIGHUP) makes a new one current while associations
already open finish on the one they started with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, cast

from dicomd.access import AccessDecision, AssociationFacts, decide
from dicomd.association import Association
from dicomd.net import events as ev
from dicomd.net.acse_codec import AssociateRJ, encode_ac
from dicomd.net.negotiation import (
    APPLICATION_CONTEXT_NAME,
    RESULT_ABSTRACT_SYNTAX_NOT_SUPPORTED,
    RESULT_USER_REJECTION,
    RJ_PERMANENT,
    RJ_PRESENTATION_LOCAL_LIMIT_EXCEEDED,
    RJ_SOURCE_PRESENTATION,
    RJ_SOURCE_USER,
    RJ_TRANSIENT,
    RJ_USER_APPLICATION_CONTEXT_NOT_SUPPORTED,
    RJ_USER_CALLED_AE_NOT_RECOGNIZED,
    AssociationRequest,
    ContextDecision,
    ContextOffer,
    Negotiated,
    negotiate_contexts,
)

if TYPE_CHECKING:
    from dicomd.association import Request
    from dicomd.config import Config, LocalAE
    from dicomd.services.base import Offer, Service


@dataclass
class LocalAEHandle:
    config: LocalAE
    services: dict[str, Service]
    # abstract syntax → (offer, service); the first service that offers a syntax wins.
    by_syntax: dict[str, tuple[ContextOffer, Service]] = field(default_factory=dict)
    # abstract syntax → the access-policy verb its contexts need (Offer.permission, else
    # the service's first permission).
    verb_by_syntax: dict[str, str] = field(default_factory=dict)
    # abstract syntax → (role-only offer, its verb) where two services share a syntax (see
    # below): offered alone when the decision grants its verb but not the serving one's.
    role_only_by_syntax: dict[str, tuple[ContextOffer, str]] = field(default_factory=dict)
    active: int = 0

    def __post_init__(self) -> None:
        for service in self.services.values():
            for offer in service.offers():
                first = self.by_syntax.get(offer.abstract_syntax)
                if first is not None and _role_only(first[0]) != _role_only(offer):
                    # One service serves the syntax (storage: the requestor sends C-STORE),
                    # another only needs the requestor's SCP role on it (query/retrieve's
                    # C-GET sub-operations): accept both roles; the serving one handles
                    # requests and its verb applies.
                    serving = (first[0], first[1]) if _role_only(offer) else (offer, service)
                    if _role_only(offer):
                        role_only = ContextOffer(
                            offer.abstract_syntax, offer.transfer_syntaxes, False, True
                        )
                        self.role_only_by_syntax[offer.abstract_syntax] = (
                            role_only,
                            offer_verb(offer, service),
                        )
                    else:
                        self.role_only_by_syntax[offer.abstract_syntax] = (
                            first[0],
                            self.verb_by_syntax[offer.abstract_syntax],
                        )
                    merged = ContextOffer(
                        serving[0].abstract_syntax, serving[0].transfer_syntaxes, True, True
                    )
                    self.by_syntax[offer.abstract_syntax] = (merged, serving[1])
                    if not _role_only(offer):
                        self.verb_by_syntax[offer.abstract_syntax] = offer_verb(offer, service)
                    continue
                self.verb_by_syntax.setdefault(offer.abstract_syntax, offer_verb(offer, service))
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


def _role_only(offer: Offer | ContextOffer) -> bool:
    """An offer that only accepts the requestor's SCP role (a C-GET storage context)."""
    return offer.scu_role is False and bool(offer.scp_role)


@dataclass
class Counters:
    """Process-wide association counts, shared by every generation."""

    active: int = 0
    accepted: int = 0
    rejected: int = 0
    refused_on_connect: int = 0
    # source address → associations it holds (limits.max_associations_per_address)
    by_address: dict[str, int] = field(default_factory=dict)


# Per-request answers, one per device's request (as pdu._RQ_CACHE_SIZE, oldest out first).
# Offers per (local AE, decision) are few and stable.
ACCEPT_CACHE_SIZE = 256
OFFER_CACHE_SIZE = 256


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
        # (request, local AE, decision) → negotiation outcome; see AcceptorAssociation._negotiate.
        self.accept_cache: dict[tuple[int, int, int], tuple[Any, ...]] = {}
        # (local AE, decision) → the offers it grants; see AcceptorAssociation._offers.
        self.offer_cache: dict[tuple[int, int], tuple[Any, ...]] = {}

    def local_ae_for(self, called_ae: str, listener: str) -> LocalAEHandle | None:
        handle = self.local_aes.get(called_ae)
        if handle is None:
            return None
        if handle.config.listeners is not None and listener not in handle.config.listeners:
            return None
        return handle


class AcceptorAssociation(Association):
    role = "acceptor"

    # Starting values on the class (see Association).
    local_ae: LocalAEHandle | None = None
    # What the A-ASSOCIATE-RQ proposed (roles, extended negotiation, user identity).
    negotiation: AssociationRequest | None = None
    permitted: frozenset[str] = frozenset()
    decision: AccessDecision | None = None
    address = ""
    tls_subject: str | None = None
    tls_names: tuple[str, ...] = ()
    # Abstract syntaxes accepted through Service.offer_for() on this association; made
    # when the first one is.
    extra_syntaxes: dict[str, Service] = MappingProxyType({})  # type: ignore[assignment]
    _counted = False

    def __init__(self, generation: Generation, listener: str) -> None:
        super().__init__()
        self.generation = generation
        self.listener = listener
        generation.open_associations += 1

    def _log_context(self) -> dict[str, Any]:
        context = super()._log_context()
        context["dicom_listener"] = self.listener
        if self.negotiation is not None:  # the A-ASSOCIATE-RQ arrived: AE titles known
            context["dicom_calling_ae"] = self.calling_ae
            context["dicom_called_ae"] = self.called_ae
        return context

    def connection_started(self, link):  # type: ignore[no-untyped-def]
        super().connection_started(link)
        self.address = link.peer[0]
        cert = link.tls_peer_certificate
        if cert:
            self.tls_subject = _cert_common_name(cert)
            self.tls_names = tuple(
                str(v) for k, v in cert.get("subjectAltName", ()) if k in ("DNS", "IP Address")
            )
        # Enforcement point 1: an address (and certificate) no rule can allow, whatever the
        # AE titles, is dropped before any PDU is read.
        facts = AssociationFacts(
            address=self.address,
            listener=self.listener,
            tls_subject=self.tls_subject,
            tls_names=self.tls_names,
        )
        decision = decide(self.generation.config, facts)
        if not decision.allowed:
            self.generation.counters.refused_on_connect += 1
            self._end_reason = "rejected: refused on connect"
            self.log.warning(
                "connection_refused",
                rule=decision.rule,
                address=self.address,
                listener=self.listener,
                tls_subject=self.tls_subject,
                reason=f"refused by {decision.rule}: no rule can allow this address",
            )
            self.generation.open_associations -= 1
            self._refused = True
            link.transport.abort()

    def on_associate_indication(self, event: ev.AssociateIndication) -> None:
        gen = self.generation
        request = event.request
        self.negotiation = request
        self.calling_ae, self.called_ae = request.calling_ae, request.called_ae
        self.peer_max_pdu_length = request.max_pdu_length
        self.peer_implementation = (
            request.implementation_class_uid,
            request.implementation_version_name,
        )
        self._log = None  # the AE titles are known now
        reject = self._reject
        if request.application_context != APPLICATION_CONTEXT_NAME:
            reject(
                RJ_PERMANENT,
                RJ_SOURCE_USER,
                RJ_USER_APPLICATION_CONTEXT_NOT_SUPPORTED,
                f"application context {request.application_context!r} not supported",
                rule="application context",
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
                rule="local_aes",
            )
            return
        identity = None
        if request.user_identity is not None and request.user_identity.kind in (1, 2):
            identity = request.user_identity.primary.decode("utf-8", "replace")
        facts = AssociationFacts(
            address=self.address,
            calling_ae=request.calling_ae,
            called_ae=request.called_ae,
            listener=self.listener,
            tls_subject=self.tls_subject,
            tls_names=self.tls_names,
            user_identity=identity,
        )
        decision = decide(gen.config, facts)
        self.decision = decision
        if not decision.allowed:
            reject(
                RJ_PERMANENT,
                RJ_SOURCE_USER,
                decision.reject_reason,
                f"refused by {decision.rule}",
                rule=decision.rule,
                address=self.address,
                tls_subject=self.tls_subject,
                user_identity=identity,
            )
            return
        limits = gen.config.limits
        if gen.counters.active >= limits.max_associations:
            reject(
                RJ_TRANSIENT,
                RJ_SOURCE_PRESENTATION,
                RJ_PRESENTATION_LOCAL_LIMIT_EXCEEDED,
                f"limit of {limits.max_associations} associations reached",
                rule="limits.max_associations",
            )
            return
        ae_limit = handle.config.max_associations
        if ae_limit is not None and handle.active >= ae_limit:
            reject(
                RJ_TRANSIENT,
                RJ_SOURCE_PRESENTATION,
                RJ_PRESENTATION_LOCAL_LIMIT_EXCEEDED,
                f"limit of {ae_limit} associations for {handle.config.ae_title} reached",
                rule=f"local_aes ({handle.config.ae_title}).max_associations",
            )
            return
        address_limit = limits.max_associations_per_address
        if address_limit is not None and gen.counters.by_address.get(self.address, 0) >= (
            address_limit
        ):
            reject(
                RJ_TRANSIENT,
                RJ_SOURCE_PRESENTATION,
                RJ_PRESENTATION_LOCAL_LIMIT_EXCEEDED,
                f"limit of {address_limit} associations from {self.address} reached",
                rule="limits.max_associations_per_address",
            )
            return
        self.permitted = decision.services
        negotiated, refused, extra, accept = self._negotiate(request, handle, decision)
        if extra:
            self.extra_syntaxes = dict(extra)
        if refused:
            self._log_refused_services(request, refused, decision)
        # The A-ASSOCIATE-AC goes out first: the peer's next PDU cannot be read before this
        # callback returns, and the bookkeeping below then overlaps its round trip.
        self.link.associate_accept(accept)
        self.local_ae = handle
        handle.active += 1
        gen.counters.active += 1
        gen.counters.by_address[self.address] = gen.counters.by_address.get(self.address, 0) + 1
        gen.counters.accepted += 1
        self._counted = True
        self._set_established(negotiated.accepted)
        if not self.logs("info"):
            return  # the arguments below cost more than the rest of the set-up
        self.log.info(
            "association_accepted",
            rule=decision.rule,
            address=self.address,
            tls_subject=self.tls_subject,
            contexts=[
                f"{cx.context_id}:{cx.abstract_syntax}/{cx.transfer_syntax}"
                for cx in negotiated.accepted.values()
            ],
            rejected_contexts=sum(1 for d in negotiated.decisions if d.result != 0),
            peer_max_pdu=request.max_pdu_length,
            peer_implementation=request.implementation_version_name
            or request.implementation_class_uid,
        )

    def _reject(self, result: int, source: int, reason: int, why: str, **facts: object) -> None:
        self.generation.counters.rejected += 1
        self._end_reason = f"rejected: {why}"
        facts.setdefault("address", self.address)
        self.log.warning("association_rejected", reason=why, **facts)
        self.link.associate_reject(AssociateRJ(result, source, reason))

    def _log_refused_services(
        self, request: AssociationRequest, refused: dict[str, str], decision: AccessDecision
    ) -> None:
        for verb in sorted(
            {
                refused[cx.abstract_syntax]
                for cx in request.contexts
                if cx.abstract_syntax in refused
            }
        ):
            by = decision.by_service.get(verb, decision.rule)
            self.log.warning(
                "service_refused",
                rule=by,
                address=self.address,
                service=verb,
                contexts=sum(
                    1 for cx in request.contexts if refused.get(cx.abstract_syntax) == verb
                ),
                reason=f"{verb!r} is refused by {by}",
            )

    def _negotiate(
        self, request: AssociationRequest, handle: LocalAEHandle, decision: AccessDecision
    ) -> tuple[Negotiated, dict[str, str], dict[str, Service], bytes]:
        """Contexts, refusals and the A-ASSOCIATE-AC for a request; pure in its arguments,
        so it is remembered per (request, local AE, decision): byte-identical requests (the
        usual case, which ``pdu.decode_associate_rq`` shares) skip it. A new request pays
        for the negotiation and the AC encoding only (a few µs): the offers the decision
        lets through are remembered per (local AE, decision), see ``_offers``."""
        gen = self.generation
        key = (id(request), id(handle), id(decision))
        hit = gen.accept_cache.get(key)
        if hit is not None and hit[0] is request and hit[1] is handle and hit[2] is decision:
            return hit[3]
        offers, refused = self._offers(handle, decision)
        taken: dict[str, Service] = {}  # syntaxes no offer names, taken by a service
        copied = False  # the remembered offers are shared: copy before adding to them
        for cx in request.contexts:
            syntax = cx.abstract_syntax
            if syntax in handle.by_syntax or syntax in taken or syntax in refused:
                continue
            # An abstract syntax no offer names: a permitted service may still take it.
            for service in handle.services.values():
                extra = service.offer_for(syntax)
                if extra is None:
                    continue
                if not copied:
                    offers, refused, copied = dict(offers), dict(refused), True
                verb = offer_verb(extra, service)
                if not decision.permits(verb):
                    refused[syntax] = verb
                    break
                offers[syntax] = ContextOffer(
                    syntax, extra.transfer_syntaxes, extra.scu_role, extra.scp_role
                )
                taken[syntax] = service
                break
        negotiated = _mark_refused(negotiate_contexts(request, offers), refused)
        accept = encode_ac(
            request,
            negotiated,
            max_pdu_length=gen.config.limits.max_pdu_length,
            extended_negotiation=_extended_replies(request, negotiated, handle, taken),
        )
        result = (negotiated, refused, taken, accept)
        if len(gen.accept_cache) >= ACCEPT_CACHE_SIZE:
            del gen.accept_cache[next(iter(gen.accept_cache))]  # the oldest
        # The key objects are kept in the value so a recycled id() can never match.
        gen.accept_cache[key] = (request, handle, decision, result)
        return result

    def _offers(
        self, handle: LocalAEHandle, decision: AccessDecision
    ) -> tuple[dict[str, ContextOffer], dict[str, str]]:
        """The local AE's offers the decision grants, by abstract syntax, and the syntaxes
        it refuses with the verb they needed (remembered per local AE and decision;
        decisions are shared, see ``access.decide``). Enforcement point 3: contexts of
        services the decision does not grant are rejected with user-rejection (not
        "abstract syntax not supported": we do serve them)."""
        cache = self.generation.offer_cache
        key = (id(handle), id(decision))
        hit = cache.get(key)
        if hit is not None and hit[0] is handle and hit[1] is decision:
            return hit[2], hit[3]
        offers: dict[str, ContextOffer] = {}
        refused: dict[str, str] = {}  # abstract syntax → the verb it needed
        for syntax, (offer, _service) in handle.by_syntax.items():
            verb = handle.verb_by_syntax[syntax]
            if decision.permits(verb):
                offers[syntax] = offer
                continue
            role_only = handle.role_only_by_syntax.get(syntax)
            if role_only is not None and decision.permits(role_only[1]):
                offers[syntax] = role_only[0]  # e.g. C-GET's storage SCP role without `store`
            else:
                refused[syntax] = verb
        if len(cache) >= OFFER_CACHE_SIZE:
            cache.clear()
        cache[key] = (handle, decision, offers, refused)
        return offers, refused

    def service_for(self, request: Request) -> Service | None:
        if self.local_ae is None:
            return None
        entry = self.local_ae.by_syntax.get(request.context.abstract_syntax)
        if entry is None:
            service = self.extra_syntaxes.get(request.context.abstract_syntax)
        else:
            service = entry[1]
        if service is not None:
            verb = service.permission_for(request)
            if self.decision is None or not self.decision.permits(verb):
                # Negotiation let the context through for another verb of this service.
                return cast("Service", _NotAuthorized(verb, self))
        return service

    _refused = False

    def on_closed(self) -> None:
        if self._refused:
            return  # counted and logged when refused on connect
        self.generation.open_associations -= 1
        if self._counted:
            self._counted = False
            self.generation.counters.active -= 1
            remaining = self.generation.counters.by_address.get(self.address, 1) - 1
            if remaining > 0:
                self.generation.counters.by_address[self.address] = remaining
            else:
                self.generation.counters.by_address.pop(self.address, None)
            if self.local_ae is not None:
                self.local_ae.active -= 1
            if self.logs("info"):  # summary() is not free
                self.log.info(
                    "association_closed",
                    reason=self._end_reason or "connection closed",
                    **self.summary(),
                )
        elif not self._end_reason.startswith("rejected") and self.logs("info"):
            self.log.info(
                "connection_closed",
                reason=self._end_reason or "closed before association",
                **self.summary(),
            )


def offer_verb(offer: Offer, service: Service) -> str:
    """The access-policy verb a presentation context needs."""
    if offer.permission:
        return offer.permission
    return service.permissions[0] if service.permissions else service.name


def _extended_replies(
    request: AssociationRequest,
    negotiated: Negotiated,
    handle: LocalAEHandle,
    taken: dict[str, Service],
) -> dict[str, bytes]:
    """Replies to the proposed SOP Class Extended Negotiation items: one per accepted
    abstract syntax whose serving service answers (Service.extended_negotiation)."""
    if not request.extended_negotiation:
        return {}
    accepted = {cx.abstract_syntax for cx in negotiated.accepted.values()}
    replies: dict[str, bytes] = {}
    for syntax, proposed in request.extended_negotiation.items():
        if syntax not in accepted:
            continue
        entry = handle.by_syntax.get(syntax)
        service = entry[1] if entry is not None else taken.get(syntax)
        answer = getattr(service, "extended_negotiation", None)
        reply = answer(syntax, proposed) if answer is not None else None
        if reply is not None:
            replies[syntax] = reply
    return replies


def _mark_refused(negotiated: Negotiated, refused: dict[str, str]) -> Negotiated:
    if not refused:
        return negotiated
    decisions = tuple(
        ContextDecision(d.context_id, d.abstract_syntax, RESULT_USER_REJECTION, d.transfer_syntax)
        if d.abstract_syntax in refused and d.result == RESULT_ABSTRACT_SYNTAX_NOT_SUPPORTED
        else d
        for d in negotiated.decisions
    )
    return Negotiated(decisions, negotiated.accepted, negotiated.role_replies)


STATUS_NOT_AUTHORIZED = 0x0124  # Refused: Not Authorized (PS3.7 Annex C)


class _NotAuthorized:
    """Stands in for a service whose verb the access decision does not grant."""

    name = "not-authorized"

    def __init__(self, verb: str, association: AcceptorAssociation) -> None:
        self.verb = verb
        decision = association.decision
        self.rule = decision.by_service.get(verb, decision.rule) if decision else "access"

    def answer_inline(self, association: Association, request: Request) -> bool:
        return False

    async def handle(self, association: Association, request: Request) -> None:
        association.log.warning(
            "request_refused",
            rule=self.rule,
            address=association.link.peer[0],
            service=self.verb,
            reason=f"{self.verb!r} is refused by {self.rule}",
        )
        await association.respond(
            request,
            status=STATUS_NOT_AUTHORIZED,
            error_comment=f"{self.verb} not authorized"[:64],
        )


def _cert_common_name(cert: dict) -> str | None:
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None
