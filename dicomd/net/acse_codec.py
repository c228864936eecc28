"""A-ASSOCIATE-RQ/AC/RJ by hand (PS3.8 9.3.2-9.3.4 and annex D, PS3.7 D.3.3), sans-IO.

The association set-up is the one part of an association that is all parsing: ~200 bytes
of nested items in, ~200 bytes out. Going through pynetdicom's PDU, item and primitive
classes (with pydicom validating each UID as it is built) cost ~185-240 µs per association;
this module decodes an A-ASSOCIATE-RQ straight into ``negotiation.AssociationRequest`` and
encodes the A-ASSOCIATE-AC straight from ``negotiation.Negotiated``, with ``struct`` and
byte slices. pynetdicom's classes stay the reference the tests hold this codec to
(tests/test_acse_codec.py): same request for every valid RQ, byte-identical ACs.

Checks (the structural ones are those ``pdu.py`` made before handing the bytes to
pynetdicom; the value checks take the place of pynetdicom's):

* structure (anything wrong here is found before any value is looked at): the fixed part
  is complete; items and sub-items tile their container exactly; a presentation context
  item holds its 4-byte header; top-level items are application context (0x10),
  presentation context (0x20) and user information (0x50), else A-ABORT reason 4
  "unrecognized PDU parameter"; a presentation context holds only abstract (0x30) and
  transfer (0x40) syntax sub-items, else reason 4. User information sub-items of types
  this edition does not define are skipped (PS3.8 D.2 note 2).
* values (A-ABORT reason 6 "invalid PDU parameter value"): AE titles are ASCII without
  control characters or backslash and not all spaces (leading/trailing spaces are not
  significant, PS3.8 table 9-11); UIDs are 1-64 characters of ``0-9`` and ``.`` after a
  trailing NUL (PS3.5 9.1 pads odd lengths with one) and surrounding spaces are removed
  (pynetdicom let any ASCII through with a warning; the Implementation Class UID, which
  only names the peer's software, still may be any printable ASCII);
  fixed-size fields have their size; presentation context IDs are odd 1-255; role values
  are 0 or 1; user identity types are 1-5; lengths inside sub-items stay inside them.

Where several items say the same thing the outcome is pynetdicom's: the first application
context name, the last user information item, the last of each sub-item (per SOP class
for roles and extended negotiation), the last abstract syntax of a presentation context;
a presentation context's transfer syntaxes keep their order without repeats.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from dicomd import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicomd.net.events import (
    ABORT_REASON_INVALID_PDU_PARAMETER,
    ABORT_REASON_UNRECOGNIZED_PDU_PARAMETER,
)
from dicomd.net.negotiation import (
    APPLICATION_CONTEXT_NAME,
    AssociateAC,
    AssociationRequest,
    ContextResult,
    Negotiated,
    ProposedContext,
    UserIdentity,
)

__all__ = [
    "AssociateRJ",
    "PduError",
    "ProtocolVersionNotSupported",
    "decode_ac",
    "decode_rj",
    "decode_rq",
    "encode_ac",
    "encode_rq",
]


class PduError(Exception):
    """A received PDU cannot be accepted (PS3.8 Evt19 "unrecognized or invalid PDU").

    ``reason`` is the A-ABORT provider reason (PS3.8 table 9-26) to answer with.
    """

    def __init__(self, message: str, reason: int = ABORT_REASON_INVALID_PDU_PARAMETER) -> None:
        super().__init__(message)
        self.reason = reason


class ProtocolVersionNotSupported(PduError):
    """An A-ASSOCIATE-RQ without bit 0 of its protocol version set (PS3.8 9.3.2).

    Not an abort: PS3.8 AE-6 has the provider answer with an A-ASSOCIATE-RJ, result 1
    (permanent), source 2 (provider, ACSE), reason 2 (protocol version not supported).
    """

    def __init__(self, protocol_version: int) -> None:
        super().__init__(
            f"A-ASSOCIATE-RQ protocol version 0x{protocol_version:04X} not supported "
            "(bit 0, version 1, not set)"
        )
        self.protocol_version = protocol_version


# Offsets in an A-ASSOCIATE-RQ/AC (PS3.8 tables 9-11, 9-17): header (6), protocol version
# (2), reserved (2), called AE (16), calling AE (16), reserved (32), then the items.
_HEADER_LENGTH = 6
_ITEMS_OFFSET = 74

_APPLICATION_CONTEXT = 0x10
_PRESENTATION_CONTEXT_RQ = 0x20
_PRESENTATION_CONTEXT_AC = 0x21
_ABSTRACT_SYNTAX = 0x30
_TRANSFER_SYNTAX = 0x40
_USER_INFORMATION = 0x50
_MAXIMUM_LENGTH = 0x51
_IMPLEMENTATION_CLASS_UID = 0x52
_ASYNC_OPERATIONS_WINDOW = 0x53
_ROLE_SELECTION = 0x54
_IMPLEMENTATION_VERSION_NAME = 0x55
_SOP_CLASS_EXTENDED = 0x56
_SOP_CLASS_COMMON_EXTENDED = 0x57
_USER_IDENTITY_RQ = 0x58
_USER_IDENTITY_AC = 0x59

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U16_PAIR = struct.Struct(">HH")
_ITEM_HEADER = struct.Struct(">BxH")
_PDU_HEADER = struct.Struct(">BxI")
_UID_CHARACTERS = b"0123456789."
_MAX_UID_LENGTH = 64
_MAX_AE_LENGTH = 16
_RESULT_MAX = 4  # transfer-syntaxes-not-supported (PS3.8 table 9-18)


class _ValueFault(PduError):
    """A value fault found by the helpers shared by the RQ and AC decoders; the decoder
    names the PDU (``_named``)."""


def _invalid(what: str) -> PduError:
    return _ValueFault(what)


def _named(exc: _ValueFault, name: str) -> PduError:
    return PduError(f"{name}: {exc}", exc.reason)


# --- values -------------------------------------------------------------------------------


def _ae_title(raw: bytes, what: str) -> str:
    """An AE title field (16 bytes, space padded): ASCII, no control character or
    backslash, leading and trailing spaces not significant, not all spaces."""
    try:
        value = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise _invalid(f"{what} AE title {raw!r} is not ASCII") from None
    if not value:
        raise _invalid(f"{what} AE title is all spaces")
    if not value.isprintable() or "\\" in value:
        raise _invalid(f"{what} AE title {value!r} has a control character or backslash")
    return value


def _uid(raw: bytes, what: str, allow_empty: bool = True, strip: bool = True) -> str:
    """A UID field (PS3.8 annex F): digits and dots, 1-64 characters. One trailing NUL is
    tolerated and removed, and (``strip``) surrounding spaces. An empty value is "" where
    PS3.8 lets a later check refuse it (an unknown abstract syntax, a wrong application
    context)."""
    if 0 < len(raw) <= _MAX_UID_LENGTH and not raw.translate(None, _UID_CHARACTERS):
        return raw.decode("ascii")  # the usual case: nothing to strip
    value = raw[:-1] if raw[-1:] == b"\x00" else raw
    if strip:
        value = value.strip()
    if value.translate(None, _UID_CHARACTERS):
        raise _invalid(f"{what} {raw!r} is not a UID (digits and dots)")
    if len(value) > _MAX_UID_LENGTH:
        raise _invalid(f"{what} of {len(value)} characters (at most {_MAX_UID_LENGTH})")
    if not value and not allow_empty:
        raise _invalid(f"{what} is empty")
    return value.decode("ascii")


def _implementation_uid(raw: bytes) -> str:
    """Implementation Class UID (PS3.7 D.3.3.2.1). It only names the peer's software (for
    the log), so a non-conformant one (letters, say) is taken as it is rather than costing
    the association: printable ASCII, at most 64 characters."""
    if 0 < len(raw) <= _MAX_UID_LENGTH and not raw.translate(None, _UID_CHARACTERS):
        return raw.decode("ascii")
    try:
        value = (raw[:-1] if raw[-1:] == b"\x00" else raw).decode("ascii").strip()
    except UnicodeDecodeError:
        raise _invalid(f"implementation class UID {raw!r} is not ASCII") from None
    if len(value) > _MAX_UID_LENGTH or not value.isprintable():
        raise _invalid(f"implementation class UID {value!r} is not a UID")
    return value


def _version_name(raw: bytes) -> str:
    """Implementation Version Name (PS3.7 D.3.3.2.3): 1-16 characters of the AE repertoire."""
    try:
        value = raw.decode("ascii")
    except UnicodeDecodeError:
        raise _invalid(f"implementation version name {raw!r} is not ASCII") from None
    if len(value) > _MAX_AE_LENGTH or not value.isprintable() or "\\" in value:
        raise _invalid(f"implementation version name {value!r} is not a 1-16 character name")
    return value.strip()


def _length_prefixed(data: bytes, off: int, stop: int, what: str) -> tuple[bytes, int]:
    """A 2-byte length and that many bytes at ``data[off:stop]``; returns (value, end)."""
    if stop - off < 2:
        raise _invalid(f"{what}: its length field is missing")
    end = off + 2 + (data[off] << 8 | data[off + 1])
    if end > stop:
        raise _invalid(f"{what} overruns its sub-item")
    return data[off + 2 : end], end


# --- A-ASSOCIATE-RQ -----------------------------------------------------------------------

_Items = list[tuple[int, int, int]]


def _items(data: bytes, off: int, end: int, where: str) -> _Items:
    """``(type, value offset, stop)`` of the items tiling ``data[off:end]``. Item header:
    type (1), reserved (1), item-length (2) (PS3.8 9.3.2.x)."""
    items = []
    while off < end:
        if end - off < 4:
            raise PduError(f"{where}: {end - off} trailing bytes cannot hold an item header")
        item_type = data[off]
        start = off + 4
        stop = start + (data[off + 2] << 8 | data[off + 3])
        if stop > end:
            raise PduError(f"{where}: item 0x{item_type:02X} overruns its container")
        items.append((item_type, start, stop))
        off = stop
    return items


def _structure(
    data: bytes, where: str, context_type: int, context_sub_items: tuple[int, ...]
) -> tuple[_Items, list[_Items], _Items]:
    """Walk every item and sub-item first, so that a structural fault is reported as such
    (reason 4 or 6) whatever faulty value may precede it. ``context_type`` is the
    presentation context item of this PDU (0x20 in an RQ, 0x21 in an AC), holding only
    ``context_sub_items``."""
    top = _items(data, _ITEMS_OFFSET, len(data), where)
    context_subs: list[_Items] = []
    user_subs: _Items = []
    for item_type, start, stop in top:
        if item_type == context_type:
            # Presentation context ID, reserved (RQ) or result/reason (AC), reserved (2),
            # then the sub-items.
            if stop - start < 4:
                raise PduError(f"{where}: presentation context item too short")
            subs = _items(data, start + 4, stop, f"{where} context")
            for sub_type, _, _ in subs:
                if sub_type not in context_sub_items:
                    raise PduError(
                        f"{where}: sub-item 0x{sub_type:02X} in a presentation context",
                        ABORT_REASON_UNRECOGNIZED_PDU_PARAMETER,
                    )
            context_subs.append(subs)
        elif item_type == _USER_INFORMATION:
            # Every user information item is checked; the last one counts (below).
            user_subs = _items(data, start, stop, f"{where} user information")
        elif item_type != _APPLICATION_CONTEXT:
            raise PduError(
                f"{where}: unrecognized item type 0x{item_type:02X}",
                ABORT_REASON_UNRECOGNIZED_PDU_PARAMETER,
            )
    return top, context_subs, user_subs


def decode_rq(pdu: bytes | memoryview) -> AssociationRequest:
    """Decode a whole A-ASSOCIATE-RQ PDU (header included) into the plain values the
    acceptor decides on. Raises ``ProtocolVersionNotSupported`` or ``PduError``."""
    data = pdu if type(pdu) is bytes else bytes(pdu)
    size = len(data)
    # The version is tested before the layout: a later protocol version may lay the PDU
    # out differently. PS3.8 9.3.2: a receiver "shall only test that bit 0 is set".
    if size < _HEADER_LENGTH + 2:
        raise PduError("A-ASSOCIATE-RQ too short for its protocol version")
    version = data[6] << 8 | data[7]
    if not version & 1:
        raise ProtocolVersionNotSupported(version)
    if size < _ITEMS_OFFSET:
        raise PduError("A-ASSOCIATE-RQ shorter than its 68-byte fixed part")
    try:
        return _decode_rq(data)
    except _ValueFault as exc:
        raise _named(exc, "A-ASSOCIATE-RQ") from None


def _decode_rq(data: bytes) -> AssociationRequest:
    top, context_subs, user_subs = _structure(
        data, "A-ASSOCIATE-RQ", _PRESENTATION_CONTEXT_RQ, (_ABSTRACT_SYNTAX, _TRANSFER_SYNTAX)
    )

    called_ae = _ae_title(data[10:26], "called")
    calling_ae = _ae_title(data[26:42], "calling")
    application_context: str | None = None
    contexts: list[ProposedContext] = []
    next_subs = iter(context_subs)
    for item_type, start, stop in top:
        if item_type == _PRESENTATION_CONTEXT_RQ:
            contexts.append(_context(data, start, next(next_subs)))
        elif item_type == _APPLICATION_CONTEXT:
            name = _uid(data[start:stop], "application context name")
            if application_context is None:
                application_context = name

    user = _user_information(data, user_subs, in_request=True)
    max_pdu, impl_uid, impl_version, roles, extended, common, identity, window, _ = user
    return AssociationRequest(
        calling_ae,
        called_ae,
        application_context or "",
        tuple(contexts),
        max_pdu,
        impl_uid,
        impl_version,
        roles,
        extended,
        common,
        identity,
        window,
    )


class _UserInformation(NamedTuple):
    max_pdu: int
    implementation_uid: str
    implementation_version: str
    roles: dict[str, tuple[bool, bool]]
    extended: dict[str, bytes]
    common: dict[str, tuple[str, tuple[str, ...]]]
    identity: UserIdentity | None
    window: tuple[int, int] | None
    identity_response: bytes | None


def _user_information(data: bytes, user_subs: _Items, in_request: bool) -> _UserInformation:
    """The user information sub-items (PS3.8 D.1, PS3.7 D.3.3) of an RQ or an AC. Every
    sub-item of a type defined for either PDU is checked wherever it appears (the old
    pynetdicom path decoded them all); the last of each kind counts. A role selection or
    extended negotiation sub-item names a SOP class: an empty UID is refused (pynetdicom
    read a zero UID-length as "the rest of the sub-item")."""
    max_pdu = 0
    impl_uid = impl_version = ""
    roles: dict[str, tuple[bool, bool]] = {}
    extended: dict[str, bytes] = {}
    common: dict[str, tuple[str, tuple[str, ...]]] = {}
    identity: UserIdentity | None = None
    window: tuple[int, int] | None = None
    response: bytes | None = None
    for sub_type, start, stop in user_subs:
        if sub_type == _MAXIMUM_LENGTH:
            if stop - start != 4:
                raise _invalid(f"maximum length sub-item of {stop - start} bytes (not 4)")
            max_pdu = _U32.unpack_from(data, start)[0]
        elif sub_type == _IMPLEMENTATION_CLASS_UID:
            impl_uid = _implementation_uid(data[start:stop])
        elif sub_type == _IMPLEMENTATION_VERSION_NAME:
            impl_version = _version_name(data[start:stop])
        elif sub_type == _ROLE_SELECTION:
            uid, end = _length_prefixed(data, start, stop, "role selection SOP class UID")
            if stop - end < 2:
                raise _invalid("role selection sub-item without its SCU/SCP role fields")
            scu, scp = data[end], data[end + 1]
            if scu > 1 or scp > 1:
                raise _invalid(f"role selection values {scu}/{scp} (0 or 1)")
            roles[_uid(uid, "role selection SOP class UID", False)] = (scu == 1, scp == 1)
        elif sub_type == _ASYNC_OPERATIONS_WINDOW:
            if stop - start < 4:
                raise _invalid("asynchronous operations window sub-item too short")
            window = _U16_PAIR.unpack_from(data, start)
        elif sub_type == _SOP_CLASS_EXTENDED:
            uid, end = _length_prefixed(data, start, stop, "extended negotiation SOP class UID")
            extended[_uid(uid, "extended negotiation SOP class UID", False)] = data[end:stop]
        elif sub_type == _SOP_CLASS_COMMON_EXTENDED:
            sop_class, service_class, related = _common_extended(data, start, stop)
            common[sop_class] = (service_class, related)
        elif sub_type == _USER_IDENTITY_RQ:
            identity = _user_identity(data, start, stop)
        elif sub_type == _USER_IDENTITY_AC and not in_request:
            # Server-response-length (2), server response (PS3.7 D.3.3.7.2).
            response, end = _length_prefixed(data, start, stop, "user identity server response")
            if end != stop:
                raise _invalid(f"user identity: {stop - end} bytes after the server response")
        # Anything else (0x59 in a request, where it means nothing, or a sub-item of a
        # later edition) is skipped, PS3.8 D.2 note 2.
    return _UserInformation(
        max_pdu, impl_uid, impl_version, roles, extended, common, identity, window, response
    )


def _context(data: bytes, start: int, subs: _Items) -> ProposedContext:
    context_id = data[start]
    if not context_id & 1:
        raise _invalid(f"presentation context ID {context_id} is not odd")
    abstract = ""
    transfer: list[str] = []
    for sub_type, s_start, s_stop in subs:
        if sub_type == _TRANSFER_SYNTAX:
            ts = _uid(data[s_start:s_stop], "transfer syntax")
            if ts and ts not in transfer:
                transfer.append(ts)
        else:
            abstract = _uid(data[s_start:s_stop], "abstract syntax")
    return ProposedContext(context_id, abstract, tuple(transfer))


def _common_extended(data: bytes, start: int, stop: int) -> tuple[str, str, tuple[str, ...]]:
    """SOP Class Common Extended Negotiation (PS3.7 D.3.3.6): SOP class UID, service class
    UID, then the related general SOP class UIDs, each behind a 2-byte length."""
    what = "common extended negotiation"
    sop_class, off = _length_prefixed(data, start, stop, f"{what} SOP class UID")
    service_class, off = _length_prefixed(data, off, stop, f"{what} service class UID")
    listed, off = _length_prefixed(data, off, stop, f"{what} related SOP classes")
    if off != stop:
        raise _invalid(f"{what}: {stop - off} bytes after the related SOP classes")
    related = []
    pos, end = 0, len(listed)
    while pos < end:
        uid, pos = _length_prefixed(listed, pos, end, f"{what} related SOP class UID")
        related.append(_uid(uid, f"{what} related SOP class UID", False, strip=False))
    return (
        _uid(sop_class, f"{what} SOP class UID"),
        _uid(service_class, f"{what} service class UID"),
        tuple(related),
    )


def _user_identity(data: bytes, start: int, stop: int) -> UserIdentity:
    """User Identity (PS3.7 D.3.3.7.1): type, positive response requested, primary field
    and secondary field, each behind a 2-byte length. A secondary-field-length with
    nothing after the primary field is tolerated as an empty secondary field."""
    if stop - start < 2:
        raise _invalid("user identity sub-item too short")
    kind, response = data[start], data[start + 1]
    if not 1 <= kind <= 5:
        raise _invalid(f"user identity type {kind} (1-5)")
    primary, off = _length_prefixed(data, start + 2, stop, "user identity primary field")
    secondary = b""
    if off != stop:
        secondary, off = _length_prefixed(data, off, stop, "user identity secondary field")
        if off != stop:
            raise _invalid(f"user identity: {stop - off} bytes after the secondary field")
    return UserIdentity(kind, primary, secondary, response != 0)


# --- A-ASSOCIATE-AC -----------------------------------------------------------------------


def _item(item_type: int, value: bytes) -> bytes:
    return _ITEM_HEADER.pack(item_type, len(value)) + value


def _uid_bytes(uid: str) -> bytes:
    return uid.encode("ascii")


def _ae_field(title: str) -> bytes:
    value = title.encode("ascii")
    if len(value) > _MAX_AE_LENGTH:
        raise ValueError(f"AE title {title!r} is longer than 16 characters")
    return value.ljust(_MAX_AE_LENGTH)


# The parts of every AC that do not depend on the request: the application context item,
# and the implementation class UID and version name sub-items (PS3.7 D.3.3.2).
_AC_APPLICATION_CONTEXT = _item(_APPLICATION_CONTEXT, _uid_bytes(APPLICATION_CONTEXT_NAME))
_AC_IMPLEMENTATION = _item(_IMPLEMENTATION_CLASS_UID, _uid_bytes(IMPLEMENTATION_CLASS_UID)) + _item(
    _IMPLEMENTATION_VERSION_NAME, IMPLEMENTATION_VERSION_NAME.encode("ascii")
)
_AC_FIXED_PREFIX = _U16.pack(1) + b"\x00\x00"  # protocol version 1, reserved
_AC_RESERVED = bytes(32)
_ASYNC_WINDOW_ONE = _item(_ASYNC_OPERATIONS_WINDOW, _U16_PAIR.pack(1, 1))
# Encoded presentation context result items, per (context ID, result, transfer syntax).
_context_items: dict[tuple[int, int, str], bytes] = {}
_CONTEXT_ITEMS_MAX = 4096
_DEFAULT_TRANSFER_SYNTAX = "1.2.840.10008.1.2"


def _context_item(context_id: int, result: int, transfer_syntax: str) -> bytes:
    key = (context_id, result, transfer_syntax)
    item = _context_items.get(key)
    if item is None:
        ts = _item(_TRANSFER_SYNTAX, _uid_bytes(transfer_syntax or _DEFAULT_TRANSFER_SYNTAX))
        item = _item(_PRESENTATION_CONTEXT_AC, bytes((context_id, 0, result, 0)) + ts)
        if len(_context_items) >= _CONTEXT_ITEMS_MAX:
            _context_items.clear()
        _context_items[key] = item
    return item


def encode_ac(
    request: AssociationRequest,
    negotiated: Negotiated,
    *,
    max_pdu_length: int,
    extended_negotiation: Mapping[str, bytes] | None = None,
) -> bytes:
    """The A-ASSOCIATE-AC for a request we accept (PS3.8 9.3.3), encoded.

    Called and calling AE titles are returned as received. User information: our maximum
    length, implementation class UID and version name, then the SCP/SCU role selection
    replies, an asynchronous operations window of (1, 1) whenever the requestor proposed
    one (dicomd performs one operation at a time per association), and the SOP Class
    Extended Negotiation replies. Every presentation context gets a result item carrying
    one transfer syntax (the chosen one; the first proposed when rejected).
    """
    parts = [
        b"",  # the PDU header, once the length is known
        _AC_FIXED_PREFIX,
        _ae_field(request.called_ae or "UNKNOWN"),
        _ae_field(request.calling_ae or "UNKNOWN"),
        _AC_RESERVED,
        _AC_APPLICATION_CONTEXT,
    ]
    parts += [
        _context_item(d.context_id, d.result, d.transfer_syntax) for d in negotiated.decisions
    ]
    user = [_item(_MAXIMUM_LENGTH, _U32.pack(max_pdu_length)), _AC_IMPLEMENTATION]
    for uid, (scu, scp) in negotiated.role_replies.items():
        value = _uid_bytes(uid)
        user.append(_item(_ROLE_SELECTION, _U16.pack(len(value)) + value + bytes((scu, scp))))
    if request.async_ops_window is not None:
        user.append(_ASYNC_WINDOW_ONE)
    for uid, info in (extended_negotiation or {}).items():
        value = _uid_bytes(uid)
        user.append(_item(_SOP_CLASS_EXTENDED, _U16.pack(len(value)) + value + info))
    user_info = b"".join(user)
    parts.append(_ITEM_HEADER.pack(_USER_INFORMATION, len(user_info)))
    parts.append(user_info)
    body_length = sum(map(len, parts))
    parts[0] = _PDU_HEADER.pack(0x02, body_length)
    return b"".join(parts)


# --- A-ASSOCIATE-RQ (requestor) -------------------------------------------------------------


def _ae_title_field(title: str, what: str) -> bytes:
    """A local AE title for an RQ: 1-16 characters of the AE repertoire, not all spaces,
    sent as given and space padded (as pynetdicom did)."""
    if (
        not isinstance(title, str)
        or not 0 < len(title) <= _MAX_AE_LENGTH
        or not title.strip()
        or not title.isascii()
        or not title.isprintable()
        or "\\" in title
    ):
        raise ValueError(
            f"{what} AE title {title!r} is not 1-16 characters of ASCII without control "
            "characters or backslash (and not all spaces)"
        )
    return title.ljust(_MAX_AE_LENGTH).encode("ascii")


def _uid_field(uid: str, what: str) -> bytes:
    """A UID we send: 1-64 characters of digits and dots (PS3.5 9.1), no padding (PS3.8
    annex F: UIDs in the association PDUs are not padded)."""
    value = uid.encode("ascii", "replace") if isinstance(uid, str) else b"\\"
    if not 0 < len(value) <= _MAX_UID_LENGTH or value.translate(None, _UID_CHARACTERS):
        raise ValueError(f"{what} {uid!r} is not a UID (1-64 digits and dots)")
    return value


def _sized_item(item_type: int, value: bytes, what: str) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError(f"{what} of {len(value)} bytes does not fit an item (at most 65535)")
    return _ITEM_HEADER.pack(item_type, len(value)) + value


def _length_prefix(value: bytes, what: str) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError(f"{what} of {len(value)} bytes is longer than 65535")
    return _U16.pack(len(value)) + value


# The RQ's fixed parts: the application context item, and the implementation class UID and
# version name sub-items (PS3.7 D.3.3.2), which are those of the AC.
_RQ_RESERVED = _AC_RESERVED
_RQ_FIXED_PREFIX = _AC_FIXED_PREFIX
_RQ_APPLICATION_CONTEXT = _AC_APPLICATION_CONTEXT
_RQ_IMPLEMENTATION = _AC_IMPLEMENTATION


def encode_rq(
    *,
    calling_ae: str,
    called_ae: str,
    contexts: Sequence[ProposedContext],
    max_pdu_length: int,
    roles: Mapping[str, tuple[bool, bool]] | None = None,
    extended_negotiation: Mapping[str, bytes] | None = None,
    user_identity: UserIdentity | None = None,
) -> bytes:
    """The A-ASSOCIATE-RQ for our proposal (PS3.8 9.3.2), encoded; the bytes pynetdicom's
    ``A_ASSOCIATE_RQ`` made from the same values (tests/test_acse_codec.py).

    Items in order: application context, one presentation context item per proposed
    context (abstract syntax, then the transfer syntaxes in order), user information:
    maximum length, implementation class UID, implementation version name, then the
    SCP/SCU role selection, SOP Class Extended Negotiation and user identity sub-items.
    Values are the caller's: anything unfit raises ``ValueError``.
    """
    parts = [
        b"",  # the PDU header, once the length is known
        _RQ_FIXED_PREFIX,
        _ae_title_field(called_ae, "called"),
        _ae_title_field(calling_ae, "calling"),
        _RQ_RESERVED,
        _RQ_APPLICATION_CONTEXT,
    ]
    if not contexts:
        raise ValueError("an A-ASSOCIATE-RQ proposes at least one presentation context")
    seen: set[int] = set()
    for cx in contexts:
        context_id = cx.context_id
        if not (isinstance(context_id, int) and 1 <= context_id <= 255 and context_id & 1):
            raise ValueError(f"presentation context ID {context_id!r} is not odd 1-255")
        if context_id in seen:
            raise ValueError(f"presentation context ID {context_id} proposed twice")
        seen.add(context_id)
        if not cx.transfer_syntaxes:
            raise ValueError(f"presentation context {context_id} without a transfer syntax")
        items = [
            bytes((context_id, 0, 0, 0)),
            _item(_ABSTRACT_SYNTAX, _uid_field(cx.abstract_syntax, "abstract syntax")),
        ]
        # A transfer syntax listed twice is proposed once (as pynetdicom did).
        items += [
            _item(_TRANSFER_SYNTAX, _uid_field(ts, "transfer syntax"))
            for ts in dict.fromkeys(cx.transfer_syntaxes)
        ]
        parts.append(_sized_item(_PRESENTATION_CONTEXT_RQ, b"".join(items), "context"))

    if not (isinstance(max_pdu_length, int) and 0 <= max_pdu_length <= 0xFFFFFFFF):
        raise ValueError(f"maximum PDU length {max_pdu_length!r} is not 0 to 2**32 - 1")
    user = [_item(_MAXIMUM_LENGTH, _U32.pack(max_pdu_length)), _RQ_IMPLEMENTATION]
    for uid, (scu, scp) in (roles or {}).items():
        if not (scu or scp):
            raise ValueError(f"role selection for {uid} proposes neither the SCU nor SCP role")
        value = _length_prefix(_uid_field(uid, "role selection SOP class UID"), "SOP class UID")
        user.append(_item(_ROLE_SELECTION, value + bytes((bool(scu), bool(scp)))))
    for uid, info in (extended_negotiation or {}).items():
        if not isinstance(info, bytes | bytearray):
            raise ValueError(f"extended negotiation for {uid}: {info!r} is not bytes")
        value = _length_prefix(_uid_field(uid, "extended negotiation SOP class UID"), "UID")
        user.append(_sized_item(_SOP_CLASS_EXTENDED, value + info, "extended negotiation"))
    if user_identity is not None:
        kind = user_identity.kind
        if not (isinstance(kind, int) and 1 <= kind <= 5):
            raise ValueError(f"user identity type {kind!r} is not 1-5")
        value = (
            bytes((kind, 1 if user_identity.response_requested else 0))
            + _length_prefix(user_identity.primary, "user identity primary field")
            + _length_prefix(user_identity.secondary, "user identity secondary field")
        )
        user.append(_sized_item(_USER_IDENTITY_RQ, value, "user identity"))
    parts.append(_sized_item(_USER_INFORMATION, b"".join(user), "user information"))
    parts[0] = _PDU_HEADER.pack(0x01, sum(map(len, parts)))
    return b"".join(parts)


# --- A-ASSOCIATE-AC (requestor) -------------------------------------------------------------


def decode_ac(pdu: bytes | memoryview) -> AssociateAC:
    """Decode a whole A-ASSOCIATE-AC PDU (header included) into the plain values the
    requestor goes on with. Raises ``PduError``.

    The same structure checks as for an RQ (``_structure``; a presentation context item
    of an AC holds only transfer syntax sub-items), and the same value checks for the
    user information. Not tested, as PS3.8 table 9-17 says: the protocol version and the
    AE title fields. Presentation contexts: the ID is odd, the result 0-4 (PS3.8 table
    9-18); an accepted context carries exactly one transfer syntax, a UID; a rejected
    one's transfer syntax is "not significant" and kept as "" (when present it is still
    at most 64 ASCII characters, as pynetdicom required).
    """
    data = pdu if type(pdu) is bytes else bytes(pdu)
    if len(data) < _ITEMS_OFFSET:
        raise PduError("A-ASSOCIATE-AC shorter than its 68-byte fixed part")
    try:
        return _decode_ac(data)
    except _ValueFault as exc:
        raise _named(exc, "A-ASSOCIATE-AC") from None


def _decode_ac(data: bytes) -> AssociateAC:
    top, context_subs, user_subs = _structure(
        data, "A-ASSOCIATE-AC", _PRESENTATION_CONTEXT_AC, (_TRANSFER_SYNTAX,)
    )
    results: list[ContextResult] = []
    next_subs = iter(context_subs)
    for item_type, start, stop in top:
        if item_type == _PRESENTATION_CONTEXT_AC:
            results.append(_context_result(data, start, next(next_subs)))
        elif item_type == _APPLICATION_CONTEXT:
            _uid(data[start:stop], "application context name")  # checked, not used
    user = _user_information(data, user_subs, in_request=False)
    return AssociateAC(
        tuple(results),
        user.max_pdu,
        user.implementation_uid,
        user.implementation_version,
        user.roles,
        user.extended,
        user.identity_response,
    )


def _context_result(data: bytes, start: int, subs: _Items) -> ContextResult:
    """Presentation context ID, reserved, result/reason, reserved, transfer syntax."""
    context_id, result = data[start], data[start + 2]
    if not context_id & 1:
        raise _invalid(f"presentation context ID {context_id} is not odd")
    if result > _RESULT_MAX:
        raise _invalid(f"presentation context {context_id} result {result} (0-4)")
    if result != 0:
        for _, s_start, s_stop in subs:
            value = data[s_start:s_stop]
            if not value.isascii() or len(value.rstrip(b"\x00").strip()) > _MAX_UID_LENGTH:
                raise _invalid(f"transfer syntax {value!r} is not 0-64 ASCII characters")
        return ContextResult(context_id, result, "")
    if len(subs) != 1:
        raise _invalid(
            f"accepted presentation context {context_id} with {len(subs)} transfer "
            "syntaxes (PS3.8 9.3.3.2: one)"
        )
    _, s_start, s_stop = subs[0]
    return ContextResult(
        context_id, 0, _uid(data[s_start:s_stop], "transfer syntax", allow_empty=False)
    )


# --- A-ASSOCIATE-RJ -----------------------------------------------------------------------


class AssociateRJ:
    """An A-ASSOCIATE-RJ (PS3.8 9.3.4, table 9-21): result, source, reason/diag.

    The attribute names are pynetdicom's, which the requestor's error reporting reads."""

    __slots__ = ("reason_diagnostic", "result", "source")

    def __init__(self, result: int, source: int, reason_diagnostic: int) -> None:
        self.result = result
        self.source = source
        self.reason_diagnostic = reason_diagnostic

    def encode(self) -> bytes:
        values = (self.result, self.source, self.reason_diagnostic)
        if not all(isinstance(v, int) and 0 <= v <= 255 for v in values):
            raise ValueError(f"A-ASSOCIATE-RJ values {values} are not bytes")
        return bytes((0x03, 0, 0, 0, 0, 4, 0, *values))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AssociateRJ):
            return NotImplemented
        return (self.result, self.source, self.reason_diagnostic) == (
            other.result,
            other.source,
            other.reason_diagnostic,
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"AssociateRJ(result={self.result}, source={self.source}, "
            f"reason_diagnostic={self.reason_diagnostic})"
        )


def decode_rj(pdu: bytes | memoryview) -> AssociateRJ:
    """Decode an A-ASSOCIATE-RJ. Result/source/reason are not range-checked: a rejection
    is final whatever its diagnostic says."""
    if len(pdu) != _HEADER_LENGTH + 4:
        raise PduError("A-ASSOCIATE-RJ PDU must be 10 bytes")
    return AssociateRJ(pdu[7], pdu[8], pdu[9])
