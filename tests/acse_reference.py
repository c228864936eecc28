"""The A-ASSOCIATE path dicomd used before ``dicomd.net.acse_codec``, through pynetdicom's
PDU, item and primitive classes: the reference the hand-written codec is tested against.

``reference_decode_rq`` is what ``pdu.decode_associate_rq`` + ``negotiation.parse_request``
did (structure checks, then ``A_ASSOCIATE_RQ.decode`` and ``to_primitive``);
``reference_encode_ac`` is what ``negotiation.build_accept`` + ``A_ASSOCIATE_AC.encode`` did.
On the requestor's side, ``reference_encode_rq`` is what ``negotiation.build_request`` +
``A_ASSOCIATE_RQ.encode`` did, and ``reference_decode_ac`` what ``pdu.decode_associate_ac``
(structure checks, ``A_ASSOCIATE_AC.decode``) + ``negotiation.parse_accept``
(``to_primitive``) did, as an ``AssociateAC``.
"""

from __future__ import annotations

import struct

from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_items import PDU_ITEM_TYPES
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    SOPClassCommonExtendedNegotiation,
    SOPClassExtendedNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.presentation import PresentationContext

from dicomd import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicomd.net.events import ABORT_REASON_UNRECOGNIZED_PDU_PARAMETER
from dicomd.net.negotiation import (
    APPLICATION_CONTEXT_NAME,
    AssociateAC,
    AssociationRequest,
    ContextResult,
    Negotiated,
    ProposedContext,
    UserIdentity,
)
from dicomd.net.pdu import PduError, ProtocolVersionNotSupported

_USER_SUB_ITEMS = frozenset(t for t in PDU_ITEM_TYPES if t > 0x50)


def _walk_items(data: bytes, start: int, end: int, where: str) -> list[tuple[int, int, int]]:
    items = []
    off = start
    while off < end:
        if end - off < 4:
            raise PduError(f"{where}: {end - off} trailing bytes cannot hold an item header")
        item_type = data[off]
        stop = off + 4 + struct.unpack_from(">H", data, off + 2)[0]
        if stop > end:
            raise PduError(f"{where}: item 0x{item_type:02X} overruns its container")
        items.append((item_type, off, stop))
        off = stop
    return items


def _check_structure(pdu: bytes, name: str, context_item: int, sub_items: tuple[int, ...]) -> bytes:
    """The old structure checks of ``pdu.py`` before pynetdicom decoded an A-ASSOCIATE-RQ
    (context item 0x20: abstract and transfer syntaxes) or -AC (0x21: transfer syntax)."""
    if len(pdu) < 74:
        raise PduError(f"{name} shorter than its 68-byte fixed part")
    rebuilt: list[bytes] | None = None
    for item_type, off, stop in _walk_items(pdu, 74, len(pdu), name):
        if item_type == context_item:
            if stop - off < 8:
                raise PduError(f"{name}: presentation context item too short")
            for sub_type, _, _ in _walk_items(pdu, off + 8, stop, f"{name} context"):
                if sub_type not in sub_items:
                    raise PduError(
                        f"{name}: sub-item 0x{sub_type:02X} in a presentation context",
                        ABORT_REASON_UNRECOGNIZED_PDU_PARAMETER,
                    )
        elif item_type == 0x50:
            subs = _walk_items(pdu, off + 4, stop, f"{name} user information")
            if any(t not in _USER_SUB_ITEMS for t, _, _ in subs):
                kept = [pdu[o:s] for t, o, s in subs if t in _USER_SUB_ITEMS]
                length = sum(len(k) for k in kept)
                rebuilt = [pdu[:off], bytes((0x50, 0)), struct.pack(">H", length)]
                rebuilt += kept
                rebuilt.append(pdu[stop:])
        elif item_type != 0x10:
            raise PduError(
                f"{name}: unrecognized item type 0x{item_type:02X}",
                ABORT_REASON_UNRECOGNIZED_PDU_PARAMETER,
            )
    if rebuilt is None:
        return pdu
    data = bytearray(b"".join(rebuilt))
    struct.pack_into(">I", data, 2, len(data) - 6)
    return bytes(data)


def _check_rq(pdu: bytes) -> bytes:
    return _check_structure(pdu, "A-ASSOCIATE-RQ", 0x20, (0x30, 0x40))


def reference_decode_rq(raw: bytes) -> AssociationRequest:
    """The old decode + parse. Raises PduError where the old decoder did; anything else
    it raised (pynetdicom's primitives refusing a value in ``to_primitive``, which the old
    acceptor met as an internal error) comes out as it is."""
    if len(raw) < 8:
        raise PduError("A-ASSOCIATE-RQ too short for its protocol version")
    version = struct.unpack_from(">H", raw, 6)[0]
    if not version & 1:
        raise ProtocolVersionNotSupported(version)
    data = _check_rq(raw)
    pdu = A_ASSOCIATE_RQ()
    try:
        pdu.decode(data)
    except Exception as exc:
        raise PduError(f"A-ASSOCIATE-RQ cannot be decoded: {exc!r}") from exc
    return _parse_request(pdu)


def _ae(value: str | bytes) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return value.strip()


def _parse_request(pdu: A_ASSOCIATE_RQ) -> AssociationRequest:
    prim = pdu.to_primitive()
    contexts = tuple(
        ProposedContext(
            int(cx.context_id or 0),
            str(cx.abstract_syntax or ""),
            tuple(str(ts) for ts in cx.transfer_syntax),
        )
        for cx in prim.presentation_context_definition_list
    )
    max_pdu = 0
    impl_uid = ""
    impl_version = ""
    roles: dict[str, tuple[bool, bool]] = {}
    ext: dict[str, bytes] = {}
    common: dict[str, tuple[str, tuple[str, ...]]] = {}
    identity: UserIdentity | None = None
    window: tuple[int, int] | None = None
    for item in prim.user_information:
        if isinstance(item, MaximumLengthNotification):
            max_pdu = int(item.maximum_length_received or 0)
        elif isinstance(item, ImplementationClassUIDNotification):
            impl_uid = str(item.implementation_class_uid or "")
        elif isinstance(item, ImplementationVersionNameNotification):
            raw = item.implementation_version_name or b""
            impl_version = _ae(raw)
        elif isinstance(item, SCP_SCU_RoleSelectionNegotiation):
            roles[str(item.sop_class_uid)] = (bool(item.scu_role), bool(item.scp_role))
        elif isinstance(item, SOPClassExtendedNegotiation):
            ext[str(item.sop_class_uid)] = bytes(item.service_class_application_information or b"")
        elif isinstance(item, SOPClassCommonExtendedNegotiation):
            common[str(item.sop_class_uid)] = (
                str(item.service_class_uid or ""),
                tuple(str(u) for u in item.related_general_sop_class_identification),
            )
        elif isinstance(item, UserIdentityNegotiation):
            identity = UserIdentity(
                int(item.user_identity_type or 0),
                bytes(item.primary_field or b""),
                bytes(item.secondary_field or b""),
                bool(item.positive_response_requested),
            )
        elif isinstance(item, AsynchronousOperationsWindowNegotiation):
            window = (
                int(item.maximum_number_operations_invoked),
                int(item.maximum_number_operations_performed),
            )
    return AssociationRequest(
        calling_ae=_ae(prim.calling_ae_title),
        called_ae=_ae(prim.called_ae_title),
        application_context=str(prim.application_context_name or ""),
        contexts=contexts,
        max_pdu_length=max_pdu,
        implementation_class_uid=impl_uid,
        implementation_version_name=impl_version,
        roles=roles,
        extended_negotiation=ext,
        common_extended_negotiation=common,
        user_identity=identity,
        async_ops_window=window,
    )


def _common_user_items(max_pdu_length: int) -> list[object]:
    """Maximum length, implementation class UID and version name: the user-information
    sub-items every RQ and AC of ours starts with (pynetdicom's classes)."""
    max_len = MaximumLengthNotification()
    max_len.maximum_length_received = max_pdu_length
    impl_uid = ImplementationClassUIDNotification()
    impl_uid.implementation_class_uid = UID(IMPLEMENTATION_CLASS_UID)
    impl_version = ImplementationVersionNameNotification()
    impl_version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    return [max_len, impl_uid, impl_version]


def reference_encode_ac(
    request: AssociationRequest,
    negotiated: Negotiated,
    *,
    max_pdu_length: int,
    extended_negotiation: dict[str, bytes] | None = None,
) -> bytes:
    """The old ``build_accept`` (pynetdicom primitives → A_ASSOCIATE_AC), encoded."""
    prim = A_ASSOCIATE()
    prim.application_context_name = UID(APPLICATION_CONTEXT_NAME)
    prim.calling_ae_title = request.calling_ae or "UNKNOWN"
    prim.called_ae_title = request.called_ae or "UNKNOWN"
    prim.result = 0
    prim.result_source = 1
    results = []
    for d in negotiated.decisions:
        cx = PresentationContext()
        cx.context_id = d.context_id
        cx.abstract_syntax = UID(d.abstract_syntax)
        cx.transfer_syntax = [UID(d.transfer_syntax or "1.2.840.10008.1.2")]
        cx.result = d.result
        results.append(cx)
    prim.presentation_context_definition_results_list = results
    info: list[object] = _common_user_items(max_pdu_length)
    for uid, (scu, scp) in negotiated.role_replies.items():
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid = UID(uid)
        role.scu_role = scu
        role.scp_role = scp
        info.append(role)
    if request.async_ops_window is not None:
        window = AsynchronousOperationsWindowNegotiation()
        window.maximum_number_operations_invoked = 1
        window.maximum_number_operations_performed = 1
        info.append(window)
    for uid, app_info in (extended_negotiation or {}).items():
        ext = SOPClassExtendedNegotiation()
        ext.sop_class_uid = UID(uid)
        ext.service_class_application_information = app_info
        info.append(ext)
    prim.user_information = info  # type: ignore[assignment]
    pdu = A_ASSOCIATE_AC()
    pdu.from_primitive(prim)
    return pdu.encode()


# --- the requestor's side ---------------------------------------------------------------------


def reference_encode_rq(
    *,
    calling_ae: str,
    called_ae: str,
    contexts: list[ProposedContext] | tuple[ProposedContext, ...],
    max_pdu_length: int,
    roles: dict[str, tuple[bool, bool]] | None = None,
    extended_negotiation: dict[str, bytes] | None = None,
    user_identity: UserIdentity | None = None,
) -> bytes:
    """The old ``build_request`` (pynetdicom primitives → A_ASSOCIATE_RQ), encoded."""
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
    info: list[object] = _common_user_items(max_pdu_length)
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
    return bytes(pdu.encode())


def _check_ac(pdu: bytes) -> bytes:
    """The old ``pdu._check_associate_ac``."""
    return _check_structure(pdu, "A-ASSOCIATE-AC", 0x21, (0x40,))


def reference_decode_ac(raw: bytes) -> AssociateAC:
    """The old decode, and what the old ``parse_accept`` read of it (plus the extended
    negotiation and user identity replies, which it did not read). Raises PduError where
    the old decoder did; anything else (``to_primitive`` refusing a value, an IndexError
    for an accepted context without a transfer syntax) comes out as it is."""
    data = _check_ac(raw)
    pdu = A_ASSOCIATE_AC()
    try:
        pdu.decode(data)
    except Exception as exc:
        raise PduError(f"A-ASSOCIATE-AC cannot be decoded: {exc!r}") from exc
    prim = pdu.to_primitive()
    max_pdu = 0
    impl_uid = ""
    impl_version = ""
    roles: dict[str, tuple[bool, bool]] = {}
    ext: dict[str, bytes] = {}
    response: bytes | None = None
    for item in prim.user_information:
        if isinstance(item, MaximumLengthNotification):
            max_pdu = int(item.maximum_length_received or 0)
        elif isinstance(item, ImplementationClassUIDNotification):
            impl_uid = str(item.implementation_class_uid or "")
        elif isinstance(item, ImplementationVersionNameNotification):
            impl_version = _ae(item.implementation_version_name or b"")
        elif isinstance(item, SCP_SCU_RoleSelectionNegotiation):
            roles[str(item.sop_class_uid)] = (bool(item.scu_role), bool(item.scp_role))
        elif isinstance(item, SOPClassExtendedNegotiation):
            ext[str(item.sop_class_uid)] = bytes(item.service_class_application_information or b"")
        elif isinstance(item, UserIdentityNegotiation) and item.server_response is not None:
            response = bytes(item.server_response)
    results = []
    for cx in prim.presentation_context_definition_results_list:
        accepted = cx.result == 0
        results.append(
            ContextResult(
                int(cx.context_id or 0),
                int(cx.result or 0),
                str(cx.transfer_syntax[0]) if accepted else "",
            )
        )
    return AssociateAC(tuple(results), max_pdu, impl_uid, impl_version, roles, ext, response)
