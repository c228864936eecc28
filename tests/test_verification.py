"""Verification (C-ECHO) end to end against real peers: DCMTK echoscu/storescp, pynetdicom."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import Dicomd, base_config, free_port, require_program, wait_for_port

from dicomd.association import AssociationRejected, associate
from dicomd.net.dimse import VERIFICATION as VERIFICATION_SOP_CLASS

IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


def run_echoscu(port: int, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    exe = require_program("echoscu")
    return subprocess.run(
        [exe, "-v", "-to", "10", "-ta", "10", "-td", "10", *args, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


@pytest.mark.parametrize("server_max_pdu", [0, 4096, 16384, 131072])
@pytest.mark.parametrize("client_max_pdu", [4096, 16384, 131072])
def test_echoscu_max_pdu(
    dicomd: Dicomd,
    tmp_path: Path,
    dcmtk_env: dict[str, str],
    server_max_pdu: int,
    client_max_pdu: int,
) -> None:
    port = free_port()
    config = base_config(tmp_path, port, limits={"max_pdu_length": server_max_pdu})
    dicomd.start(config)
    result = run_echoscu(
        port, dcmtk_env, "-aec", "DICOMD", "--max-pdu", str(client_max_pdu), "--repeat", "3"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout + result.stderr
    assert out.count("Received Echo Response (Success)") == 3
    accepted = dicomd.wait_for_log("association_accepted", dicom_calling_ae="ECHOSCU")
    assert accepted["peer_max_pdu"] == client_max_pdu
    dicomd.wait_for_log("association_closed", reason="released by peer")


def test_echoscu_several_contexts(dicomd: Dicomd, dcmtk_env: dict[str, str]) -> None:
    dicomd.start()
    # 20 presentation contexts, each proposing 5 transfer syntaxes.
    result = run_echoscu(dicomd.port, dcmtk_env, "-aec", "DICOMD", "-ppc", "20", "-pts", "5")
    assert result.returncode == 0, result.stdout + result.stderr
    entry = dicomd.wait_for_log("association_accepted")
    assert len(entry["contexts"]) == 20
    # Our preference (explicit little endian first) wins over the requestor's order.
    assert all(c.endswith(EXPLICIT) for c in entry["contexts"]), entry["contexts"]


def test_echoscu_wrong_called_ae_is_rejected(dicomd: Dicomd, dcmtk_env: dict[str, str]) -> None:
    dicomd.start()
    result = run_echoscu(dicomd.port, dcmtk_env, "-aec", "NOSUCHAE")
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "Called AE Title Not Recognized" in out, out
    entry = dicomd.wait_for_log("association_rejected")
    assert "'NOSUCHAE'" in entry["reason"]
    # The server keeps serving.
    ok = run_echoscu(dicomd.port, dcmtk_env, "-aec", "DICOMD")
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_echoscu_abort(dicomd: Dicomd, dcmtk_env: dict[str, str]) -> None:
    dicomd.start()
    result = run_echoscu(dicomd.port, dcmtk_env, "-aec", "DICOMD", "--abort")
    assert result.returncode == 0, result.stdout + result.stderr
    entry = dicomd.wait_for_log("association_closed")
    assert entry["reason"].startswith("peer aborted"), entry


def test_pynetdicom_scu(dicomd: Dicomd) -> None:
    from pynetdicom import AE

    dicomd.start()
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(VERIFICATION_SOP_CLASS)
    assoc = ae.associate("127.0.0.1", dicomd.port, ae_title="DICOMD")
    try:
        assert assoc.is_established
        for _ in range(3):
            status = assoc.send_c_echo()
            assert status.Status == 0
    finally:
        assoc.release()
    ae.shutdown()
    dicomd.wait_for_log("association_closed", dicom_calling_ae="PYNETDICOM")


def test_dicomd_echo_cli_against_dicomd(dicomd: Dicomd) -> None:
    dicomd.start()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dicomd",
            "echo",
            "127.0.0.1",
            str(dicomd.port),
            "--aec",
            "DICOMD",
            "--count",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("status 0x0000 Success") == 3
    assert "rtt=" in result.stdout


def test_dicomd_echo_cli_reports_reject(dicomd: Dicomd) -> None:
    dicomd.start()
    result = subprocess.run(
        [sys.executable, "-m", "dicomd", "echo", "127.0.0.1", str(dicomd.port), "--aec", "WRONG"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "called AE title not recognized" in result.stderr


def test_dicomd_echo_cli_connection_refused() -> None:
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "dicomd", "echo", "127.0.0.1", str(port), "--timeout", "3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "cannot connect" in result.stderr


def test_requestor_against_dcmtk_storescp(tmp_path: Path, dcmtk_env: dict[str, str]) -> None:
    exe = require_program("storescp")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "-v", "-aet", "STORESCP", "-od", str(tmp_path), str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dcmtk_env,
    )
    try:
        wait_for_port(port, proc=proc)

        async def main() -> list[int]:
            assoc = await associate(
                "127.0.0.1",
                port,
                calling_ae="DICOMD",
                called_ae="STORESCP",
                contexts=[(VERIFICATION_SOP_CLASS, [EXPLICIT, IMPLICIT])],
                max_pdu_length=16384,
            )
            assert assoc.peer_implementation[0].startswith("1.2.276.0.7230010")  # OFFIS root
            statuses = [await assoc.echo(timeout=10) for _ in range(5)]
            await assoc.release()
            return statuses

        assert asyncio.run(main()) == [0] * 5
    finally:
        proc.terminate()
        out = proc.communicate(timeout=10)[0].decode(errors="replace")
    assert out.count("Received Echo Request") == 5, out


def test_requestor_against_pynetdicom_scp() -> None:
    from pynetdicom import AE, evt

    port = free_port()
    seen: list[str] = []

    def on_echo(event):  # type: ignore[no-untyped-def]
        seen.append(event.assoc.requestor.ae_title)
        return 0x0000

    ae = AE(ae_title="PYSCP")
    ae.add_supported_context(VERIFICATION_SOP_CLASS)
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_ECHO, on_echo)]
    )
    try:

        async def main() -> int:
            assoc = await associate(
                "127.0.0.1",
                port,
                calling_ae="DICOMD",
                called_ae="PYSCP",
                contexts=[(VERIFICATION_SOP_CLASS, [IMPLICIT])],
            )
            status = await assoc.echo(timeout=10)
            await assoc.release()
            return status

        assert asyncio.run(main()) == 0
    finally:
        server.shutdown()
    assert seen == ["DICOMD"]


def test_requestor_rejected_by_pynetdicom_scp() -> None:
    from pynetdicom import AE

    port = free_port()
    ae = AE(ae_title="PYSCP")
    ae.require_called_aet = True
    ae.add_supported_context(VERIFICATION_SOP_CLASS)
    server = ae.start_server(("127.0.0.1", port), block=False)
    try:

        async def main() -> None:
            await associate(
                "127.0.0.1",
                port,
                calling_ae="DICOMD",
                called_ae="WRONG",
                contexts=[(VERIFICATION_SOP_CLASS, [IMPLICIT])],
            )

        with pytest.raises(AssociationRejected) as info:
            asyncio.run(main())
        assert info.value.reason == 7
    finally:
        server.shutdown()


def test_many_sequential_clients_in_threads(dicomd: Dicomd, dcmtk_env: dict[str, str]) -> None:
    """Several echoscu processes at once: the single-process server serves them all."""
    dicomd.start()
    results: list[int] = []

    def one() -> None:
        r = run_echoscu(dicomd.port, dcmtk_env, "-aec", "DICOMD", "--repeat", "5")
        results.append(r.returncode)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [0] * 8
