"""Storage SCP end to end: DCMTK storescu, pynetdicom and ``dicomd store`` as clients;
bit-preserving storage, the index, duplicates, bad input, a full disk, kill -9, migrations,
``dicomd reindex``."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
from conftest import Dicomd, free_port, require_program, require_root
from storage_helpers import (
    bundled_instances,
    check_archive_consistent,
    dataset_of,
    index_rows,
    instance_row,
    make_dataset,
    storage_config,
    stored_header,
)

from dicomd import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicomd.archive.layout import sanitize
from dicomd.association import associate
from dicomd.net import dimse

EXPLICIT = "1.2.840.10008.1.2.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
UID_ROOT = "1.2.826.0.1.3680043.9.7777"
# Bundled files whose data set is not well formed as sent: truncated values, or implicit VR
# data under an explicit VR transfer syntax. Stored as received they would be unreadable
# copies, so they are refused (C000 Cannot understand).
MALFORMED = {"MR_truncated.dcm", "rtplan_truncated.dcm", "SC_rgb_jpeg.dcm"}


def _check_row_against_file(row, path: Path) -> None:  # type: ignore[no-untyped-def]
    """Index values equal pydicom's reading of the original file (charsets decoded)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)

    def text(keyword: str) -> str | None:
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        if isinstance(value, pydicom.multival.MultiValue):
            return "\\".join(str(v) for v in value) or None
        return str(value).strip() or None

    # Patient and study rows hold the values of the instance that created them (bundled
    # files share UIDs across different headers), so compare them only when it was this one.
    if row["number_of_patient_related_instances"] == 1:
        assert row["patient_name"] == text("PatientName"), path.name
        assert row["patient_id"] == text("PatientID"), path.name
    if row["number_of_study_related_instances"] == 1:
        assert row["study_date"] == text("StudyDate"), path.name
        assert row["accession_number"] == text("AccessionNumber"), path.name
    assert (row["study_instance_uid"] or None) == text("StudyInstanceUID"), path.name
    assert row["instance_number"] == (
        int(ds.InstanceNumber) if ds.get("InstanceNumber") not in (None, "") else None
    ), path.name
    assert row["sop_class_uid"] == text("SOPClassUID"), path.name
    # The header the index keeps (bytes up to the pixel data) decodes to the file's.
    header = stored_header(row, path)
    assert header.SOPInstanceUID == ds.SOPInstanceUID, path.name
    assert "PixelData" not in header  # never the pixel data
    if row["header"] is not None:
        assert [e.tag for e in header] == [e.tag for e in ds if e.tag < 0x7FE00000], path.name


# --- pynetdicom: bit-preserving, index values ------------------------------------------------


def test_pynetdicom_every_bundled_instance_bit_for_bit(dicomd: Dicomd, tmp_path: Path) -> None:
    from pynetdicom import AE, _config

    instances, skipped = bundled_instances()
    assert len(instances) > 100, skipped
    # Files left out (listed so a change in pydicom's bundle is visible).
    assert {name for name, _ in skipped} >= {"no_meta.dcm", "DICOMDIR", "UN_sequence.dcm"}
    port = free_port()
    config = storage_config(
        tmp_path,
        port,
        aes=[
            {
                "ae_title": "DICOMD",
                "services": {"storage": {"min_free_space": 0, "duplicates": "replace"}},
            }
        ],
        durability="none",  # one C-STORE at a time: fsync rounds would dominate the run
    )
    dicomd.start(config)
    db = tmp_path / "index.sqlite"
    root = tmp_path / "archive"
    pairs = sorted({(i.sop_class_uid, i.transfer_syntax_uid) for i in instances})
    assert len(pairs) <= 128
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title="PYNETDICOM")
    for sop_class, ts in pairs:
        ae.add_requested_context(sop_class, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMD")
    syntaxes = set()
    try:
        assert assoc.is_established
        mismatched = 0
        for inst in instances:
            status = assoc.send_c_store(inst.path)
            if inst.path.name in MALFORMED:
                assert status.Status == 0xC000, (inst.path.name, status)
                continue
            if inst.meta_sop_instance_uid != inst.sop_instance_uid:
                # pynetdicom names the file meta's UID in the command: the data set does not
                # match it, which is refused (PS3.4 B.2.3 A900) with the offending element.
                assert status.Status == 0xA900, (inst.path.name, status)
                assert status.OffendingElement == 0x00080018
                mismatched += 1
                continue
            assert status.Status == 0, (inst.path.name, status)
            # Acknowledged means on disk and indexed: check right now.
            row = instance_row(db, inst.sop_instance_uid)
            assert row is not None, inst.path.name
            stored = root / row["path"]
            data, ts = dataset_of(stored)
            assert ts == inst.transfer_syntax_uid
            assert data == inst.dataset_bytes(), f"{inst.path.name}: data set bytes differ"
            assert row["sha256"] == hashlib.sha256(data).hexdigest()
            assert row["transfer_syntax_uid"] == inst.transfer_syntax_uid
            assert row["calling_ae"] == "PYNETDICOM"
            _check_row_against_file(row, inst.path)
            syntaxes.add(ts)
            if inst.path.name == "CT_small.dcm":
                meta = pydicom.dcmread(stored, stop_before_pixels=True).file_meta
                assert meta.MediaStorageSOPInstanceUID == inst.sop_instance_uid
                assert meta.MediaStorageSOPClassUID == inst.sop_class_uid
                assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
                assert meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME
                assert meta.SourceApplicationEntityTitle == "PYNETDICOM"
                assert meta.FileMetaInformationVersion == b"\x00\x01"
    finally:
        assoc.release()
        ae.shutdown()
        _config.STORE_SEND_CHUNKED_DATASET = old
    assert len(syntaxes) >= 10, syntaxes  # compressed, deflated, big endian, implicit...
    assert mismatched >= 5
    # Non-Latin names decoded with the instance's Specific Character Set.
    names = {r["patient_name"] for r in index_rows(db, "SELECT patient_name FROM patient")}
    assert "Yamada^Tarou=山田^太郎=やまだ^たろう" in names  # ISO 2022 IR 87
    assert "Люкceмбypг" in names  # ISO_IR 144  # noqa: RUF001
    assert "قباني^لنزار" in names  # ISO_IR 127
    assert "Διονυσιος" in names  # ISO_IR 126
    assert "Hong^Gildong=洪^吉洞=홍^길동" in names  # ISO 2022 IR 149
    assert "Wang^XiaoDong=王^小東" in names  # ISO_IR 192
    check_archive_consistent(root, db)


# --- DCMTK storescu: broad interop, each file in its own transfer syntax --------------------


def test_storescu_every_bundled_instance(
    dicomd: Dicomd, tmp_path: Path, dcmtk_env: dict[str, str]
) -> None:
    exe = require_program("storescu")
    instances, _ = bundled_instances()
    port = free_port()
    config = storage_config(
        tmp_path,
        port,
        aes=[
            {
                "ae_title": "DICOMD",
                "services": {"storage": {"min_free_space": 0, "duplicates": "replace"}},
            }
        ],
    )
    dicomd.start(config)
    # One presentation context per (SOP class, transfer syntax) pair, each proposing only
    # that syntax: storescu then sends every file in its own encoding (no conversion).
    pairs = sorted({(i.sop_class_uid, i.transfer_syntax_uid) for i in instances})
    syntaxes = sorted({ts for _, ts in pairs})
    lines = ["[[TransferSyntaxes]]"]
    for n, ts in enumerate(syntaxes):
        lines += [f"[TS{n}]", f"TransferSyntax1 = {ts}"]
    lines += ["[[PresentationContexts]]", "[Contexts]"]
    for n, (sop, ts) in enumerate(pairs, 1):
        lines.append(f"PresentationContext{n} = {sop}\\TS{syntaxes.index(ts)}")
    lines += ["[[Profiles]]", "[Each]", "PresentationContexts = Contexts"]
    cfg = tmp_path / "storescu.cfg"
    cfg.write_text("\n".join(lines) + "\n")
    result = subprocess.run(
        [exe, "-v", "-nh", "-aec", "DICOMD", "-xf", str(cfg), "Each", "127.0.0.1", str(port)]
        + [str(i.path) for i in instances],
        capture_output=True,
        text=True,
        env=dcmtk_env,
        timeout=120,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    conversions = re.findall(r"Converting transfer syntax: (.+?) -> (.+)", out)
    assert all(a.strip() == b.strip() for a, b in conversions), conversions
    sent, unreadable = set(), []
    for segment in out.split("I: Sending file: ")[1:]:
        name = segment.splitlines()[0].strip()
        if "Sending Store Request" not in segment:
            unreadable.append(name)  # storescu itself cannot read it (truncated, ...)
            continue
        assert "Received Store Response (Success)" in segment, segment
        sent.add(name)
    # storescu refuses a few damaged files that pydicom reads; everything else arrived.
    assert len(unreadable) <= 6, unreadable
    assert len(sent) + len(unreadable) == len(instances)
    db = tmp_path / "index.sqlite"
    root = tmp_path / "archive"
    last = {i.sop_instance_uid: i for i in instances if str(i.path) in sent}
    for uid, inst in last.items():
        row = instance_row(db, uid)
        assert row is not None, inst.path.name
        assert row["transfer_syntax_uid"] == inst.transfer_syntax_uid, inst.path.name
        assert row["calling_ae"] == "STORESCU"
        _check_row_against_file(row, inst.path)
        stored = pydicom.dcmread(root / row["path"], stop_before_pixels=True)
        assert stored.file_meta.TransferSyntaxUID == inst.transfer_syntax_uid
    assert check_archive_consistent(root, db) == len(last)


# --- dicomd store --------------------------------------------------------------------------


def _run_store(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicomd", "store", "127.0.0.1", str(port), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_dicomd_store_cli(dicomd: Dicomd, tmp_path: Path) -> None:
    instances, _ = bundled_instances()
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    chosen = {}
    for inst in instances:  # one file per SOP instance, in a nested tree
        if inst.path.name not in MALFORMED:
            chosen.setdefault(inst.sop_instance_uid, inst)
    for n, inst in enumerate(chosen.values()):
        shutil.copy(inst.path, src / ("sub" if n % 2 else "") / f"{n}.dcm")
    (src / "notes.txt").write_text("not DICOM")
    port = free_port()
    config = storage_config(
        tmp_path,
        port,
        aes=[
            {"ae_title": "DICOMD", "services": {"storage": {"min_free_space": 0}}},
            {
                "ae_title": "REJECTDUP",
                "services": {"storage": {"min_free_space": 0, "duplicates": "reject"}},
            },
        ],
    )
    dicomd.start(config)
    result = _run_store(port, str(src), "--aec", "DICOMD", "-j", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"sent {len(chosen)} instances" in result.stdout
    assert f"0x0000 Success: {len(chosen)}" in result.stdout
    assert "skipped" in result.stderr and "notes.txt" in result.stderr
    assert "instances" in result.stderr  # progress
    db = tmp_path / "index.sqlite"
    assert check_archive_consistent(tmp_path / "archive", db) == len(chosen)
    for inst in chosen.values():  # bytes exactly as in the file
        row = instance_row(db, inst.sop_instance_uid)
        assert row is not None
        assert dataset_of(tmp_path / "archive" / row["path"])[0] == inst.dataset_bytes()
    # Any failure makes the exit status non-zero, with a summary.
    again = _run_store(port, str(src / "sub"), "--aec", "REJECTDUP")
    assert again.returncode == 1, again.stdout + again.stderr
    assert "0x0111 Duplicate SOP Instance" in again.stdout


# --- duplicates, bad input, unknown SOP classes (dicomd's own requestor) -------------------


async def _store(
    port: int,
    called: str,
    items: list[tuple[str, bytes]],
    sop_class: str = SECONDARY_CAPTURE,
    *,
    ts: str = EXPLICIT,
) -> list[tuple[int, str | None]]:
    assoc = await associate(
        "127.0.0.1",
        port,
        calling_ae="TESTSCU",
        called_ae=called,
        contexts=[(sop_class, [ts]), (dimse.VERIFICATION, [EXPLICIT])],
    )
    out = []
    try:
        cx = assoc.context_for(sop_class)
        for uid, data in items:
            fields = dimse.c_store_rq(assoc.next_message_id(), sop_class, uid)
            async for rsp in assoc.request(cx, fields, data, timeout=30):
                out.append((rsp.status, rsp.command.error_comment))
    finally:
        await assoc.release()
    return out


async def test_duplicate_policies(dicomd: Dicomd, tmp_path: Path) -> None:
    port = free_port()
    policies = ["keep", "reject", "replace", "replace-if-different"]
    aes = [
        {
            "ae_title": f"P{n}",
            "services": {"storage": {"min_free_space": 0, "duplicates": policy}},
        }
        for n, policy in enumerate(policies)
    ]
    dicomd.start(storage_config(tmp_path, port, aes=aes))
    db = tmp_path / "index.sqlite"
    root = tmp_path / "archive"
    expected = {
        "keep": ([0, 0, 0], "first"),
        "reject": ([0, 0x0111, 0x0111], "first"),
        "replace": ([0, 0, 0], "second"),
        "replace-if-different": ([0, 0, 0], "second"),
    }
    for n, policy in enumerate(policies):
        uid = f"{UID_ROOT}.2.{n}"
        first = make_dataset(uid, patient_name="First^Copy")
        second = make_dataset(uid, patient_name="Second^Copy")
        statuses = await _store(port, f"P{n}", [(uid, first), (uid, first), (uid, second)])
        want, which = expected[policy]
        assert [s for s, _ in statuses] == want, (policy, statuses)
        row = instance_row(db, uid)
        assert row is not None
        data = (first, second)[which == "second"]
        assert row["sha256"] == hashlib.sha256(data).hexdigest(), policy
        assert dataset_of(root / row["path"])[0] == data
        name = str(stored_header(row).PatientName)
        assert name == ("First^Copy" if which == "first" else "Second^Copy"), policy
        dicomd.wait_for_log("store_duplicate", policy=policy)
    assert check_archive_consistent(root, db) == len(policies)
    assert index_rows(db, "SELECT count(*) AS n FROM study")[0]["n"] == 1
    study = index_rows(db, "SELECT * FROM study")[0]
    assert study["number_of_study_related_instances"] == len(policies)
    assert study["number_of_study_related_series"] == 1
    assert study["modalities_in_study"] == "OT"
    assert study["sop_classes_in_study"] == SECONDARY_CAPTURE


async def test_bad_input_is_refused_and_nothing_stored(dicomd: Dicomd, tmp_path: Path) -> None:
    port = free_port()
    dicomd.start(storage_config(tmp_path, port))
    good_uid, other_uid = f"{UID_ROOT}.3.1", f"{UID_ROOT}.3.2"
    statuses = await _store(
        port,
        "DICOMD",
        [
            (good_uid, make_dataset(other_uid)),  # identity differs from the command
            (good_uid, b"\x08\x00\x18\x00UI\x40\x00" + b"1.2.3"),  # truncated value
            (good_uid, make_dataset(good_uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.2")),
        ],
    )
    assert statuses[0][0] == 0xA900, statuses
    assert "SOP Instance UID" in (statuses[0][1] or "")
    assert 0xC000 <= statuses[1][0] <= 0xCFFF, statuses
    assert statuses[2][0] == 0xA900, statuses
    db = tmp_path / "index.sqlite"
    assert check_archive_consistent(tmp_path / "archive", db) == 0
    dicomd.wait_for_log("store_failed", status="0xA900")


async def test_unknown_sop_class_with_and_without_the_switch(
    dicomd: Dicomd, tmp_path: Path
) -> None:
    port = free_port()
    aes = [
        {
            "ae_title": "STRICT",
            "services": {"verification": None, "storage": {"min_free_space": 0}},
        },
        {
            "ae_title": "LENIENT",
            "services": {
                "verification": None,
                "storage": {"min_free_space": 0, "accept_unknown_sop_classes": True},
            },
        },
    ]
    dicomd.start(storage_config(tmp_path, port, aes=aes))
    private_class = "1.2.826.0.1.3680043.9.7777.99.1"
    uid = f"{UID_ROOT}.4.1"
    data = make_dataset(uid, sop_class_uid=private_class)
    with pytest.raises(Exception, match="no accepted presentation context"):
        await _store(port, "STRICT", [(uid, data)], sop_class=private_class)
    statuses = await _store(port, "LENIENT", [(uid, data)], sop_class=private_class)
    assert statuses == [(0, None)]
    row = instance_row(tmp_path / "index.sqlite", uid)
    assert row is not None and row["sop_class_uid"] == private_class
    # A known non-storage SOP class (Patient Root C-FIND) is never taken as storage.
    with pytest.raises(Exception, match="no accepted presentation context"):
        await _store(port, "LENIENT", [(uid, data)], sop_class="1.2.840.10008.5.1.4.1.2.1.1")


async def test_layout_collision_never_overwrites(dicomd: Dicomd, tmp_path: Path) -> None:
    port = free_port()
    config = storage_config(tmp_path, port, layout="{PatientID}/{StudyDate}/{SOPInstanceUID}.dcm")
    dicomd.start(config)
    uid = f"{UID_ROOT}.5.1"
    root = tmp_path / "archive"
    foreign = root / sanitize("../etc") / "_" / f"{uid}.dcm"
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"someone else's file")
    data = make_dataset(uid, extra={"PatientID": "../etc"})
    assert await _store(port, "DICOMD", [(uid, data)]) == [(0, None)]
    assert foreign.read_bytes() == b"someone else's file"
    row = instance_row(tmp_path / "index.sqlite", uid)
    assert row is not None
    assert row["path"] == f"_._etc/_/{uid}_1.dcm"  # '/' never adds a level
    assert dataset_of(root / row["path"])[0] == data


# --- disk full ------------------------------------------------------------------------------


async def test_disk_full_answers_a700_and_keeps_the_archive_whole(
    dicomd: Dicomd, tmp_path: Path
) -> None:
    require_root()
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], check=True)
    try:
        port = free_port()
        aes = [
            {"ae_title": "WATERMARK", "services": {"storage": {"min_free_space": "1MiB"}}},
            {"ae_title": "NOWATERMARK", "services": {"storage": {"min_free_space": 0}}},
        ]
        dicomd.start(storage_config(tmp_path, port, aes=aes, root=str(mnt / "archive")))
        big = 150_000
        batch = [
            (f"{UID_ROOT}.6.{n}", make_dataset(f"{UID_ROOT}.6.{n}", pixel_bytes=big))
            for n in range(30)
        ]
        statuses = [s for s, _ in await _store(port, "WATERMARK", batch)]
        assert statuses[0] == 0
        first_refusal = statuses.index(0xA700)
        assert all(s == 0xA700 for s in statuses[first_refusal:]), statuses
        assert first_refusal >= 5, statuses
        # Past the watermark, into ENOSPC: still A700, never 0000 for what is not stored.
        batch2 = [
            (f"{UID_ROOT}.7.{n}", make_dataset(f"{UID_ROOT}.7.{n}", pixel_bytes=big))
            for n in range(20)
        ]
        statuses2 = [s for s, _ in await _store(port, "NOWATERMARK", batch2)]
        assert 0xA700 in statuses2, statuses2
        assert set(statuses2) <= {0, 0xA700}, statuses2
        db = tmp_path / "index.sqlite"
        stored = check_archive_consistent(mnt / "archive", db)
        assert stored == statuses.count(0) + statuses2.count(0)
        dicomd.wait_for_log("store_failed", status="0xA700")
        dicomd.stop()
    finally:
        dicomd.stop()
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# --- durability none, the journal -----------------------------------------------------------


def wait_indexed(db: Path, count: int, timeout: float = 15.0) -> None:
    """Under ``durability: none`` the index follows the answers (within SUBMIT_DELAY)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if db.exists() and index_rows(db, "SELECT count(*) AS n FROM instance")[0]["n"] >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} instances indexed after {timeout} s")


def _series(run: str, n: int, pixel_bytes: int = 5000) -> list[tuple[str, bytes]]:
    return [
        (
            f"{UID_ROOT}.{run}.{i}",
            make_dataset(
                f"{UID_ROOT}.{run}.{i}",
                study_uid=f"{UID_ROOT}.{run}",
                series_uid=f"{UID_ROOT}.{run}.{i % 3}.0",
                pixel_bytes=pixel_bytes + i,
                extra={"PatientName": "Yamada^Tarou=山田^太郎", "StudyDate": "20240102"},
            ),
        )
        for i in range(n)
    ]


# 20 kB data sets are hashed before their answer; 200 kB ones (>= HASH_AFTER_ANSWER_MIN)
# right after it, on the event loop: the index must hold the right digest either way.
@pytest.mark.parametrize("pixel_bytes", [20_000, 200_000])
async def test_none_answers_when_written_and_indexes_everything(
    dicomd: Dicomd, tmp_path: Path, pixel_bytes: int
) -> None:
    """durability none, keep: 0000 once the file is written; the index follows from the
    queue with every value (decoded off the answer's path), duplicates handled there."""
    port = free_port()
    dicomd.start(storage_config(tmp_path, port, durability="none"))
    items = _series("9", 60, pixel_bytes=pixel_bytes)
    statuses = await _store(port, "DICOMD", items + items[:5])  # 5 duplicates (keep)
    assert [s for s, _ in statuses] == [0] * 65
    db, root = tmp_path / "index.sqlite", tmp_path / "archive"
    wait_indexed(db, 60)
    dicomd.wait_for_log("store_duplicate", action="kept")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the duplicates' files go once the index saw them
        try:
            assert check_archive_consistent(root, db) == 60
            break
        except AssertionError:
            time.sleep(0.1)
    assert check_archive_consistent(root, db) == 60
    for uid, data in items:
        row = instance_row(db, uid)
        assert row is not None
        assert row["sha256"] == hashlib.sha256(data).hexdigest()
        assert row["patient_name"] == "Yamada^Tarou=山田^太郎"
        assert row["study_date"] == "20240102"
        assert dataset_of(root / row["path"])[0] == data
    study = index_rows(db, "SELECT * FROM study")[0]
    assert study["number_of_study_related_instances"] == 60
    assert study["number_of_study_related_series"] == 3


def test_journal_rewrites_files_lost_after_the_answer(dicomd: Dicomd, tmp_path: Path) -> None:
    """durability full: what was answered 0000 is in a synced journal record until the
    checkpoint; files lost or damaged meanwhile (power loss before their own sync) are
    rewritten from it at start-up."""
    port = free_port()
    config = storage_config(tmp_path, port)
    dicomd.start(config)
    items = _series("10", 12)
    statuses = asyncio.run(_store(port, "DICOMD", items))
    assert [s for s, _ in statuses] == [0] * 12
    dicomd.signal(signal.SIGKILL)  # before the idle checkpoint (2 s)
    dicomd.proc.wait(10)  # type: ignore[union-attr]
    dicomd.stop()
    db, root = tmp_path / "index.sqlite", tmp_path / "archive"
    assert list((root / ".dicomd").glob("journal-*")), "the journal was checkpointed already"
    rows = [instance_row(db, uid) for uid, _ in items]
    lost, torn = root / rows[0]["path"], root / rows[1]["path"]  # type: ignore[index]
    lost.unlink()
    with open(torn, "r+b") as fp:
        fp.truncate(300)
    dicomd.start(config)
    dicomd.wait_for_log("archive_recovered", rewritten=2)
    dicomd.wait_for_log("started", pid=dicomd.proc.pid)  # type: ignore[union-attr]
    assert dicomd.stop() == 0
    for uid, data in items:
        row = instance_row(db, uid)
        assert row is not None
        assert dataset_of(root / row["path"])[0] == data
    assert check_archive_consistent(root, db) == 12
    assert not list((root / ".dicomd").glob("journal-*"))


# --- kill -9 --------------------------------------------------------------------------------


@pytest.mark.parametrize("durability", ["full", "none"])
def test_kill_9_loses_nothing_acknowledged(dicomd: Dicomd, tmp_path: Path, durability: str) -> None:
    """kill -9 at random moments: every instance answered 0000 is on disk, intact and
    indexed after the restart (``none`` too: a killed process loses no written file, and
    start-up indexes what the index had not seen yet)."""
    port = free_port()
    config = storage_config(tmp_path, port, durability=durability)
    db = tmp_path / "index.sqlite"
    root = tmp_path / "archive"
    sent: dict[str, bytes] = {}
    acked: set[str] = set()
    rng = random.Random(4)
    for run in range(4):
        dicomd.start(config)
        stop = threading.Event()

        async def client(worker: int, run: int = run, stop: threading.Event = stop) -> None:
            try:
                assoc = await associate(
                    "127.0.0.1",
                    port,
                    calling_ae="CRASHSCU",
                    called_ae="DICOMD",
                    contexts=[(SECONDARY_CAPTURE, [EXPLICIT])],
                )
                cx = assoc.context_for(SECONDARY_CAPTURE)
                n = 0
                while not stop.is_set():
                    uid = f"{UID_ROOT}.8.{run}.{worker}.{n}"
                    data = make_dataset(
                        uid,
                        study_uid=f"{UID_ROOT}.8.{run}",
                        series_uid=f"{UID_ROOT}.8.{run}.{worker}",
                        pixel_bytes=rng.choice([100, 5000, 300_000]),
                    )
                    sent[uid] = data
                    fields = dimse.c_store_rq(assoc.next_message_id(), SECONDARY_CAPTURE, uid)
                    async for rsp in assoc.request(cx, fields, data, timeout=10):
                        if rsp.status == 0:
                            acked.add(uid)
                    n += 1
            except Exception:
                return  # the server died under us: expected

        async def ingest() -> None:
            await asyncio.gather(*(client(w) for w in range(3)))

        thread = threading.Thread(target=lambda: asyncio.run(ingest()))
        thread.start()
        threading.Event().wait(rng.uniform(0.3, 1.2))
        dicomd.signal(signal.SIGKILL)
        dicomd.proc.wait(10)  # type: ignore[union-attr]
        stop.set()
        thread.join(30)
        dicomd.stop()
        # Restart: recovery runs before the first association is served.
        dicomd.start(config)
        dicomd.wait_for_log("started", timeout=60, pid=dicomd.proc.pid)  # type: ignore[union-attr]
        dicomd.stop()
        for uid in acked:
            row = instance_row(db, uid)
            assert row is not None, f"acknowledged {uid} is not in the index after kill -9"
            assert dataset_of(root / row["path"])[0] == sent[uid]
        check_archive_consistent(root, db)
    assert len(acked) > 20, len(acked)


# --- migrations and reindex ----------------------------------------------------------------


def test_migration_from_empty_and_from_version_1(tmp_path: Path) -> None:
    import sqlalchemy as sa

    from dicomd.archive import index as ix

    empty = ix.create_index_engine(f"sqlite:///{tmp_path / 'empty.sqlite'}")
    assert ix.migrate(empty) == (0, ix.SCHEMA_VERSION)
    assert ix.migrate(empty) == (ix.SCHEMA_VERSION, ix.SCHEMA_VERSION)  # idempotent
    empty.dispose()

    # A version-1 database as an older dicomd left it, with one instance.
    engine = ix.create_index_engine(f"sqlite:///{tmp_path / 'v1.sqlite'}")
    assert ix.migrate(engine, target=1) == (0, 1)
    with engine.begin() as conn:
        columns = {c["name"] for c in sa.inspect(conn).get_columns("instance")}
        assert "header_json" not in columns
        conn.execute(
            sa.text(
                "INSERT INTO patient (id, patient_key, patient_id, "
                "number_of_patient_related_studies, number_of_patient_related_series, "
                "number_of_patient_related_instances) VALUES (1, '|P1', 'P1', 1, 1, 1)"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO study (id, study_instance_uid, patient_pk, modalities_in_study, "
                "number_of_study_related_series, number_of_study_related_instances) "
                "VALUES (1, '1.2.3', 1, 'CT', 1, 1)"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO series (id, series_instance_uid, study_pk, modality, "
                "number_of_series_related_instances) VALUES (1, '1.2.3.4', 1, 'CT', 1)"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO instance (sop_instance_uid, series_pk, sop_class_uid, "
                "transfer_syntax_uid, path, size, sha256, received_at) VALUES "
                "('1.2.3.4.5', 1, '1.2.840.10008.5.1.4.1.1.2', '1.2.840.10008.1.2.1', "
                "'a/b.dcm', 10, 'x', '2024-01-01 00:00:00')"
            )
        )
    assert ix.migrate(engine) == (1, ix.SCHEMA_VERSION)
    with engine.connect() as conn:
        study = conn.execute(sa.select(ix.STUDY)).one()
        assert study.sop_classes_in_study == "1.2.840.10008.5.1.4.1.1.2"
        assert conn.execute(sa.select(ix.INSTANCE.c.header_json)).scalar() is None
    engine.dispose()


def test_migration_from_version_2_keeps_json_headers(tmp_path: Path) -> None:
    """Version 3 keeps headers as bytes; rows of version 2 keep their DICOM JSON, and the
    index's header reader uses whichever a row has (or else the file)."""
    import sqlalchemy as sa
    from pydicom.dataset import Dataset

    from dicomd.archive import index as ix

    engine = ix.create_index_engine(f"sqlite:///{tmp_path / 'v2.sqlite'}")
    assert ix.migrate(engine, target=2) == (0, 2)
    old = Dataset()
    old.SOPInstanceUID = "1.2.3.4.5"
    old.PatientName = "Old^Row"
    with engine.begin() as conn:
        assert "header" not in {c["name"] for c in sa.inspect(conn).get_columns("instance")}
        conn.execute(
            sa.text(
                "INSERT INTO patient (id, patient_key, number_of_patient_related_studies, "
                "number_of_patient_related_series, number_of_patient_related_instances) "
                "VALUES (1, '|P', 1, 1, 1)"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO study (id, study_instance_uid, patient_pk, "
                "number_of_study_related_series, number_of_study_related_instances) "
                "VALUES (1, '1.2.3', 1, 1, 1)"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO series (id, series_instance_uid, study_pk, "
                "number_of_series_related_instances) VALUES (1, '1.2.3.4', 1, 1)"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO instance (sop_instance_uid, series_pk, sop_class_uid, "
                "transfer_syntax_uid, path, size, sha256, received_at, header_json) VALUES "
                "('1.2.3.4.5', 1, '1.2.840.10008.5.1.4.1.1.7', '1.2.840.10008.1.2.1', "
                "'a/b.dcm', 10, 'x', '2024-01-01 00:00:00', :json)"
            ),
            {"json": old.to_json()},
        )
    assert ix.migrate(engine) == (2, ix.SCHEMA_VERSION)
    with engine.connect() as conn:
        assert conn.execute(sa.select(ix.INSTANCE.c.header)).scalar() is None
        header = ix.instance_header(conn, "1.2.3.4.5", tmp_path)
        assert header is not None and str(header.PatientName) == "Old^Row"
        # A new row, written by the ingest path, keeps its header bytes.
        data = make_dataset(f"{UID_ROOT}.9.1", patient_name="New^Row", study_uid="1.2.3")
        from dicomd.archive.extract import instance_from_bytes

        info = instance_from_bytes(data, EXPLICIT)
        ix.add_instances(
            conn,
            [ix.InstanceRecord(info, "c/d.dcm", len(data), "y", EXPLICIT, "SCU", "DICOMD")],
        )
        conn.commit()
        header = ix.instance_header(conn, f"{UID_ROOT}.9.1", tmp_path)
        assert header is not None and str(header.PatientName) == "New^Row"
        study = conn.execute(sa.select(ix.STUDY)).one()
        assert study.number_of_study_related_instances == 2
        assert study.number_of_study_related_series == 2
        assert study.modalities_in_study == "OT"
    engine.dispose()


def test_reindex_rebuilds_and_resumes(dicomd: Dicomd, tmp_path: Path) -> None:
    instances, _ = bundled_instances()
    good = [i for i in instances if i.path.name not in MALFORMED]
    chosen = list({i.sop_instance_uid: i for i in good}.values())[:40]
    port = free_port()
    config = storage_config(tmp_path, port)
    dicomd.start(config)
    result = _run_store(port, *[str(i.path) for i in chosen], "--aec", "DICOMD", "-q")
    assert result.returncode == 0, result.stdout + result.stderr
    dicomd.stop()
    db = tmp_path / "index.sqlite"
    before = {r["sop_instance_uid"]: r["sha256"] for r in index_rows(db, "SELECT * FROM instance")}
    assert len(before) == len(chosen)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "dicomd", "reindex", "--config", str(dicomd.config_path)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"{len(chosen)} indexed" in first.stdout
    assert "reindex:" in first.stderr  # progress
    after = {r["sop_instance_uid"]: r["sha256"] for r in index_rows(db, "SELECT * FROM instance")}
    assert after == before
    # A second run has nothing to do; a removed file loses its row.
    victim = index_rows(db, "SELECT path FROM instance ORDER BY id LIMIT 1")[0]["path"]
    os.unlink(tmp_path / "archive" / victim)
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "0 indexed" in second.stdout and "1 stale row(s) removed" in second.stdout
    assert check_archive_consistent(tmp_path / "archive", db) == len(chosen) - 1


# --- a sync that fails --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "pixel_bytes"),
    [("journal", 5_000), ("journal", 300_000), ("instance file", 300_000)],
)
async def test_failed_sync_answers_a700_and_keeps_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str, pixel_bytes: int
) -> None:
    """``full``: when the journal's fdatasync (or a large instance's own, which is synced in
    place) fails, every instance of the group is answered A700, its file removed and its
    index row undone; the archive goes on storing once the disk does. Run in process: a
    failing sync is injected, which no peer can cause. Groups of one (the journal synced
    after the index, in the committer) and of several at once (the journal's sync in the
    pool, overlapping the index) both take this path."""
    from dicomd.archive.store import (
        STATUS_OUT_OF_RESOURCES,
        STATUS_SUCCESS,
        Archive,
        StoreFailed,
    )

    root, db = tmp_path / "archive", tmp_path / "index.sqlite"
    archive = Archive(
        root,
        "{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm",
        f"sqlite:///{db}",
        "full",
    )
    archive.open()
    real_fdatasync = os.fdatasync
    failing = threading.Event()
    failed: list[str] = []

    def fdatasync(fd: int) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}")
        is_journal = os.path.basename(name).startswith("journal-")
        if failing.is_set() and is_journal == (target == "journal") and name.startswith(str(root)):
            failed.append(name)
            raise OSError(5, "Input/output error (injected)")
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)

    async def store(run: str, n: int) -> list[int]:
        async def one(uid: str, data: bytes) -> int:
            ingest = archive.ingest(
                sop_class_uid=SECONDARY_CAPTURE,
                sop_instance_uid=uid,
                transfer_syntax_uid=EXPLICIT,
                calling_ae="TEST",
                called_ae="DICOMD",
                policy="reject",
                min_free_space=0,
            )
            for start in range(0, len(data), 16384):
                if ingest.add(data[start : start + 16384]):
                    await ingest.flush()
            try:
                return (await ingest.finish()).status
            except StoreFailed as exc:  # answered with its status
                await ingest.discard()
                return exc.status

        items = _series(run, n, pixel_bytes=pixel_bytes)
        if n == 1:
            return [await one(*items[0])]
        return list(await asyncio.gather(*(one(uid, data) for uid, data in items)))

    try:
        assert await store("21", 2) == [STATUS_SUCCESS] * 2
        failing.set()
        alone = await store("22", 1)
        together = await store("23", 6)
        failing.clear()
        after = await store("24", 3)
    finally:
        archive.close()
    assert failed, "the injected failure was never hit"
    assert alone == [STATUS_OUT_OF_RESOURCES]
    assert together == [STATUS_OUT_OF_RESOURCES] * 6
    assert after == [STATUS_SUCCESS] * 3
    assert check_archive_consistent(root, db) == 5
    stored = {
        r["sop_instance_uid"] for r in index_rows(db, "SELECT sop_instance_uid FROM instance")
    }
    assert stored == {f"{UID_ROOT}.21.{i}" for i in range(2)} | {
        f"{UID_ROOT}.24.{i}" for i in range(3)
    }
