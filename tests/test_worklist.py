"""Modality Worklist SCP end to end: DCMTK findscu and wlmscpfs, pynetdicom, our requestor.

One dicomd serves the same entries (written as dump text, made into .wl files by DCMTK
dump2dcm) from a folder source (AE DICOMD), from the SQL source after `dicomd worklist
import` of the same dump files (AE SQLWL), with case-insensitive names (AE FUZZY) and with
a result limit (AE LIMITED). DCMTK wlmscpfs serves the same folder for comparison.

Differences from wlmscpfs, and which side the standard backs:
- (0008,0005): wlmscpfs omits it unless -csk (then it copies the file's value without
  checking); dicomd includes it whenever a value is not ASCII, in the query's character set
  when the values fit, else ISO_IR 192 (PS3.4 C.4.1.1.3.2: the response's character set is
  identified). Compared here with wlmscpfs -csk, on decoded values.
- List of UID matching on Study Instance UID: not among wlmscpfs's matching keys, so it
  answers everything (with 0xFF01); dicomd matches (C.2.2.2.2).
- Person Name component groups: a key without ``=`` is matched by dicomd against the
  alphabetic group (``Yamada^Tarou`` finds ``Yamada^Tarou=山田^太郎=...``); wlmscpfs
  compares the whole value byte by byte.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import yaml
from conftest import ROOT, Dicomd, base_config, free_port, require_program, wait_for_port
from worklist_helpers import (
    ENTRIES,
    IMPLICIT,
    MWL_FIND,
    VALID_PIDS,
    find,
    query,
    write_entries,
)

from dicomd.worklist.files import write_wl


def run_cli(config: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicomd", "worklist", *args[:1], "-c", str(config), *args[1:]],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd or ROOT,
    )


CANCEL_ENTRIES = 400


class Servers:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "worklists"
        self.dumps = write_entries(self.root / "DICOMD", base / "dumps")
        (self.root / "DICOMD" / "broken.wl").write_bytes(b"\0" * 132 + b"not dicom at all")
        for ae in ("FUZZY", "LIMITED"):
            shutil.copytree(self.root / "DICOMD", self.root / ae)
        # Many matches, so a C-CANCEL arrives while answers are still being sent.
        many = self.root / "CANCEL"
        many.mkdir()
        (many / "lockfile").touch()
        for i in range(CANCEL_ENTRIES):
            shutil.copy(self.root / "DICOMD" / "e1.wl", many / f"copy{i:04d}.wl")
        self.port = free_port()
        self.config = base_config(
            base,
            self.port,
            local_aes=[
                {"ae_title": "DICOMD", "services": {"verification": None, "worklist": None}},
                {"ae_title": "SQLWL", "services": {"worklist": {"source": "sql"}}},
                {
                    "ae_title": "FUZZY",
                    "services": {"worklist": {"case_insensitive_names": True}},
                },
                {"ae_title": "LIMITED", "services": {"worklist": {"max_results": 2}}},
                {"ae_title": "CANCEL", "services": {"worklist": None}},
            ],
            worklist_sources=[
                {"name": "default", "kind": "folder", "path": str(self.root)},
                {"name": "sql", "kind": "sql"},
            ],
        )
        self.dicomd = Dicomd(base)
        self.config_path = self.dicomd.write_config(self.config)
        imported = run_cli(
            self.config_path, "import", "--source", "sql", "--ae", "SQLWL", *map(str, self.dumps)
        )
        # The incomplete entry is refused, the others imported.
        assert imported.returncode == 1, imported.stdout + imported.stderr
        assert "PatientID (0010,0020) is missing or empty" in imported.stderr
        assert imported.stdout.count("added as entry") == len(VALID_PIDS)
        self.dicomd.start(self.config)
        self.wlm_port = free_port()
        wlmscpfs = require_program("wlmscpfs")
        self.wlm = subprocess.Popen(
            [wlmscpfs, "-csk", "-dfp", str(self.root), str(self.wlm_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        wait_for_port(self.wlm_port)

    def stop(self) -> None:
        self.wlm.terminate()
        try:
            self.wlm.wait(10)
        except subprocess.TimeoutExpired:
            self.wlm.kill()
            self.wlm.wait(5)
        self.dicomd.stop()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    s = Servers(tmp_path_factory.mktemp("worklist"))
    try:
        yield s
    finally:
        s.stop()


# ---------------------------------------------------------------------------- findscu


SPS_RETURN_KEYS = [
    "ScheduledProcedureStepSequence[0].Modality",
    "ScheduledProcedureStepSequence[0].ScheduledStationAETitle",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime",
    "ScheduledProcedureStepSequence[0].ScheduledPerformingPhysicianName",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepID",
]
RETURN_KEYS = ["PatientName", "PatientID", "AccessionNumber", "RequestedProcedureID"]


def findscu(
    port: int, out: Path, keys: dict[str, str], *extra: str, aec: str = "DICOMD"
) -> tuple[list[pydicom.Dataset], str]:
    exe = require_program("findscu")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rsp*.dcm"):
        old.unlink()
    args = []
    merged = {k: "" for k in RETURN_KEYS + SPS_RETURN_KEYS}
    merged.update(keys)
    for key, value in merged.items():
        args += ["-k", f"{key}={value}" if value else key]
    result = subprocess.run(
        [exe, "-W", "-aec", aec, "-X", "-od", str(out), *extra, *args, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        env={**os.environ, "TCP_NODELAY": "1"},
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    answers = [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]
    for a in answers:
        a.decode()
    return answers, result.stdout + result.stderr


SPS = "ScheduledProcedureStepSequence[0]."
# (query keys, PatientIDs that match): each matching type, wlmscpfs agrees on all of these.
COMMON_QUERIES: list[tuple[str, dict[str, str], set[str]]] = [
    ("universal", {}, VALID_PIDS),
    ("single value", {"PatientID": "P002"}, {"P002"}),
    ("wildcard *", {"PatientName": "DOE*"}, {"P001", "P002"}),
    ("wildcard ?", {"PatientName": "D?E^JA?E"}, {"P002"}),
    ("accession", {"AccessionNumber": "A003"}, {"P003"}),
    ("sps modality", {SPS + "Modality": "MR"}, {"P002", "P005"}),
    ("sps station", {SPS + "ScheduledStationAETitle": "CT1"}, {"P001", "P004", "P007"}),
    ("multi-valued station", {SPS + "ScheduledStationAETitle": "CT3"}, {"P003"}),
    (
        "date range",
        {SPS + "ScheduledProcedureStepStartDate": "20240115-20240116"},
        {"P001", "P002", "P003"},
    ),
    ("open date range", {SPS + "ScheduledProcedureStepStartDate": "20240119-"}, {"P006", "P007"}),
    ("date before", {SPS + "ScheduledProcedureStepStartDate": "-20240115"}, {"P001", "P002"}),
    ("time range", {SPS + "ScheduledProcedureStepStartTime": "0800-0900"}, {"P001", "P003"}),
    (
        "combined date-time",
        {
            SPS + "ScheduledProcedureStepStartDate": "20240115-20240116",
            SPS + "ScheduledProcedureStepStartTime": "1000-1500",
        },
        {"P002", "P003"},
    ),
    (
        "date and time single",
        {
            SPS + "ScheduledProcedureStepStartDate": "20240115",
            SPS + "ScheduledProcedureStepStartTime": "083000",
        },
        {"P001"},
    ),
    ("sps physician wildcard", {SPS + "ScheduledPerformingPhysicianName": "JON*"}, {"P002"}),
    (
        "two keys",
        {SPS + "Modality": "CT", "PatientName": "SMITH*"},
        {"P003"},
    ),
    ("no match", {"PatientID": "NOSUCH"}, set()),
]


@pytest.mark.peer("dcmtk")
@pytest.mark.parametrize(
    ("label", "keys", "expected"), COMMON_QUERIES, ids=[q[0] for q in COMMON_QUERIES]
)
def test_findscu_matching_equals_wlmscpfs(
    servers: Servers, tmp_path: Path, label: str, keys: dict[str, str], expected: set[str]
) -> None:
    ours, log = findscu(servers.port, tmp_path / "dicomd", keys)
    theirs, _ = findscu(servers.wlm_port, tmp_path / "wlmscpfs", keys)
    assert {str(a.PatientID) for a in ours} == expected, log
    assert {str(a.PatientID) for a in theirs} == expected
    by_pid = {str(a.PatientID): a for a in theirs}
    for answer in ours:
        other = by_pid[str(answer.PatientID)]
        # Field by field: the same keys, the same (decoded) values.
        for elem in answer:
            if elem.tag == 0x00080005:
                continue
            assert elem.tag in other, f"{elem.keyword} missing in wlmscpfs answer"
            if elem.VR == "SQ":
                assert len(elem.value) == len(other[elem.tag].value) == 1
                for sub in elem.value[0]:
                    assert str(sub.value) == str(other[elem.tag].value[0][sub.tag].value), sub
            else:
                assert str(elem.value) == str(other[elem.tag].value), elem
        assert {e.tag for e in other} - {0x00080005} <= {e.tag for e in answer}
        # Our (0008,0005): present exactly when a value is not ASCII.
        spec = next(s for s in ENTRIES if s.pid == str(answer.PatientID))
        if spec.name.isascii():
            assert "SpecificCharacterSet" not in answer
        else:
            assert answer.SpecificCharacterSet == "ISO_IR 192"
            assert str(answer.PatientName) == spec.name


@pytest.mark.peer("dcmtk")
def test_findscu_field_values(servers: Servers, tmp_path: Path) -> None:
    answers, _ = findscu(servers.port, tmp_path, {"PatientID": "P001"})
    (a,) = answers
    assert str(a.PatientName) == "DOE^JOHN"
    assert a.AccessionNumber == "A001"
    assert a.RequestedProcedureID == "RP1"
    item = a.ScheduledProcedureStepSequence[0]
    assert item.Modality == "CT"
    assert item.ScheduledStationAETitle == "CT1"
    assert item.ScheduledProcedureStepStartDate == "20240115"
    assert item.ScheduledProcedureStepStartTime == "083000"
    assert str(item.ScheduledPerformingPhysicianName) == "SMITH^ANNA"
    assert item.ScheduledProcedureStepID == "SPS1"
    # Only the keys asked for.
    assert {e.keyword for e in a} == {
        "AccessionNumber",
        "PatientName",
        "PatientID",
        "ScheduledProcedureStepSequence",
        "RequestedProcedureID",
    }


@pytest.mark.peer("dcmtk")
def test_documented_differences_from_wlmscpfs(servers: Servers, tmp_path: Path) -> None:
    uids = "1.2.826.0.1.3680043.10.1138.9.1\\1.2.826.0.1.3680043.10.1138.9.3"
    ours, _ = findscu(servers.port, tmp_path / "c", {"StudyInstanceUID": uids})
    assert {str(a.PatientID) for a in ours} == {"P001", "P003"}
    theirs, _ = findscu(servers.wlm_port, tmp_path / "d", {"StudyInstanceUID": uids})
    assert {str(a.PatientID) for a in theirs} == VALID_PIDS  # not a wlmscpfs matching key


@pytest.mark.peer("dcmtk")
def test_findscu_cancel(servers: Servers, tmp_path: Path) -> None:
    answers, log = findscu(servers.port, tmp_path, {}, "-v", "--cancel", "2", aec="CANCEL")
    assert "Sending Cancel Request" in log, log
    assert "MatchingTerminatedDueToCancelRequest" in log, log
    assert len(answers) < CANCEL_ENTRIES
    servers.dicomd.wait_for_log("worklist_query", cancelled=True)


# ---------------------------------------------------------------------------- sources


def test_sql_source_answers_equal_folder_source(servers: Servers) -> None:
    for identifier in (
        query(),
        query(charset="ISO_IR 100"),
        query({"PatientName": "*"}, charset="ISO_IR 192"),
        query(Modality="CT"),
    ):
        folder = find(servers.port, identifier, called_ae="DICOMD")
        sql = find(servers.port, identifier, called_ae="SQLWL")
        assert folder.status == sql.status == 0
        assert sorted(folder.raw) == sorted(sql.raw)
        assert folder.pids <= VALID_PIDS


def test_malformed_and_incomplete_files_are_skipped_with_warnings(servers: Servers) -> None:
    result = find(servers.port, query())
    assert result.status == 0
    assert result.pids == VALID_PIDS
    skipped = servers.dicomd.wait_for_log("worklist_file_skipped")
    assert skipped["file"].endswith("broken.wl")
    incomplete = servers.dicomd.wait_for_log("worklist_entry_incomplete")
    assert incomplete["file"].endswith("e8.wl")
    assert "PatientID (0010,0020) is missing or empty" in incomplete["problems"]


def test_pynetdicom_scu_japanese(servers: Servers) -> None:
    from pynetdicom import AE

    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(MWL_FIND)
    assoc = ae.associate("127.0.0.1", servers.port, ae_title="DICOMD")
    assert assoc.is_established
    try:
        identifier = query({"PatientName": "=山田^*"}, charset="\\ISO 2022 IR 87")
        results = list(assoc.send_c_find(identifier, MWL_FIND))
    finally:
        assoc.release()
    pending = [ds for status, ds in results if status and status.Status == 0xFF00]
    assert results[-1][0].Status == 0x0000
    (answer,) = pending
    assert answer.SpecificCharacterSet == ["", "ISO 2022 IR 87"]
    assert str(answer.PatientName) == "Yamada^Tarou=山田^太郎=やまだ^たろう"
    assert answer.PatientID == "P005"


# ---------------------------------------------------------------------------- character sets


@pytest.mark.parametrize(
    ("charset", "name_key", "pid", "answer_charset"),
    [
        ("ISO_IR 100", "MÜLLER*", "P004", "ISO_IR 100"),
        ("ISO_IR 192", "Иванов^Иван", "P006", "ISO_IR 192"),
        ("ISO_IR 144", "Петров*", "P007", "ISO_IR 144"),
        ("\\ISO 2022 IR 87", "=山田^太郎", "P005", ["", "ISO 2022 IR 87"]),
        ("ISO_IR 192", "Yamada^Tarou", "P005", "ISO_IR 192"),  # alphabetic group
        ("ISO_IR 192", "Петров^П?тр", "P007", "ISO_IR 192"),  # ? is one character
    ],
)
def test_character_sets(
    servers: Servers, charset: str, name_key: str, pid: str, answer_charset: object
) -> None:
    for ts in ("1.2.840.10008.1.2.1", IMPLICIT):
        result = find(servers.port, query({"PatientName": name_key}, charset=charset), ts=ts)
        assert result.status == 0
        (answer,) = result.answers
        assert answer.PatientID == pid
        assert answer.SpecificCharacterSet == answer_charset
        spec = next(s for s in ENTRIES if s.pid == pid)
        assert str(answer.PatientName) == spec.name


def test_answer_falls_back_to_utf8_when_query_charset_cannot_hold_it(servers: Servers) -> None:
    result = find(servers.port, query({"PatientID": "P005"}, charset="ISO_IR 100"))
    (answer,) = result.answers
    assert answer.SpecificCharacterSet == "ISO_IR 192"
    assert str(answer.PatientName).startswith("Yamada^Tarou=山田")
    # An ASCII answer to a query with a character set says which one it uses.
    (ascii_answer,) = find(servers.port, query({"PatientID": "P001"}, charset="ISO_IR 100")).answers
    assert ascii_answer.SpecificCharacterSet == "ISO_IR 100"
    (plain,) = find(servers.port, query({"PatientID": "P001"})).answers
    assert "SpecificCharacterSet" not in plain


def test_case_insensitive_names_option(servers: Servers) -> None:
    key = query({"PatientName": "muller*"}, charset="ISO_IR 100")
    assert find(servers.port, key).answers == []
    fuzzy = find(servers.port, key, called_ae="FUZZY")
    assert fuzzy.pids == {"P004"}
    assert find(servers.port, query({"PatientName": "doe^john"}), called_ae="FUZZY").pids == {
        "P001"
    }


# ---------------------------------------------------------------------------- statuses


def test_max_results(servers: Servers) -> None:
    result = find(servers.port, query(), called_ae="LIMITED")
    assert result.status == 0xA700
    assert result.answers == []
    assert "exceed the limit of 2" in (result.error_comment or "")
    assert find(servers.port, query({"PatientID": "P001"}), called_ae="LIMITED").pids == {"P001"}


def test_bad_identifiers(servers: Servers) -> None:
    from pydicom.dataset import Dataset

    two_items = query()
    two_items.ScheduledProcedureStepSequence.append(Dataset())
    result = find(servers.port, two_items)
    assert result.status == 0xA900
    assert "at most one" in (result.error_comment or "")
    bad_date = query(ScheduledProcedureStepStartDate="2024-01-01-2")
    assert find(servers.port, bad_date).status == 0xA900
    garbage = find(servers.port, b"\x10\x00\x10\x00PN\xff\xff")
    assert garbage.status == 0xC000
    # The association and the server are fine afterwards.
    assert find(servers.port, query({"PatientID": "P002"})).pids == {"P002"}


def test_cancel_with_requestor(servers: Servers) -> None:
    result = find(servers.port, query(), cancel=True, called_ae="CANCEL")
    assert result.status == 0xFE00
    assert len(result.answers) < CANCEL_ENTRIES


# ---------------------------------------------------------------------------- live folder


def test_folder_changes_seen_without_restart(dicomd: Dicomd, tmp_path: Path) -> None:
    root = tmp_path / "wl"
    write_entries(root / "DICOMD", tmp_path / "dumps")
    port = free_port()
    config = base_config(
        tmp_path,
        port,
        local_aes=[{"ae_title": "DICOMD", "services": {"worklist": None}}],
        worklist_sources=[{"name": "default", "kind": "folder", "path": str(root)}],
    )
    dicomd.start(config)
    area = root / "DICOMD"
    assert find(port, query()).pids == VALID_PIDS
    # Added.
    template = pydicom.dcmread(area / "e1.wl")
    template.PatientID = "NEW1"
    write_wl(template, area / "new.wl")
    assert find(port, query()).pids == VALID_PIDS | {"NEW1"}
    # Changed in place (same name, same directory mtime).
    changed = pydicom.dcmread(area / "e2.wl")
    changed.PatientName = "CHANGED^NAME"
    with open(area / "e2.wl", "r+b") as f:  # rewrite in place, as an editor may
        from io import BytesIO

        buf = BytesIO()
        changed.save_as(buf)
        f.write(buf.getvalue())
        f.truncate()
    answer = find(port, query({"PatientID": "P002"}))
    assert [str(a.PatientName) for a in answer.answers] == ["CHANGED^NAME"]
    # Removed.
    (area / "e1.wl").unlink()
    assert find(port, query()).pids == (VALID_PIDS | {"NEW1"}) - {"P001"}
    # A file that becomes malformed is skipped; the others still answer.
    (area / "e3.wl").write_bytes(b"garbage")
    result = find(port, query())
    assert result.status == 0
    assert result.pids == (VALID_PIDS | {"NEW1"}) - {"P001", "P003"}
    entry = dicomd.wait_for_log("worklist_file_skipped")
    assert entry["file"] == str(area / "e3.wl")
    # Without the lockfile: refused, as wlmscpfs does.
    (area / "lockfile").unlink()
    refused = find(port, query())
    assert refused.status == 0xA700
    assert "lockfile" in (refused.error_comment or "")
    (area / "lockfile").touch()
    assert find(port, query()).status == 0
    # A missing AE directory is an empty worklist.
    shutil.rmtree(area)
    assert find(port, query()).answers == []


def test_development_defaults_serve_var_worklists(tmp_path: Path) -> None:
    from dicomd.config import development_defaults

    config = development_defaults(tmp_path / "var")
    ae = config.local_aes[0]
    assert ae.ae_title == "DICOMD"
    options = ae.enabled_services()["worklist"]
    assert options.source == "default"  # type: ignore[attr-defined]
    (source,) = config.worklist_sources
    assert (source.name, source.kind, source.path) == (
        "default",
        "folder",
        tmp_path / "var" / "worklists",
    )


# ---------------------------------------------------------------------------- CLI


def test_cli_sql_list_add_remove_export(tmp_path: Path) -> None:
    config = base_config(
        tmp_path,
        free_port(),
        local_aes=[{"ae_title": "CT_ROOM", "services": {"worklist": {"source": "sql"}}}],
        worklist_sources=[{"name": "sql", "kind": "sql"}],
    )
    path = tmp_path / "dicomd.yaml"
    path.write_text(yaml.safe_dump(config))
    added = run_cli(
        path,
        "add",
        "--source",
        "sql",
        "--set",
        "PatientName=ŁUKASZ^NOWAK",
        "--set",
        "PatientID=CLI1",
        "--set",
        "RequestedProcedureID=RP9",
        "--set",
        "RequestedProcedureDescription=CT HEAD",
        "--set",
        "Modality=CT",
        "--set",
        "ScheduledStationAETitle=CT_ROOM",
        "--set",
        "ScheduledProcedureStepStartDate=20240301",
        "--set",
        "ScheduledProcedureStepStartTime=0900",
        "--set",
        "ScheduledProcedureStepID=S9",
        "--set",
        "ScheduledProcedureStepDescription=HEAD",
    )
    assert added.returncode == 0, added.stderr
    assert "added as entry 1 for CT_ROOM" in added.stdout
    incomplete = run_cli(path, "add", "--source", "sql", "--set", "PatientID=X")
    assert incomplete.returncode == 1
    assert "PatientName (0010,0010) is missing or empty" in incomplete.stderr
    listed = run_cli(path, "list", "--source", "sql")
    assert "CLI1" in listed.stdout and "ŁUKASZ^NOWAK" in listed.stdout, listed.stdout
    export = run_cli(path, "export", "--source", "sql", str(tmp_path / "out"))
    assert export.returncode == 0, export.stderr
    (wl,) = (tmp_path / "out" / "CT_ROOM").glob("*.wl")
    assert (tmp_path / "out" / "CT_ROOM" / "lockfile").exists()
    ds = pydicom.dcmread(wl)
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert str(ds.PatientName) == "ŁUKASZ^NOWAK"
    assert ds.file_meta.MediaStorageSOPClassUID == MWL_FIND
    removed = run_cli(path, "remove", "--source", "sql", "1")
    assert removed.returncode == 0, removed.stderr
    assert "0 entries" in run_cli(path, "list", "--source", "sql").stdout


@pytest.mark.peer("dcmtk")
def test_exported_folder_is_served_by_wlmscpfs(servers: Servers, tmp_path: Path) -> None:
    out = tmp_path / "export"
    result = run_cli(servers.config_path, "export", "--source", "sql", "--ae", "SQLWL", str(out))
    assert result.returncode == 0, result.stderr
    (out / "SQLWL").rename(out / "DICOMD")
    port = free_port()
    proc = subprocess.Popen(
        [require_program("wlmscpfs"), "-dfp", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        answers, _ = findscu(port, tmp_path / "rsp", {})
        assert {str(a.PatientID) for a in answers} == VALID_PIDS
    finally:
        proc.terminate()
        proc.wait(10)


def test_cli_import_into_folder_and_check(tmp_path: Path, servers: Servers) -> None:
    config = base_config(
        tmp_path,
        free_port(),
        local_aes=[{"ae_title": "MR1", "services": {"worklist": None}}],
        worklist_sources=[{"name": "default", "kind": "folder", "path": str(tmp_path / "wl")}],
    )
    path = tmp_path / "dicomd.yaml"
    path.write_text(yaml.safe_dump(config))
    json_file = tmp_path / "entry.json"
    ds = pydicom.dcmread(servers.root / "DICOMD" / "e5.wl")
    ds.PatientID = "JSON1"
    json_file.write_text(ds.to_json())
    checked = run_cli(path, "import", "--check", str(servers.dumps[0]), str(json_file))
    assert checked.returncode == 0, checked.stderr
    assert not (tmp_path / "wl").exists()
    imported = run_cli(path, "import", str(servers.dumps[0]), str(json_file))
    assert imported.returncode == 0, imported.stderr
    area = tmp_path / "wl" / "MR1"
    assert sorted(p.name for p in area.iterdir()) == ["e1.wl", "entry.wl", "lockfile"]
    japanese = pydicom.dcmread(area / "entry.wl")
    assert str(japanese.PatientName) == ENTRIES[4].name
    assert japanese.SpecificCharacterSet == ["", "ISO 2022 IR 87"]


# ---------------------------------------------------------------------------- dump import


def test_dcmdump_output_round_trips(servers: Servers, tmp_path: Path) -> None:
    from dicomd.worklist.dump import parse_dump
    from dicomd.worklist.entry import decoded

    dcmdump = require_program("dcmdump")
    examples = sorted(Path("/usr/share/doc/dcmtk/examples/wlistdb/OFFIS").glob("*.dump*"))
    files = sorted((servers.root / "DICOMD").glob("e*.wl"))
    dump2dcm = require_program("dump2dcm")
    for example in examples:  # DCMTK's own hand-written example dumps
        text = example.read_bytes()
        if example.suffix == ".gz":
            import gzip

            text = gzip.decompress(text)
        src = tmp_path / example.name.replace(".gz", "")
        src.write_bytes(text)
        wl = tmp_path / (src.stem + ".wl")
        subprocess.run([dump2dcm, "-q", str(src), str(wl)], check=True)
        files.append(wl)
        warnings: list[str] = []
        assert decoded(parse_dump(text, str(src), warnings)) == decoded(pydicom.dcmread(wl))
        if example.name.startswith("wklist2."):  # (0008,0050) given twice: the first is kept
            assert warnings == [
                f"{src}:3: warning: (0008,0050) given again; the first value (line 1) is kept"
            ]
    assert len(files) >= 15
    for wl in files:
        dump = subprocess.run([dcmdump, "+L", str(wl)], capture_output=True, check=True).stdout
        assert decoded(parse_dump(dump, str(wl))) == decoded(pydicom.dcmread(wl)), wl


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (b"(0010,0010) PN [A^B]\n(0010,0020 LO [X]\n", 2, "expected a tag"),
        (b"# c\n\n(0010,0010) PN [AAAA...\n", 3, "no closing ']'"),
        (b"(0010,0010) PN [A]\n(fffe,e000) na\n", 2, "outside a sequence"),
        (b"(0040,0100) SQ\n(0008,0060) CS [CT]\n", 2, "outside an item"),
        (b"(0028,0010) US [abc]\n", 1, "bad US value"),
        (b"(0011,0010) [x]\n", 1, "not in the data dictionary"),
        (b"(0008,0016) UI =NoSuchThing\n", 1, "unknown UID name"),
    ],
)
def test_bad_dump_syntax_is_line_numbered(text: bytes, line: int, message: str) -> None:
    from dicomd.worklist.dump import DumpError, parse_dump

    with pytest.raises(DumpError) as info:
        parse_dump(text, "entry.dump")
    assert str(info.value).startswith(f"entry.dump:{line}: "), str(info.value)
    assert message in str(info.value)


def test_cli_import_reports_dump_errors(tmp_path: Path) -> None:
    config = base_config(
        tmp_path,
        free_port(),
        local_aes=[{"ae_title": "DICOMD", "services": {"worklist": None}}],
        worklist_sources=[{"name": "default", "kind": "folder", "path": str(tmp_path / "wl")}],
    )
    path = tmp_path / "dicomd.yaml"
    path.write_text(yaml.safe_dump(config))
    bad = tmp_path / "bad.dump"
    bad.write_bytes(b"(0010,0010) PN [A^B]\n(0010,0020) LO [unclosed\n")
    result = run_cli(path, "import", str(bad))
    assert result.returncode == 1
    assert f"{bad}:2: value has no closing ']'" in result.stderr
