"""The DIMSE message layer (PS3.7), sans-IO: command-set codec, message assembly, fragmentation.

Three jobs, no sockets, no asyncio:

- **Command-set codec.** A DIMSE message is a command set (group 0000, always Implicit VR
  Little Endian, PS3.7 6.3.1) optionally followed by a data set. The command set is encoded
  and decoded here by hand with ``struct``: pynetdicom's ``dimse_messages`` + pydicom cost
  more per C-STORE than the network itself (DESIGN.md, measured 2.7x slower), and a command
  set is a flat list of a few dozen fixed-VR elements, so a general codec buys nothing.
- **Message assembly** (receive side). ``MessageAssembler`` turns the PDVs of P-DATA-TF PDUs
  into ``CommandReceived`` / ``DatasetFragment`` events and enforces the fragment rules of
  PS3.8 Annex E. Data-set fragments are handed on as they arrive, neither joined nor copied,
  so a storage service can stream them to disk ("never decode what you only store").
- **Fragmentation** (send side). ``fragment_message`` / ``fragment_stream`` cut a message
  into P-DATA-TF PDUs that respect the peer's maximum length (PS3.8 Annex D.1), as a list
  of chunks for ``transport.writelines()``; data-set chunks are memoryview slices.

Errors: ``DimseError`` (an undecodable command set) and its subclass ``DimseProtocolError``
(a fragment-rule violation) both carry ``reason``, the A-ABORT reason the transport sends
with source ``ABORT_SOURCE_PROVIDER`` (PS3.8 9.3.8, table 9-26):

- ``ABORT_REASON_INVALID_PDU_PARAMETER`` (6): a PDV whose value is wrong whatever the state:
  a presentation context that was not accepted, an empty or undecodable command set;
- ``ABORT_REASON_UNEXPECTED_PDU_PARAMETER`` (5): a PDV that would be valid in another state
  but breaks the order of PS3.8 E.1 here: a data set before (or without) its command, a
  command while a message is incomplete, fragments interleaved from another context;
- ``ABORT_REASON_NOT_SPECIFIED`` (0): a command set larger than ``max_command_length``
  (a resource limit, not a rule of the standard).

Leniency, on purpose (interoperability with old modalities costs nothing here):
CommandGroupLength is neither required nor checked (the PDV's last bit delimits the command
set); elements out of tag order are accepted; odd-length fragments are accepted; PDVs of two
messages in one P-DATA-TF PDU are accepted (PS3.8 E.1 says they "shall be related to the
same DICOM message", but nothing is ambiguous when they are not). Strictness where it
matters: a duplicate element, a non-group-0000 element, a truncated element or a missing
Command Field / Command Data Set Type make the command undecodable.
"""

from __future__ import annotations

import struct
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from dicomd.net.events import (
    ABORT_REASON_INVALID_PDU_PARAMETER,
    ABORT_REASON_NOT_SPECIFIED,
    ABORT_REASON_UNEXPECTED_PDU_PARAMETER,
    Pdv,
)
from dicomd.net.pdu import pdata_header

__all__ = [
    "COMMAND_ELEMENTS",
    "COMMAND_NAMES",
    "C_CANCEL_RQ",
    "C_ECHO_RQ",
    "C_ECHO_RSP",
    "C_FIND_RQ",
    "C_FIND_RSP",
    "C_GET_RQ",
    "C_GET_RSP",
    "C_MOVE_RQ",
    "C_MOVE_RSP",
    "C_STORE_RQ",
    "C_STORE_RSP",
    "DATASET_PRESENT",
    "DEFAULT_MAX_COMMAND_LENGTH",
    "NO_DATASET",
    "N_ACTION_RQ",
    "N_ACTION_RSP",
    "N_CREATE_RQ",
    "N_CREATE_RSP",
    "N_DELETE_RQ",
    "N_DELETE_RSP",
    "N_EVENT_REPORT_RQ",
    "N_EVENT_REPORT_RSP",
    "N_GET_RQ",
    "N_GET_RSP",
    "N_SET_RQ",
    "N_SET_RSP",
    "PRIORITY_HIGH",
    "PRIORITY_LOW",
    "PRIORITY_MEDIUM",
    "RESPONSE_BIT",
    "TAG_BY_KEYWORD",
    "VERIFICATION",
    "Command",
    "CommandElement",
    "CommandReceived",
    "DatasetFragment",
    "DimseError",
    "DimseEvent",
    "DimseProtocolError",
    "MessageAssembler",
    "c_cancel_rq",
    "c_echo_rq",
    "c_find_rq",
    "c_get_rq",
    "c_move_rq",
    "c_store_rq",
    "decode_command",
    "encode_command",
    "fields_from_keywords",
    "fragment_message",
    "fragment_stream",
    "response_for",
]

# --- Command Field values (PS3.7 E.1 table E.1-1; 9.3 and 10.3 for each service) -----------

C_STORE_RQ: Final = 0x0001
C_STORE_RSP: Final = 0x8001
C_GET_RQ: Final = 0x0010
C_GET_RSP: Final = 0x8010
C_FIND_RQ: Final = 0x0020
C_FIND_RSP: Final = 0x8020
C_MOVE_RQ: Final = 0x0021
C_MOVE_RSP: Final = 0x8021
C_ECHO_RQ: Final = 0x0030
C_ECHO_RSP: Final = 0x8030
N_EVENT_REPORT_RQ: Final = 0x0100
N_EVENT_REPORT_RSP: Final = 0x8100
N_GET_RQ: Final = 0x0110
N_GET_RSP: Final = 0x8110
N_SET_RQ: Final = 0x0120
N_SET_RSP: Final = 0x8120
N_ACTION_RQ: Final = 0x0130
N_ACTION_RSP: Final = 0x8130
N_CREATE_RQ: Final = 0x0140
N_CREATE_RSP: Final = 0x8140
N_DELETE_RQ: Final = 0x0150
N_DELETE_RSP: Final = 0x8150
# C-CANCEL-RQ has no response (PS3.7 9.3.2.3, 9.3.3.3, 9.3.4.3).
C_CANCEL_RQ: Final = 0x0FFF

# Every response's Command Field is its request's with bit 15 set (PS3.7 E.1).
RESPONSE_BIT: Final = 0x8000

COMMAND_NAMES: Final[Mapping[int, str]] = {
    C_STORE_RQ: "C-STORE-RQ",
    C_STORE_RSP: "C-STORE-RSP",
    C_GET_RQ: "C-GET-RQ",
    C_GET_RSP: "C-GET-RSP",
    C_FIND_RQ: "C-FIND-RQ",
    C_FIND_RSP: "C-FIND-RSP",
    C_MOVE_RQ: "C-MOVE-RQ",
    C_MOVE_RSP: "C-MOVE-RSP",
    C_ECHO_RQ: "C-ECHO-RQ",
    C_ECHO_RSP: "C-ECHO-RSP",
    N_EVENT_REPORT_RQ: "N-EVENT-REPORT-RQ",
    N_EVENT_REPORT_RSP: "N-EVENT-REPORT-RSP",
    N_GET_RQ: "N-GET-RQ",
    N_GET_RSP: "N-GET-RSP",
    N_SET_RQ: "N-SET-RQ",
    N_SET_RSP: "N-SET-RSP",
    N_ACTION_RQ: "N-ACTION-RQ",
    N_ACTION_RSP: "N-ACTION-RSP",
    N_CREATE_RQ: "N-CREATE-RQ",
    N_CREATE_RSP: "N-CREATE-RSP",
    N_DELETE_RQ: "N-DELETE-RQ",
    N_DELETE_RSP: "N-DELETE-RSP",
    C_CANCEL_RQ: "C-CANCEL-RQ",
}

# Command Data Set Type (0000,0800): 0101H means "no data set"; PS3.7 E.1 says any other
# value means a data set follows. We send 0001H, as pynetdicom does.
NO_DATASET: Final = 0x0101
DATASET_PRESENT: Final = 0x0001

# Priority (0000,0700), PS3.7 9.1.1.1.x / E.1: note MEDIUM is 0, HIGH 1, LOW 2.
PRIORITY_MEDIUM: Final = 0x0000
PRIORITY_HIGH: Final = 0x0001
PRIORITY_LOW: Final = 0x0002

VERIFICATION: Final = "1.2.840.10008.1.1"  # Verification SOP Class (PS3.4 A.4)

# A command set holds ~100 bytes; even an N-GET with thousands of attribute tags stays far
# below this. The limit stops a peer from growing an "endless" command in our memory.
DEFAULT_MAX_COMMAND_LENGTH: Final = 1 << 20


# --- The command element registry (PS3.7 E.1 and, retired, E.2) ----------------------------


@dataclass(frozen=True, slots=True)
class CommandElement:
    """One group-0000 element: its VR, whether it is multi-valued, and its names."""

    tag: int
    vr: str
    multi: bool
    keyword: str  # the DICOM keyword, as in pydicom's dictionary
    name: str  # snake_case, for ``fields_from_keywords`` and ``response_for(**extra)``


def _e(tag: int, vr: str, keyword: str, name: str, multi: bool = False) -> CommandElement:
    return CommandElement(tag, vr, multi, keyword, name)


# Every element PS3.7 Annex E defines, retired ones (E.2) included so that a decoder meeting
# them from an old peer still knows their VR. Tags are the element number alone: the group
# is always 0000, so (0000,eeee) is stored as the int 0xeeee.
COMMAND_ELEMENTS: Final[Mapping[int, CommandElement]] = {
    e.tag: e
    for e in (
        _e(0x0000, "UL", "CommandGroupLength", "command_group_length"),
        _e(0x0001, "UL", "CommandLengthToEnd", "command_length_to_end"),  # retired
        _e(0x0002, "UI", "AffectedSOPClassUID", "affected_sop_class_uid"),
        _e(0x0003, "UI", "RequestedSOPClassUID", "requested_sop_class_uid"),
        _e(0x0010, "SH", "CommandRecognitionCode", "command_recognition_code"),  # retired
        _e(0x0100, "US", "CommandField", "command_field"),
        _e(0x0110, "US", "MessageID", "message_id"),
        _e(0x0120, "US", "MessageIDBeingRespondedTo", "message_id_being_responded_to"),
        _e(0x0200, "AE", "Initiator", "initiator"),  # retired
        _e(0x0300, "AE", "Receiver", "receiver"),  # retired
        _e(0x0400, "AE", "FindLocation", "find_location"),  # retired
        _e(0x0600, "AE", "MoveDestination", "move_destination"),
        _e(0x0700, "US", "Priority", "priority"),
        _e(0x0800, "US", "CommandDataSetType", "command_data_set_type"),
        _e(0x0850, "US", "NumberOfMatches", "number_of_matches"),  # retired
        _e(0x0860, "US", "ResponseSequenceNumber", "response_sequence_number"),  # retired
        _e(0x0900, "US", "Status", "status"),
        _e(0x0901, "AT", "OffendingElement", "offending_element", multi=True),
        _e(0x0902, "LO", "ErrorComment", "error_comment"),
        _e(0x0903, "US", "ErrorID", "error_id"),
        _e(0x1000, "UI", "AffectedSOPInstanceUID", "affected_sop_instance_uid"),
        _e(0x1001, "UI", "RequestedSOPInstanceUID", "requested_sop_instance_uid"),
        _e(0x1002, "US", "EventTypeID", "event_type_id"),
        _e(0x1005, "AT", "AttributeIdentifierList", "attribute_identifier_list", multi=True),
        _e(0x1008, "US", "ActionTypeID", "action_type_id"),
        _e(0x1020, "US", "NumberOfRemainingSuboperations", "number_of_remaining_suboperations"),
        _e(0x1021, "US", "NumberOfCompletedSuboperations", "number_of_completed_suboperations"),
        _e(0x1022, "US", "NumberOfFailedSuboperations", "number_of_failed_suboperations"),
        _e(0x1023, "US", "NumberOfWarningSuboperations", "number_of_warning_suboperations"),
        _e(
            0x1030,
            "AE",
            "MoveOriginatorApplicationEntityTitle",
            "move_originator_application_entity_title",
        ),
        _e(0x1031, "US", "MoveOriginatorMessageID", "move_originator_message_id"),
        # Retired print-management and dialog elements (PS3.7 E.2).
        _e(0x4000, "LT", "DialogReceiver", "dialog_receiver"),
        _e(0x4010, "LT", "TerminalType", "terminal_type"),
        _e(0x5010, "SH", "MessageSetID", "message_set_id"),
        _e(0x5020, "SH", "EndMessageID", "end_message_id"),
        _e(0x5110, "LT", "DisplayFormat", "display_format"),
        _e(0x5120, "LT", "PagePositionID", "page_position_id"),
        _e(0x5130, "CS", "TextFormatID", "text_format_id"),
        _e(0x5140, "CS", "NormalReverse", "normal_reverse"),
        _e(0x5150, "CS", "AddGrayScale", "add_gray_scale"),
        _e(0x5160, "CS", "Borders", "borders"),
        _e(0x5170, "IS", "Copies", "copies"),
        _e(0x5180, "CS", "CommandMagnificationType", "command_magnification_type"),
        _e(0x5190, "CS", "Erase", "erase"),
        _e(0x51A0, "CS", "Print", "print"),
        _e(0x51B0, "US", "Overlays", "overlays", multi=True),
    )
}

# snake_case name -> tag, plus a short alias the brief and the services use.
TAG_BY_KEYWORD: Final[Mapping[str, int]] = {
    **{e.name: e.tag for e in COMMAND_ELEMENTS.values()},
    "move_originator_ae": 0x1030,
}

_STRING_VRS: Final = frozenset({"UI", "AE", "SH", "LO", "LT", "ST", "CS", "IS"})
# Maximum value lengths (PS3.5 6.2). Only free text is cut to fit on encoding: a too-long
# error comment is better shortened than sent invalid; identifiers are never altered (a UID
# echoed back from a lenient decode must stay what the peer sent).
_TEXT_MAX: Final[Mapping[str, int]] = {"SH": 16, "LO": 64, "ST": 1024, "LT": 10240}

# Implicit VR LE element header: group, element, 32-bit value length (PS3.5 7.1.2).
_HEADER = struct.Struct("<HHI")
_US_ELEMENT = struct.Struct("<HHIH")
_UL_ELEMENT = struct.Struct("<HHII")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")

# The elements every command set is made of, for the fast paths of encode_command and
# decode_command (a C-ECHO's or C-STORE's command set holds nothing else): US elements
# (an int value is one US whether or not the element may hold several) and UIDs.
_US_TAGS: Final = frozenset(t for t, e in COMMAND_ELEMENTS.items() if e.vr == "US")
_US_SINGLE_TAGS: Final = frozenset(t for t in _US_TAGS if not COMMAND_ELEMENTS[t].multi)
_UI_TAGS: Final = frozenset(t for t, e in COMMAND_ELEMENTS.items() if e.vr == "UI")


class DimseError(ValueError):
    """A command set that cannot be decoded, or a message that cannot be assembled.

    ``reason`` is the A-ABORT reason (provider source) the transport sends for it.
    """

    reason: int = ABORT_REASON_INVALID_PDU_PARAMETER


class DimseProtocolError(DimseError):
    """A PDV that breaks the fragment rules of PS3.8 Annex E / PS3.7 6.3.1."""

    def __init__(self, detail: str, reason: int) -> None:
        super().__init__(detail)
        self.detail = detail
        self.reason = reason


# --- Encoding ---------------------------------------------------------------------------


def _encode_text(value: object, vr: str) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"a {vr} value must be str, not {type(value).__name__}")
    # The command set uses the default character repertoire (PS3.5 6.1.2.1, PS3.7 6.3.1);
    # a stray non-ASCII character (say, in an exception text put into an Error Comment)
    # becomes "?" rather than failing the whole response.
    raw = value.encode("ascii", "replace")
    limit = _TEXT_MAX.get(vr)
    if limit is not None and len(raw) > limit:
        raw = raw[:limit]
    if len(raw) & 1:
        # Values have even length (PS3.5 7.1.1): UIDs are padded with NUL (PS3.5 9.1),
        # every other string VR with a space (PS3.5 6.2).
        raw += b"\x00" if vr == "UI" else b" "
    return raw


def _as_ints(value: object) -> Sequence[int]:
    if isinstance(value, int):
        return (value,)
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"expected an int or a sequence of ints, not {type(value).__name__}")
    return tuple(value)


def _encode_element(tag: int, value: object) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        # Raw value: the escape hatch for unknown elements (kept raw by decode_command).
        raw = bytes(value)
        if len(raw) & 1:
            raw += b"\x00"
        return _HEADER.pack(0, tag, len(raw)) + raw
    info = COMMAND_ELEMENTS.get(tag)
    if info is None:
        raise ValueError(f"unknown command element (0000,{tag:04X}) needs a bytes value")
    vr = info.vr
    try:
        if vr == "US":
            if isinstance(value, int):
                return _US_ELEMENT.pack(0, tag, 2, value)
            ints = _as_ints(value)
            return _HEADER.pack(0, tag, 2 * len(ints)) + struct.pack(f"<{len(ints)}H", *ints)
        if vr == "UL":
            if isinstance(value, int):
                return _UL_ELEMENT.pack(0, tag, 4, value)
            ints = _as_ints(value)
            return _HEADER.pack(0, tag, 4 * len(ints)) + struct.pack(f"<{len(ints)}I", *ints)
        if vr == "AT":
            # An AT value is a tag as (group, element), two US each (PS3.5 6.2); we take
            # tags as ints 0xGGGGEEEE, pydicom's convention, so a pair is never ambiguous.
            ints = _as_ints(value)
            pairs = [half for t in ints for half in (t >> 16, t & 0xFFFF)]
            if any(t < 0 or t > 0xFFFFFFFF for t in ints):
                raise ValueError("an AT value must be a 32-bit tag")
            return _HEADER.pack(0, tag, 4 * len(ints)) + struct.pack(f"<{len(pairs)}H", *pairs)
    except struct.error as exc:
        raise ValueError(f"(0000,{tag:04X}) {info.keyword}: {exc}") from None
    raw = _encode_text(value, vr)
    return _HEADER.pack(0, tag, len(raw)) + raw


def encode_command(fields: Mapping[int, Any]) -> bytes:
    """Encode a command set (Implicit VR Little Endian, PS3.7 6.3.1).

    Keys are group-0000 element numbers (``0x0900`` for (0000,0900) Status; a full tag
    ``0x00000900`` is the same int). CommandGroupLength (0000,0000) is computed and always
    first, whatever ``fields`` holds for it; elements follow in increasing tag order, as
    PS3.7 6.3.1 requires. ``None`` values are omitted. Values: int for US/UL, int tags for
    AT (one or a sequence), str for string VRs, bytes for a raw value (any element).
    """
    parts: list[bytes] = []
    for tag in sorted(fields):
        if not 0 <= tag <= 0xFFFF:
            # PS3.7 6.3.1: only group 0000; data elements never belong in a command set.
            raise ValueError(f"tag {tag:#010x} is not a command element (group 0000)")
        value = fields[tag]
        if tag == 0x0000 or value is None:
            continue
        kind = type(value)
        if kind is int and tag in _US_TAGS and 0 <= value <= 0xFFFF:
            parts.append(_US_ELEMENT.pack(0, tag, 2, value))
        elif kind is str and tag in _UI_TAGS and value.isascii():
            raw = value.encode()
            if len(raw) & 1:
                raw += b"\x00"  # UIDs are padded with NUL (PS3.5 9.1)
            parts.append(_HEADER.pack(0, tag, len(raw)) + raw)
        else:
            parts.append(_encode_element(tag, value))
    body = b"".join(parts)
    return _UL_ELEMENT.pack(0, 0x0000, 4, len(body)) + body


# --- Decoding ---------------------------------------------------------------------------


def _decode_value(tag: int, data: bytes | memoryview, offset: int, length: int) -> object:
    info = COMMAND_ELEMENTS.get(tag)
    if info is None:
        # Unknown (future or private-ish) element: keep it, uninterpreted, so that it can
        # be logged or echoed; PS3.7 6.3.1 retired private command elements.
        return bytes(data[offset : offset + length])
    vr = info.vr
    if vr in _STRING_VRS:
        text = str(data[offset : offset + length], "latin-1")  # never fails; lossless
        if vr == "AE":
            # Leading and trailing spaces are not significant in an AE (PS3.5 6.2).
            return text.strip(" \x00")
        return text.rstrip(" \x00")
    if length == 0:
        return None  # present but empty
    if vr == "US":
        if length == 2 and not info.multi:
            return _U16.unpack_from(data, offset)[0]
        if info.multi and length % 2 == 0:
            return struct.unpack_from(f"<{length // 2}H", data, offset)
    elif vr == "UL":
        if length == 4:
            return _U32.unpack_from(data, offset)[0]
    elif vr == "AT" and length % 4 == 0:
        halves = struct.unpack_from(f"<{length // 2}H", data, offset)
        return tuple((halves[i] << 16) | halves[i + 1] for i in range(0, len(halves), 2))
    raise DimseError(f"(0000,{tag:04X}) {info.keyword}: length {length} is invalid for {vr}")


def decode_command(data: bytes | memoryview) -> Command:
    """Decode a complete command set (Implicit VR Little Endian).

    Raises ``DimseError`` for an element outside group 0000, a truncated element, an
    undefined length, a duplicate element, a value whose length does not fit its VR, or a
    command without Command Field or Command Data Set Type (nothing can be done with it).
    CommandGroupLength is dropped (it is framing, recomputed by ``encode_command``).
    """
    if isinstance(data, memoryview) and data.itemsize != 1:
        data = data.cast("B")  # offsets below are byte offsets
    fields: dict[int, object] = {}
    size = len(data)
    offset = 0
    while offset < size:
        if size - offset < 8:
            raise DimseError(f"command set truncated in an element header at byte {offset}")
        group, tag, length = _HEADER.unpack_from(data, offset)
        if group != 0x0000:
            raise DimseError(
                f"element ({group:04X},{tag:04X}) in a command set: only group 0000 is allowed"
                " (PS3.7 6.3.1)"
            )
        offset += 8
        if length == 0xFFFFFFFF or offset + length > size:
            raise DimseError(
                f"(0000,{tag:04X}) has length {length:#x} but {size - offset} bytes remain"
            )
        if tag in fields:
            raise DimseError(f"(0000,{tag:04X}) occurs twice (PS3.7 6.3.1: at most once)")
        if length == 2 and tag in _US_SINGLE_TAGS:
            fields[tag] = _U16.unpack_from(data, offset)[0]
        elif tag in _UI_TAGS:
            fields[tag] = str(data[offset : offset + length], "latin-1").rstrip(" \x00")
        else:
            fields[tag] = _decode_value(tag, data, offset, length)
        offset += length
    fields.pop(0x0000, None)
    if not isinstance(fields.get(0x0100), int):
        raise DimseError("command set without a Command Field (0000,0100)")
    if not isinstance(fields.get(0x0800), int):
        raise DimseError("command set without a Command Data Set Type (0000,0800)")
    return Command(fields)


def _keyword(tag: int) -> str:
    info = COMMAND_ELEMENTS.get(tag)
    return info.keyword if info is not None else f"(0000,{tag:04X})"


class Command:
    """A decoded command set: ``fields`` maps element number to value (see encode_command)."""

    __slots__ = ("fields",)

    def __init__(self, fields: Mapping[int, object] | None = None) -> None:
        self.fields: dict[int, object] = dict(fields) if fields is not None else {}

    def _int(self, tag: int) -> int | None:
        value = self.fields.get(tag)
        return value if isinstance(value, int) else None

    def _str(self, tag: int) -> str | None:
        value = self.fields.get(tag)
        return value if isinstance(value, str) else None

    @property
    def command_field(self) -> int | None:
        return self._int(0x0100)

    @property
    def name(self) -> str:
        """The message name for logs, e.g. ``C-STORE-RQ``."""
        cf = self.command_field
        if cf is None:
            return "no-command-field"
        return COMMAND_NAMES.get(cf, f"command-{cf:#06x}")

    @property
    def is_request(self) -> bool:
        cf = self.command_field
        return cf is not None and not cf & RESPONSE_BIT

    @property
    def is_response(self) -> bool:
        cf = self.command_field
        return cf is not None and bool(cf & RESPONSE_BIT)

    @property
    def message_id(self) -> int | None:
        return self._int(0x0110)

    @property
    def message_id_being_responded_to(self) -> int | None:
        return self._int(0x0120)

    @property
    def affected_sop_class_uid(self) -> str | None:
        return self._str(0x0002)

    @property
    def requested_sop_class_uid(self) -> str | None:
        return self._str(0x0003)

    @property
    def affected_sop_instance_uid(self) -> str | None:
        return self._str(0x1000)

    @property
    def requested_sop_instance_uid(self) -> str | None:
        return self._str(0x1001)

    @property
    def priority(self) -> int | None:
        return self._int(0x0700)

    @property
    def has_dataset(self) -> bool:
        # PS3.7 E.1: any value but 0101H means a data set follows; absent means none.
        value = self._int(0x0800)
        return value is not None and value != NO_DATASET

    @property
    def status(self) -> int | None:
        return self._int(0x0900)

    @property
    def move_destination(self) -> str | None:
        return self._str(0x0600)

    @property
    def move_originator_ae(self) -> str | None:
        return self._str(0x1030)

    @property
    def move_originator_message_id(self) -> int | None:
        return self._int(0x1031)

    @property
    def error_comment(self) -> str | None:
        return self._str(0x0902)

    def encode(self) -> bytes:
        return encode_command(self.fields)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Command):
            return NotImplemented
        return self.fields == other.fields

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        items = ", ".join(f"{_keyword(t)}={v!r}" for t, v in sorted(self.fields.items()))
        return f"Command({self.name}: {items})"


# --- Builders ---------------------------------------------------------------------------


def fields_from_keywords(**keywords: object) -> dict[int, object]:
    """``{tag: value}`` from snake_case element names (``TAG_BY_KEYWORD``)."""
    fields: dict[int, object] = {}
    for key, value in keywords.items():
        tag = TAG_BY_KEYWORD.get(key)
        if tag is None:
            raise TypeError(f"unknown command element keyword {key!r}")
        fields[tag] = value
    return fields


def c_echo_rq(message_id: int, sop_class: str = VERIFICATION) -> dict[int, object]:
    """C-ECHO-RQ (PS3.7 9.3.5.1)."""
    return {0x0002: sop_class, 0x0100: C_ECHO_RQ, 0x0110: message_id, 0x0800: NO_DATASET}


def c_store_rq(
    message_id: int,
    sop_class_uid: str,
    sop_instance_uid: str,
    *,
    priority: int = PRIORITY_MEDIUM,
    move_originator_ae: str | None = None,
    move_originator_message_id: int | None = None,
) -> dict[int, object]:
    """C-STORE-RQ (PS3.7 9.3.1.1); the move originator is set for C-MOVE sub-operations."""
    return {
        0x0002: sop_class_uid,
        0x0100: C_STORE_RQ,
        0x0110: message_id,
        0x0700: priority,
        0x0800: DATASET_PRESENT,
        0x1000: sop_instance_uid,
        0x1030: move_originator_ae,
        0x1031: move_originator_message_id,
    }


def _query_rq(
    command_field: int, message_id: int, sop_class_uid: str, priority: int
) -> dict[int, object]:
    # C-FIND/C-GET/C-MOVE requests always carry an Identifier (PS3.7 9.3.2.1, 9.3.3.1, 9.3.4.1).
    return {
        0x0002: sop_class_uid,
        0x0100: command_field,
        0x0110: message_id,
        0x0700: priority,
        0x0800: DATASET_PRESENT,
    }


def c_find_rq(
    message_id: int, sop_class_uid: str, *, priority: int = PRIORITY_MEDIUM
) -> dict[int, object]:
    """C-FIND-RQ (PS3.7 9.3.2.1); the Identifier follows as the data set."""
    return _query_rq(C_FIND_RQ, message_id, sop_class_uid, priority)


def c_get_rq(
    message_id: int, sop_class_uid: str, *, priority: int = PRIORITY_MEDIUM
) -> dict[int, object]:
    """C-GET-RQ (PS3.7 9.3.3.1); the Identifier follows as the data set."""
    return _query_rq(C_GET_RQ, message_id, sop_class_uid, priority)


def c_move_rq(
    message_id: int,
    sop_class_uid: str,
    move_destination: str,
    *,
    priority: int = PRIORITY_MEDIUM,
) -> dict[int, object]:
    """C-MOVE-RQ (PS3.7 9.3.4.1); the Identifier follows as the data set."""
    fields = _query_rq(C_MOVE_RQ, message_id, sop_class_uid, priority)
    fields[0x0600] = move_destination
    return fields


def c_cancel_rq(message_id_being_responded_to: int) -> dict[int, object]:
    """C-CANCEL-RQ (PS3.7 9.3.2.3): names the C-FIND/GET/MOVE it cancels; no data set."""
    return {0x0100: C_CANCEL_RQ, 0x0120: message_id_being_responded_to, 0x0800: NO_DATASET}


def response_for(
    request: Command, status: int, *, has_dataset: bool = False, **extra_fields: object
) -> dict[int, object]:
    """The command set of the response to ``request`` (PS3.7 9.3 / 10.3 "-RSP" tables).

    Affected SOP Class UID is the request's affected or, for N-GET/SET/ACTION/DELETE,
    requested SOP class; Affected SOP Instance UID likewise when the request had one.
    ``extra_fields`` are snake_case element names (``TAG_BY_KEYWORD``) and win over the
    defaults, e.g. ``number_of_remaining_suboperations=3``, ``error_comment="..."``, or
    ``affected_sop_instance_uid=None`` to leave it out.
    """
    # The request's fields are read directly, as the Command properties would (int or
    # str, else None): this runs once per request, C-ECHO included.
    get = request.fields.get
    cf = get(0x0100)
    if not isinstance(cf, int) or cf & RESPONSE_BIT:
        raise ValueError(f"{request.name} is not a request")
    if cf == C_CANCEL_RQ:
        raise ValueError("C-CANCEL-RQ has no response (PS3.7 9.3.2.3)")
    message_id = get(0x0110)
    fields: dict[int, object] = {
        0x0002: _str_or_none(get(0x0002)) or _str_or_none(get(0x0003)),
        0x0100: cf | RESPONSE_BIT,
        0x0120: message_id if isinstance(message_id, int) else None,
        0x0800: DATASET_PRESENT if has_dataset else NO_DATASET,
        0x0900: status,
        0x1000: _str_or_none(get(0x1000)) or _str_or_none(get(0x1001)),
    }
    if extra_fields:
        fields.update(fields_from_keywords(**extra_fields))
    return fields


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


# --- Receive side: message assembly -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class CommandReceived:
    """A complete command set arrived; if ``command.has_dataset``, its data set follows."""

    context_id: int
    command: Command


@dataclass(frozen=True, slots=True)
class DatasetFragment:
    """One data-set fragment, as received (not copied: consume it before the next PDU)."""

    context_id: int
    data: bytes | memoryview
    is_last: bool


DimseEvent = CommandReceived | DatasetFragment

_IDLE, _IN_COMMAND, _IN_DATASET, _FAILED = range(4)


class MessageAssembler:
    """Turns PDVs into DIMSE events, enforcing PS3.8 Annex E and PS3.7 6.3.1.

    One per association, fed the PDVs of every P-DATA-TF PDU in order. Command fragments
    are joined (commands are small) and decoded on the last one; data-set fragments pass
    through as they arrive. Any violation raises ``DimseProtocolError`` (or ``DimseError``
    for an undecodable command); events of that call are then lost, and the assembler
    refuses further use (the association is being aborted anyway).
    """

    __slots__ = (
        "_accepted",
        "_context_id",
        "_last_command",
        "_max_command_length",
        "_parts",
        "_parts_length",
        "_state",
    )

    def __init__(
        self,
        accepted_context_ids: Collection[int],
        *,
        max_command_length: int = DEFAULT_MAX_COMMAND_LENGTH,
    ) -> None:
        self._accepted = frozenset(accepted_context_ids)
        self._max_command_length = max_command_length
        self._state = _IDLE
        self._context_id = 0
        self._parts: list[bytes | memoryview] = []
        self._parts_length = 0
        self._last_command: Command | None = None

    @property
    def in_message(self) -> bool:
        """True while a message (its command or its data set) is incomplete."""
        return self._state in (_IN_COMMAND, _IN_DATASET)

    def receive(self, pdvs: Iterable[Pdv]) -> list[DimseEvent]:
        if self._state == _FAILED:
            raise RuntimeError("MessageAssembler is unusable after a protocol error")
        events: list[DimseEvent] = []
        try:
            for pdv in pdvs:
                self._receive_one(pdv, events)
        except BaseException:
            self._state = _FAILED
            self._parts = []
            raise
        return events

    def _receive_one(self, pdv: Pdv, events: list[DimseEvent]) -> None:
        ctx = pdv.context_id
        if ctx not in self._accepted:
            # PS3.8 9.3.5.1 / 7.1.1.13: PDVs use only contexts accepted at association.
            raise DimseProtocolError(
                f"PDV on presentation context {ctx}, which was not accepted",
                ABORT_REASON_INVALID_PDU_PARAMETER,
            )
        state = self._state
        if state != _IDLE and ctx != self._context_id:
            # PS3.8 E.1: every fragment of a message on the same context, and no fragment of
            # another message until the current one is complete (no interleaving).
            raise DimseProtocolError(
                f"PDV on presentation context {ctx} while a message on context "
                f"{self._context_id} is incomplete (PS3.8 E.1: no interleaving)",
                ABORT_REASON_UNEXPECTED_PDU_PARAMETER,
            )
        if state == _IN_DATASET:
            if pdv.is_command:
                raise DimseProtocolError(
                    f"command fragment while the data set of {self._last_name()} is "
                    "incomplete (PS3.8 E.1)",
                    ABORT_REASON_UNEXPECTED_PDU_PARAMETER,
                )
            events.append(DatasetFragment(ctx, pdv.data, pdv.is_last))
            if pdv.is_last:
                self._state = _IDLE
            return
        if not pdv.is_command:
            if state == _IN_COMMAND:
                detail = "data set fragment before the last command fragment"
            elif self._last_command is None:
                detail = "data set fragment before any command"
            else:
                detail = (
                    f"data set fragment after {self._last_name()}, whose Command Data Set "
                    "Type (0000,0800) says no data set"
                )
            raise DimseProtocolError(
                f"{detail} (PS3.7 6.3.1)", ABORT_REASON_UNEXPECTED_PDU_PARAMETER
            )
        self._add_command_fragment(ctx, pdv, events)

    def _add_command_fragment(self, ctx: int, pdv: Pdv, events: list[DimseEvent]) -> None:
        data = pdv.data
        self._parts_length += len(data)
        if self._parts_length > self._max_command_length:
            raise DimseProtocolError(
                f"command set longer than {self._max_command_length} bytes",
                ABORT_REASON_NOT_SPECIFIED,
            )
        if not pdv.is_last:
            # Copy: a memoryview may point into a receive buffer reused for the next PDU,
            # and this fragment must outlive it. Commands are small; this is cheap.
            self._parts.append(bytes(data))
            self._state = _IN_COMMAND
            self._context_id = ctx
            return
        if self._parts:
            self._parts.append(data)
            data = b"".join(self._parts)
            self._parts = []
        self._parts_length = 0
        if not data:
            raise DimseProtocolError("empty command set", ABORT_REASON_INVALID_PDU_PARAMETER)
        command = decode_command(data)
        self._last_command = command
        events.append(CommandReceived(ctx, command))
        if command.has_dataset:
            self._state = _IN_DATASET
            self._context_id = ctx
        else:
            self._state = _IDLE

    def _last_name(self) -> str:
        return self._last_command.name if self._last_command is not None else "the message"


# --- Send side: fragmentation -----------------------------------------------------------

# P-DATA-TF with one PDV (PS3.8 9.3.5, table 9-22/9-23): PDU type 04H, reserved, PDU length,
# then the PDV item: item length, presentation context ID, message control header (E.2).
# Same encoding as dicomd.net.pdu.pdata_header; kept private here until they are deduped.
# The PDU-length field is 32 bits and covers item length (4) + context ID + header + data.
_MAX_FRAGMENT = (0xFFFFFFFF - 6) & ~1


def _fragment_size(max_pdu_length: int) -> int:
    """Data bytes per PDV for a peer's Maximum Length Received (PS3.8 D.1).

    The limit is on the P-DATA-TF variable field: PDV item length (4) + context ID (1) +
    message control header (1) + fragment. Fragments have even length (PS3.8 E.1), so an
    odd limit loses a byte. 0 means no limit (but the 32-bit PDU length still bounds it).
    """
    if max_pdu_length == 0:
        return _MAX_FRAGMENT
    if max_pdu_length < 8:
        raise ValueError(f"max_pdu_length {max_pdu_length} leaves no room for a fragment")
    return min(max_pdu_length - 6, _MAX_FRAGMENT) & ~1


def _append_fragments(
    out: list[bytes | memoryview],
    context_id: int,
    is_command: bool,
    data: bytes | memoryview,
    size: int,
    is_final: bool,
) -> None:
    view = memoryview(data).cast("B")  # byte offsets whatever the caller's format
    total = view.nbytes
    if total == 0:
        if is_final:
            # A message's stream always ends with a fragment that has the last bit set,
            # even when it carries no bytes.
            out.append(pdata_header(context_id, is_command, True, 0))
        return
    for start in range(0, total, size):
        chunk = view[start : start + size]
        last = is_final and start + size >= total
        out.append(pdata_header(context_id, is_command, last, chunk.nbytes))
        out.append(chunk)


def fragment_message(
    context_id: int,
    command: bytes,
    dataset: bytes | memoryview | None,
    max_pdu_length: int,
) -> list[bytes | memoryview]:
    """P-DATA-TF PDUs for one message, as chunks to ``writelines()`` in order.

    One PDV per PDU; each PDU's variable field stays within ``max_pdu_length`` (the peer's
    Maximum Length Received, PS3.8 D.1; 0 = unlimited). The command set is sent first, then
    the data set (PS3.8 E.1); data-set chunks are memoryview slices of ``dataset`` (no copy),
    headers are small bytes. ``dataset=None`` sends none; ``b""`` sends one empty last PDV.
    """
    if not command:
        raise ValueError("a DIMSE message needs a command set")
    size = _fragment_size(max_pdu_length)
    out: list[bytes | memoryview] = []
    if len(command) <= size:
        # The usual case: header and command in one small bytes object, one chunk less.
        out.append(pdata_header(context_id, True, True, len(command)) + bytes(command))
    else:
        _append_fragments(out, context_id, True, command, size, True)
    if dataset is not None:
        _append_fragments(out, context_id, False, dataset, size, True)
    return out


def fragment_stream(
    context_id: int,
    is_command: bool,
    data: bytes | memoryview,
    max_pdu_length: int,
    is_final_part: bool,
) -> list[bytes | memoryview]:
    """P-DATA-TF PDUs for one piece of a command or data-set stream (e.g. read from a file).

    The last-fragment bit is set only on the final fragment of the final part. Every part
    but the final one must have even length, or a fragment in the middle of the stream
    would be odd (PS3.8 E.1: each fragment consists of an even number of bytes).
    """
    size = _fragment_size(max_pdu_length)
    nbytes = memoryview(data).nbytes
    if not is_final_part and nbytes & 1:
        raise ValueError(f"a non-final part must have even length, not {nbytes}")
    out: list[bytes | memoryview] = []
    _append_fragments(out, context_id, is_command, data, size, is_final_part)
    return out


def pdata_image(
    context_id: int, length: int, max_pdu_length: int, head_room: int
) -> tuple[bytearray, list[memoryview]]:
    """One buffer laid out as the data-set P-DATA-TF PDUs of a ``length``-byte data set,
    headers filled in, plus writable views of the fragment slots to read the data into.

    The buffer starts with ``head_room`` spare bytes so that the message's command PDU can
    be put in front of the data-set PDUs later (``Association.send_image``): the whole
    message is then one contiguous write, where fragment views would be joined (copied)
    by ``writelines()`` first. Fragments are split as ``fragment_message`` splits them.
    """
    size = _fragment_size(max_pdu_length)
    count = max(1, -(-length // size))
    buf = bytearray(head_room + length + 12 * count)
    view = memoryview(buf)
    slots: list[memoryview] = []
    pos = head_room
    for i in range(count):
        n = min(size, length - i * size)
        buf[pos : pos + 12] = pdata_header(context_id, False, i == count - 1, n)
        pos += 12
        slots.append(view[pos : pos + n])
        pos += n
    return buf, slots
