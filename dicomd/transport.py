"""The asyncio shell around the sans-IO upper layer: one Protocol per TCP connection.

It does only what needs an event loop: write what the state machine wants written, arm the
ARTIM and idle timers, pause reading while the association's consumer is behind, and hand
every upper-layer event to the association object that owns the connection. No threads,
no per-association task unless a service asks for one.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from dicomd.logging import get_logger
from dicomd.net import events as ev
from dicomd.net.fsm import UpperLayer

if TYPE_CHECKING:
    from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ

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
    message stalls. Both are checked by one lazily re-armed timer per connection so an
    idle association costs no wake-ups beyond one per timeout period.
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
    ) -> None:
        self.owner = owner
        self.upper = UpperLayer(requestor=requestor, max_pdu_length=max_pdu_length)
        self.artim_timeout = artim_timeout
        self.idle_timeout = idle_timeout
        self.dimse_timeout = dimse_timeout
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.peer: tuple[str, int] = ("", 0)
        self.local: tuple[str, int] = ("", 0)
        self.tls_peer_certificate: dict | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.closed = self.loop.create_future()
        # Set by the owner: True while a received message is incomplete (dimse_timeout
        # applies); busy while a request is being served (idle_timeout does not apply).
        self.in_message = False
        self.busy = False
        self._artim: asyncio.TimerHandle | None = None
        self._watch: asyncio.TimerHandle | None = None
        self._last_activity = self.loop.time()
        self._paused_reading = False
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self.on_timeout: Callable[[str], None] | None = None

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Without TCP_NODELAY a C-STORE-RSP waits for the peer's delayed ACK (~40 ms).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        if isinstance(peer, tuple):
            self.peer = (str(peer[0]), int(peer[1]))
        if isinstance(local, tuple):
            self.local = (str(local[0]), int(local[1]))
        self.tls_peer_certificate = transport.get_extra_info("peercert")
        self.owner.connection_started(self)
        if transport.is_closing():
            return  # the owner refused the connection (access policy) before any PDU
        self._run(self.upper.connection_made())
        self._arm_watch()

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
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- what the owner calls ------------------------------------------------------------

    def associate_request(self, rq: A_ASSOCIATE_RQ) -> None:
        self._run(self.upper.associate_request(rq))

    def associate_accept(self, ac: A_ASSOCIATE_AC) -> None:
        self._run(self.upper.associate_accept(ac))

    def associate_reject(self, rj: A_ASSOCIATE_RJ) -> None:
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
        if not self._paused_reading and self.transport is not None:
            self._paused_reading = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused_reading and self.transport is not None:
            self._paused_reading = False
            self._last_activity = self.loop.time()
            self.transport.resume_reading()

    # -- internals -----------------------------------------------------------------------

    def _run(self, events: list[ev.Event]) -> None:
        """Act on the state machine's events, then write what it queued."""
        for event in events:
            kind = type(event)
            if kind is ev.StartArtim:
                self._start_artim()
            elif kind is ev.StopArtim:
                self._stop_artim()
            elif kind is ev.CloseTransport:
                self._flush()
                if self.transport is not None:
                    self.transport.close()
            else:
                self.owner.upper_layer_event(event)
        self._flush()

    def _flush(self) -> None:
        chunks = self.upper.data_to_send()
        if chunks and self.transport is not None and not self.transport.is_closing():
            for chunk in chunks:
                self.bytes_out += len(chunk)
            self.transport.writelines(chunks)

    def _start_artim(self) -> None:
        self._stop_artim()
        self._artim = self.loop.call_later(self.artim_timeout, self._artim_expired)

    def _stop_artim(self) -> None:
        if self._artim is not None:
            self._artim.cancel()
            self._artim = None

    def _artim_expired(self) -> None:
        self._artim = None
        if self.on_timeout is not None:
            self.on_timeout("ARTIM timer expired")
        self._run(self.upper.artim_expired())

    def _arm_watch(self) -> None:
        period = min(t for t in (self.idle_timeout, self.dimse_timeout, 3600.0) if t > 0)
        self._watch = self.loop.call_later(period, self._check_activity)

    def _check_activity(self) -> None:
        self._watch = None
        if self.transport is None or self.upper.is_closed:
            return
        if self.upper.is_established and not self._paused_reading:
            # Waiting on the peer mid-message: DIMSE timeout. Idle between messages with
            # nothing being served: idle timeout. Serving a request: the service's business.
            limit = 0.0
            if self.in_message:
                limit, what = self.dimse_timeout, "DIMSE timeout"
            elif not self.busy:
                limit, what = self.idle_timeout, "idle timeout"
            if limit > 0 and self.loop.time() - self._last_activity >= limit:
                if self.on_timeout is not None:
                    self.on_timeout(f"{what} after {limit:g} s")
                self.abort()
                return
        self._arm_watch()

    def _cancel_timers(self) -> None:
        self._stop_artim()
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
