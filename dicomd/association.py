"""Associations as the services and the CLI see them: DIMSE messages in, DIMSE messages out.

An ``Association`` sits on one ``transport.Link``. It turns upper-layer data indications into
DIMSE messages (``net.dimse.MessageAssembler``), hands each request to its service as a
``Request`` whose data set arrives as a stream of fragments, and sends responses fragmented
to the peer's maximum PDU length. ``AcceptorAssociation`` adds the A-ASSOCIATE decision;
``RequestorAssociation`` adds the client API (``associate()``, ``echo()``, ``request()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl as ssl_module
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from dicomd.logging import Logger, get_logger
from dicomd.net import dimse
from dicomd.net import events as ev
from dicomd.net.acse_codec import encode_rq
from dicomd.net.negotiation import (
    AcceptedContext,
    AssociationAccept,
    ProposedContext,
    UserIdentity,
    parse_accept,
)
from dicomd.transport import Link

if TYPE_CHECKING:
    from dicomd.services.base import Service

_assoc_ids = itertools.count(1)
_LEVEL_PROBE = get_logger("dicomd.association")  # see Association.logs

# Above this many buffered data set bytes the socket stops being read until the service
# catches up; below the low mark reading resumes.
STREAM_HIGH_WATER = 4 * 1024 * 1024
STREAM_LOW_WATER = 1 * 1024 * 1024

STATUS_SUCCESS = 0x0000
STATUS_PROCESSING_FAILURE = 0x0110
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_UNRECOGNIZED_OPERATION = 0x0211


class AssociationError(Exception):
    """The association could not be established or ended abnormally."""


class AssociationRejected(AssociationError):
    def __init__(self, result: int, source: int, reason: int) -> None:
        self.result, self.source, self.reason = result, source, reason
        super().__init__(describe_reject(result, source, reason))


class AssociationAborted(AssociationError):
    pass


_RJ_REASONS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognized",
    (1, 7): "called AE title not recognized",
    (2, 1): "no reason given",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}
_RJ_SOURCES = {
    1: "service-user",
    2: "service-provider (ACSE)",
    3: "service-provider (presentation)",
}


def describe_reject(result: int, source: int, reason: int) -> str:
    kind = {1: "permanent", 2: "transient"}.get(result, f"result {result}")
    why = _RJ_REASONS.get((source, reason), f"reason {reason}")
    return f"association rejected ({kind}, {_RJ_SOURCES.get(source, source)}): {why}"


_ABORT_REASONS = {
    0: "reason not specified",
    1: "unrecognized PDU",
    2: "unexpected PDU",
    4: "unrecognized PDU parameter",
    5: "unexpected PDU parameter",
    6: "invalid PDU parameter value",
}


def describe_abort(event: ev.AbortIndication) -> str:
    who = "we" if event.local else "peer"
    src = "service-user" if event.source == ev.ABORT_SOURCE_USER else "service-provider"
    text = f"{who} aborted ({src}, {_ABORT_REASONS.get(event.reason, event.reason)})"
    return f"{text}: {event.detail}" if event.detail else text


class DatasetStream:
    """The data set of one incoming message, fragment by fragment, with backpressure."""

    def __init__(self, association: Association) -> None:
        self._association = association
        self._fragments: deque[bytes | memoryview] = deque()
        self._buffered = 0
        self._complete = False
        self._failed: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.size = 0

    # producer side (the association)
    def _feed(self, data: bytes | memoryview, last: bool) -> None:
        self._fragments.append(data)
        self._buffered += len(data)
        self.size += len(data)
        self._complete = last
        if self._buffered > STREAM_HIGH_WATER:
            self._association.link.pause_reading()
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        self._failed = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # consumer side (the service)
    def __aiter__(self) -> AsyncIterator[bytes | memoryview]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes | memoryview]:
        while True:
            while self._fragments:
                data = self._fragments.popleft()
                self._buffered -= len(data)
                if self._buffered < STREAM_LOW_WATER:
                    self._association.link.resume_reading()
                yield data
            if self._complete:
                return
            if self._failed is not None:
                raise self._failed
            self._waiter = self._association.link.loop.create_future()
            await self._waiter
            self._waiter = None

    async def read_all(self) -> bytes:
        parts = [bytes(p) async for p in self]
        return b"".join(parts)


@dataclass(eq=False, slots=True)
class Request:
    """One incoming DIMSE request."""

    association: Association
    context: AcceptedContext
    command: dimse.Command
    dataset: DatasetStream | None
    received_at: float
    responded: bool = False
    _cancelled: asyncio.Event | None = field(default=None, repr=False)
    _cancel_requested: bool = field(default=False, repr=False)

    @property
    def cancelled(self) -> asyncio.Event:
        """Set once the peer sends a C-CANCEL-RQ for this request or the association ends.

        Made on first use: only long requests (C-FIND, C-MOVE, C-GET) look at it, and an
        Event per request was a measurable share of a C-ECHO."""
        event = self._cancelled
        if event is None:
            event = self._cancelled = asyncio.Event()
            if self._cancel_requested:
                event.set()
        return event

    def cancel(self) -> None:
        """Set ``cancelled`` (now, or when it is first made)."""
        self._cancel_requested = True
        if self._cancelled is not None:
            self._cancelled.set()


@dataclass(frozen=True)
class Response:
    """One DIMSE response received by a requestor; ``dataset`` is its raw encoded data set."""

    command: dimse.Command
    dataset: bytes | None

    @property
    def status(self) -> int:
        return int(self.command.status or 0)

    @property
    def is_pending(self) -> bool:
        return self.status in (0xFF00, 0xFF01)


class _ResponseCollector:
    """Gathers the (small) data set of an incoming response before handing it on."""

    def __init__(self, queue: asyncio.Queue[Response | BaseException], command: dimse.Command):
        self.queue = queue
        self.command = command
        self.parts: list[bytes] = []

    def feed(self, data: bytes | memoryview, last: bool) -> None:
        self.parts.append(bytes(data))
        if last:
            self.queue.put_nowait(Response(self.command, b"".join(self.parts)))


class Association:
    """DIMSE over one upper-layer connection; subclasses decide how it is established."""

    role = "association"

    # Immutable starting values live on the class: an instance assigns its own when they
    # change, and a short association does not pay for setting them all up.
    _log: Logger | None = None
    calling_ae = ""
    called_ae = ""
    peer_max_pdu_length = 0
    peer_implementation = ("", "")
    _established: asyncio.Future[None] | None = None
    messages_in = 0
    messages_out = 0
    _assembler: dimse.MessageAssembler | None = None
    _incoming: DatasetStream | _ResponseCollector | None = None
    _message_ids: Iterator[int] | None = None
    _end_reason = ""
    # How establishment ended: None (not yet), True (established) or the exception.
    _establish_outcome: bool | BaseException | None = None

    def __init__(self) -> None:
        self.id = next(_assoc_ids)
        self.link: Link = None  # type: ignore[assignment]  # set in connection_started
        self.contexts: dict[int, AcceptedContext] = {}
        self.started = time.monotonic()
        self._in_flight: dict[int, Request] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._responses: dict[int, asyncio.Queue[Response | BaseException]] = {}

    @property
    def established(self) -> asyncio.Future[None]:
        """Done when the association is established; fails if it never is.

        Made on first use, on the link's loop once there is a link: acceptors never wait
        on it, and asking asyncio for the running loop costs a getpid() system call."""
        future = self._established
        if future is None:
            loop = self.link.loop if self.link is not None else asyncio.get_running_loop()
            future = self._established = loop.create_future()
            outcome = self._establish_outcome
            if outcome is True:
                future.set_result(None)
            elif outcome is not None:
                future.set_exception(outcome)
                future.exception()  # mark retrieved: the requestor re-raises it itself
        return future

    # -- logging -------------------------------------------------------------------------

    @property
    def log(self) -> Logger:
        """This association's logger, bound to the DICOM_* fields known so far.

        Built on first use and again after the fields change (``_log_context``): most
        associations log nothing at the configured level, and three binds were a
        measurable part of a short one."""
        log = self._log
        if log is None:
            log = self._log = get_logger("dicomd.association", **self._log_context())
        return log

    def logs(self, level: str) -> bool:
        """Whether ``self.log`` emits ``level``, without building it: a guard for log lines
        whose arguments cost something (it is the same logger name, so the same level)."""
        return _LEVEL_PROBE.is_enabled_for(level)

    def _log_context(self) -> dict[str, Any]:
        """The bound fields, in the order they are learnt (journal DICOM_* fields)."""
        context: dict[str, Any] = {}
        if self.link is not None:
            peer = self.link.peer
            context["dicom_assoc_id"] = self.id
            context["dicom_peer"] = f"{peer[0]}:{peer[1]}"
        return context

    # -- ConnectionOwner ---------------------------------------------------------------

    def connection_started(self, link: Link) -> None:
        self.link = link
        link.on_timeout = self._timed_out
        self._log = None  # the peer is known now

    def upper_layer_event(self, event: ev.Event) -> None:
        kind = type(event)
        if kind is ev.DataIndication:
            self._on_data(event)  # type: ignore[arg-type]
        elif kind is ev.AssociateIndication:
            self.on_associate_indication(event)  # type: ignore[arg-type]
        elif kind is ev.AssociateAccepted:
            self.on_associate_accepted(event)  # type: ignore[arg-type]
        elif kind is ev.AssociateRejected:
            rj = event.reject  # type: ignore[union-attr]
            self._fail_established(AssociationRejected(rj.result, rj.source, rj.reason_diagnostic))
        elif kind is ev.ReleaseIndication:
            self.on_release_indication(event)  # type: ignore[arg-type]
        elif kind is ev.ReleaseConfirmed:
            self._end_reason = self._end_reason or "released"
            self._maybe_release()
        elif kind is ev.AbortIndication:
            self._on_abort(event)  # type: ignore[arg-type]
        elif kind is ev.ConnectionClosed:
            self._on_closed()

    # -- establishment hooks -------------------------------------------------------------

    def on_associate_indication(self, event: ev.AssociateIndication) -> None:
        raise NotImplementedError  # acceptors only

    def on_associate_accepted(self, event: ev.AssociateAccepted) -> None:
        raise NotImplementedError  # requestors only

    def on_release_indication(self, event: ev.ReleaseIndication) -> None:
        self._end_reason = "released by peer"
        self._release_when_idle = True
        self._maybe_release()

    _release_when_idle = False

    def _maybe_release(self) -> None:
        # In a release collision the acceptor answers only after its own request is
        # confirmed (Sta10 → Sta12, PS3.8 AR-10); can_release_response says when.
        if (
            self._release_when_idle
            and not self._in_flight
            and self._incoming is None
            and self.link.upper.can_release_response
        ):
            self._release_when_idle = False
            self.link.release_response()

    def _set_established(self, contexts: dict[int, AcceptedContext]) -> None:
        self.contexts = contexts
        self._assembler = dimse.MessageAssembler(contexts.keys())
        if self._establish_outcome is None:
            self._establish_outcome = True
            if self._established is not None:
                self._established.set_result(None)

    def _fail_established(self, exc: BaseException) -> None:
        if self._establish_outcome is None:
            self._establish_outcome = exc
            if self._established is not None:
                self._established.set_exception(exc)
                self._established.exception()  # marked retrieved: the requestor re-raises it

    # -- incoming messages ---------------------------------------------------------------

    def _on_data(self, event: ev.DataIndication) -> None:
        assert self._assembler is not None
        try:
            messages = self._assembler.receive(event.pdvs)
        except dimse.DimseProtocolError as exc:
            self.log.warning("dimse_protocol_error", error=str(exc))
            self._end_reason = f"aborted: {exc}"
            self.link.abort(getattr(exc, "reason", 0))
            return
        except dimse.DimseError as exc:
            self.log.warning("dimse_undecodable_command", error=str(exc))
            self._end_reason = f"aborted: {exc}"
            self.link.abort(0)
            return
        for message in messages:
            if type(message) is dimse.DatasetFragment:
                incoming = self._incoming
                if incoming is not None:
                    if isinstance(incoming, DatasetStream):
                        incoming._feed(message.data, message.is_last)
                    else:
                        incoming.feed(message.data, message.is_last)
                if message.is_last:
                    self._incoming = None
                    self._maybe_release()
            else:
                self._on_command(message.context_id, message.command)
        # While a message is incomplete we wait on the peer: the DIMSE timeout applies.
        self.link.in_message = self._assembler.in_message

    def _on_command(self, context_id: int, command: dimse.Command) -> None:
        self.messages_in += 1
        # decode_command guarantees an int Command Field; read it once.
        command_field = command.fields[0x0100]
        if command_field & dimse.RESPONSE_BIT:
            queue = self._responses.get(int(command.message_id_being_responded_to or 0))
            if queue is None:
                self.log.warning(
                    "unexpected_response",
                    message_id=command.message_id_being_responded_to,
                    command_field=hex(command.command_field),
                )
                if command.has_dataset:
                    self._incoming = _ResponseCollector(asyncio.Queue(), command)
                return
            if command.has_dataset:
                self._incoming = _ResponseCollector(queue, command)
            else:
                queue.put_nowait(Response(command, None))
            return
        if command_field == dimse.C_CANCEL_RQ:
            target = self._in_flight.get(int(command.message_id_being_responded_to or 0))
            if target is not None:
                target.cancel()
            return
        context = self.contexts[context_id]
        stream = DatasetStream(self) if command.has_dataset else None
        request = Request(self, context, command, stream, time.monotonic())
        if stream is not None:
            self._incoming = stream
        try:
            service = self.service_for(request)
        except Exception as exc:  # answered in _serve, as a failing service would be
            service = cast("Service", _Unserviceable(exc))
        if stream is None and service is not None and self._answered_inline(service, request):
            return
        self._in_flight[int(command.message_id or 0)] = request
        self.link.busy = True
        coro: Coroutine[Any, Any, None] = self._serve(request, service)
        task = self.link.loop.create_task(coro)  # get_running_loop() costs a getpid()
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def service_for(self, request: Request) -> Service | None:
        """The service that handles requests on this context (acceptors override)."""
        return None

    def _answered_inline(self, service: Service, request: Request) -> bool:
        """Let the service answer inside this data_received callback
        (``Service.answer_inline``, C-ECHO): a task and its trip through the event loop
        would cost more than the answer. A failure there is answered as in ``_serve``."""
        try:
            return service.answer_inline(self, request)
        except (ConnectionError, AssociationError):
            return True  # the association is gone; the close is logged once elsewhere
        except Exception as exc:
            self._log_service_failure(request, exc)
            if not request.responded and self.link.upper.is_established:
                with contextlib.suppress(ConnectionError, AssociationError):
                    self.respond_now(
                        request, status=STATUS_PROCESSING_FAILURE, error_comment="internal error"
                    )
            return True

    def _log_service_failure(self, request: Request, exc: Exception) -> None:
        self.log.error(
            "service_failed",
            error=repr(exc),
            command_field=hex(request.command.command_field),
            exc_info=True,  # called inside the except block
        )

    async def _serve(self, request: Request, service: Service | None) -> None:
        try:
            if service is None:
                await self.respond(request, status=STATUS_UNRECOGNIZED_OPERATION)
            else:
                await service.handle(self, request)
                if not request.responded:
                    raise RuntimeError(f"service {service.name!r} returned without a response")
        except (ConnectionError, AssociationError):
            pass  # the association is gone; the close is logged once elsewhere
        except Exception as exc:
            self._log_service_failure(request, exc)
            if not request.responded and not self.link.upper.is_closed:
                try:
                    await self.respond(
                        request, status=STATUS_PROCESSING_FAILURE, error_comment="internal error"
                    )
                except (ConnectionError, AssociationError):
                    pass
        finally:
            self._in_flight.pop(int(request.command.message_id or 0), None)
            self.link.busy = bool(self._in_flight)
            self.link.touch()
            if not self.link.upper.is_closed:
                self._maybe_release()

    # -- outgoing messages ---------------------------------------------------------------

    async def send_message(
        self,
        context_id: int,
        fields: dict[int, Any],
        dataset: bytes | memoryview | None = None,
    ) -> None:
        self._send_now(context_id, fields, dataset)
        await self.link.drain()

    def _send_now(
        self, context_id: int, fields: dict[int, Any], dataset: bytes | memoryview | None
    ) -> None:
        if not self.link.upper.is_established:
            raise AssociationAborted(self._end_reason or "association is not established")
        command = dimse.encode_command(fields)
        chunks = dimse.fragment_message(context_id, command, dataset, self.peer_max_pdu_length)
        self.link.send_data(chunks)
        self.messages_out += 1

    async def send_image(
        self, context_id: int, fields: dict[int, Any], image: tuple[bytearray, int]
    ) -> None:
        """Send a message whose data-set PDUs are already laid out in a buffer after some
        spare bytes (``dimse.pdata_image``, for this association's peer maximum PDU
        length and ``context_id``): the command PDU is written into the spare bytes when it
        fits, so the message is one contiguous write that no one copies."""
        if not self.link.upper.is_established:
            raise AssociationAborted(self._end_reason or "association is not established")
        buf, head_room = image
        command = dimse.encode_command(fields)
        first = dimse.fragment_message(context_id, command, None, self.peer_max_pdu_length)
        if len(first) == 1 and len(first[0]) <= head_room:
            start = head_room - len(first[0])
            buf[start:head_room] = first[0]
            chunks: list[bytes | memoryview] = [memoryview(buf)[start:]]
        else:
            chunks = [*first, memoryview(buf)[head_room:]]
        self.link.send_data(chunks)
        self.messages_out += 1
        await self.link.drain()

    async def respond(
        self,
        request: Request,
        status: int,
        dataset: bytes | memoryview | None = None,
        **extra: Any,
    ) -> None:
        """Send the response to ``request`` (pending responses may precede the final one)."""
        fields = dimse.response_for(
            request.command, status, has_dataset=dataset is not None, **extra
        )
        if status not in (0xFF00, 0xFF01):
            request.responded = True
        await self.send_message(request.context.context_id, fields, dataset)

    def respond_now(self, request: Request, status: int, **extra: Any) -> None:
        """Send the final response to ``request`` (no data set) without waiting: for
        ``Service.answer_inline``. The bytes join the socket's write buffer; a peer that
        stops reading gets its reading paused (``Link.pause_writing``), so what we queue
        stays bounded by what one read brought in."""
        fields = dimse.response_for(request.command, status, has_dataset=False, **extra)
        request.responded = True
        self._send_now(request.context.context_id, fields, None)

    async def respond_pending(
        self, request: Request, datasets: Sequence[bytes], status: int = 0xFF00
    ) -> None:
        """Send several pending responses (C-FIND matches) in one write.

        They share one command set, encoded once; batching saves a system call and a
        state-machine pass per match, which dominates a query with many matches.
        """
        if not datasets:
            return
        if not self.link.upper.is_established:
            raise AssociationAborted(self._end_reason or "association is not established")
        command = dimse.encode_command(
            dimse.response_for(request.command, status, has_dataset=True)
        )
        context_id, max_pdu = request.context.context_id, self.peer_max_pdu_length
        chunks: list[bytes | memoryview] = []
        for dataset in datasets:
            chunks.extend(dimse.fragment_message(context_id, command, dataset, max_pdu))
        self.link.send_data(chunks)
        self.messages_out += len(datasets)
        await self.link.drain()

    async def request(
        self,
        context_id: int,
        fields: dict[int, Any],
        dataset: bytes | memoryview | None = None,
        *,
        timeout: float | None = None,
        image: tuple[bytearray, int] | None = None,
    ) -> AsyncIterator[Response]:
        """Send a request and yield its responses (pending ones, then the final one).

        ``image``: the data set as laid-out PDUs instead of ``dataset`` (``send_image``)."""
        message_id = int(fields[dimse.TAG_BY_KEYWORD["message_id"]])
        queue: asyncio.Queue[Response | BaseException] = asyncio.Queue()
        self._responses[message_id] = queue
        try:
            if image is not None:
                await self.send_image(context_id, fields, image)
            else:
                await self.send_message(context_id, fields, dataset)
            while True:
                # Responses that already arrived are taken without a timer: wait_for costs
                # a task per call, which dominated queries with many matches.
                if queue.empty():
                    item = await asyncio.wait_for(queue.get(), timeout)
                else:
                    item = queue.get_nowait()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if not item.is_pending:
                    return
        finally:
            self._responses.pop(message_id, None)

    def next_message_id(self) -> int:
        ids = self._message_ids
        if ids is None:
            ids = self._message_ids = itertools.cycle(range(1, 65536))
        return next(ids)

    def abort(self) -> None:
        self._end_reason = self._end_reason or "aborted by us"
        self.link.abort()

    # -- endings -------------------------------------------------------------------------

    def _timed_out(self, what: str) -> None:
        self._end_reason = f"aborted: {what}"
        self.log.warning("association_timeout", reason=what)

    def _on_abort(self, event: ev.AbortIndication) -> None:
        text = describe_abort(event)
        if not self._end_reason.startswith("aborted"):
            self._end_reason = text
        exc = AssociationAborted(text)
        self._fail_established(exc)
        self._fail_pending(exc)

    def _fail_pending(self, exc: BaseException) -> None:
        if isinstance(self._incoming, DatasetStream):
            self._incoming._fail(exc)
        self._incoming = None
        for queue in self._responses.values():
            queue.put_nowait(exc)
        for request in self._in_flight.values():
            if request.dataset is not None:
                request.dataset._fail(exc)
            request.cancel()

    def _on_closed(self) -> None:
        if (
            self._establish_outcome is None
            or self._incoming is not None
            or self._responses
            or self._in_flight
        ):  # someone waits: tell them why (a released association has no one waiting)
            exc = AssociationAborted(self._end_reason or "connection closed")
            self._fail_established(exc)
            self._fail_pending(exc)
        self.on_closed()

    def on_closed(self) -> None:
        """Called once, when the connection is gone. Subclasses log and count."""

    def summary(self) -> dict[str, Any]:
        return {
            "duration_s": round(time.monotonic() - self.started, 6),
            "messages_in": self.messages_in,
            "messages_out": self.messages_out,
            "bytes_in": self.link.bytes_in if self.link else 0,
            "bytes_out": self.link.bytes_out if self.link else 0,
        }


class _Unserviceable:
    """Stands in when finding the service for a request failed (a bug): ``_serve`` logs it
    and answers with a processing failure."""

    name = "service_for"

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def answer_inline(self, association: Association, request: Request) -> bool:
        return False

    async def handle(self, association: Association, request: Request) -> None:
        raise self.exc


class _HandlerService:
    """Adapts a requestor's ``store_handler`` to what ``Association._serve`` calls."""

    name = "store_handler"

    def __init__(self, handler: Callable[[Request], Any]) -> None:
        self.handler = handler

    def answer_inline(self, association: Association, request: Request) -> bool:
        return False

    async def handle(self, association: Association, request: Request) -> None:
        await self.handler(request)


class RequestorAssociation(Association):
    """The client side: ``await associate(...)`` returns one of these, established."""

    role = "requestor"

    def __init__(self, rq_contexts: Sequence[ProposedContext], rq: bytes) -> None:
        super().__init__()
        self._proposed = tuple(rq_contexts)
        self._rq = rq
        self.accept: AssociationAccept | None = None
        self.store_handler: Callable[[Request], Any] | None = None

    def _log_context(self) -> dict[str, Any]:
        context = super()._log_context()
        context["dicom_calling_ae"] = self.calling_ae
        context["dicom_called_ae"] = self.called_ae
        return context

    def on_associate_accepted(self, event: ev.AssociateAccepted) -> None:
        self.accept = parse_accept(event.accept, self._proposed)
        self.peer_max_pdu_length = self.accept.max_pdu_length
        self.peer_implementation = (
            self.accept.implementation_class_uid,
            self.accept.implementation_version_name,
        )
        self._set_established(self.accept.accepted)

    def service_for(self, request: Request) -> Service | None:
        """C-STORE sub-operations of a C-GET go to ``store_handler`` (it must respond)."""
        if self.store_handler is None or request.command.command_field != dimse.C_STORE_RQ:
            return None
        return cast("Service", _HandlerService(self.store_handler))

    def context_for(self, abstract_syntax: str, transfer_syntax: str | None = None) -> int:
        for cx in self.contexts.values():
            if cx.abstract_syntax == abstract_syntax and (
                transfer_syntax is None or cx.transfer_syntax == transfer_syntax
            ):
                return cx.context_id
        raise AssociationError(f"no accepted presentation context for {abstract_syntax}")

    async def echo(self, *, timeout: float | None = None) -> int:
        context_id = self.context_for(dimse.VERIFICATION)
        status = -1
        fields = dimse.c_echo_rq(self.next_message_id())
        async for response in self.request(context_id, fields, timeout=timeout):
            status = response.status
        return status

    async def release(self, timeout: float = 30.0) -> None:
        if self.link.upper.is_closed:
            return
        if self.link.upper.can_release:
            self.link.release_request()
        try:
            await asyncio.wait_for(asyncio.shield(self.link.closed), timeout)
        except TimeoutError:
            self.link.abort()
            raise

    def on_closed(self) -> None:
        self.log.debug("association_closed", reason=self._end_reason, **self.summary())


async def associate(
    host: str,
    port: int,
    *,
    calling_ae: str,
    called_ae: str,
    contexts: Sequence[tuple[str, Sequence[str]]],
    max_pdu_length: int = 65536,
    roles: dict[str, tuple[bool, bool]] | None = None,
    extended_negotiation: dict[str, bytes] | None = None,
    user_identity: UserIdentity | None = None,
    ssl: ssl_module.SSLContext | None = None,
    server_hostname: str | None = None,
    local_addr: tuple[str, int] | None = None,
    connect_timeout: float = 10.0,
    acse_timeout: float = 30.0,
    dimse_timeout: float = 60.0,
) -> RequestorAssociation:
    """Open an association; raises AssociationRejected / AssociationAborted / OSError,
    or ValueError for values that cannot be proposed (AE titles, UIDs).

    ``roles``: SCP/SCU role selection per SOP class, (scu, scp) for us (PS3.7 D.3.3.4);
    ``extended_negotiation``: SOP Class Extended Negotiation per SOP class, the service
    class application information (PS3.7 D.3.3.5): the acceptor's replies are in
    ``assoc.accept.extended_negotiation``; ``user_identity``: PS3.7 D.3.3.7;
    ``ssl``: a client context (``dicomd.tls.client_context``) for a TLS peer;
    ``local_addr``: the (address, port) to connect from (port 0: any).
    """
    proposed = [
        ProposedContext(2 * i + 1, abstract, tuple(ts)) for i, (abstract, ts) in enumerate(contexts)
    ]
    if len(proposed) > 128:
        raise ValueError("at most 128 presentation contexts can be proposed (PS3.8 9.3.2.2)")
    rq = encode_rq(
        calling_ae=calling_ae,
        called_ae=called_ae,
        contexts=proposed,
        max_pdu_length=max_pdu_length,
        roles=roles,
        extended_negotiation=extended_negotiation,
        user_identity=user_identity,
    )
    assoc = RequestorAssociation(proposed, rq)
    assoc.calling_ae, assoc.called_ae = calling_ae, called_ae
    loop = asyncio.get_running_loop()

    def factory() -> Link:
        link = Link(
            assoc,
            requestor=True,
            max_pdu_length=max_pdu_length,
            artim_timeout=acse_timeout,
            dimse_timeout=dimse_timeout,
        )
        # Evt1 (A-ASSOCIATE request) precedes the transport connection (AE-1, Sta4).
        link.associate_request(rq)
        return link

    await asyncio.wait_for(
        loop.create_connection(
            factory,
            host,
            port,
            ssl=ssl,
            server_hostname=server_hostname if ssl else None,
            local_addr=local_addr,
        ),
        connect_timeout,
    )
    try:
        await asyncio.wait_for(asyncio.shield(assoc.established), acse_timeout)
    except TimeoutError:
        assoc.link.abort()
        raise AssociationAborted("no A-ASSOCIATE response within the ACSE timeout") from None
    return assoc
