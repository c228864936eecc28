"""TLS beyond C-ECHO: DCMTK storescu +tls storing into dicomd's TLS listener, and a C-MOVE
whose destination is a TLS peer (DCMTK storescp +tls): the sub-association uses TLS."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
from conftest import Dicomd, base_config, free_port, require_program, wait_for_port
from pydicom.data import get_testdata_file
from test_tls import make_pki, tls_listener


def dataset_bytes(path: Path) -> bytes:
    """The data set of a Part-10 file: everything after the file meta group."""
    with open(path, "rb") as f:
        pydicom.filereader.read_preamble(f, False)
        pydicom.filereader._read_file_meta_info(f)
        return f.read()


def test_storescu_tls_and_move_to_tls_destination(
    dicomd: Dicomd, tmp_path: Path, dcmtk_env: dict[str, str]
) -> None:
    pki = make_pki(tmp_path / "pki")
    port, tls_port, dest_port = free_port(), free_port(), free_port()
    config = base_config(tmp_path, port)
    config["listeners"].append(tls_listener("dicom-tls", tls_port, pki, "require"))
    config["local_aes"][0]["services"] = {
        "verification": None,
        "storage": None,
        "query_retrieve": None,
    }
    config["peers"] = [
        {
            "name": "tls-viewer",
            "ae_title": "STORESCP",
            "host": "127.0.0.1",
            "port": dest_port,
            "move_destination": True,
            "tls": {
                "certificate": str(pki.client_cert),
                "private_key": str(pki.client_key),
                "ca_file": str(pki.ca),
                "server_name": "localhost",
            },
        }
    ]
    dicomd.start(config)
    wait_for_port(tls_port, proc=dicomd.proc)

    # 1. storescu over TLS with a client certificate, into the TLS listener.
    source = Path(get_testdata_file("CT_small.dcm"))
    storescu = subprocess.run(
        [require_program("storescu"), "-v", "-aet", "TLSMODALITY", "-aec", "DICOMD",
         "+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca),
         "127.0.0.1", str(tls_port), str(source)],
        capture_output=True, text=True, env=dcmtk_env, timeout=60,
    )  # fmt: skip
    assert storescu.returncode == 0, storescu.stdout + storescu.stderr
    assert "Received Store Response (Success)" in storescu.stdout + storescu.stderr
    accepted = dicomd.wait_for_log("association_accepted", dicom_calling_ae="TLSMODALITY")
    assert accepted["tls_subject"] == "modality-1"

    # 2. C-MOVE (plain listener) to a destination that only speaks TLS.
    received = tmp_path / "received"
    received.mkdir()
    storescp = subprocess.Popen(
        [require_program("storescp"), "-aet", "STORESCP", "+B", "+tls", str(pki.server_key),
         str(pki.server_cert), "+cf", str(pki.ca), "-od", str(received), str(dest_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dcmtk_env,
    )  # fmt: skip
    try:
        wait_for_port(dest_port, proc=storescp)
        study = pydicom.dcmread(source).StudyInstanceUID
        movescu = subprocess.run(
            [require_program("movescu"), "-v", "-S", "-aec", "DICOMD", "-aem", "STORESCP",
             "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
             "127.0.0.1", str(port)],
            capture_output=True, text=True, env=dcmtk_env, timeout=60,
        )  # fmt: skip
        assert movescu.returncode == 0, movescu.stdout + movescu.stderr
        files = list(received.iterdir())
        assert len(files) == 1, files
        # The destination received, over TLS, the data set dicomd stored (storescp +B keeps
        # it as received).
        stored = next((tmp_path / "archive").rglob("*.dcm"))
        assert dataset_bytes(files[0]) == dataset_bytes(stored)
        entry = dicomd.wait_for_log("qr_move", move_destination="STORESCP")
        assert entry["completed"] == 1 and entry["failed"] == 0
    finally:
        storescp.terminate()
        storescp.wait(10)

    # 3. The same move refused when the destination's certificate is not trusted: the
    # sub-association fails, the instance is counted failed (no silent plain fallback).
    bad = subprocess.Popen(
        [require_program("storescp"), "-aet", "STORESCP", "+tls", str(pki.other_key),
         str(pki.other_cert), "+cf", str(pki.ca), "-od", str(received), str(dest_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dcmtk_env,
    )  # fmt: skip
    try:
        wait_for_port(dest_port, proc=bad)
        result = subprocess.run(
            [sys.executable, "-m", "dicomd", "move", "127.0.0.1", str(port), "--aec", "DICOMD",
             "--dest", "STORESCP", "-k", f"StudyInstanceUID={study}", "--level", "STUDY"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode != 0, result.stdout + result.stderr
        failed = dicomd.wait_for_log("qr_move", move_destination="STORESCP", failed=1)
        assert failed["completed"] == 0
        assert len(list(received.iterdir())) == 1  # nothing more arrived
    finally:
        bad.terminate()
        bad.wait(10)
