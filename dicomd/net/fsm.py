"""The DICOM upper layer state machine of PS3.8 9.2, sans-IO.

``UpperLayer`` is PS3.8's "DICOM UL service-provider" for one transport connection.
Inputs are the transport's (``connection_made``, ``receive_data``, ``connection_lost``,
``artim_expired``) and the local user's service primitives (``associate_request``,
``send_data``, ``release_request``, ...). Every input returns the ``dicomd.net.events``
that result; bytes for the peer queue up in ``data_to_send()``. No sockets, no clock.

The behaviour is table 9-10 itself, transcribed below as a grid (one row per event,
one column per state) so it can be checked against the standard cell by cell. Actions
are named and numbered as in tables 9-6 to 9-9. PDU decoding happens lazily inside the
action that needs the PDU; if it fails, the same PDU is re-run as Evt19 ("unrecognized or
invalid PDU") in the unchanged state, so Evt19 gets exactly the table's action.

Contract with the transport (what the events mean):

* ``StartArtim`` arms or re-arms the ARTIM timer, ``StopArtim`` disarms it (it may not be
  armed: PS3.8 AA-2 says "stop ARTIM timer *if running*"); call ``artim_expired()`` when it
  fires.
* After every call, write ``data_to_send()`` to the socket in order, *then* act on
  ``CloseTransport`` (close once written).
* ``ConnectionClosed`` is emitted exactly when the machine enters Sta1, in the same list
  and last: either because the transport reported the closure (Evt17: AA-4, AA-5, AR-5)
  or because an action closed it itself (AE-4, AR-3, AA-2, AA-3; preceded by
  ``CloseTransport``). The association is over at that point. The transport will later
  report the closure it was asked for; ``connection_lost()`` in Sta1 is a no-op, as are
  ``receive_data()`` (bytes that were in flight) and ``artim_expired()`` (a timer that lost
  the race with the close).

Where PS3.8 leaves room, this implementation decides (see also the action docstrings):

* AA-1 sends the A-ABORT with the service-user source (0, reason 0) as table 9-9 says,
  even when a bad PDU in Sta2 triggered it; the diagnostic goes to the log through the
  ``AbortIndication`` (below). ``abort(reason)`` with a nonzero reason is our extension
  for provider-level faults found above this layer: it sends source 2 and that reason.
* ``AbortIndication`` is the A-ABORT / A-P-ABORT indication where the table issues one
  (AA-3, AA-4, AA-8). It is also emitted when a connection in Sta2 ends through an
  invalid or unexpected PDU, an A-ABORT or ARTIM expiry (AA-1, AA-2), which PS3.8 reports
  to nobody because no A-ASSOCIATE indication was given yet; the transport needs it to log
  why it dropped the peer. A peer that connects and closes without a word (AA-5, e.g. a
  TCP health check) gets no ``AbortIndication``. Nothing is indicated in Sta13: the
  association already ended and was reported.
* AE-6 rejects an A-ASSOCIATE-RQ whose protocol version lacks bit 0 with an
  A-ASSOCIATE-RJ (1, 2, 2) and reports it as ``AssociateRejected(local=True)``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from dicomd.net import pdu as _pdu
from dicomd.net.events import (
    ABORT_REASON_NOT_SPECIFIED,
    ABORT_REASON_UNEXPECTED_PDU,
    ABORT_SOURCE_PROVIDER,
    ABORT_SOURCE_USER,
    AbortIndication,
    AssociateAccepted,
    AssociateIndication,
    AssociateRejected,
    CloseTransport,
    ConnectionClosed,
    DataIndication,
    Event,
    ReleaseConfirmed,
    ReleaseIndication,
    StartArtim,
    StopArtim,
)
from dicomd.net.pdu import PduError, PduFramer, ProtocolVersionNotSupported, decode_pdata

if TYPE_CHECKING:
    from dicomd.net.acse_codec import AssociateRJ

__all__ = [
    "ACTIONS",
    "EVENTS",
    "PDU_EVENTS",
    "TRANSITIONS",
    "Evt",
    "LocalProtocolError",
    "State",
    "UpperLayer",
]


class LocalProtocolError(Exception):
    """The local user (or transport) invoked a primitive that table 9-10 does not allow in
    the current state. A bug in the caller; the machine's state is left unchanged."""


class State(enum.Enum):
    """Machine states, PS3.8 tables 9-1 to 9-5."""

    Sta1 = "Idle"
    Sta2 = "Transport connection open (Awaiting A-ASSOCIATE-RQ PDU)"
    Sta3 = "Awaiting local A-ASSOCIATE response primitive (from local user)"
    Sta4 = "Awaiting transport connection opening to complete (from local transport service)"
    Sta5 = "Awaiting A-ASSOCIATE-AC or A-ASSOCIATE-RJ PDU"
    Sta6 = "Association established and ready for data transfer"
    Sta7 = "Awaiting A-RELEASE-RP PDU"
    Sta8 = "Awaiting local A-RELEASE response primitive (from local user)"
    Sta9 = "Release collision requestor side; awaiting A-RELEASE response (from local user)"
    Sta10 = "Release collision acceptor side; awaiting A-RELEASE-RP PDU"
    Sta11 = "Release collision requestor side; awaiting A-RELEASE-RP PDU"
    Sta12 = (
        "Release collision acceptor side; awaiting A-RELEASE response primitive (from local user)"
    )
    Sta13 = "Awaiting Transport Connection Close Indication (Association no longer exists)"

    # Members are singletons compared by identity, so identity is a valid hash. Enum's own
    # __hash__ is a Python function (hash of the name); every state change and every
    # ``is_established`` check hashes a state, ~15 times per association.
    __hash__ = object.__hash__


class Evt(enum.IntEnum):
    """Machine events, PS3.8 table 9-10 (descriptions in ``EVENTS``)."""

    Evt1 = 1
    Evt2 = 2
    Evt3 = 3
    Evt4 = 4
    Evt5 = 5
    Evt6 = 6
    Evt7 = 7
    Evt8 = 8
    Evt9 = 9
    Evt10 = 10
    Evt11 = 11
    Evt12 = 12
    Evt13 = 13
    Evt14 = 14
    Evt15 = 15
    Evt16 = 16
    Evt17 = 17
    Evt18 = 18
    Evt19 = 19


EVENTS: dict[Evt, str] = {
    Evt.Evt1: "A-ASSOCIATE request (local user)",
    Evt.Evt2: "Transport connect confirmation (local transport service)",
    Evt.Evt3: "A-ASSOCIATE-AC PDU (received on transport connection)",
    Evt.Evt4: "A-ASSOCIATE-RJ PDU (received on transport connection)",
    Evt.Evt5: "Transport connection indication (local transport service)",
    Evt.Evt6: "A-ASSOCIATE-RQ PDU (on transport connection)",
    Evt.Evt7: "A-ASSOCIATE response primitive (accept)",
    Evt.Evt8: "A-ASSOCIATE response primitive (reject)",
    Evt.Evt9: "P-DATA request primitive",
    Evt.Evt10: "P-DATA-TF PDU (on transport connection)",
    Evt.Evt11: "A-RELEASE request primitive",
    Evt.Evt12: "A-RELEASE-RQ PDU (on transport)",
    Evt.Evt13: "A-RELEASE-RP PDU (on transport)",
    Evt.Evt14: "A-RELEASE response primitive",
    Evt.Evt15: "A-ABORT request primitive",
    Evt.Evt16: "A-ABORT PDU (on transport)",
    Evt.Evt17: "Transport connection closed indication (local transport service)",
    Evt.Evt18: "ARTIM timer expired (Association reject/release timer)",
    Evt.Evt19: "Unrecognized or invalid PDU received",
}

# The event a received PDU of each type is (PS3.8 table 9-10).
PDU_EVENTS: dict[int, Evt] = {
    _pdu.A_ASSOCIATE_RQ_PDU: Evt.Evt6,
    _pdu.A_ASSOCIATE_AC_PDU: Evt.Evt3,
    _pdu.A_ASSOCIATE_RJ_PDU: Evt.Evt4,
    _pdu.P_DATA_TF: Evt.Evt10,
    _pdu.A_RELEASE_RQ: Evt.Evt12,
    _pdu.A_RELEASE_RP: Evt.Evt13,
    _pdu.A_ABORT: Evt.Evt16,
}

# PS3.8 table 9-10, "DICOM Upper Layer Protocol State Transition Table", cell by cell.
# A "." is an empty cell: the event cannot happen in that state (for local primitives:
# LocalProtocolError).
_TABLE_9_10 = """
        Sta1  Sta2  Sta3  Sta4  Sta5  Sta6  Sta7  Sta8  Sta9  Sta10 Sta11 Sta12 Sta13
Evt1    AE-1  .     .     .     .     .     .     .     .     .     .     .     .
Evt2    .     .     .     AE-2  .     .     .     .     .     .     .     .     .
Evt3    .     AA-1  AA-8  .     AE-3  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-6
Evt4    .     AA-1  AA-8  .     AE-4  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-6
Evt5    AE-5  .     .     .     .     .     .     .     .     .     .     .     .
Evt6    .     AE-6  AA-8  .     AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-7
Evt7    .     .     AE-7  .     .     .     .     .     .     .     .     .     .
Evt8    .     .     AE-8  .     .     .     .     .     .     .     .     .     .
Evt9    .     .     .     .     .     DT-1  .     AR-7  .     .     .     .     .
Evt10   .     AA-1  AA-8  .     AA-8  DT-2  AR-6  AA-8  AA-8  AA-8  AA-8  AA-8  AA-6
Evt11   .     .     .     .     .     AR-1  .     .     .     .     .     .     .
Evt12   .     AA-1  AA-8  .     AA-8  AR-2  AR-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-6
Evt13   .     AA-1  AA-8  .     AA-8  AA-8  AR-3  AA-8  AA-8  AR-10 AR-3  AA-8  AA-6
Evt14   .     .     .     .     .     .     .     AR-4  AR-9  .     .     AR-4  .
Evt15   .     .     AA-1  AA-2  AA-1  AA-1  AA-1  AA-1  AA-1  AA-1  AA-1  AA-1  .
Evt16   .     AA-2  AA-3  .     AA-3  AA-3  AA-3  AA-3  AA-3  AA-3  AA-3  AA-3  AA-2
Evt17   .     AA-5  AA-4  AA-4  AA-4  AA-4  AA-4  AA-4  AA-4  AA-4  AA-4  AA-4  AR-5
Evt18   .     AA-2  .     .     .     .     .     .     .     .     .     .     AA-2
Evt19   .     AA-1  AA-8  .     AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-7
"""


def _parse_table(text: str) -> dict[tuple[Evt, State], str]:
    lines = text.strip().splitlines()
    states = [State[name] for name in lines[0].split()]
    table = {}
    for line in lines[1:]:
        evt_name, *cells = line.split()
        if len(cells) != len(states):
            raise AssertionError(f"table 9-10 row {evt_name} has {len(cells)} cells")
        for state, cell in zip(states, cells, strict=True):
            if cell != ".":
                table[(Evt[evt_name], state)] = cell
    return table


TRANSITIONS: dict[tuple[Evt, State], str] = _parse_table(_TABLE_9_10)

# Module-level aliases: a global load is cheaper than an enum attribute on the hot path.
_S1, _S2, _S3, _S4, _S5, _S6, _S7, _S8, _S9, _S10, _S11, _S12, _S13 = State
(_EVT1, _EVT2, _EVT5, _EVT7, _EVT8, _EVT9, _EVT11, _EVT14, _EVT15, _EVT17, _EVT18, _EVT19) = (
    Evt.Evt1, Evt.Evt2, Evt.Evt5, Evt.Evt7, Evt.Evt8, Evt.Evt9, Evt.Evt11, Evt.Evt14,
    Evt.Evt15, Evt.Evt17, Evt.Evt18, Evt.Evt19,
)  # fmt: skip

_ESTABLISHED = frozenset((_S6, _S7, _S8, _S9, _S10, _S11, _S12))
_ABORTABLE = frozenset((_S3, _S4, _S5)) | _ESTABLISHED

# Events are immutable and field-less, so one instance of each serves every emission.
_START_ARTIM = StartArtim()
_STOP_ARTIM = StopArtim()
_CLOSE_TRANSPORT = CloseTransport()
_CONNECTION_CLOSED = ConnectionClosed()
_RELEASE_CONFIRMED = ReleaseConfirmed()
_RELEASE_INDICATION = ReleaseIndication(collision=False)
_RELEASE_COLLISION = ReleaseIndication(collision=True)


def _describe(arg: Any, state: State) -> tuple[int, str]:
    """The A-ABORT reason and log text for an invalid (PduError) or unexpected PDU."""
    if isinstance(arg, PduError):
        return arg.reason, f"invalid PDU in {state.name}: {arg}"
    if isinstance(arg, memoryview | bytes):
        name = _pdu.PDU_NAMES.get(arg[0], "PDU")
        return ABORT_REASON_UNEXPECTED_PDU, f"unexpected {name} in {state.name}"
    return ABORT_REASON_NOT_SPECIFIED, f"{state.name}"


class UpperLayer:
    """One DICOM UL connection, PS3.8 9.2, as a sans-IO state machine.

    ``requestor`` fixes the role: it decides what ``connection_made`` means (Evt2 vs
    Evt5) and the collision branch of AR-8. ``max_pdu_length`` is the Maximum Length we
    announced (what the peer may send us; 0 = unlimited, PS3.8 D.1);
    ``max_association_pdu_length`` bounds A-ASSOCIATE-RQ/AC PDUs.
    """

    __slots__ = (
        "_actions",
        "_events",
        "_framer",
        "_framer_used",
        "_out",
        "_pdu_actions",
        "_pending_rq",
        "_requestor",
        "_rx_dead",
        "_state",
        "max_association_pdu_length",
        "max_pdu_length",
    )

    def __init__(
        self,
        *,
        requestor: bool,
        max_pdu_length: int,
        max_association_pdu_length: int = 1 << 20,
    ) -> None:
        self._requestor = requestor
        self.max_pdu_length = max_pdu_length
        self.max_association_pdu_length = max_association_pdu_length
        self._framer = PduFramer(max_pdu_length, max_association_pdu_length)
        self._framer_used = False
        self._out: list[bytes | memoryview] = []
        self._events: list[Event] = []
        self._pending_rq: bytes | None = None
        self._rx_dead = False
        self._state = _S1
        self._actions, self._pdu_actions = _DISPATCH[_S1]

    # --- state ----------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def requestor(self) -> bool:
        return self._requestor

    @property
    def is_established(self) -> bool:
        """An association exists: from AE-3/AE-7 until it is released or aborted
        (Sta6 to Sta12; data may still flow in Sta7 and Sta8)."""
        return self._state in _ESTABLISHED

    @property
    def can_send_data(self) -> bool:
        """``send_data`` is allowed (Sta6 DT-1, Sta8 AR-7)."""
        return self._state is _S6 or self._state is _S8

    @property
    def can_release(self) -> bool:
        """``release_request`` is allowed (Sta6 only, AR-1)."""
        return self._state is _S6

    @property
    def can_release_response(self) -> bool:
        """``release_response`` is allowed: Sta8, Sta9 (requestor side of a collision) or
        Sta12. On the acceptor side of a collision (Sta10) the answer must wait for the
        peer's A-RELEASE-RP, i.e. the ``ReleaseConfirmed`` event (AR-10)."""
        state = self._state
        return state is _S8 or state is _S9 or state is _S12

    @property
    def can_abort(self) -> bool:
        """``abort`` is allowed (Sta3..Sta12). In Sta2 and Sta13 there is no association
        to abort: to drop the connection there, close the transport and report it with
        ``connection_lost()`` (AA-5 / AR-5)."""
        return self._state in _ABORTABLE

    @property
    def is_closed(self) -> bool:
        """No transport connection (Sta1): not yet opened, or over."""
        return self._state is _S1

    def _goto(self, state: State) -> None:
        self._state = state
        self._actions, self._pdu_actions = _DISPATCH[state]

    def _send(self, data: bytes | memoryview) -> None:
        self._out.append(data)

    def data_to_send(self) -> list[bytes | memoryview]:
        """Take the bytes queued for the peer, in order."""
        out = self._out
        if out:
            self._out = []
        else:
            out = []
        return out

    # --- dispatch -------------------------------------------------------------------

    def _local(self, evt: Evt, arg: Any = None) -> list[Event]:
        action = self._actions.get(evt)
        if action is None:
            raise LocalProtocolError(
                f"{evt.name} ({EVENTS[evt]}) is not allowed in {self._state.name} "
                f"({self._state.value}), PS3.8 table 9-10"
            )
        events: list[Event] = []
        self._events = events
        action(self, arg)
        return events

    # --- transport-side inputs ------------------------------------------------------

    def connection_made(self) -> list[Event]:
        """Transport connection open: Evt2 (requestor, AE-2: send the A-ASSOCIATE-RQ)
        or Evt5 (acceptor, AE-5: start ARTIM)."""
        return self._local(_EVT2 if self._requestor else _EVT5)

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Bytes from the peer. Runs Evt3/4/6/10/12/13/16 per whole PDU, Evt19 for an
        invalid one. Once the framing is lost (a bad PDU header or length), every later
        byte is discarded; once the machine is back in Sta1, so is the rest of the input."""
        state = self._state
        if state is _S1 or self._rx_dead:
            return []
        if state is _S4:
            raise LocalProtocolError("receive_data() before connection_made() (Sta4)")
        events: list[Event] = []
        self._events = events
        framer = self._framer
        framer.feed(data)
        while True:
            try:
                item = framer.next_pdu()
            except PduError as exc:
                self._rx_dead = True
                self._actions[_EVT19](self, exc)
                break
            if item is None:
                break
            try:
                self._pdu_actions[item[0]](self, item[1])
            except PduError as exc:
                # Actions decode before they change anything, so the state is the one
                # the PDU arrived in: run the PDU again as Evt19 there.
                self._actions[_EVT19](self, exc)
            if self._state is _S1:
                break
        return events

    def connection_lost(self) -> list[Event]:
        """Evt17. In Sta1 (the close we asked for, or no connection) nothing happens."""
        if self._state is _S1:
            return []
        return self._local(_EVT17)

    def artim_expired(self) -> list[Event]:
        """Evt18 (Sta2, Sta13). A timer firing in Sta1 lost a race with the close and is
        ignored; elsewhere no ARTIM timer should be running, so it is the caller's bug."""
        if self._state is _S1:
            return []
        return self._local(_EVT18)

    # --- local service primitives ---------------------------------------------------

    def associate_request(self, rq: bytes) -> list[Event]:
        """Evt1, requestor only: AE-1 (Sta4). ``rq`` is the encoded A-ASSOCIATE-RQ
        (``acse_codec.encode_rq``). The caller then opens the transport and calls
        ``connection_made()`` (or ``connection_lost()`` if that fails)."""
        if not self._requestor:
            raise LocalProtocolError("associate_request() on an acceptor")
        return self._local(_EVT1, rq)

    def associate_accept(self, ac: bytes) -> list[Event]:
        """Evt7 (Sta3): AE-7, send the A-ASSOCIATE-AC (encoded, ``acse_codec.encode_ac``)."""
        return self._local(_EVT7, ac)

    def associate_reject(self, rj: AssociateRJ) -> list[Event]:
        """Evt8 (Sta3): AE-8, send the A-ASSOCIATE-RJ and start ARTIM."""
        return self._local(_EVT8, rj)

    def send_data(self, chunks: Iterable[bytes | memoryview]) -> list[Event]:
        """Evt9: queue already encoded, complete P-DATA-TF PDUs (DT-1 in Sta6, AR-7 in
        Sta8). The bytes are not inspected; chunks are queued as given, uncopied."""
        if _EVT9 not in self._actions:
            return self._local(_EVT9, chunks)  # raises LocalProtocolError
        self._out.extend(chunks)  # DT-1 and AR-7 both only send; the state is unchanged
        return []

    def release_request(self) -> list[Event]:
        """Evt11 (Sta6): AR-1, send A-RELEASE-RQ."""
        return self._local(_EVT11)

    def release_response(self) -> list[Event]:
        """Evt14: AR-4 (Sta8, Sta12) or AR-9 (Sta9, requestor side of a collision)."""
        return self._local(_EVT14)

    def abort(self, reason: int = 0) -> list[Event]:
        """Evt15, A-ABORT request: AA-1 (Sta3, Sta5..Sta12) or AA-2 (Sta4).

        With ``reason`` 0 this is the service-user's A-ABORT (source 0, PS3.8 7.3). A
        nonzero ``reason`` (an ``ABORT_REASON_*``) is for a PDU-level fault that the layer
        above detected on our behalf, e.g. a PDV on a presentation context that was not
        accepted; the A-ABORT then carries source 2 and that reason, as PS3.8 9.3.8 has
        the provider do. Not allowed in Sta1, Sta2 or Sta13 (no association to abort: the
        transport just closes the connection there).
        """
        if reason not in (0, 1, 2, 4, 5, 6):
            raise ValueError(f"A-ABORT reason {reason} is not defined in PS3.8 table 9-26")
        return self._local(_EVT15, reason)

    # --- actions, PS3.8 tables 9-6 to 9-9 -------------------------------------------
    # Each takes the event's argument: a received PDU (memoryview), a PduError (Evt19),
    # a primitive's parameter, or None. Actions that consume a PDU decode it first, so a
    # PduError leaves the machine untouched.

    def _ae_1(self, rq: bytes) -> None:
        """AE-1: issue TRANSPORT CONNECT (the caller does); next Sta4. The RQ is encoded
        now so that a bad one fails in the caller's hands, not later in AE-2."""
        self._pending_rq = _pdu.encode_associate(rq)
        self._reset_connection()
        self._goto(_S4)

    def _ae_2(self, _: None) -> None:
        """AE-2: send A-ASSOCIATE-RQ; next Sta5."""
        assert self._pending_rq is not None
        self._send(self._pending_rq)
        self._pending_rq = None
        self._goto(_S5)

    def _ae_3(self, pdu: memoryview) -> None:
        """AE-3: A-ASSOCIATE confirmation (accept); next Sta6."""
        ac = _pdu.decode_associate_ac(pdu)
        self._events.append(AssociateAccepted(ac))
        self._goto(_S6)

    def _ae_4(self, pdu: memoryview) -> None:
        """AE-4: A-ASSOCIATE confirmation (reject), close the transport; next Sta1."""
        rj = _pdu.decode_associate_rj(pdu)
        self._events.append(AssociateRejected(rj))
        self._close_now()

    def _ae_5(self, _: None) -> None:
        """AE-5: accept the transport connection, start ARTIM; next Sta2."""
        self._reset_connection()
        self._events.append(_START_ARTIM)
        self._goto(_S2)

    def _ae_6(self, pdu: memoryview) -> None:
        """AE-6: stop ARTIM; if the provider can take the RQ, A-ASSOCIATE indication
        (Sta3), else send A-ASSOCIATE-RJ and start ARTIM (Sta13).

        The only provider-level ground for rejecting is the protocol version (PS3.8
        9.3.2); everything about AE titles and contexts is the user's decision (AE-8).
        """
        try:
            rq = _pdu.decode_associate_rq(pdu)
        except ProtocolVersionNotSupported:
            rj = _pdu.make_associate_rj(
                _pdu.RJ_RESULT_PERMANENT,
                _pdu.RJ_SOURCE_PROVIDER_ACSE,
                _pdu.RJ_REASON_PROTOCOL_VERSION,
            )
            self._send(_pdu.encode_associate(rj))
            self._events += (_STOP_ARTIM, AssociateRejected(rj, local=True), _START_ARTIM)
            self._goto(_S13)
            return
        self._events += (_STOP_ARTIM, AssociateIndication(rq))
        self._goto(_S3)

    def _ae_7(self, ac: bytes) -> None:
        """AE-7: send A-ASSOCIATE-AC; next Sta6."""
        self._send(_pdu.encode_associate(ac))
        self._goto(_S6)

    def _ae_8(self, rj: AssociateRJ) -> None:
        """AE-8: send A-ASSOCIATE-RJ, start ARTIM; next Sta13."""
        self._send(_pdu.encode_associate(rj))
        self._events.append(_START_ARTIM)
        self._goto(_S13)

    def _dt_1(self, chunks: Iterable[bytes | memoryview]) -> None:
        """DT-1: send P-DATA-TF; stay in Sta6. (``send_data`` inlines this.)"""
        self._out.extend(chunks)

    def _dt_2(self, pdu: memoryview) -> None:
        """DT-2: P-DATA indication; stay in Sta6. The hot path: no state change."""
        self._events.append(DataIndication(decode_pdata(pdu)))

    def _ar_1(self, _: None) -> None:
        """AR-1: send A-RELEASE-RQ; next Sta7."""
        self._send(_pdu.encode_release_rq())
        self._goto(_S7)

    def _ar_2(self, _: memoryview) -> None:
        """AR-2: A-RELEASE indication; next Sta8."""
        self._events.append(_RELEASE_INDICATION)
        self._goto(_S8)

    def _ar_3(self, _: memoryview) -> None:
        """AR-3: A-RELEASE confirmation, close the transport; next Sta1."""
        self._events.append(_RELEASE_CONFIRMED)
        self._close_now()

    def _ar_4(self, _: None) -> None:
        """AR-4: send A-RELEASE-RP, start ARTIM; next Sta13. The requestor closes the
        transport (AR-3); ARTIM bounds how long we wait for it."""
        self._send(_pdu.encode_release_rp())
        self._events.append(_START_ARTIM)
        self._goto(_S13)

    def _ar_5(self, _: None) -> None:
        """AR-5: stop ARTIM; next Sta1 (the transport is already closed)."""
        self._events += (_STOP_ARTIM, _CONNECTION_CLOSED)
        self._goto(_S1)

    def _ar_6(self, pdu: memoryview) -> None:
        """AR-6: P-DATA indication while our release request is pending; stay in Sta7
        (PS3.8 7.2: the peer may still be finishing its replies)."""
        self._events.append(DataIndication(decode_pdata(pdu)))

    def _ar_7(self, chunks: Iterable[bytes | memoryview]) -> None:
        """AR-7: send P-DATA-TF after the peer asked to release; stay in Sta8."""
        self._out.extend(chunks)

    def _ar_8(self, _: memoryview) -> None:
        """AR-8: A-RELEASE indication (release collision); next Sta9 for the
        association-requestor, Sta10 for the acceptor."""
        self._events.append(_RELEASE_COLLISION)
        self._goto(_S9 if self._requestor else _S10)

    def _ar_9(self, _: None) -> None:
        """AR-9: send A-RELEASE-RP (requestor side of a collision); next Sta11."""
        self._send(_pdu.encode_release_rp())
        self._goto(_S11)

    def _ar_10(self, _: memoryview) -> None:
        """AR-10: A-RELEASE confirmation (acceptor side of a collision); next Sta12. The
        user then answers the peer's request (Evt14, AR-4)."""
        self._events.append(_RELEASE_CONFIRMED)
        self._goto(_S12)

    def _aa_1(self, arg: Any) -> None:
        """AA-1: send A-ABORT (service-user source), start (or restart) ARTIM; next Sta13.

        From Evt15 ``arg`` is the user's reason: 0 gives the service-user A-ABORT of table
        9-9; a nonzero one is sent with source 2 (see ``abort``). From a PDU in Sta2
        (``arg`` is the PDU or the PduError) the A-ABORT is (0, 0) as table 9-9 says, and
        an ``AbortIndication`` reports the diagnostic for the log (module docstring).
        """
        if isinstance(arg, int):
            source = ABORT_SOURCE_PROVIDER if arg else ABORT_SOURCE_USER
            self._send(_pdu.encode_abort(source, arg))
        else:
            _, detail = _describe(arg, self._state)
            self._send(_pdu.encode_abort(ABORT_SOURCE_USER, 0))
            self._events.append(AbortIndication(ABORT_SOURCE_USER, 0, True, detail))
        self._events.append(_START_ARTIM)
        self._goto(_S13)

    def _aa_2(self, arg: Any) -> None:
        """AA-2: stop ARTIM if running, close the transport; next Sta1.

        Sta2 + A-ABORT or ARTIM expiry, Sta4 + local abort, Sta13 + A-ABORT or ARTIM.
        Only the Sta2 cases are reported (module docstring).
        """
        state = self._state
        if state is _S2:
            if isinstance(arg, memoryview | bytes):
                source, reason = _pdu.decode_abort(arg)
                detail = "A-ABORT received while awaiting A-ASSOCIATE-RQ"
                self._events.append(AbortIndication(source, reason, False, detail))
            else:
                detail = "ARTIM expired while awaiting A-ASSOCIATE-RQ"
                self._events.append(
                    AbortIndication(ABORT_SOURCE_PROVIDER, ABORT_REASON_NOT_SPECIFIED, True, detail)
                )
        self._events.append(_STOP_ARTIM)
        self._close_now()

    def _aa_3(self, pdu: memoryview) -> None:
        """AA-3: A-ABORT (source 0) or A-P-ABORT (source 2) indication, close the
        transport; next Sta1."""
        source, reason = _pdu.decode_abort(pdu)
        self._events.append(AbortIndication(source, reason, False, "A-ABORT received"))
        self._close_now()

    def _aa_4(self, _: None) -> None:
        """AA-4: A-P-ABORT indication (the transport closed under us); next Sta1."""
        detail = f"transport connection closed in {self._state.name}"
        self._events += (
            AbortIndication(ABORT_SOURCE_PROVIDER, ABORT_REASON_NOT_SPECIFIED, True, detail),
            _CONNECTION_CLOSED,
        )
        self._goto(_S1)

    def _aa_5(self, _: None) -> None:
        """AA-5: stop ARTIM; next Sta1 (closed before any A-ASSOCIATE-RQ)."""
        self._events += (_STOP_ARTIM, _CONNECTION_CLOSED)
        self._goto(_S1)

    def _aa_6(self, _: memoryview) -> None:
        """AA-6: ignore the PDU; stay in Sta13."""

    def _aa_7(self, arg: Any) -> None:
        """AA-7: send A-ABORT; stay in Sta13. Provider source: reason 2 for an
        A-ASSOCIATE-RQ, the PduError's reason for an invalid PDU."""
        reason, _ = _describe(arg, self._state)
        self._send(_pdu.encode_abort(ABORT_SOURCE_PROVIDER, reason))

    def _aa_8(self, arg: Any) -> None:
        """AA-8: send A-ABORT (provider source), A-P-ABORT indication, start ARTIM;
        next Sta13. Reason 2 for an unexpected PDU, the PduError's for an invalid one."""
        reason, detail = _describe(arg, self._state)
        self._send(_pdu.encode_abort(ABORT_SOURCE_PROVIDER, reason))
        self._events += (
            AbortIndication(ABORT_SOURCE_PROVIDER, reason, True, detail),
            _START_ARTIM,
        )
        self._goto(_S13)

    # --- helpers ----------------------------------------------------------------------

    def _close_now(self) -> None:
        """Close the transport ourselves and enter Sta1."""
        self._events += (_CLOSE_TRANSPORT, _CONNECTION_CLOSED)
        self._pending_rq = None
        self._goto(_S1)

    def _reset_connection(self) -> None:
        """A new transport connection: fresh framing. The framer made with the machine
        serves its first connection; a machine reused after Sta1 (PS3.8 allows Evt1/Evt5
        there) gets a new one."""
        if self._framer_used:
            self._framer = PduFramer(self.max_pdu_length, self.max_association_pdu_length)
        self._framer_used = True
        self._rx_dead = False


_Action = Callable[[UpperLayer, Any], None]

# State machine actions, PS3.8 tables 9-6 (AE), 9-7 (DT), 9-8 (AR), 9-9 (AA).
ACTIONS: dict[str, tuple[str, _Action]] = {
    "AE-1": ("Issue TRANSPORT CONNECT request primitive to local transport service",
             UpperLayer._ae_1),
    "AE-2": ("Send A-ASSOCIATE-RQ-PDU", UpperLayer._ae_2),
    "AE-3": ("Issue A-ASSOCIATE confirmation (accept) primitive", UpperLayer._ae_3),
    "AE-4": ("Issue A-ASSOCIATE confirmation (reject) primitive and close transport "
             "connection", UpperLayer._ae_4),
    "AE-5": ("Issue Transport connection response primitive; start ARTIM timer",
             UpperLayer._ae_5),
    "AE-6": ("Stop ARTIM timer and if A-ASSOCIATE-RQ acceptable by service-provider: issue "
             "A-ASSOCIATE indication primitive, otherwise issue A-ASSOCIATE-RJ-PDU and start "
             "ARTIM timer", UpperLayer._ae_6),
    "AE-7": ("Send A-ASSOCIATE-AC PDU", UpperLayer._ae_7),
    "AE-8": ("Send A-ASSOCIATE-RJ PDU and start ARTIM timer", UpperLayer._ae_8),
    "DT-1": ("Send P-DATA-TF PDU", UpperLayer._dt_1),
    "DT-2": ("Send P-DATA indication primitive", UpperLayer._dt_2),
    "AR-1": ("Send A-RELEASE-RQ PDU", UpperLayer._ar_1),
    "AR-2": ("Issue A-RELEASE indication primitive", UpperLayer._ar_2),
    "AR-3": ("Issue A-RELEASE confirmation primitive, and close transport connection",
             UpperLayer._ar_3),
    "AR-4": ("Issue A-RELEASE-RP PDU and start ARTIM timer", UpperLayer._ar_4),
    "AR-5": ("Stop ARTIM timer", UpperLayer._ar_5),
    "AR-6": ("Issue P-DATA indication", UpperLayer._ar_6),
    "AR-7": ("Issue P-DATA-TF PDU", UpperLayer._ar_7),
    "AR-8": ("Issue A-RELEASE indication (release collision): if association-requestor, "
             "next state is Sta9, if not next state is Sta10", UpperLayer._ar_8),
    "AR-9": ("Send A-RELEASE-RP PDU", UpperLayer._ar_9),
    "AR-10": ("Issue A-RELEASE confirmation primitive", UpperLayer._ar_10),
    "AA-1": ("Send A-ABORT PDU (service-user source) and start (or restart if already "
             "started) ARTIM timer", UpperLayer._aa_1),
    "AA-2": ("Stop ARTIM timer if running. Close transport connection", UpperLayer._aa_2),
    "AA-3": ("If (service-user initiated abort): issue A-ABORT indication and close transport "
             "connection, otherwise (service-provider initiated abort): issue A-P-ABORT "
             "indication and close transport connection", UpperLayer._aa_3),
    "AA-4": ("Issue A-P-ABORT indication primitive", UpperLayer._aa_4),
    "AA-5": ("Stop ARTIM timer", UpperLayer._aa_5),
    "AA-6": ("Ignore PDU", UpperLayer._aa_6),
    "AA-7": ("Send A-ABORT PDU", UpperLayer._aa_7),
    "AA-8": ("Send A-ABORT PDU (service-provider source), issue an A-P-ABORT indication, and "
             "start ARTIM timer", UpperLayer._aa_8),
}  # fmt: skip

# Per-state dispatch compiled from TRANSITIONS: the machine swaps these two dicts on each
# state change (one lookup in _DISPATCH), so an event costs one dict lookup.
_LOCAL_DISPATCH: dict[State, dict[Evt, _Action]] = {s: {} for s in State}
_PDU_DISPATCH: dict[State, dict[int, _Action]] = {s: {} for s in State}
for (_evt, _state), _name in TRANSITIONS.items():
    _LOCAL_DISPATCH[_state][_evt] = ACTIONS[_name][1]
for _type, _evt in PDU_EVENTS.items():
    for _state in State:
        if (_evt, _state) in TRANSITIONS:
            _PDU_DISPATCH[_state][_type] = ACTIONS[TRANSITIONS[(_evt, _state)]][1]
_DISPATCH: dict[State, tuple[dict[Evt, _Action], dict[int, _Action]]] = {
    s: (_LOCAL_DISPATCH[s], _PDU_DISPATCH[s]) for s in State
}
del _evt, _state, _name, _type
