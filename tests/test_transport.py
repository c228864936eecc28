"""transport.Link over real loopback sockets, in process, with short timeouts: what the
event loops do for us (TCP_NODELAY) and the timers Link keeps (ARTIM, idle, DIMSE) on the
one timer handle they share."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import pytest
import uvloop
from pdu_fixtures import make_ac, make_rq

from dicomd.net import events as ev
from dicomd.net import pdu as P
from dicomd.transport import Link

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def run(loop_name: str, main: Callable[[], Any]) -> Any:
    loop = LOOPS[loop_name]()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


class Owner:
    """Records what the upper layer reports; accepts any A-ASSOCIATE-RQ."""

    def __init__(self, accept: bool = True) -> None:
        self.events: list[ev.Event] = []
        self.timeouts: list[str] = []
        self.accept = accept
        self.link: Link | None = None

    def connection_started(self, link: Link) -> None:
        self.link = link
        link.on_timeout = self.timeouts.append

    def upper_layer_event(self, event: ev.Event) -> None:
        self.events.append(event)
        assert self.link is not None
        if isinstance(event, ev.AssociateIndication) and self.accept:
            self.link.associate_accept(make_ac().encode())
        elif isinstance(event, ev.ReleaseIndication):
            self.link.release_response()


async def serve(owner: Owner, **timeouts: float) -> tuple[asyncio.AbstractServer, int, list[Link]]:
    loop = asyncio.get_running_loop()
    links: list[Link] = []

    def factory() -> Link:
        link = Link(owner, requestor=False, max_pdu_length=16384, **timeouts)  # type: ignore[arg-type]
        links.append(link)
        return link

    server = await loop.create_server(factory, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], links


async def read_pdu(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readexactly(6)
    kind, length = struct.unpack(">BxI", head)
    return kind, await reader.readexactly(length)


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_event_loops_set_tcp_nodelay_on_accepted_and_connected_sockets(loop_name: str) -> None:
    """Link no longer sets TCP_NODELAY itself (a system call per association): the loops
    do it on every TCP transport. If a loop ever stops, C-STORE-RSPs wait ~40 ms."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        accepted: list[asyncio.BaseTransport] = []

        class Keep(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                accepted.append(transport)

        server = await loop.create_server(Keep, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
        for _ in range(100):
            if accepted:
                break
            await asyncio.sleep(0.01)
        for t in (transport, accepted[0]):
            sock = t.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        transport.close()
        accepted[0].close()
        server.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_artim_drops_a_silent_peer(loop_name: str) -> None:
    async def main() -> None:
        owner = Owner()
        server, port, links = await serve(owner, artim_timeout=0.2)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        t0 = time.monotonic()
        assert await reader.read(1) == b""  # closed by us, no PDU (AA-2 in Sta2)
        took = time.monotonic() - t0
        assert 0.15 < took < 2.0
        assert owner.timeouts == ["ARTIM timer expired"]
        await links[0].closed
        assert links[0]._timer is None
        writer.close()
        server.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_artim_stops_at_the_request_and_bounds_the_release(loop_name: str) -> None:
    """ARTIM stopped by the A-ASSOCIATE-RQ must not fire later; started again by our
    A-RELEASE-RP, it closes a peer that never closes (PS3.8 AR-4, Sta13)."""

    async def main() -> None:
        owner = Owner()
        server, port, links = await serve(owner, artim_timeout=0.3, idle_timeout=5)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(make_rq().encode())
        assert (await read_pdu(reader))[0] == P.A_ASSOCIATE_AC_PDU
        await asyncio.sleep(0.5)  # past the first ARTIM deadline: still established
        assert owner.timeouts == [] and links[0].upper.is_established
        writer.write(P.encode_release_rq())
        assert (await read_pdu(reader))[0] == P.A_RELEASE_RP
        t0 = time.monotonic()
        assert await reader.read(1) == b""  # we did not close: ARTIM did
        assert 0.2 < time.monotonic() - t0 < 2.0
        assert owner.timeouts == ["ARTIM timer expired"]
        writer.close()
        server.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_idle_and_dimse_timeouts(loop_name: str) -> None:
    async def main() -> None:
        owner = Owner()
        server, port, _links = await serve(owner, artim_timeout=5, idle_timeout=0.3)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(make_rq().encode())
        await read_pdu(reader)
        t0 = time.monotonic()
        kind, _body = await read_pdu(reader)
        assert kind == P.A_ABORT
        assert 0.25 < time.monotonic() - t0 < 2.0
        assert owner.timeouts == ["idle timeout after 0.3 s"]
        writer.close()

        # A message that stalls half-way: the DIMSE timeout, not the (longer) idle one.
        owner2 = Owner()
        server2, port2, links2 = await serve(
            owner2, artim_timeout=5, idle_timeout=30, dimse_timeout=0.3
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", port2)
        writer.write(make_rq().encode())
        await read_pdu(reader)
        links2[0].in_message = True  # what Association sets for an incomplete message
        kind, _ = await read_pdu(reader)
        assert kind == P.A_ABORT
        assert owner2.timeouts == ["DIMSE timeout after 0.3 s"]
        writer.close()
        server.close()
        server2.close()

    run(loop_name, main)


def test_one_timer_per_short_association() -> None:
    """Connect, A-ASSOCIATE, A-RELEASE, close: ARTIM is started twice and stopped twice
    and the idle watch runs throughout, on one timer armed once and cancelled once."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        armed: list[float] = []
        call_at = loop.call_at

        def counting_call_at(when: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
            armed.append(when)
            return call_at(when, callback, *args)

        loop.call_at = counting_call_at  # type: ignore[method-assign]
        owner = Owner()
        server, port, links = await serve(owner, artim_timeout=30, idle_timeout=300)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(make_rq().encode())
        await read_pdu(reader)
        writer.write(P.encode_release_rq())
        await read_pdu(reader)
        writer.close()
        await links[0].closed
        assert len(armed) == 1
        assert links[0]._timer is None
        server.close()

    run("uvloop", main)
