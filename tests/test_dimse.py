"""Tests of the DIMSE message layer (dicomd.net.dimse): codec, assembly, fragmentation.

pynetdicom and pydicom are the reference implementations here: what they encode we must
decode, and what we encode they must decode, field by field.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from io import BytesIO

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pynetdicom import dimse_messages as msgs
from pynetdicom import dimse_primitives as prims
from pynetdicom.pdu import P_DATA_TF

from dicomd.net import dimse
from dicomd.net.dimse import (
    C_CANCEL_RQ,
    C_ECHO_RQ,
    C_ECHO_RSP,
    C_FIND_RQ,
    C_GET_RSP,
    C_MOVE_RQ,
    C_MOVE_RSP,
    C_STORE_RQ,
    C_STORE_RSP,
    COMMAND_ELEMENTS,
    DATASET_PRESENT,
    N_ACTION_RQ,
    N_CREATE_RQ,
    N_DELETE_RQ,
    N_EVENT_REPORT_RQ,
    N_GET_RQ,
    N_GET_RSP,
    N_SET_RQ,
    NO_DATASET,
    PRIORITY_HIGH,
    PRIORITY_LOW,
    PRIORITY_MEDIUM,
    VERIFICATION,
    Command,
    CommandReceived,
    DatasetFragment,
    DimseError,
    DimseProtocolError,
    MessageAssembler,
    c_cancel_rq,
    c_echo_rq,
    c_find_rq,
    c_get_rq,
    c_move_rq,
    c_store_rq,
    decode_command,
    encode_command,
    fields_from_keywords,
    fragment_message,
    fragment_stream,
    pdata_image,
    response_for,
)
from dicomd.net.events import (
    ABORT_REASON_INVALID_PDU_PARAMETER,
    ABORT_REASON_NOT_SPECIFIED,
    ABORT_REASON_UNEXPECTED_PDU_PARAMETER,
    Pdv,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_GET = "1.2.840.10008.5.1.4.1.2.2.3"
PRINTER = "1.2.840.10008.5.1.1.16"
PRINTER_INSTANCE = "1.2.840.10008.5.1.1.17"
FILM_SESSION = "1.2.840.10008.5.1.1.1"
INSTANCE = "1.2.826.0.1.3680043.8.498.1234567890"


# --- helpers ------------------------------------------------------------------------------


def parse_pdata(stream: bytes) -> list[tuple[int, Pdv]]:
    """Split a byte stream of P-DATA-TF PDUs into (PDU variable-field length, PDV)."""
    out: list[tuple[int, Pdv]] = []
    offset = 0
    while offset < len(stream):
        pdu_type, _, pdu_length = struct.unpack_from(">BBI", stream, offset)
        assert pdu_type == 0x04
        end = offset + 6 + pdu_length
        assert end <= len(stream)
        item = offset + 6
        while item < end:
            (item_length,) = struct.unpack_from(">I", stream, item)
            ctx, mch = stream[item + 4], stream[item + 5]
            data = stream[item + 6 : item + 4 + item_length]
            out.append((pdu_length, Pdv(ctx, bool(mch & 1), bool(mch & 2), data)))
            item += 4 + item_length
        assert item == end
        offset = end
    return out


def chunks_to_pdvs(chunks: Iterable[bytes | memoryview]) -> list[Pdv]:
    return [pdv for _, pdv in parse_pdata(b"".join(chunks))]


def reassemble(events: list[dimse.DimseEvent]) -> tuple[Command, bytes | None]:
    commands = [e for e in events if isinstance(e, CommandReceived)]
    assert len(commands) == 1
    fragments = [e for e in events if isinstance(e, DatasetFragment)]
    if not commands[0].command.has_dataset:
        assert not fragments
        return commands[0].command, None
    assert fragments and fragments[-1].is_last
    assert not any(f.is_last for f in fragments[:-1])
    return commands[0].command, b"".join(bytes(f.data) for f in fragments)


def pydicom_value(value: object) -> object:
    """A pydicom element value in dimse's representation (AT and multi-values as tuples)."""
    if isinstance(value, (list, MultiValue)):
        return tuple(int(v) for v in value)
    if isinstance(value, str):
        return str(value)
    return value


def expected_fields(fields: dict[int, object]) -> dict[int, object]:
    """What decode_command gives back for what encode_command was given."""
    out: dict[int, object] = {}
    for tag, value in fields.items():
        if value is None or tag == 0:
            continue
        info = COMMAND_ELEMENTS[tag]
        if info.vr == "AT" or (info.multi and not isinstance(value, tuple)):
            value = (value,) if isinstance(value, int) else tuple(value)
        out[tag] = value
    return out


def request(fields: dict[int, object]) -> Command:
    return decode_command(encode_command(fields))


# Every builder, and a response to every request type.
N_GET = fields_from_keywords(
    command_field=N_GET_RQ,
    message_id=11,
    requested_sop_class_uid=PRINTER,
    requested_sop_instance_uid=PRINTER_INSTANCE,
    command_data_set_type=NO_DATASET,
    attribute_identifier_list=[0x21100010, 0x21100020],
)
N_REQUESTS = {
    "N-EVENT-REPORT-RQ": fields_from_keywords(
        command_field=N_EVENT_REPORT_RQ,
        message_id=12,
        affected_sop_class_uid=PRINTER,
        affected_sop_instance_uid=PRINTER_INSTANCE,
        event_type_id=1,
        command_data_set_type=NO_DATASET,
    ),
    "N-GET-RQ": N_GET,
    "N-SET-RQ": fields_from_keywords(
        command_field=N_SET_RQ,
        message_id=13,
        requested_sop_class_uid=FILM_SESSION,
        requested_sop_instance_uid=INSTANCE,
        command_data_set_type=DATASET_PRESENT,
    ),
    "N-ACTION-RQ": fields_from_keywords(
        command_field=N_ACTION_RQ,
        message_id=14,
        requested_sop_class_uid=FILM_SESSION,
        requested_sop_instance_uid=INSTANCE,
        action_type_id=1,
        command_data_set_type=NO_DATASET,
    ),
    "N-CREATE-RQ": fields_from_keywords(
        command_field=N_CREATE_RQ,
        message_id=15,
        affected_sop_class_uid=FILM_SESSION,
        command_data_set_type=DATASET_PRESENT,
    ),
    "N-DELETE-RQ": fields_from_keywords(
        command_field=N_DELETE_RQ,
        message_id=16,
        requested_sop_class_uid=FILM_SESSION,
        requested_sop_instance_uid=INSTANCE,
        command_data_set_type=NO_DATASET,
    ),
}
REQUESTS: dict[str, dict[int, object]] = {
    "C-ECHO-RQ": c_echo_rq(1),
    "C-ECHO-RQ other class": c_echo_rq(65535, "1.2.3"),
    "C-STORE-RQ": c_store_rq(2, CT, INSTANCE),
    "C-STORE-RQ sub-op": c_store_rq(
        3,
        CT,
        INSTANCE,
        priority=PRIORITY_HIGH,
        move_originator_ae="MOVESCU",
        move_originator_message_id=7,
    ),
    "C-FIND-RQ": c_find_rq(4, STUDY_FIND, priority=PRIORITY_LOW),
    "C-GET-RQ": c_get_rq(5, STUDY_GET),
    "C-MOVE-RQ": c_move_rq(6, STUDY_MOVE, "STORESCP"),
    "C-CANCEL-RQ": c_cancel_rq(4),
    **N_REQUESTS,
}
RESPONSES: dict[str, Callable[[], dict[int, object]]] = {
    "C-ECHO-RSP": lambda: response_for(request(c_echo_rq(1)), 0x0000),
    "C-STORE-RSP": lambda: response_for(request(c_store_rq(2, CT, INSTANCE)), 0x0000),
    "C-STORE-RSP error": lambda: response_for(
        request(c_store_rq(2, CT, INSTANCE)),
        0xA700,
        error_comment="Out of resources: disk full",
        offending_element=[0x00100010, 0x00080018],
        error_id=3,
    ),
    "C-FIND-RSP pending": lambda: response_for(
        request(c_find_rq(4, STUDY_FIND)), 0xFF00, has_dataset=True
    ),
    "C-GET-RSP": lambda: response_for(
        request(c_get_rq(5, STUDY_GET)),
        0xFF00,
        number_of_remaining_suboperations=3,
        number_of_completed_suboperations=2,
        number_of_failed_suboperations=1,
        number_of_warning_suboperations=0,
    ),
    "C-MOVE-RSP final": lambda: response_for(
        request(c_move_rq(6, STUDY_MOVE, "STORESCP")),
        0xB000,
        has_dataset=True,
        number_of_completed_suboperations=24,
        number_of_failed_suboperations=1,
        number_of_warning_suboperations=0,
    ),
    **{
        name.replace("-RQ", "-RSP"): (lambda fields=fields: response_for(request(fields), 0))
        for name, fields in N_REQUESTS.items()
    },
}
ALL_FIELDS = {**REQUESTS, **{name: make() for name, make in RESPONSES.items()}}


# --- the element registry -------------------------------------------------------------------


def test_registry_is_pydicom_group_0000() -> None:
    from pydicom._dicom_dict import DicomDictionary

    group0 = {tag: entry for tag, entry in DicomDictionary.items() if tag >> 16 == 0}
    assert set(group0) == set(COMMAND_ELEMENTS)
    for tag, (vr, vm, _name, _retired, keyword) in group0.items():
        info = COMMAND_ELEMENTS[tag]
        assert (info.vr, info.keyword, info.multi) == (vr, keyword, vm != "1"), hex(tag)


def test_keywords_are_unique_and_resolve() -> None:
    names = [e.name for e in COMMAND_ELEMENTS.values()]
    assert len(names) == len(set(names))
    assert fields_from_keywords(move_originator_ae="X", status=1) == {0x1030: "X", 0x0900: 1}
    with pytest.raises(TypeError):
        fields_from_keywords(no_such_thing=1)


# --- codec: our own round trip ----------------------------------------------------------------


@pytest.mark.parametrize("name", list(ALL_FIELDS))
def test_round_trip_every_builder(name: str) -> None:
    fields = ALL_FIELDS[name]
    encoded = encode_command(fields)
    command = decode_command(encoded)
    assert command.fields == expected_fields(fields)
    assert command.encode() == encoded
    assert decode_command(memoryview(encoded)) == command
    assert len(encoded) % 2 == 0


def test_builders_set_the_standard_fields() -> None:
    store = Command(
        c_store_rq(3, CT, INSTANCE, move_originator_ae="A", move_originator_message_id=9)
    )
    assert store.command_field == C_STORE_RQ and store.name == "C-STORE-RQ"
    assert store.is_request and not store.is_response
    assert store.message_id == 3 and store.priority == PRIORITY_MEDIUM
    assert store.affected_sop_class_uid == CT
    assert store.affected_sop_instance_uid == INSTANCE
    assert store.move_originator_ae == "A" and store.move_originator_message_id == 9
    assert store.has_dataset

    echo = Command(c_echo_rq(1))
    assert echo.affected_sop_class_uid == VERIFICATION and not echo.has_dataset

    move = Command(c_move_rq(6, STUDY_MOVE, "DEST", priority=PRIORITY_HIGH))
    assert move.move_destination == "DEST" and move.priority == PRIORITY_HIGH
    assert move.has_dataset and move.command_field == C_MOVE_RQ

    cancel = Command(c_cancel_rq(4))
    assert cancel.command_field == C_CANCEL_RQ and cancel.is_request
    assert cancel.message_id_being_responded_to == 4 and not cancel.has_dataset
    assert Command(c_find_rq(1, STUDY_FIND)).command_field == C_FIND_RQ


def test_response_for() -> None:
    rq = request(c_store_rq(2, CT, INSTANCE))
    rsp = Command(response_for(rq, 0xB007, error_comment="coerced"))
    assert rsp.command_field == C_STORE_RSP and rsp.is_response and not rsp.is_request
    assert rsp.message_id_being_responded_to == 2
    assert rsp.affected_sop_class_uid == CT
    assert rsp.affected_sop_instance_uid == INSTANCE
    assert rsp.status == 0xB007 and rsp.error_comment == "coerced"
    assert not rsp.has_dataset and rsp.message_id is None

    echo_rsp = Command(response_for(request(c_echo_rq(9)), 0))
    assert echo_rsp.command_field == C_ECHO_RSP
    assert 0x1000 not in expected_fields(echo_rsp.fields)  # the request had no instance

    # N-GET: the requested class and instance become the affected ones (PS3.7 10.1.2).
    n_get = Command(response_for(request(N_GET), 0, has_dataset=True))
    assert n_get.command_field == N_GET_RSP and n_get.has_dataset
    assert n_get.affected_sop_class_uid == PRINTER
    assert n_get.affected_sop_instance_uid == PRINTER_INSTANCE

    move = Command(
        response_for(
            request(c_move_rq(6, STUDY_MOVE, "D")), 0xFF00, number_of_remaining_suboperations=3
        )
    )
    assert move.command_field == C_MOVE_RSP and move.fields[0x1020] == 3

    # Extra fields win, None removes.
    plain = response_for(rq, 0, affected_sop_instance_uid=None)
    assert 0x1000 not in decode_command(encode_command(plain)).fields

    with pytest.raises(ValueError):
        response_for(Command(response_for(rq, 0)), 0)
    with pytest.raises(ValueError):
        response_for(request(c_cancel_rq(1)), 0)
    with pytest.raises(TypeError):
        response_for(rq, 0, bogus=1)
    assert Command(response_for(request(c_get_rq(5, STUDY_GET)), 0)).command_field == C_GET_RSP


# --- codec: encoding details --------------------------------------------------------------------


def test_encoding_layout() -> None:
    encoded = encode_command({0x0900: 0, 0x0002: "1.2.3", 0x0000: 999, 0x0600: "AE1", 0x1030: None})
    group, elem, length, value = struct.unpack_from("<HHII", encoded)
    assert (group, elem, length) == (0, 0, 4) and value == len(encoded) - 12  # PS3.7 E.1
    # Tag order, NUL-padded UI, space-padded AE, US as two bytes; None omitted.
    assert encoded[12:] == (
        b"\x00\x00\x02\x00\x06\x00\x00\x001.2.3\x00"
        + b"\x00\x00\x00\x06\x04\x00\x00\x00AE1 "
        + b"\x00\x00\x00\x09\x02\x00\x00\x00\x00\x00"
    )


def test_encoding_text_rules() -> None:
    long = "é" + "x" * 100
    fields = decode_command(
        encode_command({0x0100: 1, 0x0800: NO_DATASET, 0x0902: long, 0x0010: "ABC"})
    ).fields
    assert fields[0x0902] == "?" + "x" * 63  # ASCII only, LO cut to 64
    assert fields[0x0010] == "ABC"
    # Identifiers are never cut: a long UID from a lenient decode is echoed unchanged.
    uid = "1." * 40 + "1"
    assert decode_command(encode_command({0x0100: 1, 0x0800: 1, 0x0002: uid})).fields[2] == uid


def test_encoding_errors() -> None:
    with pytest.raises(ValueError):
        encode_command({0x00100010: "DOE^JOHN"})  # a data element, not a command element
    with pytest.raises(ValueError):
        encode_command({0x0110: 70000})
    with pytest.raises(ValueError):
        encode_command({0x0110: -1})
    with pytest.raises(ValueError):
        encode_command({0x0901: [0x1_0000_0000]})
    with pytest.raises(ValueError):
        encode_command({0x7777: "x"})  # unknown element: only raw bytes
    with pytest.raises(TypeError):
        encode_command({0x0002: 12})
    with pytest.raises(TypeError):
        encode_command({0x0110: "1"})


def test_raw_and_unknown_elements_survive() -> None:
    data = encode_command({0x0100: 1, 0x0800: NO_DATASET, 0x7777: b"\x01\x02\x03"})
    command = decode_command(data)
    assert command.fields[0x7777] == b"\x01\x02\x03\x00"  # padded to even
    assert command.encode() == data
    assert "(0000,7777)" in repr(command)


def test_multi_valued_and_retired() -> None:
    fields = {0x0100: 1, 0x0800: NO_DATASET, 0x51B0: [1, 2, 3], 0x0001: 5, 0x0901: 0x00100020}
    decoded = decode_command(encode_command(fields)).fields
    assert decoded[0x51B0] == (1, 2, 3)
    assert decoded[0x0001] == 5
    assert decoded[0x0901] == (0x00100020,)


# --- codec: decoding details --------------------------------------------------------------------


def element(tag: int, value: bytes, group: int = 0) -> bytes:
    return struct.pack("<HHI", group, tag, len(value)) + value


MINIMAL = element(0x0100, b"\x30\x00") + element(0x0800, b"\x01\x01")


def test_decode_strips_padding_and_is_lenient() -> None:
    data = (
        element(0x0000, b"\xff\xff\x00\x00")  # wrong group length: ignored
        + element(0x0600, b" DEST   ")  # AE: leading and trailing spaces insignificant
        + element(0x0002, b"1.2.3 ")  # UI padded with a space instead of NUL
        + element(0x0902, b"text\x00\x00")
        + MINIMAL
        + element(0x0110, b"\x05\x00")  # out of tag order: accepted
        + element(0x1000, b"")
    )
    command = decode_command(data)
    assert command.move_destination == "DEST"
    assert command.affected_sop_class_uid == "1.2.3"
    assert command.error_comment == "text"
    assert command.message_id == 5
    assert command.affected_sop_instance_uid == ""
    assert 0x0000 not in command.fields
    # Without any group length at all.
    assert decode_command(MINIMAL).command_field == C_ECHO_RQ
    # A memoryview with another item size is read as bytes.
    assert decode_command(memoryview(MINIMAL).cast("H")).command_field == C_ECHO_RQ


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(MINIMAL + element(0x0010, b"DOE ", group=0x0010), id="data element"),
        pytest.param(MINIMAL + b"\x00\x00\x00\x09\x02\x00", id="truncated header"),
        pytest.param(MINIMAL + element(0x0900, b"\x00\x00")[:-1], id="truncated value"),
        pytest.param(MINIMAL + b"\x00\x00\x02\x00\xff\xff\xff\xff", id="undefined length"),
        pytest.param(MINIMAL + element(0x0100, b"\x01\x00"), id="duplicate"),
        pytest.param(element(0x0100, b"\x30\x00\x00\x00") + MINIMAL[10:], id="US length 4"),
        pytest.param(MINIMAL + element(0x0000, b"\x00\x00"), id="UL length 2"),
        pytest.param(MINIMAL + element(0x0901, b"\x10\x00"), id="AT length 2"),
        pytest.param(element(0x0800, b"\x01\x01"), id="no command field"),
        pytest.param(element(0x0100, b"\x30\x00"), id="no data set type"),
        pytest.param(element(0x0100, b"") + element(0x0800, b"\x01\x01"), id="empty field"),
    ],
)
def test_decode_errors(data: bytes) -> None:
    with pytest.raises(DimseError) as info:
        decode_command(data)
    assert info.value.reason == ABORT_REASON_INVALID_PDU_PARAMETER


def test_command_properties_on_partial_commands() -> None:
    empty = Command()
    assert empty.command_field is None and empty.name == "no-command-field"
    assert not empty.is_request and not empty.is_response and not empty.has_dataset
    assert Command({0x0100: 0x0999}).name == "command-0x0999"
    assert Command({0x0100: 1}) != "x"
    assert Command({0x0100: 1}) == Command({0x0100: 1})


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_decode_fuzz_only_raises_dimse_error(data: bytes) -> None:
    try:
        decode_command(data)
    except DimseError:
        pass


# --- codec: interoperability with pynetdicom / pydicom ------------------------------------------


def ds_bytes(size: int) -> BytesIO:
    return BytesIO(bytes(i % 251 for i in range(size)))


def pynetdicom_messages() -> dict[str, tuple[type[msgs.DIMSEMessage], object]]:
    """pynetdicom primitives for every message type, with most optional fields set."""
    out: dict[str, tuple[type[msgs.DIMSEMessage], object]] = {}

    p = prims.C_ECHO()
    p.MessageID, p.AffectedSOPClassUID = 7, VERIFICATION
    out["C-ECHO-RQ"] = (msgs.C_ECHO_RQ, p)
    p = prims.C_ECHO()
    p.MessageIDBeingRespondedTo, p.AffectedSOPClassUID, p.Status = 7, VERIFICATION, 0
    p.ErrorComment = "fine"
    out["C-ECHO-RSP"] = (msgs.C_ECHO_RSP, p)

    p = prims.C_STORE()
    p.MessageID, p.AffectedSOPClassUID, p.AffectedSOPInstanceUID = 65535, CT, INSTANCE
    p.Priority = PRIORITY_LOW
    p.MoveOriginatorApplicationEntityTitle, p.MoveOriginatorMessageID = "MOVESCU", 3
    p.DataSet = ds_bytes(40_000)
    out["C-STORE-RQ"] = (msgs.C_STORE_RQ, p)
    p = prims.C_STORE()
    p.MessageIDBeingRespondedTo, p.AffectedSOPClassUID = 65535, CT
    p.AffectedSOPInstanceUID, p.Status = INSTANCE, 0xA700
    p.OffendingElement = [0x00100010, 0x00100020]
    p.ErrorComment = "disk full"
    out["C-STORE-RSP"] = (msgs.C_STORE_RSP, p)

    p = prims.C_FIND()
    p.MessageID, p.AffectedSOPClassUID, p.Priority = 2, STUDY_FIND, PRIORITY_HIGH
    p.Identifier = ds_bytes(300)
    out["C-FIND-RQ"] = (msgs.C_FIND_RQ, p)
    p = prims.C_FIND()
    p.MessageIDBeingRespondedTo, p.AffectedSOPClassUID, p.Status = 2, STUDY_FIND, 0xFF00
    p.Identifier = ds_bytes(5000)
    out["C-FIND-RSP"] = (msgs.C_FIND_RSP, p)

    p = prims.C_GET()
    p.MessageID, p.AffectedSOPClassUID, p.Identifier = 3, STUDY_GET, ds_bytes(100)
    out["C-GET-RQ"] = (msgs.C_GET_RQ, p)
    p = prims.C_GET()
    p.MessageIDBeingRespondedTo, p.AffectedSOPClassUID, p.Status = 3, STUDY_GET, 0xFF00
    p.NumberOfRemainingSuboperations, p.NumberOfCompletedSuboperations = 5, 20
    p.NumberOfFailedSuboperations, p.NumberOfWarningSuboperations = 1, 2
    out["C-GET-RSP"] = (msgs.C_GET_RSP, p)

    p = prims.C_MOVE()
    p.MessageID, p.AffectedSOPClassUID, p.MoveDestination = 4, STUDY_MOVE, "STORESCP"
    p.Identifier = ds_bytes(200)
    out["C-MOVE-RQ"] = (msgs.C_MOVE_RQ, p)
    p = prims.C_MOVE()
    p.MessageIDBeingRespondedTo, p.AffectedSOPClassUID, p.Status = 4, STUDY_MOVE, 0
    p.NumberOfCompletedSuboperations, p.NumberOfFailedSuboperations = 25, 0
    p.NumberOfWarningSuboperations = 0
    out["C-MOVE-RSP"] = (msgs.C_MOVE_RSP, p)

    p = prims.C_CANCEL()
    p.MessageIDBeingRespondedTo = 2
    out["C-CANCEL-RQ"] = (msgs.C_CANCEL_RQ, p)

    p = prims.N_EVENT_REPORT()
    p.MessageID, p.AffectedSOPClassUID, p.AffectedSOPInstanceUID = 8, PRINTER, PRINTER_INSTANCE
    p.EventTypeID, p.EventInformation = 1, ds_bytes(64)
    out["N-EVENT-REPORT-RQ"] = (msgs.N_EVENT_REPORT_RQ, p)
    p = prims.N_GET()
    p.MessageID, p.RequestedSOPClassUID, p.RequestedSOPInstanceUID = 9, PRINTER, PRINTER_INSTANCE
    p.AttributeIdentifierList = [0x21100010, 0x21100020, 0x21100030]
    out["N-GET-RQ"] = (msgs.N_GET_RQ, p)
    p = prims.N_GET()
    p.MessageIDBeingRespondedTo, p.AffectedSOPClassUID, p.Status = 9, PRINTER, 0
    p.AffectedSOPInstanceUID, p.AttributeList = PRINTER_INSTANCE, ds_bytes(80)
    out["N-GET-RSP"] = (msgs.N_GET_RSP, p)
    p = prims.N_ACTION()
    p.MessageID, p.RequestedSOPClassUID, p.RequestedSOPInstanceUID = 10, FILM_SESSION, INSTANCE
    p.ActionTypeID = 1
    out["N-ACTION-RQ"] = (msgs.N_ACTION_RQ, p)
    p = prims.N_CREATE()
    p.MessageIDBeingRespondedTo, p.AffectedSOPClassUID, p.Status = 11, FILM_SESSION, 0
    p.AffectedSOPInstanceUID = INSTANCE
    out["N-CREATE-RSP"] = (msgs.N_CREATE_RSP, p)
    p = prims.N_DELETE()
    p.MessageID, p.RequestedSOPClassUID, p.RequestedSOPInstanceUID = 12, FILM_SESSION, INSTANCE
    out["N-DELETE-RQ"] = (msgs.N_DELETE_RQ, p)
    return out


PYNETDICOM_MESSAGES = pynetdicom_messages()


def pynetdicom_encode(name: str, context_id: int, max_pdu: int) -> tuple[Dataset, bytes, list[Pdv]]:
    cls, primitive = PYNETDICOM_MESSAGES[name]
    message = cls()
    message.primitive_to_message(primitive)
    dataset = message.data_set.getvalue() if message.data_set is not None else b""
    pdvs: list[Pdv] = []
    for pdata in message.encode_msg(context_id, max_pdu):
        # Through the real PDU bytes, as they would come off the wire.
        stream = P_DATA_TF(pdata).encode()
        for pdu_length, pdv in parse_pdata(stream):
            assert max_pdu == 0 or pdu_length <= max_pdu
            pdvs.append(pdv)
    return message.command_set, dataset, pdvs


@pytest.mark.parametrize("max_pdu", [0, 4096, 16384])
@pytest.mark.parametrize("name", list(PYNETDICOM_MESSAGES))
def test_assemble_pynetdicom_messages(name: str, max_pdu: int) -> None:
    command_set, dataset, pdvs = pynetdicom_encode(name, 3, max_pdu)
    assembler = MessageAssembler([1, 3])
    events = assembler.receive(pdvs)
    assert not assembler.in_message
    command, received = reassemble(events)
    assert all(e.context_id == 3 for e in events)
    assert command.name == name
    expected = {
        elem.tag & 0xFFFF: pydicom_value(elem.value) for elem in command_set if elem.tag != 0
    }
    assert command.fields == expected
    assert (received or b"") == dataset


@pytest.mark.parametrize("name", list(ALL_FIELDS))
def test_pydicom_decodes_what_we_encode(name: str) -> None:
    fields = expected_fields(ALL_FIELDS[name])
    encoded = encode_command(fields)
    ds = read_dataset(BytesIO(encoded), is_implicit_VR=True, is_little_endian=True)
    assert ds[0x00000000].value == len(encoded) - 12
    assert {e.tag & 0xFFFF: pydicom_value(e.value) for e in ds if e.tag != 0} == fields
    assert [e.tag for e in ds] == sorted(e.tag for e in ds)


@pytest.mark.parametrize("max_pdu", [0, 4096, 16384])
def test_pynetdicom_decodes_our_fragments(max_pdu: int) -> None:
    fields = c_store_rq(7, CT, INSTANCE, move_originator_ae="MOVESCU", move_originator_message_id=5)
    dataset = bytes(range(256)) * 200
    stream = b"".join(fragment_message(5, encode_command(fields), dataset, max_pdu))
    message = msgs.DIMSEMessage()
    offset, done = 0, False
    while offset < len(stream):
        (length,) = struct.unpack_from(">I", stream, offset + 2)
        pdu = P_DATA_TF()
        pdu.decode(stream[offset : offset + 6 + length])
        offset += 6 + length
        assert not done
        done = message.decode_msg(pdu.to_primitive())
    assert done
    cs = message.command_set
    assert cs.CommandField == C_STORE_RQ and cs.MessageID == 7
    assert cs.AffectedSOPInstanceUID == INSTANCE and cs.AffectedSOPClassUID == CT
    assert cs.MoveOriginatorApplicationEntityTitle == "MOVESCU"
    assert cs.MoveOriginatorMessageID == 5
    assert message.data_set.getvalue() == dataset
    assert message.context_id == 5


# --- assembler ----------------------------------------------------------------------------------

ECHO = encode_command(c_echo_rq(1))
STORE = encode_command(c_store_rq(2, CT, INSTANCE))


def cmd(data: bytes, ctx: int = 1, last: bool = True) -> Pdv:
    return Pdv(ctx, True, last, data)


def ds(data: bytes, ctx: int = 1, last: bool = True) -> Pdv:
    return Pdv(ctx, False, last, data)


def test_assembler_events_and_zero_copy() -> None:
    assembler = MessageAssembler({1, 3})
    piece = memoryview(bytearray(b"abcd"))
    events = assembler.receive([cmd(STORE[:10], last=False), cmd(STORE[10:])])
    assert len(events) == 1 and isinstance(events[0], CommandReceived)
    assert events[0].command.command_field == C_STORE_RQ
    assert assembler.in_message
    events = assembler.receive([ds(piece, last=False)])
    assert events == [DatasetFragment(1, piece, False)]
    assert events[0].data is piece  # handed on, not copied
    events = assembler.receive([ds(b"", last=True), cmd(ECHO, ctx=3)])
    assert [type(e) for e in events] == [DatasetFragment, CommandReceived]
    assert not assembler.in_message
    # Command fragments may be split anywhere, even into empty pieces.
    events = assembler.receive([cmd(b"", last=False), cmd(ECHO[:3], last=False), cmd(ECHO[3:])])
    assert events[0].command == decode_command(ECHO)


def test_assembler_copies_held_command_fragments() -> None:
    # A non-last command fragment must outlive a receive buffer that is reused.
    buffer = bytearray(STORE[:20])
    assembler = MessageAssembler([1])
    assembler.receive([cmd(memoryview(buffer), last=False)])
    buffer[:] = b"\xff" * 20
    (event,) = assembler.receive([cmd(STORE[20:])])
    assert event.command == decode_command(STORE)


def violation(pdvs: list[Pdv], reason: int, match: str, accepted: Iterable[int] = (1, 3)) -> None:
    assembler = MessageAssembler(accepted)
    with pytest.raises(DimseProtocolError, match=match) as info:
        assembler.receive(pdvs)
    assert info.value.reason == reason
    assert info.value.detail == str(info.value)
    # After an error the assembler is unusable.
    with pytest.raises(RuntimeError):
        assembler.receive([cmd(ECHO)])


UNEXPECTED = ABORT_REASON_UNEXPECTED_PDU_PARAMETER
INVALID = ABORT_REASON_INVALID_PDU_PARAMETER


def test_violation_context_not_accepted() -> None:
    violation([cmd(ECHO, ctx=5)], INVALID, "not accepted")
    violation([cmd(STORE), ds(b"xx", ctx=7)], INVALID, "not accepted")


def test_violation_dataset_before_command() -> None:
    violation([ds(b"xx")], UNEXPECTED, "before any command")
    violation([cmd(STORE[:10], last=False), ds(b"xx")], UNEXPECTED, "before the last command")


def test_violation_dataset_when_command_said_none() -> None:
    violation([cmd(ECHO), ds(b"xx")], UNEXPECTED, "C-ECHO-RQ.*no data set")


def test_violation_second_command_while_dataset_incomplete() -> None:
    violation([cmd(STORE), cmd(ECHO)], UNEXPECTED, "data set of C-STORE-RQ is incomplete")
    violation([cmd(STORE), ds(b"ab", last=False), cmd(ECHO)], UNEXPECTED, "incomplete")


def test_violation_message_on_two_contexts() -> None:
    violation([cmd(STORE, ctx=1), ds(b"xx", ctx=3)], UNEXPECTED, "interleaving")
    violation(
        [cmd(STORE, ctx=1), ds(b"xx", ctx=1, last=False), ds(b"yy", ctx=3)],
        UNEXPECTED,
        "interleaving",
    )


def test_violation_interleaved_commands() -> None:
    violation([cmd(STORE[:10], ctx=1, last=False), cmd(ECHO, ctx=3)], UNEXPECTED, "interleaving")


def test_violation_empty_command() -> None:
    violation([cmd(b"")], INVALID, "empty command")
    violation([cmd(b"", last=False), cmd(b"")], INVALID, "empty command")


def test_violation_command_too_long() -> None:
    assembler = MessageAssembler([1], max_command_length=100)
    with pytest.raises(DimseProtocolError) as info:
        assembler.receive([cmd(b"\x00" * 60, last=False), cmd(b"\x00" * 60, last=False)])
    assert info.value.reason == ABORT_REASON_NOT_SPECIFIED


def test_undecodable_command_is_dimse_error() -> None:
    assembler = MessageAssembler([1])
    with pytest.raises(DimseError) as info:
        assembler.receive([cmd(MINIMAL + element(0x0010, b"XX", group=8))])
    assert not isinstance(info.value, DimseProtocolError)
    assert info.value.reason == INVALID
    with pytest.raises(RuntimeError):
        assembler.receive([])


# --- fragmentation ------------------------------------------------------------------------------


def check_fragments(
    chunks: list[bytes | memoryview], max_pdu: int, dataset: bytes | None
) -> list[Pdv]:
    parsed = parse_pdata(b"".join(chunks))
    for pdu_length, pdv in parsed:
        assert max_pdu == 0 or pdu_length <= max_pdu  # PS3.8 D.1
        assert pdu_length == 4 + 2 + len(pdv.data)  # one PDV per PDU
    pdvs = [pdv for _, pdv in parsed]
    commands = [p for p in pdvs if p.is_command]
    data = [p for p in pdvs if not p.is_command]
    assert pdvs[: len(commands)] == commands  # command first
    assert [p.is_last for p in commands] == [False] * (len(commands) - 1) + [True]
    if dataset is None:
        assert not data
    else:
        assert [p.is_last for p in data] == [False] * (len(data) - 1) + [True]
        assert b"".join(p.data for p in data) == dataset
        assert all(len(p.data) % 2 == 0 for p in data[:-1])  # PS3.8 E.1
    return pdvs


@pytest.mark.parametrize("max_pdu", [4096, 16384, 0])
@pytest.mark.parametrize("size_name", ["none", "0", "1", "fragment", "fragment+1", "3 fragments"])
def test_fragment_message_sizes(max_pdu: int, size_name: str) -> None:
    fragment = max_pdu - 6 if max_pdu else 100_000
    size = {
        "none": None,
        "0": 0,
        "1": 1,
        "fragment": fragment,
        "fragment+1": fragment + 1,
        "3 fragments": 3 * fragment,
    }[size_name]
    dataset = None if size is None else bytes(i % 256 for i in range(size))
    chunks = fragment_message(1, STORE, dataset, max_pdu)
    pdvs = check_fragments(chunks, max_pdu, dataset)
    expected_data_pdvs = {
        None: 0,
        0: 1,
        1: 1,
        fragment: 1,
        fragment + 1: 2 if max_pdu else 1,
        3 * fragment: 3 if max_pdu else 1,
    }[size]
    assert sum(not p.is_command for p in pdvs) == expected_data_pdvs
    assert sum(p.is_command for p in pdvs) == 1
    # Header + command in one chunk, then (header, slice) per data-set fragment; an empty
    # data set is one bare header with the last bit.
    assert len(chunks) == (2 if size == 0 else 1 + 2 * expected_data_pdvs)
    if dataset:
        slices = chunks[2::2]
        assert all(isinstance(c, memoryview) and c.obj is dataset for c in slices)


def test_fragment_message_small_pdu_splits_the_command() -> None:
    dataset = b"0123456789" * 3
    chunks = fragment_message(3, STORE, dataset, 16)  # 10 data bytes per PDV
    pdvs = check_fragments(chunks, 16, dataset)
    assert sum(p.is_command for p in pdvs) == -(-len(STORE) // 10)
    (command,), _ = reassemble_pdvs(pdvs)
    assert command == decode_command(STORE)


def test_fragment_message_odd_limit_keeps_fragments_even() -> None:
    dataset = bytes(1000)
    pdvs = check_fragments(fragment_message(1, STORE, dataset, 4095), 4095, dataset)
    assert pdvs and all(len(p.data) == 4088 or p.is_last for p in pdvs)
    pdvs = check_fragments(fragment_message(1, ECHO, bytes(101), 57), 57, bytes(101))
    assert {len(p.data) for p in pdvs if not p.is_last} == {50}


@pytest.mark.parametrize("max_pdu", [4096, 4095, 16384, 8, 0])
@pytest.mark.parametrize("size", [0, 1, 2, 4089, 4090, 4091, 3 * 4090, 3 * 4090 + 7, 100_001])
def test_pdata_image_is_fragment_message_laid_out(max_pdu: int, size: int) -> None:
    """The data-set PDUs of pdata_image, once its slots are filled, are byte for byte the
    ones fragment_message makes; the head room is left for the command PDU."""
    if max_pdu == 8 and size > 5000:
        size = 5000  # 2 bytes per PDV: keep the test quick
    dataset = bytes(i * 7 % 256 for i in range(size))
    buf, slots = pdata_image(3, size, max_pdu, 100)
    pos = 0
    for slot in slots:
        slot[:] = dataset[pos : pos + len(slot)]
        pos += len(slot)
    assert pos == size
    command = fragment_message(3, STORE, None, max_pdu)  # several PDUs when max_pdu is 8
    data_chunks = fragment_message(3, STORE, dataset, max_pdu)[len(command) :]
    assert bytes(buf[100:]) == b"".join(bytes(c) for c in data_chunks)
    assert bytes(buf[:100]) == bytes(100)
    check_fragments([*command, buf[100:]], max_pdu, dataset)


def test_fragment_message_errors() -> None:
    for bad in (1, 6, 7, -1):
        with pytest.raises(ValueError):
            fragment_message(1, ECHO, None, bad)
    with pytest.raises(ValueError):
        fragment_message(1, b"", None, 0)
    # The smallest usable limit carries two bytes per PDV.
    check_fragments(fragment_message(1, ECHO, b"abcd", 8), 8, b"abcd")


def test_fragment_message_accepts_any_buffer() -> None:
    dataset = memoryview(bytearray(range(200))).cast("H")  # 100 items, 200 bytes
    pdvs = check_fragments(fragment_message(1, ECHO, dataset, 64), 64, dataset.tobytes())
    assert len([p for p in pdvs if not p.is_command]) == 4


def reassemble_pdvs(pdvs: list[Pdv]) -> tuple[list[Command], bytes]:
    events = MessageAssembler({1, 3, 5}).receive(pdvs)
    commands = [e.command for e in events if isinstance(e, CommandReceived)]
    data = b"".join(bytes(e.data) for e in events if isinstance(e, DatasetFragment))
    return commands, data


def test_fragment_stream() -> None:
    parts = [bytes([n]) * 3000 for n in range(3)]
    chunks = fragment_message(1, STORE, None, 1024)
    for i, part in enumerate(parts):
        chunks += fragment_stream(1, False, part, 1024, is_final_part=i == len(parts) - 1)
    pdvs = chunks_to_pdvs(chunks)
    data_pdvs = [p for p in pdvs if not p.is_command]
    assert [p.is_last for p in data_pdvs] == [False] * (len(data_pdvs) - 1) + [True]
    assert len(data_pdvs) == 3 * -(-3000 // 1018)
    commands, data = reassemble_pdvs(pdvs)
    assert len(commands) == 1 and data == b"".join(parts)

    # A command can be streamed too; an empty final part still ends the stream.
    assert fragment_stream(1, False, b"", 1024, is_final_part=False) == []
    chunks = fragment_stream(1, True, STORE, 0, is_final_part=True)
    chunks += fragment_stream(1, False, b"ab", 0, is_final_part=False)
    chunks += fragment_stream(1, False, b"", 0, is_final_part=True)
    commands, data = reassemble_pdvs(chunks_to_pdvs(chunks))
    assert commands == [decode_command(STORE)] and data == b"ab"
    with pytest.raises(ValueError):
        fragment_stream(1, False, b"abc", 1024, is_final_part=False)
    assert len(fragment_stream(1, False, b"abc", 1024, is_final_part=True)) == 2  # odd final ok


# --- property-based round trip ------------------------------------------------------------------

PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)


def value_strategy(tag: int) -> st.SearchStrategy[object]:
    info = COMMAND_ELEMENTS[tag]
    if info.vr == "US":
        us = st.integers(0, 0xFFFF)
        return st.lists(us, min_size=1, max_size=5).map(tuple) if info.multi else us
    if info.vr == "UL":
        return st.integers(0, 0xFFFFFFFF)
    if info.vr == "AT":
        return st.lists(st.integers(0, 0xFFFFFFFF), min_size=1, max_size=6).map(tuple)
    if info.vr == "UI":
        return st.from_regex(r"[0-9][0-9.]{0,63}", fullmatch=True)
    limit = {"AE": 16, "SH": 16, "CS": 16, "IS": 12, "LO": 64, "ST": 1024, "LT": 2000}[info.vr]
    text = st.text(PRINTABLE, max_size=limit)
    return text.map(str.strip) if info.vr == "AE" else text.map(str.rstrip)


OPTIONAL_TAGS = [t for t in COMMAND_ELEMENTS if t not in (0x0000, 0x0100, 0x0800)]


@st.composite
def messages(draw: st.DrawFn) -> tuple[dict[int, object], bytes | None]:
    dataset = draw(st.none() | st.binary(max_size=3000))
    fields: dict[int, object] = {
        0x0100: draw(st.sampled_from(sorted(dimse.COMMAND_NAMES))),
        0x0800: NO_DATASET,
    }
    if dataset is not None:
        # PS3.7 E.1: any value but 0101H announces a data set.
        fields[0x0800] = draw(st.integers(0, 0xFFFF).filter(lambda v: v != NO_DATASET))
    for tag in draw(st.lists(st.sampled_from(OPTIONAL_TAGS), unique=True, max_size=12)):
        fields[tag] = draw(value_strategy(tag))
    return fields, dataset


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.lists(messages(), min_size=1, max_size=3),
    st.just(0) | st.integers(8, 3000),
    st.sampled_from([1, 3, 255]),
)
def test_round_trip_fragmented(
    batch: list[tuple[dict[int, object], bytes | None]], max_pdu: int, context_id: int
) -> None:
    chunks: list[bytes | memoryview] = []
    for fields, dataset in batch:
        chunks += fragment_message(context_id, encode_command(fields), dataset, max_pdu)
    parsed = parse_pdata(b"".join(chunks))
    assert all(max_pdu == 0 or length <= max_pdu for length, _ in parsed)
    assembler = MessageAssembler([context_id])
    events = assembler.receive(pdv for _, pdv in parsed)
    assert not assembler.in_message
    received: list[tuple[dict[int, object], bytes | None]] = []
    for event in events:
        assert event.context_id == context_id
        if isinstance(event, CommandReceived):
            received.append((event.command.fields, None if not event.command.has_dataset else b""))
        else:
            fields, data = received[-1]
            assert data is not None
            received[-1] = (fields, data + bytes(event.data))
    assert received == [(expected_fields(f), d) for f, d in batch]


# --- the hot path stays off pydicom -------------------------------------------------------------


def test_c_store_rsp_path_does_not_call_pydicom(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("pydicom called on the DIMSE hot path")

    import pydicom.filereader
    import pydicom.filewriter

    monkeypatch.setattr(Dataset, "__init__", boom)
    monkeypatch.setattr(pydicom.filewriter, "write_dataset", boom)
    monkeypatch.setattr(pydicom.filewriter, "write_data_element", boom)
    monkeypatch.setattr(pydicom.filereader, "read_dataset", boom)
    monkeypatch.setattr(pydicom.filereader, "data_element_generator", boom)
    rq = decode_command(encode_command(c_store_rq(1, CT, INSTANCE)))
    rsp = encode_command(response_for(rq, 0))
    assert decode_command(rsp).command_field == C_STORE_RSP
    check_fragments(fragment_message(1, rsp, None, 4096), 4096, None)


def test_constants() -> None:
    assert (C_ECHO_RQ | 0x8000) == C_ECHO_RSP and (dimse.C_GET_RQ | 0x8000) == C_GET_RSP
    assert (PRIORITY_MEDIUM, PRIORITY_HIGH, PRIORITY_LOW) == (0, 1, 2)
    assert len(dimse.COMMAND_NAMES) == 23
    assert set(dimse.__all__) <= set(dir(dimse))
