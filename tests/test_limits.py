"""Association limits and timeouts, against a dicomd subprocess."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import Dicomd, base_config, free_port, recv_pdu, require_program

from dicomd.association import AssociationRejected, associate
from dicomd.net.dimse import VERIFICATION

IMPLICIT = "1.2.840.10008.1.2"


async def open_assoc(port: int, called: str = "DICOMD", calling: str = "LIMITS"):  # type: ignore[no-untyped-def]
    return await associate(
        "127.0.0.1",
        port,
        calling_ae=calling,
        called_ae=called,
        contexts=[(VERIFICATION, [IMPLICIT])],
    )


def test_max_associations_overall(dicomd: Dicomd, tmp_path: Path) -> None:
    port = free_port()
    dicomd.start(base_config(tmp_path, port, limits={"max_associations": 2}))

    async def main() -> None:
        held = [await open_assoc(port), await open_assoc(port)]
        with pytest.raises(AssociationRejected) as info:
            await open_assoc(port)
        # Transient, service-provider (presentation), local limit exceeded (PS3.8 9.3.4).
        assert (info.value.result, info.value.source, info.value.reason) == (2, 3, 2)
        await held[0].release()
        third = await open_assoc(port)  # a slot is free again
        assert await third.echo(timeout=10) == 0
        await third.release()
        await held[1].release()

    asyncio.run(main())
    entry = dicomd.wait_for_log("association_rejected")
    assert "limit of 2 associations reached" in entry["reason"]


def test_max_associations_per_local_ae(dicomd: Dicomd, tmp_path: Path) -> None:
    port = free_port()
    config = base_config(tmp_path, port)
    config["local_aes"] = [
        {"ae_title": "SMALL", "max_associations": 1, "services": {"verification": None}},
        {"ae_title": "BIG", "services": {"verification": None}},
    ]
    dicomd.start(config)

    async def main() -> None:
        held = await open_assoc(port, "SMALL")
        with pytest.raises(AssociationRejected) as info:
            await open_assoc(port, "SMALL")
        assert (info.value.result, info.value.source, info.value.reason) == (2, 3, 2)
        other = await open_assoc(port, "BIG")  # the other AE is not affected
        assert await other.echo(timeout=10) == 0
        await other.release()
        await held.release()

    asyncio.run(main())
    entry = dicomd.wait_for_log("association_rejected")
    assert "limit of 1 associations for SMALL reached" in entry["reason"]


def test_dcmtk_sees_local_limit_exceeded(
    dicomd: Dicomd, tmp_path: Path, dcmtk_env: dict[str, str]
) -> None:
    exe = require_program("echoscu")
    port = free_port()
    dicomd.start(base_config(tmp_path, port, limits={"max_associations": 1}))

    async def hold_and_probe() -> str:
        held = await open_assoc(port)
        proc = await asyncio.create_subprocess_exec(
            exe,
            "-v",
            "-aec",
            "DICOMD",
            "127.0.0.1",
            str(port),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dcmtk_env,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        await held.release()
        return out.decode()

    out = asyncio.run(hold_and_probe())
    assert "Local Limit Exceeded" in out, out


def test_idle_timeout_aborts_idle_association(dicomd: Dicomd, tmp_path: Path) -> None:
    port = free_port()
    dicomd.start(base_config(tmp_path, port, limits={"idle_timeout": 1}))

    async def main() -> None:
        assoc = await open_assoc(port)
        assert await assoc.echo(timeout=10) == 0
        await asyncio.wait_for(assoc.link.closed, 10)  # aborted by the server

    t0 = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - t0 < 8
    entry = dicomd.wait_for_log("association_timeout")
    assert entry["reason"].startswith("idle timeout after 1 s")


def test_dimse_timeout_aborts_stalled_message(dicomd: Dicomd, tmp_path: Path) -> None:
    """A command whose last fragment never comes is aborted after dimse_timeout."""
    import struct

    from acse_reference import reference_encode_rq

    from dicomd.net.dimse import c_echo_rq, encode_command
    from dicomd.net.negotiation import ProposedContext

    port = free_port()
    dicomd.start(base_config(tmp_path, port, limits={"dimse_timeout": 1, "idle_timeout": 60}))
    rq = reference_encode_rq(
        calling_ae="STALL",
        called_ae="DICOMD",
        contexts=[ProposedContext(1, VERIFICATION, (IMPLICIT,))],
        max_pdu_length=16384,
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(rq)
        assert recv_pdu(sock)[0] == 0x02
        command = encode_command(c_echo_rq(1))[:20]
        pdv = struct.pack(">IBB", len(command) + 2, 1, 0x01) + command  # not the last fragment
        sock.sendall(struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv)
        t0 = time.monotonic()
        kind, _ = recv_pdu(sock, timeout=10)
        assert kind == 0x07  # A-ABORT
        assert time.monotonic() - t0 < 5
    entry = dicomd.wait_for_log("association_timeout")
    assert entry["reason"].startswith("DIMSE timeout")
