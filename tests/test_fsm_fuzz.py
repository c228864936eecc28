"""Fuzzing the upper layer: garbage, valid PDUs and local primitives in any order.

Invariants checked after every step, in both roles:
* nothing escapes but ``LocalProtocolError`` for calls the table does not allow;
* ``ConnectionClosed`` is the last event and leaves the machine in Sta1;
* after an abort (indicated or sent) the machine is in Sta13 or Sta1, and it stays in
  Sta13 until it reaches Sta1;
* the ARTIM timer runs exactly in Sta2 and Sta13 (PS3.8 9.1.5 / table 9-10);
* every chunk queued for the peer is exactly one well-formed PDU.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import pdu_fixtures as fixtures
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ

from dicomd.net import pdu as P
from dicomd.net.events import (
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
from dicomd.net.fsm import LocalProtocolError, State, UpperLayer

# Mutated A-ASSOCIATE PDUs carry odd UIDs; pydicom warns about them while decoding.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")

EVENT_TYPES = (
    AbortIndication,
    AssociateAccepted,
    AssociateIndication,
    AssociateRejected,
    CloseTransport,
    ConnectionClosed,
    DataIndication,
    ReleaseConfirmed,
    ReleaseIndication,
    StartArtim,
    StopArtim,
)


def make_rq() -> A_ASSOCIATE_RQ:
    return fixtures.make_rq("FUZZ", max_pdu=4096, implementation_uid=None)


def make_ac() -> A_ASSOCIATE_AC:
    return fixtures.make_ac("FUZZ", max_pdu=4096, implementation_uid=None)


RQ, AC = make_rq().encode(), make_ac().encode()
PDATA = P.encode_pdata([Pdv(1, True, True, b"\x00" * 20), Pdv(3, False, False, b"x" * 7)])
VALID_PDUS = [
    RQ,
    AC,
    P.encode_associate(P.make_associate_rj(1, 1, 7)),
    PDATA,
    P.encode_release_rq(),
    P.encode_release_rp(),
    P.encode_abort(0, 0),
    P.encode_abort(2, 2),
]


@st.composite
def mutated_pdu(draw: st.DrawFn) -> bytes:
    raw = bytearray(draw(st.sampled_from(VALID_PDUS)))
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(raw) - 1))
        raw[i] = draw(st.integers(0, 255))
    if draw(st.booleans()):  # keep the PDU-length consistent so the body gets decoded
        struct.pack_into(">I", raw, 2, len(raw) - 6)
    return bytes(raw)


pdu_pieces = st.one_of(
    st.sampled_from(VALID_PDUS),
    st.sampled_from(VALID_PDUS),
    mutated_pdu(),
    st.binary(max_size=24),
)
incoming = st.lists(pdu_pieces, min_size=1, max_size=4).map(b"".join)

LOCAL_CALLS: dict[str, Callable[[UpperLayer], list]] = {
    "associate_request": lambda ul: ul.associate_request(make_rq()),
    "connection_made": lambda ul: ul.connection_made(),
    "associate_accept": lambda ul: ul.associate_accept(make_ac()),
    "associate_reject": lambda ul: ul.associate_reject(P.make_associate_rj(2, 3, 1)),
    "send_data": lambda ul: ul.send_data([PDATA, P.pdata_header(1, False, True, 3) + b"abc"]),
    "release_request": lambda ul: ul.release_request(),
    "release_response": lambda ul: ul.release_response(),
    "abort": lambda ul: ul.abort(),
    "abort_provider": lambda ul: ul.abort(6),
    "connection_lost": lambda ul: ul.connection_lost(),
    "artim_expired": lambda ul: ul.artim_expired(),
}

operation = st.one_of(
    st.tuples(st.just("rx"), incoming, st.integers(1, 64)),
    st.tuples(st.just("call"), st.sampled_from(sorted(LOCAL_CALLS)), st.just(0)),
)


def check_output_chunk(chunk: bytes | memoryview) -> bytes:
    """Each queued chunk is exactly one PDU that our own decoders accept."""
    framer = P.PduFramer(0)
    framer.feed(bytes(chunk))
    item = framer.next_pdu()
    assert item is not None, f"incomplete PDU queued: {bytes(chunk)[:16].hex()}"
    assert framer.buffered == 0 and framer.next_pdu() is None
    pdu_type, pdu = item
    if pdu_type == P.A_ASSOCIATE_RQ_PDU:
        P.decode_associate_rq(pdu)
    elif pdu_type == P.A_ASSOCIATE_AC_PDU:
        P.decode_associate_ac(pdu)
    elif pdu_type == P.A_ASSOCIATE_RJ_PDU:
        P.decode_associate_rj(pdu)
    elif pdu_type == P.P_DATA_TF:
        P.decode_pdata(pdu)
    elif pdu_type == P.A_ABORT:
        source, reason = P.decode_abort(pdu)
        assert source in (0, 2)
        assert reason in (0, 1, 2, 4, 5, 6)
        assert source == 2 or reason == 0
    return bytes(pdu)


class Harness:
    """One machine plus the model of its ARTIM timer; what it sends goes to ``wire``."""

    def __init__(self, requestor: bool) -> None:
        self.ul = UpperLayer(requestor=requestor, max_pdu_length=4096)
        self.artim = False
        self.aborted = False
        self.abort_seen = False
        self.wire = bytearray()

    def step(self, fn: Callable[[UpperLayer], list]) -> None:
        before = self.ul.state
        try:
            events = fn(self.ul)
        except LocalProtocolError:
            assert self.ul.state is before  # state not corrupted
            assert self.ul.data_to_send() == []
            return
        self.check(events)

    def check(self, events: list) -> None:
        ul = self.ul
        assert isinstance(events, list)
        for ev in events:
            assert isinstance(ev, EVENT_TYPES)
            if isinstance(ev, StartArtim):
                self.artim = True
            elif isinstance(ev, StopArtim):
                self.artim = False
        sent_abort = False
        for chunk in ul.data_to_send():
            if check_output_chunk(chunk)[0] == P.A_ABORT:
                sent_abort = True
            self.wire += chunk
        if any(isinstance(e, ConnectionClosed) for e in events):
            assert isinstance(events[-1], ConnectionClosed)
            assert sum(isinstance(e, ConnectionClosed) for e in events) == 1
            assert ul.state is State.Sta1
        if ul.state is State.Sta1:
            assert not self.artim, "ARTIM left running after the connection ended"
        else:
            assert self.artim == (ul.state in (State.Sta2, State.Sta13)), ul.state
        if sent_abort or any(isinstance(e, AbortIndication) for e in events):
            self.abort_seen = True
            assert ul.state in (State.Sta13, State.Sta1)
        if self.aborted:
            assert ul.state in (State.Sta13, State.Sta1)
        self.aborted = ul.state is State.Sta13
        assert ul.is_closed is (ul.state is State.Sta1)


def run(requestor: bool, prefix: list[str], ops: list[tuple[str, object, int]]) -> None:
    h = Harness(requestor)
    for name in prefix:
        h.step(LOCAL_CALLS[name])
    for kind, arg, split in ops:
        if kind == "rx":
            data = arg
            assert isinstance(data, bytes)
            for i in range(0, len(data), split):
                piece = data[i : i + split]
                h.step(lambda ul, piece=piece: ul.receive_data(piece))
        else:
            assert isinstance(arg, str)
            h.step(LOCAL_CALLS[arg])


FUZZ = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(st.lists(operation, max_size=25))
def test_acceptor_random_sequences(ops: list) -> None:
    run(False, ["connection_made"], ops)


@FUZZ
@given(st.lists(operation, max_size=25))
def test_requestor_random_sequences(ops: list) -> None:
    run(True, ["associate_request", "connection_made"], ops)


@FUZZ
@given(st.booleans(), st.lists(operation, max_size=25))
def test_from_idle(requestor: bool, ops: list) -> None:
    run(requestor, [], ops)


@settings(max_examples=300, deadline=None)
@given(st.booleans(), st.binary(max_size=512), st.integers(1, 600))
def test_garbage_after_association(requestor: bool, garbage: bytes, split: int) -> None:
    if requestor:
        prefix = ["associate_request", "connection_made"]
        ops = [("rx", AC, 7), ("rx", garbage, split)]
    else:
        prefix = ["connection_made"]
        ops = [("rx", RQ, 5), ("call", "associate_accept", 0), ("rx", garbage, split)]
    run(requestor, prefix, ops)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_garbage_before_association(garbage: bytes) -> None:
    run(False, ["connection_made"], [("rx", garbage, 1 + len(garbage) // 3)])


# Only well-formed PDUs: reaches the release states (Sta7..Sta12) that garbage rarely does.
valid_operation = st.one_of(
    st.tuples(st.just("rx"), st.sampled_from(VALID_PDUS), st.integers(1, 300)),
    st.tuples(st.just("call"), st.sampled_from(sorted(LOCAL_CALLS)), st.just(0)),
)


@FUZZ
@given(st.booleans(), st.lists(valid_operation, max_size=25))
def test_valid_pdus_in_any_order(requestor: bool, ops: list) -> None:
    prefix = ["associate_request", "connection_made"] if requestor else ["connection_made"]
    run(requestor, prefix, ops)


# Two machines wired back to back; each side acts at random, bytes travel in random
# slices, and now and then a side aborts, the connection drops or the wire corrupts
# something. Disruptions are rare so that runs get deep into release and collisions.
BENIGN_CALLS = ["associate_accept", "send_data", "release_request", "release_response"]
BENIGN_WEIGHTED = [*BENIGN_CALLS, "release_request", "release_response"]
DISRUPTIVE_CALLS = sorted(set(LOCAL_CALLS) - set(BENIGN_CALLS))


@st.composite
def paired_operation(draw: st.DrawFn) -> tuple[str, object]:
    roll = draw(st.integers(0, 99))
    if roll < 45:
        return draw(st.sampled_from(["req", "acc"])), draw(st.sampled_from(BENIGN_WEIGHTED))
    if roll < 92:
        return draw(st.sampled_from(["to_req", "to_acc"])), draw(st.integers(1, 300))
    if roll < 97:
        return draw(st.sampled_from(["req", "acc"])), draw(st.sampled_from(DISRUPTIVE_CALLS))
    return "noise", draw(st.binary(min_size=1, max_size=12))


@FUZZ
@given(st.lists(paired_operation(), min_size=20, max_size=60))
def test_paired_machines(ops: list) -> None:
    sides = {"req": Harness(True), "acc": Harness(False)}
    peer_of = {"to_req": "acc", "to_acc": "req"}  # whose output feeds that direction
    for a, b in [
        ("req", "associate_request"),
        ("acc", "connection_made"),
        ("req", "connection_made"),
        *ops,
    ]:
        if a in sides:
            sides[a].step(LOCAL_CALLS[b])
        elif a == "noise":
            sides["req" if b[0] & 1 else "acc"].wire += b
        else:
            wire = sides[peer_of[a]].wire
            data = bytes(wire[:b])
            del wire[:b]
            if data:
                dst = sides["req" if a == "to_req" else "acc"]
                dst.step(lambda ul, data=data: ul.receive_data(data))


# The release phase on its own (PS3.8 7.2, including collisions, Sta7..Sta12): both sides
# are associated first, then release, respond, send data and deliver in random order.
release_operation = st.one_of(
    st.tuples(
        st.sampled_from(["req", "acc"]),
        st.sampled_from(["release_request", "release_response", "send_data"]),
    ),
    st.tuples(st.sampled_from(["to_req", "to_acc"]), st.integers(1, 200)),
)


@FUZZ
@given(st.lists(release_operation, min_size=4, max_size=30))
def test_release_interleavings(ops: list) -> None:
    sides = {"req": Harness(True), "acc": Harness(False)}

    def deliver(direction: str, size: int) -> None:
        src, dst = ("acc", "req") if direction == "to_req" else ("req", "acc")
        wire = sides[src].wire
        data = bytes(wire[:size])
        del wire[:size]
        if data:
            sides[dst].step(lambda ul: ul.receive_data(data))

    setup = [
        ("req", "associate_request"),
        ("acc", "connection_made"),
        ("req", "connection_made"),
        ("to_acc", 1 << 20),
        ("acc", "associate_accept"),
        ("to_req", 1 << 20),
    ]
    for a, b in [*setup, *ops]:
        if a in sides:
            sides[a].step(LOCAL_CALLS[b])
        else:
            deliver(a, b)
    # Finish: whoever still has to answer does, until the exchange settles.
    if all(h.ul.state is State.Sta6 for h in sides.values()):
        sides["req"].step(LOCAL_CALLS["release_request"])
    for _ in range(4):
        deliver("to_acc", 1 << 20)
        deliver("to_req", 1 << 20)
        for h in sides.values():
            if h.ul.state in (State.Sta8, State.Sta9, State.Sta12):
                h.step(LOCAL_CALLS["release_response"])
    # Whatever the interleaving: no abort, and the release completes (PS3.8 7.2): the
    # side that got the last A-RELEASE-RP closed (Sta1), the other awaits the close.
    assert not sides["req"].abort_seen and not sides["acc"].abort_seen
    assert {h.ul.state for h in sides.values()} == {State.Sta1, State.Sta13}
