"""Slow and silent peers are dropped on time while other peers are served: ARTIM bounds the
whole time from connect to a complete A-ASSOCIATE-RQ (it is not restarted by each byte), on
plain and TLS listeners (where the TLS handshake counts too), and an over-long PDU is
aborted."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import time
from pathlib import Path

import pytest
from acse_reference import reference_encode_rq
from conftest import Dicomd, base_config, free_port, recv_pdu, wait_for_port

from dicomd.association import associate
from dicomd.net.dimse import VERIFICATION
from dicomd.net.negotiation import ProposedContext

trustme = pytest.importorskip("trustme")

IMPLICIT = "1.2.840.10008.1.2"
ACSE_TIMEOUT = 2.0


def rq_bytes() -> bytes:
    return reference_encode_rq(
        calling_ae="SLOWLORIS",
        called_ae="DICOMD",
        contexts=[ProposedContext(1, VERIFICATION, (IMPLICIT,))],
        max_pdu_length=16384,
    )


async def open_stream(port: int, source: str, tls: ssl.SSLContext | None = None):  # type: ignore[no-untyped-def]
    return await asyncio.open_connection(
        "127.0.0.1", port, local_addr=(source, 0), ssl=tls, server_hostname="" if tls else None
    )


async def until_closed(reader: asyncio.StreamReader, limit: float) -> float:
    """Seconds until the server closes the connection (reading whatever it sends)."""
    t0 = time.monotonic()
    while True:
        try:
            data = await asyncio.wait_for(reader.read(1024), limit)
        except (ConnectionError, ssl.SSLError):
            break
        if not data:
            break
    return time.monotonic() - t0


async def silent(port: int, source: str, tls: ssl.SSLContext | None = None) -> float:
    t0 = time.monotonic()
    reader, writer = await open_stream(port, source, tls)
    await until_closed(reader, 20)
    writer.close()
    return time.monotonic() - t0


async def trickle(port: int, source: str, data: bytes, tls: ssl.SSLContext | None = None) -> float:
    """Send ``data`` one byte every 0.5 s; seconds from connect until the server closes."""
    t0 = time.monotonic()
    reader, writer = await open_stream(port, source, tls)

    async def drip() -> None:
        try:
            for i in range(len(data)):
                writer.write(data[i : i + 1])
                await writer.drain()
                await asyncio.sleep(0.5)
        except (ConnectionError, ssl.SSLError):
            pass

    dripping = asyncio.create_task(drip())
    await until_closed(reader, 20)
    dripping.cancel()
    writer.close()
    return time.monotonic() - t0


async def echo_ok(port: int, tls: ssl.SSLContext | None = None) -> float:
    t0 = time.monotonic()
    assoc = await associate(
        "127.0.0.1",
        port,
        calling_ae="PROMPT",
        called_ae="DICOMD",
        contexts=[(VERIFICATION, [IMPLICIT])],
        ssl=tls,
        server_hostname="localhost" if tls else None,
    )
    assert await assoc.echo(timeout=5) == 0
    await assoc.release()
    return time.monotonic() - t0


def test_plain_slowloris_dropped_on_time_while_others_are_served(
    dicomd: Dicomd, tmp_path: Path
) -> None:
    port = free_port()
    dicomd.start(base_config(tmp_path, port, limits={"acse_timeout": ACSE_TIMEOUT}))

    async def main() -> None:
        slow = [
            asyncio.create_task(trickle(port, f"127.0.0.{10 + i}", rq_bytes())) for i in range(10)
        ]
        quiet = [asyncio.create_task(silent(port, f"127.0.0.{30 + i}")) for i in range(10)]
        await asyncio.sleep(0.5)
        # Meanwhile other peers are served at once, again and again.
        for _ in range(5):
            assert await echo_ok(port) < 1.0
            await asyncio.sleep(0.2)
        for took in await asyncio.gather(*slow, *quiet):
            # Dropped when ARTIM expires, counted from the connect: not reset by each byte
            # (a whole A-ASSOCIATE-RQ at one byte per 0.5 s would take minutes).
            assert ACSE_TIMEOUT - 0.2 <= took < ACSE_TIMEOUT + 1.5, took

    asyncio.run(main())
    entry = dicomd.wait_for_log("association_timeout")
    assert entry["reason"] == "ARTIM timer expired"


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    cert = ca.issue_cert("localhost", "127.0.0.1", key_type=trustme.KeyType.RSA)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "server.crt"))
    cert.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    return tmp_path / "ca.pem", tmp_path / "server.crt", tmp_path / "server.key"


def test_tls_slow_handshakes_dropped_on_time_while_others_are_served(
    dicomd: Dicomd, tmp_path: Path, tls_files: tuple[Path, Path, Path]
) -> None:
    ca, cert, key = tls_files
    plain, port = free_port(), free_port()
    config = base_config(tmp_path, plain, limits={"acse_timeout": ACSE_TIMEOUT})
    config["listeners"].append(
        {
            "name": "tls",
            "address": "127.0.0.1",
            "port": port,
            "tls": {"certificate": str(cert), "private_key": str(key),
                    "peer_certificate": "ignore"},
        }
    )  # fmt: skip
    dicomd.start(config)
    wait_for_port(port, proc=dicomd.proc)
    client = ssl.create_default_context(cafile=str(ca))
    client.check_hostname = False
    # A ClientHello to trickle: the first bytes a real client sends.
    incoming, out_bio = ssl.MemoryBIO(), ssl.MemoryBIO()
    sslobj = ssl.create_default_context().wrap_bio(incoming, out_bio, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        sslobj.do_handshake()
    client_hello = out_bio.read()

    async def main() -> None:
        silent_peers = [asyncio.create_task(silent(port, f"127.0.1.{i}")) for i in range(5)]
        slow_hello = [
            asyncio.create_task(trickle(port, f"127.0.2.{i}", client_hello)) for i in range(5)
        ]
        # Handshake done, then the A-ASSOCIATE-RQ trickles: ARTIM counts the handshake too.
        slow_rq = [
            asyncio.create_task(trickle(port, f"127.0.3.{i}", rq_bytes(), client)) for i in range(5)
        ]
        await asyncio.sleep(0.5)
        for _ in range(5):
            assert await echo_ok(port, client) < 1.0
            await asyncio.sleep(0.2)
        for took in await asyncio.gather(*silent_peers, *slow_hello, *slow_rq):
            assert ACSE_TIMEOUT - 0.2 <= took < ACSE_TIMEOUT + 1.5, took

    asyncio.run(main())
    entry = dicomd.wait_for_log("tls_handshake_failed", address="127.0.1.0")
    assert entry["reason"] == f"no TLS handshake within {ACSE_TIMEOUT:g} s"
    assert dicomd.wait_for_log("tls_handshake_failed", address="127.0.2.0")
    assert "Traceback" not in dicomd.log_text()


def test_pdu_longer_than_max_pdu_length_is_aborted(dicomd: Dicomd, tmp_path: Path) -> None:
    port = free_port()
    dicomd.start(base_config(tmp_path, port, limits={"max_pdu_length": 16384}))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(rq_bytes())
        assert recv_pdu(sock)[0] == 0x02
        # A P-DATA-TF announcing far more than the 16384 bytes we accept.
        sock.sendall(struct.pack(">BBI", 0x04, 0, 1 << 20) + b"\x00" * 64)
        kind, body = recv_pdu(sock)
        assert kind == 0x07  # A-ABORT
        assert (body[2], body[3]) == (2, 6)  # service-provider, invalid PDU parameter value
