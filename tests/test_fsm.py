"""The PS3.8 9.2 state machine (dicomd.net.fsm).

The table-driven test checks every (state, received PDU) cell and every (state, local
primitive) cell against pynetdicom's transcription of table 9-10 (an independent copy
of the standard's table), by the observable effect of the named action.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from acse_reference import reference_decode_ac, reference_decode_rq
from pdu_fixtures import make_ac, make_rq
from pynetdicom.fsm import TRANSITION_TABLE as PS38_TABLE_9_10

from dicomd.net import pdu as P
from dicomd.net.events import (
    ABORT_REASON_INVALID_PDU_PARAMETER,
    ABORT_REASON_UNEXPECTED_PDU,
    ABORT_REASON_UNRECOGNIZED_PDU,
    ABORT_SOURCE_PROVIDER,
    ABORT_SOURCE_USER,
    AbortIndication,
    AssociateAccepted,
    AssociateIndication,
    AssociateRejected,
    CloseTransport,
    ConnectionClosed,
    DataIndication,
    Pdv,
    ReleaseConfirmed,
    ReleaseIndication,
    StartArtim,
    StopArtim,
)
from dicomd.net.fsm import EVENTS, TRANSITIONS, Evt, LocalProtocolError, State, UpperLayer

S = State


RQ = make_rq().encode()
AC = make_ac().encode()
RJ = P.encode_associate(P.make_associate_rj(1, 1, 7))
PDATA = P.encode_pdata([Pdv(1, True, True, b"\x00" * 8)])
REL_RQ = P.encode_release_rq()
REL_RP = P.encode_release_rp()
ABORT = P.encode_abort(ABORT_SOURCE_USER, 0)
INVALID = b"\x09\x00\x00\x00\x00\x04\x00\x00\x00\x00"  # unknown PDU type -> Evt19

PDU_BY_EVENT = {
    "Evt3": AC,
    "Evt4": RJ,
    "Evt6": RQ,
    "Evt10": PDATA,
    "Evt12": REL_RQ,
    "Evt13": REL_RP,
    "Evt16": ABORT,
    "Evt19": INVALID,
}


def types(events: list) -> list[type]:
    return [type(e) for e in events]


def sent(ul: UpperLayer) -> list[bytes]:
    return [bytes(c) for c in ul.data_to_send()]


# --- driving the machine into each state -----------------------------------------------


def acceptor() -> UpperLayer:
    return UpperLayer(requestor=False, max_pdu_length=16384)


def requestor() -> UpperLayer:
    return UpperLayer(requestor=True, max_pdu_length=16384)


def _acc(*steps: Callable[[UpperLayer], object]) -> Callable[[], UpperLayer]:
    def build() -> UpperLayer:
        ul = acceptor()
        ul.connection_made()
        for step in steps:
            step(ul)
        ul.data_to_send()
        return ul

    return build


def _req(*steps: Callable[[UpperLayer], object]) -> Callable[[], UpperLayer]:
    def build() -> UpperLayer:
        ul = requestor()
        ul.associate_request(make_rq())
        for step in steps:
            step(ul)
        ul.data_to_send()
        return ul

    return build


def rx(data: bytes) -> Callable[[UpperLayer], object]:
    return lambda ul: ul.receive_data(data)


def connected(ul: UpperLayer) -> object:
    return ul.connection_made()


def accept(ul: UpperLayer) -> object:
    return ul.associate_accept(make_ac())


def release(ul: UpperLayer) -> object:
    return ul.release_request()


def respond(ul: UpperLayer) -> object:
    return ul.release_response()


# (role, state) -> how to get there. Sta2/3/10/12 exist only for an acceptor, Sta4/5/9/11
# only for a requestor (PS3.8 AR-8 splits the collision by role).
SETUPS: dict[tuple[str, State], Callable[[], UpperLayer]] = {
    ("acceptor", S.Sta1): acceptor,
    ("acceptor", S.Sta2): _acc(),
    ("acceptor", S.Sta3): _acc(rx(RQ)),
    ("acceptor", S.Sta6): _acc(rx(RQ), accept),
    ("acceptor", S.Sta7): _acc(rx(RQ), accept, release),
    ("acceptor", S.Sta8): _acc(rx(RQ), accept, rx(REL_RQ)),
    ("acceptor", S.Sta10): _acc(rx(RQ), accept, release, rx(REL_RQ)),
    ("acceptor", S.Sta12): _acc(rx(RQ), accept, release, rx(REL_RQ), rx(REL_RP)),
    ("acceptor", S.Sta13): _acc(rx(RQ), accept, rx(REL_RQ), respond),
    ("requestor", S.Sta1): requestor,
    ("requestor", S.Sta4): _req(),
    ("requestor", S.Sta5): _req(connected),
    ("requestor", S.Sta6): _req(connected, rx(AC)),
    ("requestor", S.Sta7): _req(connected, rx(AC), release),
    ("requestor", S.Sta8): _req(connected, rx(AC), rx(REL_RQ)),
    ("requestor", S.Sta9): _req(connected, rx(AC), release, rx(REL_RQ)),
    ("requestor", S.Sta11): _req(connected, rx(AC), release, rx(REL_RQ), respond),
    ("requestor", S.Sta13): _req(connected, rx(AC), lambda ul: ul.abort()),
}


@pytest.mark.parametrize(("role", "state"), list(SETUPS), ids=lambda v: getattr(v, "name", v))
def test_setups_reach_their_state(role: str, state: State) -> None:
    ul = SETUPS[(role, state)]()
    assert ul.state is state
    assert ul.requestor is (role == "requestor")


def test_every_state_is_covered() -> None:
    assert {s for _, s in SETUPS} == set(State)


# --- the transcription itself ------------------------------------------------------------


def test_table_matches_an_independent_transcription() -> None:
    mine = {(e.name, s.name): a for (e, s), a in TRANSITIONS.items()}
    assert mine == PS38_TABLE_9_10
    assert set(EVENTS) == set(Evt)
    assert S.Sta6.value == "Association established and ready for data transfer"


# --- observable effect of each action (PS3.8 tables 9-6 .. 9-9) ---------------------------


def abort_pdu(source: int, reason: int) -> bytes:
    return P.encode_abort(source, reason)


def check_action(
    action: str, role: str, state: State, evt: str, ul: UpperLayer, events: list, out: list
) -> None:
    """Assert that ``events``/``out``/``ul.state`` are what ``action`` does."""
    unexpected_or_invalid = (
        ABORT_REASON_UNRECOGNIZED_PDU if evt == "Evt19" else ABORT_REASON_UNEXPECTED_PDU
    )
    if action == "AE-3":
        assert types(events) == [AssociateAccepted] and out == []
        assert ul.state is S.Sta6
    elif action == "AE-4":
        assert types(events) == [AssociateRejected, CloseTransport, ConnectionClosed]
        assert out == [] and ul.state is S.Sta1
    elif action == "AE-6":
        assert types(events) == [StopArtim, AssociateIndication] and out == []
        assert ul.state is S.Sta3
    elif action == "DT-2":
        assert types(events) == [DataIndication] and out == [] and ul.state is S.Sta6
    elif action == "AR-2":
        assert events == [ReleaseIndication(collision=False)] and out == []
        assert ul.state is S.Sta8
    elif action == "AR-3":
        assert events == [ReleaseConfirmed(), CloseTransport(), ConnectionClosed()]
        assert out == [] and ul.state is S.Sta1
    elif action == "AR-6":
        assert types(events) == [DataIndication] and out == [] and ul.state is S.Sta7
    elif action == "AR-8":
        assert events == [ReleaseIndication(collision=True)] and out == []
        assert ul.state is (S.Sta9 if role == "requestor" else S.Sta10)
    elif action == "AR-10":
        assert events == [ReleaseConfirmed()] and out == [] and ul.state is S.Sta12
    elif action == "AA-1":
        # Table 9-9: service-user source, even for a bad PDU in Sta2; the indication
        # carries what was sent and the diagnostic in words (for the log).
        assert out == [abort_pdu(ABORT_SOURCE_USER, 0)]
        assert types(events) == [AbortIndication, StartArtim]
        ind = events[0]
        assert (ind.source, ind.reason, ind.local) == (ABORT_SOURCE_USER, 0, True)
        assert ("unexpected" if evt != "Evt19" else "invalid") in ind.detail
        assert ul.state is S.Sta13
    elif action == "AA-2":
        assert events[-3:] == [StopArtim(), CloseTransport(), ConnectionClosed()]
        assert out == [] and ul.state is S.Sta1
        if state is S.Sta2:
            assert types(events[:-3]) == [AbortIndication]
        else:
            assert len(events) == 3
    elif action == "AA-3":
        assert types(events) == [AbortIndication, CloseTransport, ConnectionClosed]
        assert not events[0].local and out == [] and ul.state is S.Sta1
    elif action == "AA-6":
        assert events == [] and out == [] and ul.state is S.Sta13
    elif action == "AA-7":
        assert events == [] and ul.state is S.Sta13
        assert out == [abort_pdu(ABORT_SOURCE_PROVIDER, unexpected_or_invalid)]
    elif action == "AA-8":
        assert out == [abort_pdu(ABORT_SOURCE_PROVIDER, unexpected_or_invalid)]
        assert types(events) == [AbortIndication, StartArtim]
        ind = events[0]
        assert (ind.source, ind.reason, ind.local) == (2, unexpected_or_invalid, True)
        assert ind.detail
        assert ul.state is S.Sta13
    else:  # pragma: no cover
        raise AssertionError(f"no check for {action}")


PDU_CASES = [
    (role, state, evt)
    for (role, state) in SETUPS
    if state not in (S.Sta1, S.Sta4)  # no transport connection: no PDU can arrive
    for evt in PDU_BY_EVENT
]


@pytest.mark.parametrize(("role", "state", "evt"), PDU_CASES, ids=lambda v: getattr(v, "name", v))
def test_every_incoming_pdu_in_every_state(role: str, state: State, evt: str) -> None:
    ul = SETUPS[(role, state)]()
    action = PS38_TABLE_9_10[(evt, state.name)]  # every connected state has an entry
    events = ul.receive_data(PDU_BY_EVENT[evt])
    check_action(action, role, state, evt, ul, events, sent(ul))


@pytest.mark.parametrize(("role", "state"), list(SETUPS), ids=lambda v: getattr(v, "name", v))
def test_pdu_bytes_while_not_connected(role: str, state: State) -> None:
    if state is S.Sta1:
        assert SETUPS[(role, state)]().receive_data(RQ) == []  # after close: dropped
    elif state is S.Sta4:
        with pytest.raises(LocalProtocolError):
            SETUPS[(role, state)]().receive_data(RQ)


# Local primitives and transport indications: (event, how to invoke it).
LOCAL_CALLS: dict[str, Callable[[UpperLayer], list]] = {
    "Evt1": lambda ul: ul.associate_request(make_rq()),
    "Evt7": lambda ul: ul.associate_accept(make_ac()),
    "Evt8": lambda ul: ul.associate_reject(P.make_associate_rj(1, 1, 3)),
    "Evt9": lambda ul: ul.send_data([PDATA]),
    "Evt11": lambda ul: ul.release_request(),
    "Evt14": lambda ul: ul.release_response(),
    "Evt15": lambda ul: ul.abort(),
    "Evt17": lambda ul: ul.connection_lost(),
    "Evt18": lambda ul: ul.artim_expired(),
    "connection_made": lambda ul: ul.connection_made(),
}

# What each local action does: (events, sent bytes, next state).
LOCAL_EFFECTS: dict[str, tuple[list, list[bytes] | None, State | None]] = {
    "AE-1": ([], [], S.Sta4),
    "AE-2": ([], [RQ], S.Sta5),
    "AE-5": ([StartArtim()], [], S.Sta2),
    "AE-7": ([], [AC], S.Sta6),
    "AE-8": ([StartArtim()], [bytes.fromhex("03000000000400010103")], S.Sta13),
    "DT-1": ([], [PDATA], S.Sta6),
    "AR-7": ([], [PDATA], S.Sta8),
    "AR-1": ([], [REL_RQ], S.Sta7),
    "AR-4": ([StartArtim()], [REL_RP], S.Sta13),
    "AR-9": ([], [REL_RP], S.Sta11),
    "AA-1": ([StartArtim()], [abort_pdu(ABORT_SOURCE_USER, 0)], S.Sta13),
    "AA-2": ([StopArtim(), CloseTransport(), ConnectionClosed()], [], S.Sta1),
    "AA-5": ([StopArtim(), ConnectionClosed()], [], S.Sta1),
    "AR-5": ([StopArtim(), ConnectionClosed()], [], S.Sta1),
    # AA-4's indication is checked by type below (its detail names the state).
    "AA-4": ([], [], S.Sta1),
}

LOCAL_CASES = [(role, state, name) for (role, state) in SETUPS for name in LOCAL_CALLS]


@pytest.mark.parametrize(
    ("role", "state", "call"), LOCAL_CASES, ids=lambda v: getattr(v, "name", v)
)
def test_every_local_primitive_in_every_state(role: str, state: State, call: str) -> None:
    ul = SETUPS[(role, state)]()
    evt = call
    if call == "connection_made":
        evt = "Evt2" if role == "requestor" else "Evt5"
    action = PS38_TABLE_9_10.get((evt, state.name))
    if call == "Evt1" and role == "acceptor":
        action = None  # the role is fixed at construction
    if call in ("Evt17", "Evt18") and state is S.Sta1:
        # The transport reporting the close we asked for, or a timer that lost the race.
        assert LOCAL_CALLS[call](ul) == [] and ul.state is S.Sta1
        return
    if action is None:
        with pytest.raises(LocalProtocolError):
            LOCAL_CALLS[call](ul)
        assert ul.state is state  # not corrupted
        assert sent(ul) == []
        return
    events = LOCAL_CALLS[call](ul)
    want_events, want_out, want_state = LOCAL_EFFECTS[action]
    if action == "AA-4":
        assert types(events) == [AbortIndication, ConnectionClosed]
        assert events[0].local and events[0].source == ABORT_SOURCE_PROVIDER
    elif action == "AA-2" and state is S.Sta2:
        assert types(events) == [AbortIndication, StopArtim, CloseTransport, ConnectionClosed]
    else:
        assert events == want_events
    assert sent(ul) == want_out
    assert ul.state is want_state


# --- happy paths -------------------------------------------------------------------------


def pipe(src: UpperLayer, dst: UpperLayer) -> list:
    """Deliver everything ``src`` has queued to ``dst``; return dst's events."""
    events = []
    for chunk in src.data_to_send():
        events += dst.receive_data(bytes(chunk))
    return events


def associate() -> tuple[UpperLayer, UpperLayer]:
    req, acc = requestor(), acceptor()
    assert req.associate_request(make_rq()) == []
    assert req.state is S.Sta4
    assert acc.connection_made() == [StartArtim()]
    assert req.connection_made() == []
    assert req.state is S.Sta5
    ev = pipe(req, acc)
    assert types(ev) == [StopArtim, AssociateIndication]
    assert ev[1].request == reference_decode_rq(make_rq().encode())
    assert acc.state is S.Sta3
    assert acc.associate_accept(make_ac()) == []
    ev = pipe(acc, req)
    assert types(ev) == [AssociateAccepted]
    assert ev[0].accept == reference_decode_ac(make_ac().encode())
    assert req.state is S.Sta6 and acc.state is S.Sta6
    assert req.is_established and acc.is_established and req.can_send_data
    return req, acc


def test_happy_path_data_both_ways_and_release() -> None:
    req, acc = associate()
    # requestor -> acceptor: a command and a 3-fragment dataset, zero-copy header helper
    payload = memoryview(b"D" * 100)
    req.send_data([P.encode_pdata([Pdv(1, True, True, b"CMD")])])
    req.send_data([P.pdata_header(1, False, False, 50), payload[:50]])
    req.send_data([P.pdata_header(1, False, True, 50) + bytes(payload[50:])])
    data = b"".join(bytes(c) for c in req.data_to_send())
    ev = acc.receive_data(data)
    assert types(ev) == [DataIndication] * 3
    pdvs = [p for e in ev for p in e.pdvs]
    assert [(p.is_command, p.is_last, bytes(p.data)) for p in pdvs] == [
        (True, True, b"CMD"),
        (False, False, b"D" * 50),
        (False, True, b"D" * 50),
    ]
    # acceptor -> requestor
    acc.send_data([P.encode_pdata([Pdv(1, True, True, b"RSP")])])
    ev = pipe(acc, req)
    assert bytes(ev[0].pdvs[0].data) == b"RSP"
    # release, requestor initiates
    assert req.release_request() == []
    assert req.state is S.Sta7
    assert pipe(req, acc) == [ReleaseIndication(collision=False)]
    assert acc.state is S.Sta8
    # the acceptor may still send data in Sta8 (AR-7), the requestor receives it (AR-6)
    acc.send_data([PDATA])
    assert acc.release_response() == [StartArtim()]
    assert acc.state is S.Sta13 and not acc.is_established
    ev = pipe(acc, req)
    assert types(ev) == [DataIndication, ReleaseConfirmed, CloseTransport, ConnectionClosed]
    assert req.state is S.Sta1 and req.is_closed
    # the requestor closed the transport: the acceptor sees Evt17 in Sta13 (AR-5)
    assert acc.connection_lost() == [StopArtim(), ConnectionClosed()]
    assert acc.state is S.Sta1
    # and the requestor's transport then reports the close it asked for: no-op
    assert req.connection_lost() == []


def test_acceptor_initiated_release() -> None:
    req, acc = associate()
    acc.release_request()
    assert pipe(acc, req) == [ReleaseIndication(collision=False)]
    assert req.release_response() == [StartArtim()]
    assert pipe(req, acc) == [ReleaseConfirmed(), CloseTransport(), ConnectionClosed()]
    assert req.state is S.Sta13
    assert req.connection_lost() == [StopArtim(), ConnectionClosed()]


def test_release_collision() -> None:
    """Both release at once (PS3.8 7.2.2): the requestor answers first (Sta9 -> Sta11),
    the acceptor waits for that answer (Sta10 -> Sta12), then answers."""
    req, acc = associate()
    req.release_request()
    acc.release_request()
    req_out, acc_out = req.data_to_send(), acc.data_to_send()
    assert req.receive_data(b"".join(acc_out)) == [ReleaseIndication(collision=True)]
    assert acc.receive_data(b"".join(req_out)) == [ReleaseIndication(collision=True)]
    assert req.state is S.Sta9 and acc.state is S.Sta10
    with pytest.raises(LocalProtocolError):  # Evt14 is not allowed in Sta10
        acc.release_response()
    assert req.release_response() == []  # AR-9
    assert req.state is S.Sta11
    assert pipe(req, acc) == [ReleaseConfirmed()]  # AR-10
    assert acc.state is S.Sta12
    assert acc.release_response() == [StartArtim()]  # AR-4
    assert acc.state is S.Sta13
    assert pipe(acc, req) == [ReleaseConfirmed(), CloseTransport(), ConnectionClosed()]  # AR-3
    assert req.state is S.Sta1
    assert acc.connection_lost() == [StopArtim(), ConnectionClosed()]


@pytest.mark.parametrize("who", ["requestor", "acceptor"])
def test_user_abort(who: str) -> None:
    req, acc = associate()
    me, peer = (req, acc) if who == "requestor" else (acc, req)
    assert me.abort() == [StartArtim()]
    assert me.state is S.Sta13
    ev = pipe(me, peer)
    assert ev == [
        AbortIndication(ABORT_SOURCE_USER, 0, False, "A-ABORT received"),
        CloseTransport(),
        ConnectionClosed(),
    ]
    assert me.connection_lost() == [StopArtim(), ConnectionClosed()]


def test_abort_with_provider_reason() -> None:
    req, acc = associate()
    acc.abort(ABORT_REASON_INVALID_PDU_PARAMETER)
    assert sent(acc) == [abort_pdu(ABORT_SOURCE_PROVIDER, ABORT_REASON_INVALID_PDU_PARAMETER)]
    with pytest.raises(ValueError):
        req.abort(3)  # reserved in table 9-26
    assert req.state is S.Sta6


def test_abort_before_connection_completes() -> None:
    req = requestor()
    req.associate_request(make_rq())
    assert req.abort() == [StopArtim(), CloseTransport(), ConnectionClosed()]  # AA-2
    assert req.data_to_send() == []


def test_connect_failure() -> None:
    req = requestor()
    req.associate_request(make_rq())
    ev = req.connection_lost()  # AA-4 in Sta4
    assert types(ev) == [AbortIndication, ConnectionClosed]


def test_user_reject() -> None:
    req, acc = requestor(), acceptor()
    req.associate_request(make_rq())
    acc.connection_made()
    req.connection_made()
    pipe(req, acc)
    rj = P.make_associate_rj(1, 1, 7)  # called AE title not recognised
    assert acc.associate_reject(rj) == [StartArtim()]
    assert acc.state is S.Sta13
    ev = pipe(acc, req)
    assert types(ev) == [AssociateRejected, CloseTransport, ConnectionClosed]
    assert (ev[0].reject.result, ev[0].reject.source, ev[0].reject.reason_diagnostic) == (1, 1, 7)
    assert not ev[0].local
    assert acc.connection_lost() == [StopArtim(), ConnectionClosed()]


def test_unsupported_protocol_version_is_rejected_not_aborted() -> None:
    acc = acceptor()
    acc.connection_made()
    raw = bytearray(RQ)
    raw[6:8] = b"\x00\x02"
    ev = acc.receive_data(bytes(raw))
    assert types(ev) == [StopArtim, AssociateRejected, StartArtim]
    assert ev[1].local
    assert sent(acc) == [bytes.fromhex("03000000000400010202")]  # AE-6: RJ (1, 2, 2)
    assert acc.state is S.Sta13


def test_artim_expiry_in_sta2() -> None:
    acc = acceptor()
    acc.connection_made()
    ev = acc.artim_expired()
    assert types(ev) == [AbortIndication, StopArtim, CloseTransport, ConnectionClosed]
    assert "ARTIM" in ev[0].detail
    assert acc.state is S.Sta1
    assert acc.artim_expired() == []  # stale timer after close


def test_artim_expiry_in_sta13() -> None:
    acc = SETUPS[("acceptor", S.Sta13)]()
    assert acc.artim_expired() == [StopArtim(), CloseTransport(), ConnectionClosed()]
    assert acc.state is S.Sta1
    assert acc.connection_lost() == []


def test_health_check_connection_is_silent() -> None:
    acc = acceptor()
    acc.connection_made()
    assert acc.connection_lost() == [StopArtim(), ConnectionClosed()]  # AA-5


def test_peer_closes_mid_association() -> None:
    _, acc = associate()
    ev = acc.connection_lost()
    assert types(ev) == [AbortIndication, ConnectionClosed]
    assert ev[0].local and ev[0].source == ABORT_SOURCE_PROVIDER


# --- invalid input -------------------------------------------------------------------------


def test_oversized_pdata_aborts_with_invalid_parameter() -> None:
    _, acc = associate()
    ev = acc.receive_data(struct.pack(">BxI", 4, 1 << 24))
    assert types(ev) == [AbortIndication, StartArtim]
    assert ev[0].reason == ABORT_REASON_INVALID_PDU_PARAMETER
    assert sent(acc) == [abort_pdu(ABORT_SOURCE_PROVIDER, ABORT_REASON_INVALID_PDU_PARAMETER)]
    # framing is lost: everything after is discarded, even a well-formed A-ABORT
    assert acc.receive_data(ABORT) == []
    assert acc.state is S.Sta13


def test_malformed_pdata_is_evt19_and_later_pdus_follow_sta13() -> None:
    _, acc = associate()
    bad = struct.pack(">BxIIBB", 4, 6, 0, 1, 0)  # zero-length PDV
    ev = acc.receive_data(bad + PDATA + RQ + ABORT)
    # AA-8 (invalid PDU parameter), then in Sta13: AA-6 (P-DATA ignored), AA-7 (RQ:
    # A-ABORT sent), AA-2 (A-ABORT: close)
    assert types(ev) == [AbortIndication, StartArtim, StopArtim, CloseTransport, ConnectionClosed]
    assert ev[0].reason == ABORT_REASON_INVALID_PDU_PARAMETER
    assert sent(acc) == [
        abort_pdu(ABORT_SOURCE_PROVIDER, ABORT_REASON_INVALID_PDU_PARAMETER),
        abort_pdu(ABORT_SOURCE_PROVIDER, ABORT_REASON_UNEXPECTED_PDU),
    ]
    assert acc.state is S.Sta1


def test_malformed_rq_in_sta2_is_aa1() -> None:
    acc = acceptor()
    acc.connection_made()
    raw = bytearray(RQ[:80])
    struct.pack_into(">I", raw, 2, len(raw) - 6)
    ev = acc.receive_data(bytes(raw))
    assert types(ev) == [AbortIndication, StartArtim]
    assert acc.state is S.Sta13


def test_peer_abort_stops_processing() -> None:
    _, acc = associate()
    ev = acc.receive_data(ABORT + PDATA + PDATA)
    assert types(ev) == [AbortIndication, CloseTransport, ConnectionClosed]
    assert acc.receive_data(PDATA) == []


def test_data_in_chunks_of_one_byte() -> None:
    _, acc = associate()
    data = PDATA * 3 + REL_RQ
    ev = []
    for i in range(len(data)):
        ev += acc.receive_data(data[i : i + 1])
    assert types(ev) == [DataIndication] * 3 + [ReleaseIndication]


def test_reuse_after_sta1() -> None:
    acc = SETUPS[("acceptor", S.Sta2)]()
    acc.receive_data(b"\x01\x00")  # half a header, then the peer goes away
    acc.connection_lost()
    assert acc.connection_made() == [StartArtim()]
    ev = acc.receive_data(RQ)  # fresh framing: the old half header is gone
    assert types(ev) == [StopArtim, AssociateIndication]


@pytest.mark.parametrize(("role", "state"), list(SETUPS), ids=lambda v: getattr(v, "name", v))
def test_can_properties_agree_with_the_table(role: str, state: State) -> None:
    ul = SETUPS[(role, state)]()
    assert ul.can_abort is (("Evt15", state.name) in PS38_TABLE_9_10)
    assert ul.can_release is (("Evt11", state.name) in PS38_TABLE_9_10)
    assert ul.can_release_response is (("Evt14", state.name) in PS38_TABLE_9_10)
    assert ul.can_send_data is (("Evt9", state.name) in PS38_TABLE_9_10)
    established = {S.Sta6, S.Sta7, S.Sta8, S.Sta9, S.Sta10, S.Sta11, S.Sta12}
    assert ul.is_established is (state in established)
