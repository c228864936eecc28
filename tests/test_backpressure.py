"""Backpressure: a service that consumes a data set slowly makes the transport stop
reading, so memory stays bounded, and every byte still arrives intact. In-process: a test
service on a real listening socket, our requestor as the client."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from typing import Any, ClassVar

from dicomd import association as association_module
from dicomd.acceptor import AcceptorAssociation, Counters, Generation
from dicomd.association import associate
from dicomd.config import parse_config
from dicomd.net import dimse
from dicomd.services.base import Offer, Service, ServiceContext
from dicomd.services.registry import Registry
from dicomd.services.verification import VerificationService
from dicomd.transport import Link

SLOW_SOP_CLASS = "1.2.826.0.1.3680043.9.9999.1"  # a private test abstract syntax
EXPLICIT = "1.2.840.10008.1.2.1"


class SlowSink(Service):
    name: ClassVar[str] = "slowsink"
    permissions: ClassVar[tuple[str, ...]] = ("store",)
    seen: ClassVar[dict[str, Any]] = {}

    def offers(self) -> list[Offer]:
        return [Offer(SLOW_SOP_CLASS, (EXPLICIT,))]

    async def handle(self, association: Any, request: Any) -> None:
        digest = hashlib.sha256()
        peak = 0
        async for fragment in request.dataset:
            peak = max(peak, request.dataset._buffered + len(fragment))
            digest.update(fragment)
            await asyncio.sleep(0.002)  # a slow disk
        self.seen.update(sha256=digest.hexdigest(), peak=peak, size=request.dataset.size)
        await association.respond(request, status=0)


async def run_server(config: Any, registry: Registry) -> tuple[asyncio.Server, int]:
    ae = config.local_aes[0]
    services = {ae.ae_title: {"slowsink": SlowSink(SlowSink.Options(), ServiceContext(config, ae))}}
    generation = Generation(config, services, Counters())

    def factory() -> Link:
        return Link(
            AcceptorAssociation(generation, "dicom"),
            requestor=False,
            max_pdu_length=config.limits.max_pdu_length,
            artim_timeout=30,
            dimse_timeout=30,
            idle_timeout=30,
        )

    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_slow_consumer_pauses_reading(monkeypatch: Any) -> None:
    pauses: list[int] = []
    original = Link.pause_reading

    def counting_pause(self: Link) -> None:
        if not self.upper.requestor:
            pauses.append(1)
        original(self)

    monkeypatch.setattr(Link, "pause_reading", counting_pause)
    registry = Registry({"slowsink": SlowSink})
    config = parse_config(
        {
            "listeners": [{"name": "dicom", "address": "127.0.0.1", "port": 11112}],
            "local_aes": [{"ae_title": "SINK", "services": {"slowsink": None}}],
            "access": {"default": "allow"},
            "limits": {"max_pdu_length": 65536},
        },
        registry=registry,
    )
    payload = os.urandom(40 * 1024 * 1024)

    async def main() -> int:
        server, port = await run_server(config, registry)
        try:
            assoc = await associate(
                "127.0.0.1",
                port,
                calling_ae="BIGSENDER",
                called_ae="SINK",
                contexts=[(SLOW_SOP_CLASS, [EXPLICIT])],
                max_pdu_length=65536,
            )
            fields = dimse.c_store_rq(1, SLOW_SOP_CLASS, "1.2.3.4")
            status = -1
            async for response in assoc.request(
                assoc.context_for(SLOW_SOP_CLASS), fields, payload, timeout=120
            ):
                status = response.status
            await assoc.release()
            return status
        finally:
            server.close()
            await server.wait_closed()

    assert asyncio.run(main()) == 0
    assert SlowSink.seen["size"] == len(payload)
    assert SlowSink.seen["sha256"] == hashlib.sha256(payload).hexdigest()
    assert pauses, "the transport never paused reading"
    # Buffered data stays near the high-water mark, far below the 40 MiB sent.
    assert SlowSink.seen["peak"] < association_module.STREAM_HIGH_WATER + 2 * 1024 * 1024


class SmallBufferLink(Link):
    """A server link with tiny socket and transport buffers, so that a client that stops
    reading makes it pause writing after a few hundred responses."""

    paused: ClassVar[list[int]] = []

    def connection_made(self, transport: Any) -> None:
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        transport.set_write_buffer_limits(high=4096)
        super().connection_made(transport)

    def pause_writing(self) -> None:
        self.paused.append(1)
        super().pause_writing()


async def serve(
    service_class: type[Service],
    ae_title: str,
    link_class: type[Link] = Link,
    dimse_timeout: float = 30,
) -> tuple[asyncio.Server, int]:
    """One service on a local AE on a loopback port, connections served by ``link_class``."""
    registry = Registry({service_class.name: service_class})
    config = parse_config(
        {
            "listeners": [{"name": "dicom", "address": "127.0.0.1", "port": 11112}],
            "local_aes": [{"ae_title": ae_title, "services": {service_class.name: None}}],
            "access": {"default": "allow"},
        },
        registry=registry,
    )
    ae = config.local_aes[0]
    service = service_class(service_class.Options(), ServiceContext(config, ae))
    generation = Generation(config, {ae.ae_title: {service_class.name: service}}, Counters())

    def factory() -> Link:
        return link_class(
            AcceptorAssociation(generation, "dicom"),
            requestor=False,
            max_pdu_length=config.limits.max_pdu_length,
            artim_timeout=30,
            dimse_timeout=dimse_timeout,
            idle_timeout=30,
        )

    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def echo_server(
    link_class: type[Link], dimse_timeout: float = 30
) -> tuple[asyncio.Server, int]:
    """A Verification SCP (called AE title ECHO)."""
    return await serve(VerificationService, "ECHO", link_class, dimse_timeout)


async def non_reading_client(port: int, calling_ae: str) -> tuple[Any, int]:
    """An association to ``echo_server`` whose side has stopped reading (a tiny receive
    buffer, reading paused), and its Verification context ID."""
    assoc = await associate(
        "127.0.0.1",
        port,
        calling_ae=calling_ae,
        called_ae="ECHO",
        contexts=[(dimse.VERIFICATION, [EXPLICIT])],
    )
    sock = assoc.link.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    assoc.link.pause_reading()
    return assoc, assoc.context_for(dimse.VERIFICATION)


def test_echo_answered_inline_waits_for_a_full_socket_buffer() -> None:
    """C-ECHO is answered inside the data_received callback (answer_inline); when the
    peer stops reading and the server's writes pause, the server stops reading too, and
    the answers wait in its write buffer. Every pipelined request still gets its
    response, in order."""
    count = 2000

    async def main() -> list[int]:
        server, port = await echo_server(SmallBufferLink)
        try:
            assoc, context_id = await non_reading_client(port, "PIPELINER")

            async def echo(message_id: int) -> tuple[int, int]:
                fields = dimse.c_echo_rq(message_id)
                async for response in assoc.request(context_id, fields, timeout=60):
                    return message_id, response.status
                return message_id, -1

            tasks = [asyncio.create_task(echo(i)) for i in range(1, count + 1)]
            for _ in range(1000):
                if SmallBufferLink.paused:
                    break
                await asyncio.sleep(0.01)
            assoc.link.resume_reading()
            results = await asyncio.gather(*tasks)
            await assoc.release()
            assert [m for m, _ in results] == list(range(1, count + 1))
            return [status for _, status in results]
        finally:
            server.close()
            await server.wait_closed()

    statuses = asyncio.run(main())
    assert SmallBufferLink.paused, "the server never paused writing: the test proves nothing"
    assert statuses == [0] * count


LATE_SOP_CLASS = "1.2.826.0.1.3680043.9.9999.2"  # a private test abstract syntax


class SometimesInline(Service):
    """Answers even message IDs inside data_received (answer_inline), leaves odd ones to
    handle() in a task, which waits first; message ID 7 makes answer_inline fail."""

    name: ClassVar[str] = "sometimesinline"
    permissions: ClassVar[tuple[str, ...]] = ("echo",)
    inline: ClassVar[list[int]] = []

    def offers(self) -> list[Offer]:
        return [Offer(LATE_SOP_CLASS, (EXPLICIT,))]

    def answer_inline(self, association: Any, request: Any) -> bool:
        message_id = request.command.message_id
        if message_id == 7:
            raise RuntimeError("a bug in answer_inline")
        if message_id % 2:
            return False
        self.inline.append(message_id)
        association.respond_now(request, status=0x0000)
        return True

    async def handle(self, association: Any, request: Any) -> None:
        await asyncio.sleep(0.001)
        await asyncio.sleep(0)
        await association.respond(request, status=0x0000)


def test_inline_answers_tasks_and_failures_on_one_association() -> None:
    async def main() -> list[int]:
        server, port = await serve(SometimesInline, "LATE")
        try:
            assoc = await associate(
                "127.0.0.1",
                port,
                calling_ae="WAITER",
                called_ae="LATE",
                contexts=[(LATE_SOP_CLASS, [EXPLICIT])],
            )
            context_id = assoc.context_for(LATE_SOP_CLASS)
            statuses = []
            for message_id in range(1, 10):
                fields = dimse.c_echo_rq(message_id, LATE_SOP_CLASS)
                async for response in assoc.request(context_id, fields, timeout=10):
                    statuses.append(response.status)
            await assoc.release(timeout=10)
            return statuses
        finally:
            server.close()
            await server.wait_closed()

    SometimesInline.inline.clear()
    statuses = asyncio.run(main())
    # 7 failed inside answer_inline: a processing failure, and the association went on.
    assert statuses == [0, 0, 0, 0, 0, 0, 0x0110, 0, 0]
    assert SometimesInline.inline == [2, 4, 6, 8]


class WatchedLink(SmallBufferLink):
    """SmallBufferLink that remembers its instances, so the test can look at the server's."""

    links: ClassVar[list[Link]] = []

    def connection_made(self, transport: Any) -> None:
        self.links.append(self)
        super().connection_made(transport)


def test_peer_that_does_not_read_is_not_buffered_without_bound_and_is_dropped() -> None:
    """A peer pipelines C-ECHO-RQs far past the (1,1) window and never reads the answers.
    Once the server's writes pause it stops reading that peer, so the answers it queues stay
    bounded; after the DIMSE timeout with nothing taken it drops the connection."""
    from dicomd.transport import _FOR_WRITES

    count = 40_000

    async def main() -> None:
        server, port = await echo_server(WatchedLink, dimse_timeout=1.0)
        try:
            assoc, context_id = await non_reading_client(port, "NOREADER")
            # Straight to the socket: the requestor API would wait for each answer.
            requests = b"".join(
                bytes(chunk)
                for i in range(1, count + 1)
                for chunk in dimse.fragment_message(
                    context_id, dimse.encode_command(dimse.c_echo_rq(i)), None, 0
                )
            )
            assoc.link.transport.write(requests)
            link = WatchedLink.links[-1]
            for _ in range(1000):
                if link._read_pauses & _FOR_WRITES:
                    break
                await asyncio.sleep(0.01)
            assert link._read_pauses & _FOR_WRITES, "the server never paused writing"
            started = asyncio.get_running_loop().time()
            await asyncio.sleep(0.3)
            queued = link.transport.get_write_buffer_size()
            read = link.bytes_in
            await asyncio.sleep(0.2)
            assert link.bytes_in == read, "the server went on reading a peer that does not read"
            assert read < len(requests) // 2, (read, len(requests))
            # Bounded by one read's worth of answers, not by what the peer sends (~4 MB).
            assert queued < 1 << 20, queued
            await asyncio.wait_for(asyncio.shield(link.closed), 10)
            assert asyncio.get_running_loop().time() - started >= 0.6
            # The client, reading again, finds the connection reset.
            assoc.link.resume_reading()
            await asyncio.wait_for(asyncio.shield(assoc.link.closed), 10)
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())
