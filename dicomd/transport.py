"""The asyncio shell around the sans-IO upper layer: one Protocol per TCP connection.

It does only what needs an event loop: write what the state machine wants written, arm the
ARTIM and idle timers, pause reading while the association's consumer is behind, and hand
every upper-layer event to the association object that owns the connection. No threads,
no per-association task unless a service asks for one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from dicomd.logging import get_logger
from dicomd.net import events as ev
from dicomd.net.fsm import UpperLayer

if TYPE_CHECKING:
    from dicomd.net.acse_codec import AssociateRJ

log = get_logger("dicomd.transport")


class ConnectionOwner(Protocol):
    """What an association object implements to receive upper-layer events."""

    def connection_started(self, link: Link) -> None: ...

    def upper_layer_event(self, event: ev.Event) -> None: ...


class Link(asyncio.Protocol):
    """One DICOM upper-layer connection: socket ↔ UpperLayer ↔ owner.

    ``artim_timeout`` is PS3.8's ARTIM (connect → A-ASSOCIATE-RQ, release → close).
    ``idle_timeout`` (0 = none) aborts an association on which nothing arrives for that
    long while it has nothing in flight; ``dimse_timeout`` aborts one whose incomplete
    message stalls. ARTIM and these checks share one lazily re-armed timer per connection
    (see ``_arm``), so an idle association costs no wake-ups beyond one per timeout period
    and a short one arms a single timer in its life.
    """

    def __init__(
        self,
        owner: ConnectionOwner,
        *,
        requestor: bool,
        max_pdu_length: int,
        artim_timeout: float,
        idle_timeout: float = 0.0,
        dimse_timeout: float = 0.0,
        loop: asyncio.AbstractEventLoop | None = None,
        tracker: set[Link] | None = None,
    ) -> None:
        self.owner = owner
        self.upper = UpperLayer(requestor=requestor, max_pdu_length=max_pdu_length)
        self.artim_timeout = artim_timeout
        self.idle_timeout = idle_timeout
        self.dimse_timeout = dimse_timeout
        self.transport: asyncio.Transport | None = None
        # The acceptor passes its loop: asyncio.get_running_loop() costs a getpid() system
        # call, once per connection otherwise.
        self.loop = loop if loop is not None else asyncio.get_running_loop()
        # A set this link is in while its connection is open (the supervisor's, to drain
        # and abort at shutdown); connection_lost removes it.
        self.tracker = tracker
        self.peer: tuple[str, int] = ("", 0)
        self.tls_peer_certificate: dict | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self._closed: asyncio.Future[None] | None = None
        self._lost = False
        # Set by the owner: True while a received message is incomplete (dimse_timeout
        # applies); busy while a request is being served (idle_timeout does not apply).
        self.in_message = False
        self.busy = False
        # The one timer handle (when it fires), the ARTIM deadline (None: stopped) and the
        # next idle/DIMSE check, all in loop.time().
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._artim_deadline: float | None = None
        watch = 3600.0  # the shortest positive timeout, at most an hour
        if 0 < idle_timeout < watch:
            watch = idle_timeout
        if 0 < dimse_timeout < watch:
            watch = dimse_timeout
        self._watch_period = watch
        self._watch_due = 0.0
        self._last_activity = self.loop.time()
        self._paused_reading = False
        self._read_pauses = 0  # why reading is paused: _FOR_CONSUMER | _FOR_WRITES
        self._write_paused = False
        self._write_paused_since = 0.0
        self._drain_waiters: list[asyncio.Future[None]] = []
        self.on_timeout: Callable[[str], None] | None = None

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Without TCP_NODELAY a C-STORE-RSP waits for the peer's delayed ACK (~40 ms): both
        # event loops set it on every TCP transport they create (uvloop in
        # TCPTransport.new, asyncio in _SelectorSocketTransport), accepted or connected;
        # tests/test_transport.py checks that they still do.
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = (str(peer[0]), int(peer[1]))
        self.tls_peer_certificate = transport.get_extra_info("peercert")
        self.owner.connection_started(self)
        if transport.is_closing():
            return  # the owner refused the connection (access policy) before any PDU
        self._watch_due = self._last_activity + self._watch_period
        self._run(self.upper.connection_made())  # the acceptor's AE-5 starts ARTIM
        self._arm(self._watch_due)

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self._last_activity = self.loop.time()
        try:
            self._run(self.upper.receive_data(data))
        except Exception:
            # A bug of ours must cost one connection, never leave it hanging half-served.
            log.error("internal_error", peer=f"{self.peer[0]}:{self.peer[1]}", exc_info=True)
            if self.transport is not None:
                self.transport.abort()

    @property
    def local(self) -> tuple[str, int]:
        """Our address and port on this connection (asked of the socket when wanted: a
        system call per connection that nothing on the usual path needs)."""
        local = self.transport.get_extra_info("sockname") if self.transport else None
        return (str(local[0]), int(local[1])) if isinstance(local, tuple) else ("", 0)

    def eof_received(self) -> bool | None:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_exception(ConnectionResetError("connection lost"))
        self._drain_waiters.clear()
        if not self.upper.is_closed:
            self._run(self.upper.connection_lost())
        self._lost = True
        if self.tracker is not None:
            self.tracker.discard(self)
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    @property
    def closed(self) -> asyncio.Future[None]:
        """Done once the connection is gone. Made on first use: most links are never
        waited on."""
        future = self._closed
        if future is None:
            future = self._closed = self.loop.create_future()
            if self._lost:
                future.set_result(None)
        return future

    def pause_writing(self) -> None:
        self._write_paused = True
        self._write_paused_since = self.loop.time()
        # A peer that keeps sending requests but does not read the answers (pipelining
        # past the (1,1) window, or simply stuck) would make us queue answers without
        # bound: stop reading it until it has taken what is queued.
        self._pause_reading_for(_FOR_WRITES)

    def resume_writing(self) -> None:
        self._write_paused = False
        self._resume_reading_for(_FOR_WRITES)
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- what the owner calls ------------------------------------------------------------

    def associate_request(self, rq: bytes) -> None:
        """Evt1: ``rq`` is the encoded A-ASSOCIATE-RQ (``acse_codec.encode_rq``)."""
        self._run(self.upper.associate_request(rq))

    def associate_accept(self, ac: bytes) -> None:
        """Send the A-ASSOCIATE-AC (encoded, ``acse_codec.encode_ac``)."""
        self._run(self.upper.associate_accept(ac))

    def associate_reject(self, rj: AssociateRJ) -> None:
        self._run(self.upper.associate_reject(rj))

    def send_data(self, chunks: list[bytes | memoryview]) -> None:
        self._run(self.upper.send_data(chunks))

    def release_request(self) -> None:
        self._run(self.upper.release_request())

    def release_response(self) -> None:
        self._run(self.upper.release_response())

    def abort(self, reason: int = 0) -> None:
        """A-ABORT where PS3.8 allows one; otherwise (Sta2, Sta13) just drop the connection."""
        if self.transport is None or self.upper.is_closed:
            return
        if self.upper.can_abort:
            self._run(self.upper.abort(reason))
        else:
            self.transport.abort()

    async def drain(self) -> None:
        """Wait until the socket's write buffer is below its high-water mark."""
        if not self._write_paused:
            return
        waiter: asyncio.Future[None] = self.loop.create_future()
        self._drain_waiters.append(waiter)
        await waiter

    def touch(self) -> None:
        """Restart the idle clock (a request finished: idleness counts from now)."""
        self._last_activity = self.loop.time()

    def pause_reading(self) -> None:
        """Stop reading while a service consumes what it was given (DatasetStream)."""
        self._pause_reading_for(_FOR_CONSUMER)

    def resume_reading(self) -> None:
        self._resume_reading_for(_FOR_CONSUMER)

    def _pause_reading_for(self, why: int) -> None:
        if self.transport is None:
            return
        if not self._read_pauses:
            self._paused_reading = True
            self.transport.pause_reading()
        self._read_pauses |= why

    def _resume_reading_for(self, why: int) -> None:
        if self.transport is None or not self._read_pauses & why:
            return
        self._read_pauses &= ~why
        if not self._read_pauses:
            self._paused_reading = False
            self._last_activity = self.loop.time()
            self.transport.resume_reading()

    # -- internals -----------------------------------------------------------------------

    def _run(self, events: list[ev.Event]) -> None:
        """Act on the state machine's events, then write what it queued."""
        for event in events:
            kind = type(event)
            if kind is _START_ARTIM:
                self._artim_deadline = deadline = self.loop.time() + self.artim_timeout
                self._arm(deadline)
            elif kind is _STOP_ARTIM:
                self._artim_deadline = None  # the timer, if due for it, will find nothing
            elif kind is _CLOSE_TRANSPORT:
                self._flush()
                if self.transport is not None:
                    self.transport.close()
            else:
                self.owner.upper_layer_event(event)
        self._flush()

    def _flush(self) -> None:
        chunks = self.upper.data_to_send()
        if chunks and self.transport is not None and not self.transport.is_closing():
            self.bytes_out += sum(map(len, chunks))
            if len(chunks) == 1:
                # writelines() joins its chunks into a new bytes object (Python 3.11):
                # a single (large, pre-assembled) chunk is written as it is, uncopied.
                self.transport.write(chunks[0])
            else:
                self.transport.writelines(chunks)

    # ARTIM and the idle/DIMSE watch share one timer handle. A connection starts ARTIM
    # (connect → A-ASSOCIATE-RQ), stops it, starts it again at release and stops it at the
    # close, and is watched all along: arming and cancelling a timer for each of these
    # cost as much as the rest of the release. So a stop only forgets the deadline, a start
    # re-arms only if its deadline is earlier than the armed one, and when the handle fires
    # it acts on whatever is due and re-arms for what is left.

    def _arm(self, when: float) -> None:
        timer = self._timer
        if timer is not None:
            if self._timer_at <= when:
                return  # it fires first and re-arms for `when` then
            timer.cancel()
        self._timer_at = when
        self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.transport is None or self.upper.is_closed:
            return
        upper = self.upper
        now = self.loop.time()
        deadline = self._artim_deadline
        if deadline is not None and now >= deadline:
            self._artim_deadline = None
            if self.on_timeout is not None:
                self.on_timeout("ARTIM timer expired")
            self._run(upper.artim_expired())
            if upper.is_closed:
                return
        if now >= self._watch_due:
            if self._check_activity(now):
                return
            self._watch_due = now + self._watch_period
        when = self._watch_due
        deadline = self._artim_deadline
        self._arm(when if deadline is None or when < deadline else deadline)

    def _check_activity(self, now: float) -> bool:
        """The idle and DIMSE timeouts; True if the association was aborted."""
        if (
            self._write_paused
            and self.dimse_timeout > 0
            and now - self._write_paused_since >= self.dimse_timeout
        ):
            # The peer has not taken our answers for a whole DIMSE timeout. An A-ABORT
            # would only queue behind them: drop the connection.
            if self.on_timeout is not None:
                self.on_timeout(
                    f"DIMSE timeout after {self.dimse_timeout:g} s: the peer does not read"
                )
            self.abort()
            if self.transport is not None:
                self.transport.abort()
            return True
        if self.upper.is_established and not self._paused_reading:
            # Waiting on the peer mid-message: DIMSE timeout. Idle between messages with
            # nothing being served: idle timeout. Serving a request: the service's business.
            limit = 0.0
            if self.in_message:
                limit, what = self.dimse_timeout, "DIMSE timeout"
            elif not self.busy:
                limit, what = self.idle_timeout, "idle timeout"
            if limit > 0 and now - self._last_activity >= limit:
                if self.on_timeout is not None:
                    self.on_timeout(f"{what} after {limit:g} s")
                self.abort()
                return True
        return False

    def _cancel_timers(self) -> None:
        self._artim_deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


# Why reading is paused (bits of Link._read_pauses).
_FOR_CONSUMER = 1  # a service has not consumed the data set fragments it was given
_FOR_WRITES = 2  # the peer has not read our answers (the write buffer is over its limit)

_START_ARTIM = ev.StartArtim
_STOP_ARTIM = ev.StopArtim
_CLOSE_TRANSPORT = ev.CloseTransport
