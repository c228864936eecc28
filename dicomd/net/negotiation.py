"""Association negotiation (PS3.7 Annex D, PS3.8 9.3.2-9.3.4), sans-IO.

The decisions are ours: which presentation contexts to accept, with *our* transfer-syntax
preference order (pynetdicom's acceptor keeps the requestor's order), which roles, and
what we announce. On the acceptor's side the A-ASSOCIATE-RQ arrives as an
``AssociationRequest`` (decoded by ``acse_codec.decode_rq``) and the A-ASSOCIATE-AC is
encoded from ``Negotiated`` by ``acse_codec.encode_ac``. On the requestor's side
``acse_codec.encode_rq`` encodes the RQ from ``ProposedContext``s and the AC arrives as an
``AssociateAC`` (``acse_codec.decode_ac``), which ``parse_accept`` matches against what
was proposed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"

# Presentation context results (PS3.8 table 9-18).
RESULT_ACCEPTANCE = 0
RESULT_USER_REJECTION = 1
RESULT_NO_REASON = 2
RESULT_ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
RESULT_TRANSFER_SYNTAXES_NOT_SUPPORTED = 4

# A-ASSOCIATE-RJ result / source / reason (PS3.8 table 9-21).
RJ_PERMANENT = 1
RJ_TRANSIENT = 2
RJ_SOURCE_USER = 1
RJ_SOURCE_ACSE = 2
RJ_SOURCE_PRESENTATION = 3
RJ_USER_NO_REASON = 1
RJ_USER_APPLICATION_CONTEXT_NOT_SUPPORTED = 2
RJ_USER_CALLING_AE_NOT_RECOGNIZED = 3
RJ_USER_CALLED_AE_NOT_RECOGNIZED = 7
RJ_ACSE_NO_REASON = 1
RJ_ACSE_PROTOCOL_VERSION_NOT_SUPPORTED = 2
RJ_PRESENTATION_TEMPORARY_CONGESTION = 1
RJ_PRESENTATION_LOCAL_LIMIT_EXCEEDED = 2


@dataclass(frozen=True, slots=True)
class ProposedContext:
    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AcceptedContext:
    """A presentation context in use on an established association.

    ``scu_role``/``scp_role`` say whether the *requestor* acts as SCU / SCP on it.
    """

    context_id: int
    abstract_syntax: str
    transfer_syntax: str
    scu_role: bool = True
    scp_role: bool = False


@dataclass(frozen=True, slots=True)
class UserIdentity:
    """User Identity negotiation item (PS3.7 D.3.3.7): type 1 username, 2 username and
    passcode, 3 Kerberos, 4 SAML, 5 JWT."""

    kind: int
    primary: bytes
    secondary: bytes
    response_requested: bool


@dataclass(frozen=True)
class AssociationRequest:
    """Everything an A-ASSOCIATE-RQ tells the acceptor, in plain values: what the access
    decision and the services see (``acse_codec.decode_rq`` builds it). Shared between
    associations whose requests were byte-identical: read it, never change it."""

    calling_ae: str
    called_ae: str
    application_context: str
    contexts: tuple[ProposedContext, ...]
    max_pdu_length: int  # the requestor's maximum receive length; 0 = unlimited
    implementation_class_uid: str
    implementation_version_name: str
    roles: dict[str, tuple[bool, bool]] = field(default_factory=dict)  # SOP class → (scu, scp)
    extended_negotiation: dict[str, bytes] = field(default_factory=dict)
    common_extended_negotiation: dict[str, tuple[str, tuple[str, ...]]] = field(
        default_factory=dict
    )
    user_identity: UserIdentity | None = None
    async_ops_window: tuple[int, int] | None = None  # (invoked, performed) if proposed


@dataclass(frozen=True, slots=True)
class ContextOffer:
    """What the acceptor supports for one abstract syntax (see services.base.Offer)."""

    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]
    scu_role: bool | None = None
    scp_role: bool | None = None


@dataclass(frozen=True)
class ContextDecision:
    context_id: int
    abstract_syntax: str
    result: int
    transfer_syntax: str  # the chosen one, or the first proposed when rejected


@dataclass(frozen=True)
class Negotiated:
    decisions: tuple[ContextDecision, ...]
    accepted: dict[int, AcceptedContext]
    role_replies: dict[str, tuple[bool, bool]]


def negotiate_contexts(
    request: AssociationRequest, offers: Iterable[ContextOffer] | dict[str, ContextOffer]
) -> Negotiated:
    """Accept each proposed context we support, choosing by *our* transfer-syntax order.
    ``offers`` may be given by abstract syntax already (a dict), as the acceptor keeps them.

    Roles (PS3.7 D.3.3.4): when the requestor proposes role selection for an abstract
    syntax and our offer supports it, we grant what it proposed and we allow; when our
    offer does not support role selection we send no reply item, so the default roles
    (requestor SCU, acceptor SCP) apply.
    """
    by_syntax = offers if isinstance(offers, dict) else {o.abstract_syntax: o for o in offers}
    decisions: list[ContextDecision] = []
    accepted: dict[int, AcceptedContext] = {}
    role_replies: dict[str, tuple[bool, bool]] = {}
    for cx in request.contexts:
        first = cx.transfer_syntaxes[0] if cx.transfer_syntaxes else ""
        offer = by_syntax.get(cx.abstract_syntax)
        if offer is None:
            decisions.append(
                ContextDecision(
                    cx.context_id, cx.abstract_syntax, RESULT_ABSTRACT_SYNTAX_NOT_SUPPORTED, first
                )
            )
            continue
        proposed = set(cx.transfer_syntaxes)
        chosen = next((ts for ts in offer.transfer_syntaxes if ts in proposed), None)
        if chosen is None:
            decisions.append(
                ContextDecision(
                    cx.context_id,
                    cx.abstract_syntax,
                    RESULT_TRANSFER_SYNTAXES_NOT_SUPPORTED,
                    first,
                )
            )
            continue
        scu, scp = True, False
        rq_role = request.roles.get(cx.abstract_syntax)
        if rq_role is not None and offer.scu_role is not None:
            scu = rq_role[0] and bool(offer.scu_role)
            scp = rq_role[1] and bool(offer.scp_role)
            role_replies[cx.abstract_syntax] = (scu, scp)
            if not (scu or scp):
                decisions.append(
                    ContextDecision(
                        cx.context_id, cx.abstract_syntax, RESULT_USER_REJECTION, chosen
                    )
                )
                continue
        decisions.append(
            ContextDecision(cx.context_id, cx.abstract_syntax, RESULT_ACCEPTANCE, chosen)
        )
        accepted[cx.context_id] = AcceptedContext(
            cx.context_id, cx.abstract_syntax, chosen, scu, scp
        )
    return Negotiated(tuple(decisions), accepted, role_replies)


@dataclass(frozen=True, slots=True)
class ContextResult:
    """One presentation context item of an A-ASSOCIATE-AC (PS3.8 9.3.3.2)."""

    context_id: int
    result: int
    # The accepted transfer syntax; "" when the context was rejected (the field is then
    # "not significant", PS3.8 table 9-18).
    transfer_syntax: str


@dataclass(frozen=True)
class AssociateAC:
    """Everything an A-ASSOCIATE-AC tells the requestor, in plain values, as received
    (``acse_codec.decode_ac`` builds it). The called/calling AE title fields are not kept:
    PS3.8 table 9-17 has them echo the request and forbids testing them."""

    contexts: tuple[ContextResult, ...]
    max_pdu_length: int  # the acceptor's maximum receive length; 0 = unlimited
    implementation_class_uid: str
    implementation_version_name: str
    roles: dict[str, tuple[bool, bool]] = field(default_factory=dict)  # SOP class → (scu, scp)
    extended_negotiation: dict[str, bytes] = field(default_factory=dict)
    user_identity_response: bytes | None = None  # the server response, if one was sent


@dataclass(frozen=True)
class AssociationAccept:
    """What the requestor learns from an A-ASSOCIATE-AC, matched against its proposal."""

    max_pdu_length: int
    implementation_class_uid: str
    implementation_version_name: str
    accepted: dict[int, AcceptedContext]
    rejected: dict[int, int]  # context id → result
    roles: dict[str, tuple[bool, bool]] = field(default_factory=dict)  # role selection replies
    extended_negotiation: dict[str, bytes] = field(default_factory=dict)  # SOP class → reply
    user_identity_response: bytes | None = None


def parse_accept(ac: AssociateAC, proposed: Sequence[ProposedContext]) -> AssociationAccept:
    """Match the AC's context results with the contexts we proposed. An answer for a
    context ID we never proposed is ignored; for an ID answered twice the last answer
    counts. Role replies (PS3.7 D.3.3.4) set the roles on the accepted contexts of their
    SOP class; without one the defaults apply (requestor SCU, acceptor SCP)."""
    by_id = {c.context_id: c for c in proposed}
    accepted: dict[int, AcceptedContext] = {}
    rejected: dict[int, int] = {}
    for cx in ac.contexts:
        mine = by_id.get(cx.context_id)
        if mine is None:
            continue
        if cx.result != RESULT_ACCEPTANCE:
            accepted.pop(cx.context_id, None)
            rejected[cx.context_id] = cx.result
            continue
        rejected.pop(cx.context_id, None)
        scu, scp = ac.roles.get(mine.abstract_syntax, (True, False))
        accepted[cx.context_id] = AcceptedContext(
            cx.context_id, mine.abstract_syntax, cx.transfer_syntax, scu, scp
        )
    return AssociationAccept(
        ac.max_pdu_length,
        ac.implementation_class_uid,
        ac.implementation_version_name,
        accepted,
        rejected,
        dict(ac.roles),
        dict(ac.extended_negotiation),
        ac.user_identity_response,
    )
