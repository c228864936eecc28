"""Query/Retrieve SCP against real DCMTK peers: findscu -P/-S at every level, movescu to a
storescp destination, getscu; the archive is filled with ``dicomd store`` (C-STORE)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from conftest import Dicomd, base_config, free_port, require_program, wait_for_port
from qr_helpers import Inst, make_archive_files, store

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"


def dataset_bytes(path: Path) -> bytes:
    from dicomd.archive.part10 import read_file_meta

    with open(path, "rb") as fp:
        meta = read_file_meta(fp)
    return path.read_bytes()[meta.dataset_offset :]


@dataclass
class Server:
    dicomd: Dicomd
    port: int
    instances: list[Inst]
    dest_port: int
    dest_dir: Path
    tmp: Path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    require_program("findscu")
    tmp = tmp_path_factory.mktemp("qr")
    port = free_port()
    dest_port = free_port()
    config = base_config(
        tmp,
        port,
        local_aes=[
            {
                "ae_title": "DICOMD",
                "services": {"verification": None, "storage": None, "query_retrieve": None},
            },
            {
                "ae_title": "LIMITED",
                "services": {"query_retrieve": {"max_results": 2, "case_insensitive_names": True}},
            },
        ],
        access={
            "default": "allow",
            "rules": [
                {
                    "name": "get-only",
                    "action": "deny",
                    "calling": ["GETONLY"],
                    "services": ["store"],
                }
            ],
        },
        peers=[
            {
                "name": "storescp",
                "ae_title": "STORESCP",
                "host": "127.0.0.1",
                "port": dest_port,
                "move_destination": True,
            },
            {
                "name": "nobody",
                "ae_title": "NOBODY",
                "host": "127.0.0.1",
                "port": free_port(),
                "move_destination": True,
            },
        ],
    )
    d = Dicomd(tmp)
    d.start(config)
    try:
        instances = make_archive_files(tmp / "source")
        store(port, [i.path for i in instances])
        store(port, [Path(pydicom.data.get_testdata_file("MR_small_RLE.dcm"))])
        yield Server(d, port, instances, dest_port, tmp / "received", tmp)
    finally:
        d.stop()


def findscu(
    server: Server,
    tmp: Path,
    model: str,
    *keys: str,
    aec: str = "DICOMD",
    extra: tuple[str, ...] = (),
) -> tuple[subprocess.CompletedProcess[str], list[pydicom.Dataset]]:
    out = tmp / f"find{time.monotonic_ns()}"
    out.mkdir()
    args = [require_program("findscu"), "-v", model, "-aec", aec, "-X", "-od", str(out), *extra]
    for k in keys:
        args += ["-k", k]
    args += ["127.0.0.1", str(server.port)]
    result = subprocess.run(
        args, capture_output=True, text=True, timeout=60, env={"TCP_NODELAY": "1"}
    )
    answers = [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]
    return result, answers


def test_study_level_patient_root(server: Server, tmp_path: Path) -> None:
    result, answers = findscu(
        server,
        tmp_path,
        "-P",
        "QueryRetrieveLevel=STUDY",
        "PatientID=PID1",
        "StudyInstanceUID",
        "StudyDate",
        "AccessionNumber",
        "ModalitiesInStudy",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
        "StudyDescription",
    )
    assert result.returncode == 0, result.stderr
    by_uid = {a.StudyInstanceUID: a for a in answers}
    expected = {i.study_uid for i in server.instances if i.patient_id == "PID1"}
    assert set(by_uid) == expected
    for uid, a in by_uid.items():
        mine = [i for i in server.instances if i.study_uid == uid]
        assert a.QueryRetrieveLevel == "STUDY"
        assert a.StudyDate == mine[0].study_date
        assert a.AccessionNumber == mine[0].accession
        assert int(a.NumberOfStudyRelatedInstances) == len(mine)
        assert int(a.NumberOfStudyRelatedSeries) == len({i.series_uid for i in mine})
        mods = a.ModalitiesInStudy
        mods = [mods] if isinstance(mods, str) else list(mods)
        assert sorted(mods) == sorted({i.modality for i in mine})
        assert a.StudyDescription.startswith("Study ")


def test_patient_level_wildcard(server: Server, tmp_path: Path) -> None:
    result, answers = findscu(
        server,
        tmp_path,
        "-P",
        "QueryRetrieveLevel=PATIENT",
        "PatientName=DOE*",
        "PatientID",
        "NumberOfPatientRelatedStudies",
        "NumberOfPatientRelatedInstances",
    )
    assert result.returncode == 0, result.stderr
    got = {a.PatientID: a for a in answers}
    assert set(got) == {"PID1", "PID2"}
    assert int(got["PID1"].NumberOfPatientRelatedStudies) == 2
    assert int(got["PID1"].NumberOfPatientRelatedInstances) == 6
    assert str(got["PID2"].PatientName) == "DOE^JANE"
    # Standard matching is case-sensitive ...
    _, answers = findscu(
        server, tmp_path, "-P", "QueryRetrieveLevel=PATIENT", "PatientName=doe*", "PatientID"
    )
    assert answers == []
    # ... the LIMITED AE matches names case-insensitively and stops after 2 answers.
    result, answers = findscu(
        server,
        tmp_path,
        "-P",
        "QueryRetrieveLevel=PATIENT",
        "PatientName=doe?j*",
        "PatientID",
        aec="LIMITED",
    )
    assert {a.PatientID for a in answers} == {"PID1", "PID2"}
    result, answers = findscu(
        server, tmp_path, "-S", "QueryRetrieveLevel=STUDY", "StudyInstanceUID", aec="LIMITED"
    )
    assert len(answers) == 2
    assert "refused: outofresources" in (result.stdout + result.stderr).lower()
    server.dicomd.wait_for_log("qr_too_many_matches", max_results=2)


def test_study_root_date_range_and_uid_list(server: Server, tmp_path: Path) -> None:
    result, answers = findscu(
        server,
        tmp_path,
        "-S",
        "QueryRetrieveLevel=STUDY",
        "StudyDate=20240101-20240331",
        "StudyInstanceUID",
        "PatientID",
    )
    assert result.returncode == 0, result.stderr
    expected = {i.study_uid for i in server.instances if "20240101" <= i.study_date <= "20240331"}
    assert {a.StudyInstanceUID for a in answers} == expected
    uids = sorted({i.study_uid for i in server.instances})[:2]
    _, answers = findscu(
        server,
        tmp_path,
        "-S",
        "QueryRetrieveLevel=STUDY",
        "StudyInstanceUID=" + "\\".join(uids),
        "PatientName",
    )
    assert sorted(a.StudyInstanceUID for a in answers) == uids
    # An accession number with a LIKE metacharacter is matched literally.
    _, answers = findscu(
        server, tmp_path, "-S", "QueryRetrieveLevel=STUDY", "AccessionNumber=ACC_4%",
        "StudyInstanceUID",
    )  # fmt: skip
    assert len(answers) == 1


def test_series_and_image_levels(server: Server, tmp_path: Path) -> None:
    study = server.instances[0].study_uid
    for model in ("-P", "-S"):
        keys = ["PatientID=PID1"] if model == "-P" else []
        result, answers = findscu(
            server,
            tmp_path,
            model,
            "QueryRetrieveLevel=SERIES",
            *keys,
            f"StudyInstanceUID={study}",
            "SeriesInstanceUID",
            "Modality=CT",
            "NumberOfSeriesRelatedInstances",
            "SeriesDescription",
        )
        assert result.returncode == 0, result.stderr
        assert len(answers) == 1
        assert answers[0].Modality == "CT"
        assert int(answers[0].NumberOfSeriesRelatedInstances) == 3
        series = answers[0].SeriesInstanceUID
        result, answers = findscu(
            server,
            tmp_path,
            model,
            "QueryRetrieveLevel=IMAGE",
            *keys,
            f"StudyInstanceUID={study}",
            f"SeriesInstanceUID={series}",
            "SOPInstanceUID",
            "InstanceNumber",
            "ImageComments",
            "Rows",
        )
        assert result.returncode == 0, result.stderr
        mine = {i.sop_uid: i for i in server.instances if i.series_uid == series}
        assert {a.SOPInstanceUID for a in answers} == set(mine)
        for a in answers:
            assert int(a.InstanceNumber) == mine[a.SOPInstanceUID].number
            assert a.ImageComments.startswith("image ")  # from the stored header
            assert a.Rows == 4


def test_hierarchical_key_missing(server: Server, tmp_path: Path) -> None:
    result, answers = findscu(
        server, tmp_path, "-S", "QueryRetrieveLevel=SERIES", "SeriesInstanceUID"
    )
    assert answers == []
    assert "datasetdoesnotmatchsopclass" in (result.stdout + result.stderr).lower()
    server.dicomd.wait_for_log("qr_bad_identifier")


def test_character_sets(server: Server, tmp_path: Path) -> None:
    jp = next(i for i in server.instances if i.patient_id == "PIDJP")
    fr = next(i for i in server.instances if i.patient_id == "PIDFR")
    _, answers = findscu(
        server, tmp_path, "-P", "QueryRetrieveLevel=PATIENT", "PatientID=PIDJP", "PatientName"
    )
    assert len(answers) == 1
    assert str(answers[0].PatientName) == jp.patient_name
    assert "ISO_IR 192" in str(answers[0].SpecificCharacterSet)
    # A query in ISO 2022 IR 87 gets the answer in its own character set.
    _, answers = findscu(
        server,
        tmp_path,
        "-P",
        "QueryRetrieveLevel=PATIENT",
        "SpecificCharacterSet=\\ISO 2022 IR 87",
        "PatientName=Yamada*",
        "PatientID",
    )
    assert [a.PatientID for a in answers] == ["PIDJP"]
    assert str(answers[0].PatientName) == jp.patient_name
    assert "ISO 2022 IR 87" in list(answers[0].SpecificCharacterSet)
    _, answers = findscu(
        server,
        tmp_path,
        "-P",
        "QueryRetrieveLevel=PATIENT",
        "SpecificCharacterSet=ISO_IR 100",
        "PatientName=Buc^J*",
        "PatientID",
    )
    assert [a.PatientID for a in answers] == ["PIDFR"]
    assert str(answers[0].PatientName) == fr.patient_name
    assert answers[0].SpecificCharacterSet == "ISO_IR 100"


def test_cancel(server: Server) -> None:
    """A C-CANCEL sent on seeing the first answer stops a large C-FIND. The requestor
    reacts within the stream (pynetdicom takes several milliseconds to, by when dicomd may
    have sent all 300 answers and its final Success)."""
    import asyncio

    from pydicom.dataset import Dataset

    from dicomd.association import associate
    from dicomd.net import dimse
    from dicomd.query.charset import encode_dataset

    bulk = [i for i in server.instances if i.patient_id == "BULK"]
    q = Dataset()
    q.QueryRetrieveLevel = "IMAGE"
    q.StudyInstanceUID = bulk[0].study_uid
    q.SeriesInstanceUID = bulk[0].series_uid
    q.SOPInstanceUID = ""

    async def find_and_cancel() -> list[int]:
        explicit = "1.2.840.10008.1.2.1"
        assoc = await associate(
            "127.0.0.1",
            server.port,
            calling_ae="CANCELLER",
            called_ae="DICOMD",
            contexts=[(STUDY_ROOT_FIND, [explicit])],
        )
        statuses: list[int] = []
        try:
            cx = assoc.context_for(STUDY_ROOT_FIND)
            message_id = assoc.next_message_id()
            fields = dimse.c_find_rq(message_id, STUDY_ROOT_FIND)
            async for response in assoc.request(cx, fields, encode_dataset(q, explicit)):
                statuses.append(response.status)
                if len(statuses) == 1:
                    await assoc.send_message(cx, dimse.c_cancel_rq(message_id))
        finally:
            await assoc.release()
        return statuses

    statuses = asyncio.run(find_and_cancel())
    assert statuses[-1] == 0xFE00
    assert len(statuses) < len(bulk)
    entry = server.dicomd.wait_for_log("qr_find", status="0xfe00")
    assert entry["answers"] < len(bulk)


# --- C-MOVE ---------------------------------------------------------------------------------


@pytest.fixture
def storescp(server: Server, tmp_path: Path) -> Iterator[Path]:
    program = require_program("storescp")
    out = tmp_path / "received"
    out.mkdir()
    proc = subprocess.Popen(
        [program, "-aet", "STORESCP", "+B", "-od", str(out), str(server.dest_port)],
        env={"TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(server.dest_port, proc=proc)
        yield out
    finally:
        proc.terminate()
        proc.wait(10)


def movescu(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_program("movescu"), "-v", "-aec", "DICOMD", *args, "127.0.0.1", str(server.port)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"TCP_NODELAY": "1"},
    )


def test_move_study_to_storescp(server: Server, storescp: Path) -> None:
    study = server.instances[0].study_uid
    result = movescu(
        server, "-S", "-aem", "STORESCP", "-k", "QueryRetrieveLevel=STUDY",
        "-k", f"StudyInstanceUID={study}",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    mine = [i for i in server.instances if i.study_uid == study]
    received = list(storescp.iterdir())
    assert len(received) == len(mine)
    for path in received:
        ds = pydicom.dcmread(path)
        src = next(i for i in mine if i.sop_uid == ds.SOPInstanceUID)
        # +B keeps the received data set: byte-identical to what was sent and stored.
        assert dataset_bytes(path) == dataset_bytes(src.path)
        assert ds.PixelData == pydicom.dcmread(src.path).PixelData
    entry = server.dicomd.wait_for_log("qr_move", move_destination="STORESCP")
    assert entry["completed"] == len(mine) and entry["failed"] == 0


def test_move_unknown_destination(server: Server) -> None:
    result = movescu(
        server, "-S", "-aem", "ELSEWHERE", "-k", "QueryRetrieveLevel=STUDY",
        "-k", f"StudyInstanceUID={server.instances[0].study_uid}",
    )  # fmt: skip
    text = (result.stdout + result.stderr).lower()
    assert "movedestinationunknown" in text, text
    entry = server.dicomd.wait_for_log("qr_move_destination_unknown", move_destination="ELSEWHERE")
    assert "STORESCP" in entry["known_destinations"]


def test_move_destination_down(server: Server) -> None:
    result = movescu(
        server, "-S", "-aem", "NOBODY", "-k", "QueryRetrieveLevel=SERIES",
        "-k", f"StudyInstanceUID={server.instances[0].study_uid}",
        "-k", f"SeriesInstanceUID={server.instances[0].series_uid}",
    )  # fmt: skip
    text = (result.stdout + result.stderr).lower()
    assert "outofresourcessuboperations" in text, text
    server.dicomd.wait_for_log("qr_move_subassociation_failed", move_destination="NOBODY")


# --- C-GET ----------------------------------------------------------------------------------


@pytest.mark.parametrize("calling", ["GETSCU", "GETONLY"])
def test_getscu_study(server: Server, tmp_path: Path, calling: str) -> None:
    """GETONLY may not store (an access rule) but may still C-GET: the storage contexts
    are then accepted for the requestor's SCP role only."""
    study = server.instances[0].study_uid
    out = tmp_path / "got"
    out.mkdir()
    result = subprocess.run(
        [
            require_program("getscu"), "-v", "-S", "-aet", calling, "-aec", "DICOMD",
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
            "-od", str(out), "127.0.0.1", str(server.port),
        ],
        capture_output=True, text=True, timeout=60, env={"TCP_NODELAY": "1"},
    )  # fmt: skip
    # getscu 3.6.7 can crash on exit although the files arrived: check the files.
    mine = {i.sop_uid: i for i in server.instances if i.study_uid == study}
    received = list(out.iterdir())
    assert len(received) == len(mine), result.stdout + result.stderr
    for path in received:
        ds = pydicom.dcmread(path)
        src = mine[ds.SOPInstanceUID]
        assert ds.PixelData == pydicom.dcmread(src.path).PixelData
        assert ds.ImageComments == pydicom.dcmread(src.path).ImageComments
    entry = server.dicomd.wait_for_log("qr_get", completed=len(mine), calling_ae=calling)
    assert entry["failed"] == 0 and entry["status"] == "0x0"
    if calling == "GETONLY":
        stored = subprocess.run(
            [require_program("storescu"), "-aet", "GETONLY", "-aec", "DICOMD", "127.0.0.1",
             str(server.port), str(server.instances[0].path)],
            capture_output=True, text=True, timeout=60, env={"TCP_NODELAY": "1"},
        )  # fmt: skip
        assert stored.returncode != 0


def test_move_compressed_to_uncompressed_only_destination(server: Server, storescp: Path) -> None:
    """storescp accepts only uncompressed syntaxes: the RLE instance is decompressed with
    pydicom (NumPy and the pylibjpeg decoders are dependencies) and arrives uncompressed."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE

    source = pydicom.dcmread(pydicom.data.get_testdata_file("MR_small_RLE.dcm"))
    ae = AE(ae_title="MOVER")
    ae.add_requested_context(STUDY_ROOT_MOVE)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="DICOMD")
    assert assoc.is_established
    try:
        q = Dataset()
        q.QueryRetrieveLevel = "IMAGE"
        q.StudyInstanceUID = source.StudyInstanceUID
        q.SeriesInstanceUID = source.SeriesInstanceUID
        q.SOPInstanceUID = source.SOPInstanceUID
        responses = list(assoc.send_c_move(q, "STORESCP", STUDY_ROOT_MOVE))
    finally:
        assoc.release()
    status, identifier = responses[-1]
    received = list(storescp.iterdir())
    assert status.Status == 0x0000, (status, identifier)
    assert len(received) == 1
    got = pydicom.dcmread(received[0])
    assert got.file_meta.TransferSyntaxUID in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
    source.decompress()
    assert got.PixelData == source.PixelData


def test_move_cancel(server: Server, storescp: Path) -> None:
    from pydicom.dataset import Dataset
    from pynetdicom import AE

    bulk = [i for i in server.instances if i.patient_id == "BULK"]
    ae = AE(ae_title="CANCELLER")
    ae.add_requested_context(STUDY_ROOT_MOVE)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="DICOMD")
    assert assoc.is_established
    try:
        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID = bulk[0].study_uid
        q.SeriesInstanceUID = bulk[0].series_uid
        last = None
        for n, (status, _identifier) in enumerate(
            assoc.send_c_move(q, "STORESCP", STUDY_ROOT_MOVE, msg_id=9)
        ):
            last = status
            if n == 0:
                assoc.send_c_cancel(9, query_model=STUDY_ROOT_MOVE)
        assert last is not None and last.Status == 0xFE00
        assert 0 < last.NumberOfRemainingSuboperations < len(bulk)
    finally:
        assoc.release()
    entry = server.dicomd.wait_for_log("qr_move", status="0xfe00")
    assert entry["completed"] < len(bulk)


# --- dicomd find | move | get ---------------------------------------------------------------


def dicomd_cli(*args: str) -> subprocess.CompletedProcess[str]:
    import sys

    return subprocess.run(
        [sys.executable, "-m", "dicomd", *args], capture_output=True, text=True, timeout=60
    )


def test_cli_find_json_and_table(server: Server) -> None:
    import json

    port = str(server.port)
    result = dicomd_cli(
        "find", "127.0.0.1", port, "--aec", "DICOMD", "--json",
        "-k", "PatientName=DOE*", "-k", "StudyDate=20240101-20241231",
        "-k", "StudyInstanceUID", "-k", "PatientID",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    expected = {
        i.study_uid
        for i in server.instances
        if i.patient_name.startswith("DOE") and i.study_date.startswith("2024")
    }
    assert {r["StudyInstanceUID"] for r in rows} == expected
    # Non-ASCII keys go out in ISO_IR 192; the table lists the default return keys.
    jp = next(i for i in server.instances if i.patient_id == "PIDJP")
    result = dicomd_cli(
        "find", "127.0.0.1", port, "--aec", "DICOMD", "--model", "patient", "--level",
        "patient", "-k", f"PatientName={jp.patient_name}", "-k", "PatientID",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "PIDJP" in result.stdout and "PatientID" in result.stdout.splitlines()[0]
    result = dicomd_cli(
        "find", "127.0.0.1", port, "--aec", "DICOMD", "--level", "SERIES", "-k", "Modality"
    )
    assert result.returncode == 1
    assert "0xA900" in result.stderr


def test_cli_move_and_get(server: Server, storescp: Path, tmp_path: Path) -> None:
    study = server.instances[0].study_uid
    mine = {i.sop_uid for i in server.instances if i.study_uid == study}
    port = str(server.port)
    result = dicomd_cli(
        "move", "127.0.0.1", port, "--aec", "DICOMD", "--dest", "STORESCP",
        "-k", f"StudyInstanceUID={study}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"completed={len(mine)}" in result.stderr
    assert len(list(storescp.iterdir())) == len(mine)
    result = dicomd_cli(
        "move", "127.0.0.1", port, "--aec", "DICOMD", "--dest", "NOWHERE",
        "-k", f"StudyInstanceUID={study}",
    )  # fmt: skip
    assert result.returncode == 1 and "0xA801" in result.stderr
    out = tmp_path / "got"
    result = dicomd_cli(
        "get", "127.0.0.1", port, "--aec", "DICOMD", "-o", str(out),
        "-k", f"StudyInstanceUID={study}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    got = {pydicom.dcmread(p).SOPInstanceUID: p for p in out.iterdir()}
    assert set(got) == mine
    src = {i.sop_uid: i.path for i in server.instances}
    for uid, path in got.items():
        assert dataset_bytes(path) == dataset_bytes(src[uid])
