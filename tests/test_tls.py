"""DICOM TLS for real: RSA certificates from trustme, DCMTK echoscu +tls for each
peer-certificate mode and BCP 195 profile, pynetdicom with an ssl_context, our requestor with
dicomd.tls.client_context (to dicomd and to DCMTK storescp +tls as a TLS peer), a plain client
on the TLS port, certificates reloaded on SIGHUP, and TLS identities in access rules."""

from __future__ import annotations

import asyncio
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import Dicomd, base_config, free_port, require_program, wait_for_port

from dicomd.association import AssociationAborted, associate
from dicomd.config import Peer, PeerTLS
from dicomd.net.dimse import VERIFICATION
from dicomd.tls import client_context, peer_connection, peer_contexts

trustme = pytest.importorskip("trustme")

IMPLICIT = "1.2.840.10008.1.2"
MODES = ("require", "verify", "ignore")


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_cert: Path  # a client certificate from a CA the server does not trust
    other_key: Path
    authority: Any


def make_pki(directory: Path) -> Pki:
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    other_ca = trustme.CA(key_type=trustme.KeyType.RSA)
    server = ca.issue_cert("localhost", "127.0.0.1", key_type=trustme.KeyType.RSA)
    client = ca.issue_cert(
        "modality-1.example.org", common_name="modality-1", key_type=trustme.KeyType.RSA
    )
    other = other_ca.issue_cert("intruder.example.org", key_type=trustme.KeyType.RSA)
    directory.mkdir(parents=True, exist_ok=True)
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    server.private_key_pem.write_to_path(str(directory / "server.key"))
    server.cert_chain_pems[0].write_to_path(str(directory / "server.crt"))
    client.private_key_pem.write_to_path(str(directory / "client.key"))
    client.cert_chain_pems[0].write_to_path(str(directory / "client.crt"))
    other.private_key_pem.write_to_path(str(directory / "other.key"))
    other.cert_chain_pems[0].write_to_path(str(directory / "other.crt"))
    return Pki(
        directory / "ca.pem",
        directory / "server.crt",
        directory / "server.key",
        directory / "client.crt",
        directory / "client.key",
        directory / "other.crt",
        directory / "other.key",
        ca,
    )


def tls_listener(name: str, port: int, pki: Pki, mode: str) -> dict[str, Any]:
    return {
        "name": name,
        "address": "127.0.0.1",
        "port": port,
        "tls": {
            "certificate": str(pki.server_cert),
            "private_key": str(pki.server_key),
            "ca_file": str(pki.ca),
            "peer_certificate": mode,
        },
    }


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Dicomd]:
    """One dicomd with a plain listener and one TLS listener per peer-certificate mode."""
    tmp_path = tmp_path_factory.mktemp("tls")
    instance = Dicomd(tmp_path)
    port = free_port()
    config = base_config(tmp_path, port)
    ports = {mode: free_port() for mode in MODES}
    config["listeners"] += [tls_listener(mode, ports[mode], pki, mode) for mode in MODES]
    instance.start(config)
    for mode in MODES:
        wait_for_port(ports[mode], proc=instance.proc)
    instance.tls_ports = ports  # type: ignore[attr-defined]
    try:
        yield instance
    finally:
        instance.stop()


def echoscu(port: int, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    exe = require_program("echoscu")
    return subprocess.run(
        [exe, "-v", "-to", "10", "-ta", "10", "-td", "10", "-aec", "DICOMD", *args,
         "127.0.0.1", str(port)],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("client_cert", [True, False], ids=["client-cert", "anonymous"])
def test_echoscu_tls_modes(
    tls_server: Dicomd, pki: Pki, dcmtk_env: dict[str, str], mode: str, client_cert: bool
) -> None:
    port = tls_server.tls_ports[mode]  # type: ignore[attr-defined]
    aet = f"TLS_{mode[:3].upper()}_{'C' if client_cert else 'A'}"
    identity = ["+tls", str(pki.client_key), str(pki.client_cert)] if client_cert else ["+tla"]
    result = echoscu(port, dcmtk_env, "-aet", aet, *identity, "+cf", str(pki.ca))
    out = result.stdout + result.stderr
    should_work = client_cert or mode != "require"
    if should_work:
        assert result.returncode == 0, out
        assert "Received Echo Response (Success)" in out
        entry = tls_server.wait_for_log("association_accepted", dicom_calling_ae=aet)
        # The certificate's subject is known only when the server asked for it.
        expected = "modality-1" if client_cert and mode != "ignore" else None
        assert entry["tls_subject"] == expected, entry
    else:
        assert result.returncode != 0, out
        entry = tls_server.wait_for_log("tls_handshake_failed", listener=mode)
        # Depending on the client's timing OpenSSL names the missing certificate, or the
        # client just hangs up; either way the line says what to check.
        assert "certificate" in (entry.get("hint") or "") + entry["reason"], entry


@pytest.mark.parametrize("profile", ["+px", "+py", "+pz"])
def test_echoscu_bcp195_profiles(
    tls_server: Dicomd, pki: Pki, dcmtk_env: dict[str, str], profile: str
) -> None:
    port = tls_server.tls_ports["require"]  # type: ignore[attr-defined]
    result = echoscu(
        port, dcmtk_env, profile, "+tls", str(pki.client_key), str(pki.client_cert),
        "+cf", str(pki.ca),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_untrusted_client_certificate_is_refused(
    tls_server: Dicomd, pki: Pki, dcmtk_env: dict[str, str]
) -> None:
    port = tls_server.tls_ports["verify"]  # type: ignore[attr-defined]
    result = echoscu(
        port, dcmtk_env, "-aet", "INTRUDER", "+tls", str(pki.other_key), str(pki.other_cert),
        "+cf", str(pki.ca),
    )  # fmt: skip
    assert result.returncode != 0
    entry = tls_server.wait_for_log("tls_handshake_failed", listener="verify")
    assert "CERTIFICATE_VERIFY_FAILED" in entry["reason"].upper() or "trusted" in entry["hint"]


def test_pynetdicom_with_ssl_context(tls_server: Dicomd, pki: Pki) -> None:
    from pynetdicom import AE

    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    ctx.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    ae = AE(ae_title="PYNETDICOM_TLS")
    ae.add_requested_context(VERIFICATION)
    port = tls_server.tls_ports["require"]  # type: ignore[attr-defined]
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMD", tls_args=(ctx, "localhost"))
    try:
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
    finally:
        assoc.release()
        ae.shutdown()
    entry = tls_server.wait_for_log("association_accepted", dicom_calling_ae="PYNETDICOM_TLS")
    assert entry["tls_subject"] == "modality-1"


def peer_tls(pki: Pki, server_name: str | None = "localhost") -> PeerTLS:
    return PeerTLS(
        certificate=pki.client_cert,
        private_key=pki.client_key,
        ca_file=pki.ca,
        server_name=server_name,
    )


def test_our_requestor_with_client_context(tls_server: Dicomd, pki: Pki) -> None:
    port = tls_server.tls_ports["require"]  # type: ignore[attr-defined]
    peer = Peer(name="dicomd-tls", ae_title="DICOMD", host="127.0.0.1", port=port,
                tls=peer_tls(pki))  # fmt: skip
    contexts = peer_contexts([peer])

    async def main() -> None:
        assoc = await associate(
            peer.host,
            peer.port,
            calling_ae="OUR_TLS",
            called_ae=peer.ae_title,
            contexts=[(VERIFICATION, [IMPLICIT])],
            **peer_connection(peer, contexts),  # type: ignore[arg-type]
        )
        assert assoc.link.transport.get_extra_info("ssl_object") is not None
        assert await assoc.echo(timeout=10) == 0
        await assoc.release()
        # The server name is checked when configured: a wrong one fails the handshake.
        wrong = client_context(peer_tls(pki, server_name="pacs.example.org"))
        with pytest.raises(ssl.SSLCertVerificationError):
            await associate(
                "127.0.0.1", port, calling_ae="OUR_TLS", called_ae="DICOMD",
                contexts=[(VERIFICATION, [IMPLICIT])], ssl=wrong,
                server_hostname="pacs.example.org",
            )  # fmt: skip

    asyncio.run(main())
    entry = tls_server.wait_for_log("association_accepted", dicom_calling_ae="OUR_TLS")
    assert entry["tls_subject"] == "modality-1"


def test_our_requestor_to_dcmtk_storescp_tls(
    tmp_path: Path, pki: Pki, dcmtk_env: dict[str, str]
) -> None:
    """The client context against another implementation's TLS server (a C-MOVE
    destination with TLS is reached the same way)."""
    exe = require_program("storescp")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "-aet", "STORESCP", "+tls", str(pki.server_key), str(pki.server_cert),
         "+cf", str(pki.ca), "-od", str(tmp_path), str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dcmtk_env,
    )  # fmt: skip
    try:
        wait_for_port(port)
        peer = Peer(name="storescp", ae_title="STORESCP", host="127.0.0.1", port=port,
                    tls=peer_tls(pki), move_destination=True)  # fmt: skip

        async def main() -> int:
            assoc = await associate(
                peer.host, peer.port, calling_ae="DICOMD", called_ae=peer.ae_title,
                contexts=[(VERIFICATION, [IMPLICIT])],
                **peer_connection(peer, peer_contexts([peer])),  # type: ignore[arg-type]
            )  # fmt: skip
            status = await assoc.echo(timeout=10)
            await assoc.release()
            return status

        assert asyncio.run(main()) == 0
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_plain_client_on_tls_port_is_dropped_cleanly(
    tls_server: Dicomd, dcmtk_env: dict[str, str]
) -> None:
    port = tls_server.tls_ports["ignore"]  # type: ignore[attr-defined]
    src = "127.0.0.12"

    async def main() -> None:
        with pytest.raises((AssociationAborted, ConnectionError)):
            await associate(
                "127.0.0.1", port, calling_ae="PLAIN", called_ae="DICOMD",
                contexts=[(VERIFICATION, [IMPLICIT])], local_addr=(src, 0), acse_timeout=10,
            )  # fmt: skip

    t0 = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - t0 < 5
    entry = tls_server.wait_for_log("tls_handshake_failed", address=src)
    assert entry["reason"] == "not TLS: the peer sent an A-ASSOCIATE-RQ", entry
    assert "plain DICOM client on a TLS port" in entry["hint"]
    time.sleep(0.3)
    events = [e for e in tls_server.log_events() if e.get("address") == src]
    assert len(events) == 1, events  # logged once
    assert "Traceback" not in tls_server.log_text()
    # DCMTK without +tls sees a failure too, and the server keeps serving.
    result = echoscu(port, dcmtk_env, "-aet", "PLAIN_DCMTK")
    assert result.returncode != 0
    ok = echoscu(tls_server.port, dcmtk_env, "-aet", "PLAIN_OK")
    assert ok.returncode == 0, ok.stdout + ok.stderr


def served_certificate(port: int, ca: Path) -> bytes:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        cert = tls.getpeercert(binary_form=True)
        assert cert is not None
        return cert


def test_certificate_reloaded_on_sighup(dicomd: Dicomd, tmp_path: Path, pki: Pki) -> None:
    server_dir = tmp_path / "server-pki"
    server_dir.mkdir()
    cert, key = server_dir / "server.crt", server_dir / "server.key"
    first = pki.authority.issue_cert("localhost", "127.0.0.1", key_type=trustme.KeyType.RSA)
    first.cert_chain_pems[0].write_to_path(str(cert))
    first.private_key_pem.write_to_path(str(key))
    plain, tls_port = free_port(), free_port()
    config = base_config(tmp_path, plain)
    listener = tls_listener("tls", tls_port, pki, "ignore")
    listener["tls"].update(certificate=str(cert), private_key=str(key))
    config["listeners"].append(listener)
    dicomd.start(config)
    wait_for_port(tls_port, proc=dicomd.proc)
    before = served_certificate(tls_port, pki.ca)

    async def open_held():  # type: ignore[no-untyped-def]
        ctx = ssl.create_default_context(cafile=str(pki.ca))
        ctx.check_hostname = False
        return await associate(
            "127.0.0.1", tls_port, calling_ae="HELD", called_ae="DICOMD",
            contexts=[(VERIFICATION, [IMPLICIT])], ssl=ctx,
        )  # fmt: skip

    async def main() -> None:
        held = await open_held()  # an association open across the reload keeps working
        second = pki.authority.issue_cert("localhost", "127.0.0.1", key_type=trustme.KeyType.RSA)
        second.cert_chain_pems[0].write_to_path(str(cert))
        second.private_key_pem.write_to_path(str(key))
        dicomd.signal(signal.SIGHUP)
        await asyncio.to_thread(dicomd.wait_for_log, "tls_reloaded")
        after = await asyncio.to_thread(served_certificate, tls_port, pki.ca)
        assert after != before
        assert after == ssl.PEM_cert_to_DER_cert(cert.read_text())
        assert await held.echo(timeout=10) == 0
        await held.release()

    asyncio.run(main())


def test_unreadable_key_on_reload_keeps_the_old_configuration(
    dicomd: Dicomd, tmp_path: Path, pki: Pki
) -> None:
    plain, tls_port = free_port(), free_port()
    config = base_config(tmp_path, plain)
    config["listeners"].append(tls_listener("tls", tls_port, pki, "ignore"))
    dicomd.start(config)
    wait_for_port(tls_port, proc=dicomd.proc)
    before = served_certificate(tls_port, pki.ca)
    config["listeners"][1]["tls"]["private_key"] = str(tmp_path / "missing.key")
    dicomd.write_config(config)
    dicomd.signal(signal.SIGHUP)
    entry = dicomd.wait_for_log("reload_failed")
    assert "cannot load TLS material" in entry["reason"]
    assert served_certificate(tls_port, pki.ca) == before


def test_tls_identity_in_access_rules(
    dicomd: Dicomd, tmp_path: Path, pki: Pki, dcmtk_env: dict[str, str]
) -> None:
    plain, tls_port = free_port(), free_port()
    config = base_config(tmp_path, plain)
    config["listeners"].append(tls_listener("tls", tls_port, pki, "verify"))
    config["access"] = {
        "default": "deny",
        "rules": [
            {"name": "modality-cert", "listeners": ["tls"], "tls_subject": ["modality-*"],
             "services": ["echo"]},
        ],
    }  # fmt: skip
    dicomd.start(config)
    wait_for_port(tls_port, proc=dicomd.proc)
    ok = echoscu(tls_port, dcmtk_env, "-aet", "WITH_CERT", "+tls", str(pki.client_key),
                 str(pki.client_cert), "+cf", str(pki.ca))  # fmt: skip
    assert ok.returncode == 0, ok.stdout + ok.stderr
    entry = dicomd.wait_for_log("association_accepted", dicom_calling_ae="WITH_CERT")
    assert entry["rule"] == "access.rules[0] (modality-cert)"
    # Without a certificate no rule can allow the peer: closed after the handshake,
    # before any PDU is read.
    anonymous = echoscu(tls_port, dcmtk_env, "-aet", "NO_CERT", "+tla", "+cf", str(pki.ca))
    assert anonymous.returncode != 0
    refused = dicomd.wait_for_log("connection_refused", listener="tls")
    assert refused["rule"] == "access.default (deny)" and refused["tls_subject"] is None
