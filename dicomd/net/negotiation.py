"""Association negotiation (PS3.7 Annex D, PS3.8 9.3.2-9.3.4), sans-IO.

The decisions are ours: which presentation contexts to accept, with *our* transfer-syntax
preference order (pynetdicom's acceptor keeps the requestor's order), which roles, and
what we announce. On the acceptor's side the A-ASSOCIATE-RQ arrives as an
``AssociationRequest`` (decoded by ``acse_codec.decode_rq``) and the A-ASSOCIATE-AC is
encoded from ``Negotiated`` by ``acse_codec.encode_ac``; on the requestor's side
pynetdicom's PDU classes and primitives still build the RQ and read the AC.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    SOPClassExtendedNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.presentation import PresentationContext

from dicomd import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

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


def _ae(value: str | bytes) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return value.strip()


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
    by_syntax = offers if type(offers) is dict else {o.abstract_syntax: o for o in offers}
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


def _common_user_information(max_pdu_length: int) -> list[object]:
    max_len = MaximumLengthNotification()
    max_len.maximum_length_received = max_pdu_length
    impl_uid = ImplementationClassUIDNotification()
    impl_uid.implementation_class_uid = UID(IMPLEMENTATION_CLASS_UID)
    impl_version = ImplementationVersionNameNotification()
    impl_version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    return [max_len, impl_uid, impl_version]


def build_request(
    *,
    calling_ae: str,
    called_ae: str,
    contexts: Sequence[ProposedContext],
    max_pdu_length: int,
    roles: dict[str, tuple[bool, bool]] | None = None,
    extended_negotiation: dict[str, bytes] | None = None,
    user_identity: UserIdentity | None = None,
) -> A_ASSOCIATE_RQ:
    prim = A_ASSOCIATE()
    prim.application_context_name = UID(APPLICATION_CONTEXT_NAME)
    prim.calling_ae_title = calling_ae
    prim.called_ae_title = called_ae
    pcs = []
    for c in contexts:
        cx = PresentationContext()
        cx.context_id = c.context_id
        cx.abstract_syntax = UID(c.abstract_syntax)
        cx.transfer_syntax = [UID(ts) for ts in c.transfer_syntaxes]
        pcs.append(cx)
    prim.presentation_context_definition_list = pcs
    info = _common_user_information(max_pdu_length)
    for uid, (scu, scp) in (roles or {}).items():
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid = UID(uid)
        role.scu_role = scu
        role.scp_role = scp
        info.append(role)
    for uid, app_info in (extended_negotiation or {}).items():
        ext = SOPClassExtendedNegotiation()
        ext.sop_class_uid = UID(uid)
        ext.service_class_application_information = app_info
        info.append(ext)
    if user_identity is not None:
        ui = UserIdentityNegotiation()
        ui.user_identity_type = user_identity.kind
        ui.primary_field = user_identity.primary
        ui.secondary_field = user_identity.secondary
        ui.positive_response_requested = user_identity.response_requested
        info.append(ui)
    prim.user_information = info  # type: ignore[assignment]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(prim)
    return pdu


@dataclass(frozen=True)
class AssociationAccept:
    """What the requestor learns from an A-ASSOCIATE-AC."""

    max_pdu_length: int
    implementation_class_uid: str
    implementation_version_name: str
    accepted: dict[int, AcceptedContext]
    rejected: dict[int, int]  # context id → result


def parse_accept(pdu: A_ASSOCIATE_AC, proposed: Sequence[ProposedContext]) -> AssociationAccept:
    prim = pdu.to_primitive()
    by_id = {c.context_id: c for c in proposed}
    max_pdu = 0
    impl_uid = ""
    impl_version = ""
    roles: dict[str, tuple[bool, bool]] = {}
    for item in prim.user_information:
        if isinstance(item, MaximumLengthNotification):
            max_pdu = int(item.maximum_length_received or 0)
        elif isinstance(item, ImplementationClassUIDNotification):
            impl_uid = str(item.implementation_class_uid or "")
        elif isinstance(item, ImplementationVersionNameNotification):
            impl_version = _ae(item.implementation_version_name or b"")
        elif isinstance(item, SCP_SCU_RoleSelectionNegotiation):
            roles[str(item.sop_class_uid)] = (bool(item.scu_role), bool(item.scp_role))
    accepted: dict[int, AcceptedContext] = {}
    rejected: dict[int, int] = {}
    for cx in prim.presentation_context_definition_results_list:
        cid = int(cx.context_id or 0)
        mine = by_id.get(cid)
        if mine is None:
            continue  # an answer to a context we never proposed: ignore it
        if cx.result != RESULT_ACCEPTANCE:
            rejected[cid] = int(cx.result or 0)
            continue
        scu, scp = roles.get(mine.abstract_syntax, (True, False))
        accepted[cid] = AcceptedContext(
            cid, mine.abstract_syntax, str(cx.transfer_syntax[0]), scu, scp
        )
    return AssociationAccept(max_pdu, impl_uid, impl_version, accepted, rejected)
