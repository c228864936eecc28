"""Bad bytes on a raw socket: each gets the abort PS3.8 prescribes, and the server keeps
serving other peers."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys

import pytest
from acse_reference import reference_encode_rq
from conftest import Dicomd, base_config, free_port, recv_pdu

from dicomd.net.dimse import VERIFICATION as VERIFICATION_SOP_CLASS
from dicomd.net.dimse import c_echo_rq, encode_command
from dicomd.net.negotiation import ProposedContext

IMPLICIT = "1.2.840.10008.1.2"


def associate_rq_bytes(called: str = "DICOMD") -> bytes:
    return reference_encode_rq(
        calling_ae="RAWTEST",
        called_ae=called,
        contexts=[ProposedContext(1, VERIFICATION_SOP_CLASS, (IMPLICIT,))],
        max_pdu_length=16384,
    )


def pdata(context_id: int, control: int, payload: bytes) -> bytes:
    pdv = struct.pack(">IBB", len(payload) + 2, context_id, control) + payload
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def echo_command() -> bytes:
    return encode_command(c_echo_rq(1))


def established(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(associate_rq_bytes())
    kind, _ = recv_pdu(sock)
    assert kind == 0x02, "expected A-ASSOCIATE-AC"
    return sock


def expect_abort(sock: socket.socket) -> tuple[int, int]:
    kind, body = recv_pdu(sock)
    assert kind == 0x07, f"expected A-ABORT, got PDU type {kind:#x}"
    assert len(body) == 4
    # After sending A-ABORT the server waits in Sta13 for us to close (PS3.8 AA-1/AA-8),
    # bounded by ARTIM (test_artim_closes_after_abort).
    return body[2], body[3]


def still_serves(port: int) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dicomd", "echo", "127.0.0.1", str(port), "--aec", "DICOMD"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def server(dicomd: Dicomd) -> Dicomd:
    return dicomd.start()


def test_artim_closes_after_abort(dicomd: Dicomd, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A peer that never closes after our A-ABORT is cut off when ARTIM expires (Sta13)."""
    port = free_port()
    dicomd.start(base_config(tmp_path, port, limits={"acse_timeout": 1}))
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(struct.pack(">BBI", 0x09, 0, 4) + b"\x00" * 4)
        expect_abort(sock)
        sock.settimeout(10)
        assert sock.recv(1) == b""


def test_artim_closes_silent_connection(dicomd: Dicomd, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A connection that never sends an A-ASSOCIATE-RQ is closed when ARTIM expires (Sta2)."""
    port = free_port()
    dicomd.start(base_config(tmp_path, port, limits={"acse_timeout": 1}))
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(10)
        assert sock.recv(1) == b""
    still_serves(port)


def test_truncated_header_then_close(server: Dicomd) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"\x01\x00\x00")
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(10)
        assert sock.recv(100) == b""  # the server closes without answering a half PDU
    still_serves(server.port)


def test_length_that_lies_too_big(server: Dicomd) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(struct.pack(">BBI", 0x01, 0, 0xFFFFFF00) + b"\x00" * 64)
        source, reason = expect_abort(sock)
    # Sta2 + Evt19 (invalid PDU) is AA-1: A-ABORT with service-user source (PS3.8 table 9-10).
    assert (source, reason) == (0, 0)
    still_serves(server.port)


def test_association_rq_whose_items_lie(server: Dicomd) -> None:
    rq = bytearray(associate_rq_bytes())
    # Corrupt the first variable item's length (the application context item at offset 74).
    struct.pack_into(">H", rq, 74 + 2, 0xFFF0)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(bytes(rq))
        kind, _ = recv_pdu(sock)
        assert kind == 0x07
    still_serves(server.port)


def test_unknown_pdu_type(server: Dicomd) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(struct.pack(">BBI", 0x09, 0, 4) + b"\x00" * 4)
        expect_abort(sock)
    still_serves(server.port)


def test_unknown_pdu_type_when_established(server: Dicomd) -> None:
    with established(server.port) as sock:
        sock.sendall(struct.pack(">BBI", 0x09, 0, 4) + b"\x00" * 4)
        source, reason = expect_abort(sock)
    assert (source, reason) == (2, 1)  # AA-8, service-provider, unrecognized PDU
    still_serves(server.port)


def test_pdata_before_association(server: Dicomd) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(pdata(1, 0x03, echo_command()))
        expect_abort(sock)
    still_serves(server.port)


def test_pdv_for_context_not_accepted(server: Dicomd) -> None:
    with established(server.port) as sock:
        sock.sendall(pdata(3, 0x03, echo_command()))
        source, _ = expect_abort(sock)
    assert source in (0, 2)
    still_serves(server.port)


def test_dataset_before_command(server: Dicomd) -> None:
    with established(server.port) as sock:
        sock.sendall(pdata(1, 0x02, b"\x08\x00\x16\x00\x00\x00\x00\x00"))
        expect_abort(sock)
    still_serves(server.port)


def test_second_command_before_last_fragment(server: Dicomd) -> None:
    command = echo_command()
    with established(server.port) as sock:
        sock.sendall(pdata(1, 0x01, command[:10]))  # command, not last
        sock.sendall(pdata(1, 0x03, command))  # a whole new command: interleaving
        # The joined fragments are not a valid command either way: the server aborts.
        expect_abort(sock)
    still_serves(server.port)


def test_release_rq_with_bad_length(server: Dicomd) -> None:
    with established(server.port) as sock:
        sock.sendall(struct.pack(">BBI", 0x05, 0, 2) + b"\x00\x00")
        source, _reason = expect_abort(sock)
    assert source == 2
    still_serves(server.port)


def test_associate_rq_twice(server: Dicomd) -> None:
    with established(server.port) as sock:
        sock.sendall(associate_rq_bytes())
        source, reason = expect_abort(sock)
    assert (source, reason) == (2, 2)  # AA-8: unexpected PDU
    still_serves(server.port)


def test_garbage_flood_then_good_peer(server: Dicomd) -> None:
    import random

    rng = random.Random(1234)
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300))))
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(10)
            while sock.recv(4096):
                pass
    still_serves(server.port)
