"""Query/Retrieve benchmark: C-FIND latency, C-MOVE and C-GET rates, dicomd vs dcmqrscp and Orthanc.

    .venv/bin/python bench/bench_qr.py                  # full run (about 1 min once data exist)
    .venv/bin/python bench/bench_qr.py --quick          # 1 round, few queries, 100 k index
    .venv/bin/python bench/bench_qr.py --only dicomd,dcmqrscp --skip-big
    .venv/bin/python bench/bench_qr.py --big-only       # dicomd on the 1 M-instance index only
    .venv/bin/python bench/bench_qr.py --json run.json  # also keep every sample

Archive (generated once into the work directory, fixed UIDs): 475 studies of 5 small
instances (16x16x16-bit CT/MR, two series per study, 1.6 KiB files, 48-element headers)
for 119 patients, 4 studies each, study dates every 3 days from 2020-01-01; 16 patients are
named ``DOE^...`` so ``PatientName=DOE*`` matches 64 studies; plus one CT study of 25
instances, 512x512x16 bit (525 KiB files): 2,400 instances. It is loaded into each server
by DCMTK ``storescu`` (``TCP_NODELAY=1``, one association, explicit VR little endian only).

Servers, all on loopback ports and running side by side for the whole run: dicomd
(storage + query_retrieve, ``durability: none``, logging at warning), DCMTK ``dcmqrscp``
(``TCP_NODELAY=1``, its default forking mode) and Orthanc (Debian's /usr/sbin/Orthanc, its
own JSON config: HTTP off, DICOM C-FIND/C-MOVE/C-GET allowed for any caller, everything
else default). Two DCMTK ``storescp`` (``TCP_NODELAY=1``) are the C-MOVE destinations,
known to the three servers: ``STORESCP`` writes every file (its default mode),
``IGNORESCP`` runs with ``--ignore`` (receives, stores nothing: the sender's own speed).

C-FIND: Study Root, STUDY level, 14 usual return keys; three kinds of query:
PatientID exact (cycling over 40 patients, 4 studies each), PatientName ``DOE*`` (64
studies) and a 90-day StudyDate range (cycling over 8 windows, 30 studies each). The
client is dicomd's own asyncio requestor (as in bench_worklist.py), one association per
server, queries one after the other; latency = C-FIND-RQ sent → final response received
(answers are counted, not decoded). A warm-up round first; then each round runs, for each
query kind, a batch of queries on each server, servers alternating order between rounds.
queries/s = queries of a batch / its wall time (one association, sequential). "first-time"
is the latency of each distinct query the first time a server sees it (in the warm-up
round; dicomd remembers raw answers per query shape and candidate row). Server CPU =
utime+stime of the server process and its children (dcmqrscp's per-association child
included) over the timed batches, per query.

C-MOVE (client: dicomd's requestor) and C-GET (client: DCMTK ``getscu``, which stores the
files itself or, ``--ignore``, not) of the CT study: inst/s = 25 / (C-MOVE-RQ or C-GET-RQ
sent → final response received); for getscu this window comes from its own log
timestamps, and the whole process time (start, association, release, exit) is reported as
well. One warm-up round, then ``--retrieve-rounds`` rounds, servers alternating; medians.
The receivers write into the run directory by default; on this machine's disk (ext4
mounted with online discard) the time they take to write 25 files moves by 2x between
runs, which compresses every sender's ratio by as much. ``--receiver-dir /dev/shm`` puts
their files on a tmpfs instead: they still decode and write every file, repeatably.

Big index: dicomd alone on a synthetic index of ``--big`` instances (default 1,000,000)
written straight into its SQLite file (schema by dicomd's own migrations, no ANALYZE):
10,000 studies of 4 series x 25 instances, 2,500 patients, 16 of them DOE (64 studies), a
study a day; every instance row carries a ~1 KiB header BLOB like the one dicomd keeps
(explicit VR little endian, hand-encoded), so answers come from stored headers exactly as
for received instances. Same three queries (30-day windows: 30 studies each).

Every server runs in its own session and is stopped at the end (SIGTERM, then SIGKILL).
The work directory defaults to /var/tmp/dicomd-bench-qr; the big index is kept there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import calibrate  # bench/, on sys.path as the script's directory

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from dicomd.association import associate  # noqa: E402
from dicomd.logging import configure_logging  # noqa: E402
from dicomd.net import dimse  # noqa: E402

PYTHON = sys.executable
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
EXPLICIT_LE = "1.2.840.10008.1.2.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
UID_ROOT = "1.2.826.0.1.3680043.9.7778"
DATA_VERSION = "qr-1"
PROFILE = """[[TransferSyntaxes]]
[ExplicitLE]
TransferSyntax1 = 1.2.840.10008.1.2.1

[[PresentationContexts]]
[Store]
PresentationContext1 = 1.2.840.10008.5.1.4.1.1.2\\ExplicitLE
PresentationContext2 = 1.2.840.10008.5.1.4.1.1.4\\ExplicitLE

[[Profiles]]
[Bench]
PresentationContexts = Store
"""
LOG_CONFIG = """log4cplus.rootLogger = INFO, console
log4cplus.appender.console = log4cplus::ConsoleAppender
log4cplus.appender.console.layout = log4cplus::PatternLayout
log4cplus.appender.console.layout.ConversionPattern = %D{%s.%Q} %p: %m%n
"""

SURNAMES = (
    "SMITH", "JONES", "BROWN", "TAYLOR", "WILSON", "MARTIN", "MUELLER", "ROSSI",
    "GARCIA", "MOREAU", "NOVAK", "SILVA", "KOWALSKI", "JANSEN", "LARSEN",
)  # fmt: skip
GIVEN = ("ANNA", "JOHN", "MARIA", "PETER", "LENA", "OMAR", "YUKI", "IVAN")
RETURN_KEYS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "AccessionNumber", "StudyID", "StudyInstanceUID", "StudyDescription",
    "ReferringPhysicianName", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)  # fmt: skip
KINDS = ("PatientID", "DOE*", "StudyDate")


# --- the archive's layout (shared by the small archive and the synthetic index) --------------


@dataclass(frozen=True)
class Layout:
    studies: int
    per_patient: int
    series: tuple[tuple[str, str, int], ...]  # (modality, SOP class, instances) per series
    day_step: int  # days between consecutive studies
    first_day: dt.date
    doe_every: int  # patient p is a DOE when p % doe_every == 0 (and p < 16 * doe_every)
    tag: str  # distinguishes UIDs of the two layouts

    @property
    def patients(self) -> int:
        return -(-self.studies // self.per_patient)

    def is_doe(self, p: int) -> bool:
        return p % self.doe_every == 0 and p < 16 * self.doe_every

    def patient(self, p: int) -> dict[str, str]:
        given = GIVEN[p % len(GIVEN)]
        surname = "DOE" if self.is_doe(p) else SURNAMES[p % len(SURNAMES)]
        return {
            "PatientName": f"{surname}^{given}{p}",
            "PatientID": f"PID{p:06d}",
            "PatientBirthDate": f"{1930 + p % 70}{1 + p % 12:02d}{1 + p % 28:02d}",
            "PatientSex": "FM"[p % 2],
        }

    def study_date(self, s: int) -> str:
        return (self.first_day + dt.timedelta(days=s * self.day_step)).strftime("%Y%m%d")

    def study(self, s: int) -> dict[str, str]:
        return {
            "StudyInstanceUID": f"{UID_ROOT}.{self.tag}.{s + 1}",
            "StudyDate": self.study_date(s),
            "StudyTime": f"{8 + s % 10:02d}{(s * 7) % 60:02d}00",
            "AccessionNumber": f"A{self.tag}{s:07d}",
            "StudyID": str(s + 1),
            "StudyDescription": ("CT CHEST", "MR BRAIN", "CT ABDOMEN", "MR KNEE")[s % 4],
            "ReferringPhysicianName": f"REFERRER^{GIVEN[s % len(GIVEN)]}",
        }

    def series_of(self, s: int) -> list[tuple[str, str, str, int]]:
        """(series UID, modality, SOP class, instance count) of study ``s``."""
        out = []
        for k, (modality, sop_class, count) in enumerate(self.series):
            if modality == "CT/MR":  # alternate by study
                modality, sop_class = (("CT", CT_IMAGE), ("MR", MR_IMAGE))[s % 2]
            out.append((f"{UID_ROOT}.{self.tag}.{s + 1}.{k + 1}", modality, sop_class, count))
        return out

    def instances_per_study(self) -> int:
        return sum(c for _m, _c, c in self.series)


SMALL = Layout(
    studies=475,
    per_patient=4,
    series=(("CT", CT_IMAGE, 3), ("CT/MR", MR_IMAGE, 2)),
    day_step=3,
    first_day=dt.date(2020, 1, 1),
    doe_every=7,
    tag="1",
)
BIG_STUDIES = 10_000
BIG_SERIES = (
    ("CT", CT_IMAGE, 25),
    ("CT", CT_IMAGE, 25),
    ("CT/MR", MR_IMAGE, 25),
    ("CT", CT_IMAGE, 25),
)


def big_layout(instances: int) -> Layout:
    studies = max(16 * 4, instances // 100)
    return Layout(
        studies=studies,
        per_patient=4,
        series=BIG_SERIES,
        day_step=1,
        first_day=dt.date(1998, 1, 1),
        doe_every=max(1, studies // 4 // 16),
        tag="2",
    )


CT_STUDY = {
    "StudyInstanceUID": f"{UID_ROOT}.3.1",
    "SeriesInstanceUID": f"{UID_ROOT}.3.1.1",
    "PatientID": "PIDCT",
    "PatientName": "CTPATIENT^BENCH",
    "StudyDate": "20240601",
}
CT_COUNT = 25


# --- element encoding (explicit VR little endian), for headers and checks ---------------------

_UI_PAD = frozenset({"UI"})
_US = frozenset({"US"})


def element(tag: int, vr: str, value: str | int) -> bytes:
    if vr in _US:
        raw = struct.pack("<H", int(value))
    else:
        raw = str(value).encode("ascii")
        if len(raw) % 2:
            raw += b"\0" if vr in _UI_PAD else b" "
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(raw)) + raw


# (tag, VR, level, keyword-or-constant): the header of every instance, in tag order.
# level: "c" constant, "p" patient, "s" study, "r" series, "i" instance.
HEADER_TEMPLATE: tuple[tuple[int, str, str, str], ...] = (
    (0x00080008, "CS", "c", "ORIGINAL\\PRIMARY\\AXIAL"),
    (0x00080016, "UI", "r", "SOPClassUID"),
    (0x00080018, "UI", "i", "SOPInstanceUID"),
    (0x00080020, "DA", "s", "StudyDate"),
    (0x00080021, "DA", "s", "StudyDate"),
    (0x00080022, "DA", "s", "StudyDate"),
    (0x00080030, "TM", "s", "StudyTime"),
    (0x00080031, "TM", "s", "StudyTime"),
    (0x00080050, "SH", "s", "AccessionNumber"),
    (0x00080060, "CS", "r", "Modality"),
    (0x00080070, "LO", "c", "ACME MEDICAL"),
    (0x00080080, "LO", "c", "GENERAL HOSPITAL"),
    (0x00080090, "PN", "s", "ReferringPhysicianName"),
    (0x00081010, "SH", "c", "SCANNER01"),
    (0x00081030, "LO", "s", "StudyDescription"),
    (0x0008103E, "LO", "r", "SeriesDescription"),
    (0x00081090, "LO", "c", "MODEL 64"),
    (0x00100010, "PN", "p", "PatientName"),
    (0x00100020, "LO", "p", "PatientID"),
    (0x00100030, "DA", "p", "PatientBirthDate"),
    (0x00100040, "CS", "p", "PatientSex"),
    (0x00180015, "CS", "c", "CHEST"),
    (0x00180050, "DS", "c", "1.25"),
    (0x00180060, "DS", "c", "120"),
    (0x00181020, "LO", "c", "V1.0"),
    (0x00185100, "CS", "c", "HFS"),
    (0x0020000D, "UI", "s", "StudyInstanceUID"),
    (0x0020000E, "UI", "r", "SeriesInstanceUID"),
    (0x00200010, "SH", "s", "StudyID"),
    (0x00200011, "IS", "r", "SeriesNumber"),
    (0x00200013, "IS", "i", "InstanceNumber"),
    (0x00200032, "DS", "i", "ImagePositionPatient"),
    (0x00200037, "DS", "c", "1\\0\\0\\0\\1\\0"),
    (0x00200052, "UI", "s", "FrameOfReferenceUID"),
    (0x00201041, "DS", "i", "SliceLocation"),
    (0x00280002, "US", "c", "1"),
    (0x00280004, "CS", "c", "MONOCHROME2"),
    (0x00280010, "US", "r", "Rows"),
    (0x00280011, "US", "r", "Columns"),
    (0x00280030, "DS", "c", "0.7\\0.7"),
    (0x00280100, "US", "c", "16"),
    (0x00280101, "US", "c", "16"),
    (0x00280102, "US", "c", "15"),
    (0x00280103, "US", "c", "0"),
    (0x00281050, "DS", "c", "40"),
    (0x00281051, "DS", "c", "400"),
    (0x00281052, "DS", "c", "-1024"),
    (0x00281053, "DS", "c", "1"),
)


class HeaderMaker:
    """Header bytes for one instance from the level values (cached per level)."""

    def __init__(self) -> None:
        self.const = {
            tag: element(tag, vr, value) for tag, vr, lvl, value in HEADER_TEMPLATE if lvl == "c"
        }

    def part(self, level: str, values: dict[str, Any]) -> dict[int, bytes]:
        return {
            tag: element(tag, vr, values[kw])
            for tag, vr, lvl, kw in HEADER_TEMPLATE
            if lvl == level
        }

    def header(self, parts: dict[str, dict[int, bytes]], inst: dict[int, bytes]) -> bytes:
        out = []
        for tag, _vr, lvl, _kw in HEADER_TEMPLATE:
            if lvl == "c":
                out.append(self.const[tag])
            elif lvl == "i":
                out.append(inst[tag])
            else:
                out.append(parts[lvl][tag])
        return b"".join(out)


def series_values(uid: str, modality: str, sop_class: str, k: int, side: int) -> dict[str, Any]:
    return {
        "SeriesInstanceUID": uid,
        "Modality": modality,
        "SOPClassUID": sop_class,
        "SeriesDescription": f"{modality} SERIES {k + 1}",
        "SeriesNumber": str(k + 1),
        "Rows": side,
        "Columns": side,
    }


def instance_values(uid: str, i: int) -> dict[str, Any]:
    return {
        "SOPInstanceUID": uid,
        "InstanceNumber": str(i + 1),
        "ImagePositionPatient": f"-180\\-180\\{-i * 1.25 + 0.0:g}",
        "SliceLocation": f"{-i * 1.25 + 0.0:g}",
    }


# --- data sets on disk ------------------------------------------------------------------------


def _write_part10(path: Path, sop_class: str, sop_uid: str, header: bytes, pixels: bytes) -> None:
    meta_elems = (
        element(0x00020002, "UI", sop_class)
        + element(0x00020003, "UI", sop_uid)
        + element(0x00020010, "UI", EXPLICIT_LE)
        + element(0x00020012, "UI", f"{UID_ROOT}.99")
        + element(0x00020013, "SH", "BENCH_QR")
    )
    version = struct.pack("<HH2sHI", 2, 1, b"OB", 0, 2) + b"\0\1"
    meta = version + meta_elems
    group_length = struct.pack("<HH2sHI", 2, 0, b"UL", 4, len(meta))
    pixel = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, len(pixels)) + pixels
    path.write_bytes(b"\0" * 128 + b"DICM" + group_length + meta + header + pixel)


def make_data(work: Path) -> tuple[list[Path], list[Path]]:
    """(small instance files, CT study files), made once."""
    data = work / "data"
    stamp = data / "version"
    small_dir, ct_dir = data / "small", data / "ct"
    expected = SMALL.studies * SMALL.instances_per_study()
    if not (
        stamp.exists()
        and stamp.read_text() == DATA_VERSION
        and len(list(small_dir.glob("*.dcm"))) == expected
        and len(list(ct_dir.glob("*.dcm"))) == CT_COUNT
    ):
        shutil.rmtree(data, ignore_errors=True)
        small_dir.mkdir(parents=True)
        ct_dir.mkdir(parents=True)
        maker = HeaderMaker()
        pixels = bytes(range(256)) * 2  # 16 x 16 x 2 bytes
        n = 0
        for s in range(SMALL.studies):
            p = s // SMALL.per_patient
            study = SMALL.study(s) | {"FrameOfReferenceUID": f"{UID_ROOT}.1.{s + 1}.0"}
            parts = {"p": maker.part("p", SMALL.patient(p)), "s": maker.part("s", study)}
            for k, (uid, modality, sop_class, count) in enumerate(SMALL.series_of(s)):
                parts["r"] = maker.part("r", series_values(uid, modality, sop_class, k, 16))
                for i in range(count):
                    sop_uid = f"{uid}.{i + 1}"
                    header = maker.header(parts, maker.part("i", instance_values(sop_uid, i)))
                    _write_part10(small_dir / f"s{n:05d}.dcm", sop_class, sop_uid, header, pixels)
                    n += 1
        ct_pixels = bytes(range(256)) * 2048  # 512 x 512 x 2 bytes
        study = {
            "StudyInstanceUID": CT_STUDY["StudyInstanceUID"],
            "StudyDate": CT_STUDY["StudyDate"],
            "StudyTime": "120000",
            "AccessionNumber": "ACTSTUDY",
            "StudyID": "9999",
            "StudyDescription": "CT THORAX",
            "ReferringPhysicianName": "REFERRER^CT",
            "FrameOfReferenceUID": f"{UID_ROOT}.3.1.0",
        }
        patient = {
            "PatientName": CT_STUDY["PatientName"],
            "PatientID": CT_STUDY["PatientID"],
            "PatientBirthDate": "19600101",
            "PatientSex": "O",
        }
        parts = {
            "p": maker.part("p", patient),
            "s": maker.part("s", study),
            "r": maker.part(
                "r", series_values(CT_STUDY["SeriesInstanceUID"], "CT", CT_IMAGE, 0, 512)
            ),
        }
        for i in range(CT_COUNT):
            sop_uid = f"{CT_STUDY['SeriesInstanceUID']}.{i + 1}"
            header = maker.header(parts, maker.part("i", instance_values(sop_uid, i)))
            shift = (i * 7) % 256
            _write_part10(
                ct_dir / f"c{i:03d}.dcm",
                CT_IMAGE,
                sop_uid,
                header,
                ct_pixels[shift:] + ct_pixels[:shift],
            )
        stamp.write_text(DATA_VERSION)
    return sorted(small_dir.glob("*.dcm")), sorted(ct_dir.glob("*.dcm"))


# --- queries ----------------------------------------------------------------------------------


def identifier(**match: str) -> bytes:
    from pydicom.dataset import Dataset

    from dicomd.query.charset import encode_dataset

    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for keyword in RETURN_KEYS:
        setattr(ds, keyword, match.get(keyword, ""))
    return encode_dataset(ds, EXPLICIT_LE)


def query_sets(layout: Layout, windows: int = 8) -> dict[str, list[tuple[bytes, int]]]:
    """Per kind: [(encoded identifier, expected hits), ...] to cycle through."""
    step = max(1, layout.patients // 40)
    pids = [
        p for p in range(0, layout.patients, step) if (p + 1) * layout.per_patient <= layout.studies
    ][:40]
    out: dict[str, list[tuple[bytes, int]]] = {
        "PatientID": [
            (identifier(PatientID=layout.patient(p)["PatientID"]), layout.per_patient) for p in pids
        ],
        "DOE*": [(identifier(PatientName="DOE*"), 16 * layout.per_patient)],
    }
    # ~30 studies per window, windows spread over the archive's date span.
    span_days = 90 if layout.day_step == 3 else 30
    total_days = layout.studies * layout.day_step
    ranges = []
    for w in range(windows):
        start_day = (total_days - span_days) * (w + 1) // (windows + 1)
        start = layout.first_day + dt.timedelta(days=start_day)
        end = start + dt.timedelta(days=span_days - 1)
        first = -(-start_day // layout.day_step)
        last = (start_day + span_days - 1) // layout.day_step
        hits = last - first + 1
        ranges.append(
            (
                identifier(StudyDate=f"{start:%Y%m%d}-{end:%Y%m%d}"),
                hits,
            )
        )
    out["StudyDate"] = ranges
    return out


# --- processes --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), 0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


@dataclass
class Server:
    name: str
    aet: str
    cmd: list[str]
    run_dir: Path
    port: int
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "TCP_NODELAY": "1", **self.env}
        with open(self.run_dir / f"{self.name}.log", "ab") as log:
            self.proc = subprocess.Popen(
                self.cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        wait_port(self.port, self.proc)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None


def dicomd_server(run_dir: Path, index: Path, dests: dict[str, int]) -> Server:
    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {
        "run_as": {"allow_root": True},
        "shutdown_timeout": 5,
        "logging": {"level": "warning", "format": "json"},
        "listeners": [{"name": "dicom", "address": HOST, "port": port}],
        "local_aes": [
            {
                "ae_title": "DICOMD",
                "services": {"storage": {"min_free_space": 0}, "query_retrieve": None},
            }
        ],
        "archive": {
            "root": str(run_dir / "store"),
            "index_url": f"sqlite:///{index}",
            "durability": "none",
        },
        "access": {"default": "allow"},
        "peers": [
            {
                "name": aet.lower(),
                "ae_title": aet,
                "host": HOST,
                "port": port,
                "move_destination": True,
            }
            for aet, port in dests.items()
        ],
    }
    (run_dir / "dicomd.yaml").write_text(yaml.safe_dump(config))
    cmd = [PYTHON, "-m", "dicomd", "run", "--config", str(run_dir / "dicomd.yaml")]
    return Server("dicomd", "DICOMD", cmd, run_dir, port, env={"PYTHONPATH": str(ROOT)})


def build_server(kind: str, run_dir: Path, dests: dict[str, int]) -> Server:
    run_dir.mkdir(parents=True, exist_ok=True)
    store = run_dir / "store"
    store.mkdir(exist_ok=True)
    if kind == "dicomd":
        return dicomd_server(run_dir, run_dir / "index.sqlite", dests)
    port = free_port()
    if kind == "dcmqrscp":
        cfg = run_dir / "dcmqrscp.cfg"
        cfg.write_text(
            f"NetworkTCPPort = {port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n"
            "HostTable BEGIN\n"
            + "".join(f"{a.lower()} = ({a}, {HOST}, {p})\n" for a, p in dests.items())
            + "HostTable END\n"
            "VendorTable BEGIN\nVendorTable END\n"
            f"AETable BEGIN\nDCMQRSCP {store} RW (1000, 4096mb) ANY\nAETable END\n"
        )
        return Server(kind, "DCMQRSCP", ["dcmqrscp", "-c", str(cfg)], run_dir, port)
    if kind == "orthanc":
        cfg = run_dir / "orthanc.json"
        cfg.write_text(
            json.dumps(
                {
                    "Name": "bench-qr",
                    "StorageDirectory": str(store),
                    "IndexDirectory": str(run_dir / "orthanc-index"),
                    "DicomAet": "ORTHANC",
                    "DicomPort": port,
                    "HttpServerEnabled": False,
                    "HttpPort": free_port(),
                    "RemoteAccessAllowed": False,
                    "DicomCheckCalledAet": False,
                    "StorageCompression": False,
                    "Plugins": [],
                    "DicomServerEnabled": True,
                    "DicomAlwaysAllowFind": True,
                    "DicomAlwaysAllowMove": True,
                    "DicomAlwaysAllowGet": True,
                    "DicomModalities": {a.lower(): [a, HOST, p] for a, p in dests.items()},
                },
                indent=1,
            )
        )
        return Server(kind, "ORTHANC", ["Orthanc", str(cfg)], run_dir, port)
    raise ValueError(kind)


def storescu(server: Server, files: list[Path], profile: Path) -> tuple[float, int, str]:
    """(seconds, exit status, first error lines) of one storescu over ``files``."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["storescu", "-aec", server.aet, "-xf", str(profile), "Bench", HOST, str(server.port)]
        + [str(p) for p in files],
        capture_output=True,
        env={**os.environ, "TCP_NODELAY": "1"},
        check=False,
    )
    elapsed = time.perf_counter() - t0
    lines = [ln for ln in proc.stderr.decode(errors="replace").splitlines() if "E:" in ln]
    return elapsed, proc.returncode, " | ".join(lines[:2])[:200]


def dicomd_count(index: Path) -> int:
    with contextlib.closing(sqlite3.connect(index)) as conn:
        return int(conn.execute("SELECT count(*) FROM instance").fetchone()[0])


def machine() -> str:
    """CPU, versions of Python, SQLite, DCMTK and Orthanc."""
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break

    def first_line(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=10)
        except OSError:
            return "not installed"
        lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
        return lines[0].strip() if lines else "?"

    return (
        f"{os.cpu_count()} CPUs ({cpu}), Python {sys.version.split()[0]}, "
        f"SQLite {sqlite3.sqlite_version}, {first_line(['dcmqrscp', '--version'])}, "
        f"{first_line(['Orthanc', '--version'])}; {calibrate.describe(calibrate.machine_speed())}"
    )


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# --- C-FIND -----------------------------------------------------------------------------------


@dataclass
class Sample:
    phase: str  # "small" or "big"
    server: str
    kind: str
    rnd: int
    ms: list[float]
    hits: list[int]
    expected: list[int]
    wall: float
    cpu: float  # server CPU seconds over the batch (process and children, /proc)
    first_ms: list[float]  # latencies of queries this server had not been sent before


def tree_cpu(pid: int) -> float:
    """utime+stime (and reaped children's) of a process and its live descendants."""
    total = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(fields[i]) for i in (11, 12, 13, 14)) / CLK_TCK
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return total


async def find_batch(
    assoc: Any,
    cx: int,
    items: list[tuple[bytes, int]],
    n: int,
    offset: int,
    seen: set[bytes] | None = None,
) -> tuple[list[float], list[int], list[int], float, list[float]]:
    """Send ``n`` queries from ``items`` one after the other: (latencies ms, answers,
    expected answers, wall seconds, latencies of queries not in ``seen`` before)."""
    ms: list[float] = []
    hits: list[int] = []
    expected: list[int] = []
    first: list[float] = []
    seen = set() if seen is None else seen
    perf = time.perf_counter
    t_start = perf()
    for q in range(n):
        body, exp = items[(offset + q) % len(items)]
        t0 = perf()
        count = 0
        async for response in assoc.request(
            cx, dimse.c_find_rq(assoc.next_message_id(), STUDY_ROOT_FIND), body, timeout=600
        ):
            if response.is_pending:
                count += 1
            elif response.status != 0:
                raise RuntimeError(f"C-FIND status 0x{response.status:04X}")
        ms.append((perf() - t0) * 1000)
        hits.append(count)
        expected.append(exp)
        if body not in seen:
            seen.add(body)
            first.append(ms[-1])
    return ms, hits, expected, perf() - t_start, first


async def run_finds(
    servers: list[Server],
    sets: dict[str, list[tuple[bytes, int]]],
    rounds: int,
    per_batch: int,
    phase: str,
) -> list[Sample]:
    assocs = {}
    for s in servers:
        assoc = await associate(
            HOST,
            s.port,
            calling_ae="BENCH",
            called_ae=s.aet,
            contexts=[(STUDY_ROOT_FIND, [EXPLICIT_LE])],
            dimse_timeout=600,
        )
        assocs[s.name] = (assoc, assoc.context_for(STUDY_ROOT_FIND))
    samples: list[Sample] = []
    offsets = dict.fromkeys(KINDS, 0)
    seen: dict[str, set[bytes]] = {s.name: set() for s in servers}
    try:
        for rnd in range(rounds + 1):  # round 0: warm-up
            order = servers if rnd % 2 == 0 else servers[::-1]
            for kind in KINDS:
                n = max(len(sets[kind]), per_batch // 2) if rnd == 0 else per_batch
                for s in order:
                    assoc, cx = assocs[s.name]
                    assert s.proc is not None
                    cpu0 = tree_cpu(s.proc.pid)
                    ms, hits, exp, wall, first = await find_batch(
                        assoc, cx, sets[kind], n, offsets[kind], seen[s.name]
                    )
                    cpu = tree_cpu(s.proc.pid) - cpu0
                    samples.append(
                        Sample(phase, s.name, kind, rnd, ms, hits, exp, wall, cpu, first)
                    )
                    print(
                        f"  {phase} round {rnd or 'warm-up'} {kind:<9} {s.name:<8} "
                        f"p50 {statistics.median(ms):7.2f} ms  max {max(ms):7.2f} ms  "
                        f"hits {statistics.mean(hits):5.1f} (load {loadavg()})",
                        flush=True,
                    )
                offsets[kind] += n
    finally:
        for assoc, _cx in assocs.values():
            with contextlib.suppress(Exception):
                await assoc.release()
    return samples


# --- C-MOVE / C-GET ---------------------------------------------------------------------------


@dataclass
class Retrieve:
    server: str
    op: str  # "move" / "get"
    mode: str  # the receiver's: "write" (files written) or "ignore" (received, not stored)
    rnd: int
    seconds: float  # request sent -> final response
    process_seconds: float  # getscu: whole process; move: same as seconds
    completed: int
    received: int
    note: str = ""


def move_identifier() -> bytes:
    from pydicom.dataset import Dataset

    from dicomd.query.charset import encode_dataset

    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = CT_STUDY["StudyInstanceUID"]
    return encode_dataset(ds, EXPLICIT_LE)


def clear(directory: Path) -> None:
    for p in directory.iterdir():
        if p.is_file():
            p.unlink()


async def one_move(server: Server, dest_dir: Path, rnd: int, mode: str) -> Retrieve:
    clear(dest_dir)
    assoc = await associate(
        HOST,
        server.port,
        calling_ae="BENCH",
        called_ae=server.aet,
        contexts=[(STUDY_ROOT_MOVE, [EXPLICIT_LE])],
        dimse_timeout=600,
    )
    cx = assoc.context_for(STUDY_ROOT_MOVE)
    body = move_identifier()
    completed, status = 0, -1
    destination = "STORESCP" if mode == "write" else "IGNORESCP"
    t0 = time.perf_counter()
    async for response in assoc.request(
        cx,
        dimse.c_move_rq(assoc.next_message_id(), STUDY_ROOT_MOVE, destination),
        body,
        timeout=600,
    ):
        if not response.is_pending:
            status = response.status
            completed = int(response.command.fields.get(0x1021) or 0)  # Completed Sub-ops
    elapsed = time.perf_counter() - t0
    await assoc.release()
    received = sum(1 for p in dest_dir.iterdir() if p.is_file()) if mode == "write" else completed
    note = "" if status == 0 else f"status 0x{status:04X}"
    return Retrieve(server.name, "move", mode, rnd, elapsed, elapsed, completed, received, note)


_STAMP = re.compile(r"^(\d+)\.(\d+)\.(\d+) (\w+): (.*)$")


def one_get(server: Server, out_dir: Path, log_cfg: Path, rnd: int, mode: str) -> Retrieve:
    clear(out_dir)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            "getscu", "-lc", str(log_cfg), "-S", "-aet", "BENCH", "-aec", server.aet,
            "-k", "QueryRetrieveLevel=STUDY",
            "-k", f"StudyInstanceUID={CT_STUDY['StudyInstanceUID']}",
            *(["--ignore"] if mode == "ignore" else ["-od", str(out_dir)]),
            HOST, str(server.port),
        ],
        capture_output=True, env={**os.environ, "TCP_NODELAY": "1"}, check=False,
    )  # fmt: skip
    process = time.perf_counter() - t0
    sent = final = None
    completed = 0
    for line in (proc.stdout + proc.stderr).decode(errors="replace").splitlines():
        m = _STAMP.match(line)
        if not m:
            continue
        stamp = int(m[1]) + int(m[2]) / 1e3 + int(m[3]) / 1e6
        text = m[5]
        if sent is None and text.startswith("Sending C-GET Request"):
            sent = stamp
        elif text.startswith("Received C-GET Response") and "(Pending)" not in text:
            final = stamp
        elif text.strip().startswith("Number of Completed Suboperations"):
            completed = int(text.rsplit(":", 1)[1])
    received = sum(1 for p in out_dir.iterdir() if p.is_file()) if mode == "write" else completed
    note = ""
    if proc.returncode != 0:
        note = f"getscu exit {proc.returncode}"
    if sent is None or final is None:
        note = (note + " no C-GET timestamps in getscu's log").strip()
        seconds = process
    else:
        seconds = final - sent
    return Retrieve(server.name, "get", mode, rnd, seconds, process, completed, received, note)


# --- the synthetic big index ----------------------------------------------------------------


def prefill(db: Path, n: int) -> Layout:
    """``n`` instances (10,000 studies at 1 M) straight into a fresh index."""
    from dicomd.archive import index as ix

    layout = big_layout(n)
    per_study = layout.instances_per_study()
    tmp = db.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    engine = ix.create_index_engine(f"sqlite:///{tmp}", durable=False)
    ix.migrate(engine)
    engine.dispose()
    conn = sqlite3.connect(tmp)
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA journal_mode=OFF")
    conn.execute("PRAGMA cache_size=-200000")
    maker = HeaderMaker()
    t0 = time.perf_counter()
    patients = []
    for p in range(layout.patients):
        v = layout.patient(p)
        studies = min(layout.per_patient, layout.studies - p * layout.per_patient)
        patients.append(
            (
                p + 1, f"|{v['PatientID']}", v["PatientID"], v["PatientName"],
                v["PatientBirthDate"], v["PatientSex"], studies,
                studies * len(layout.series), studies * per_study,
            )
        )  # fmt: skip
    conn.executemany(
        "INSERT INTO patient (id, patient_key, patient_id, patient_name, patient_birth_date, "
        "patient_sex, number_of_patient_related_studies, number_of_patient_related_series, "
        "number_of_patient_related_instances) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        patients,
    )
    study_rows, series_rows = [], []
    series_id = 0
    for s in range(layout.studies):
        v = layout.study(s)
        series = layout.series_of(s)
        modalities = "\\".join(sorted({m for _u, m, _c, _n in series}))
        classes = "\\".join(sorted({c for _u, _m, c, _n in series}))
        study_rows.append(
            (
                s + 1, v["StudyInstanceUID"], s // layout.per_patient + 1, v["StudyDate"],
                v["StudyTime"], v["AccessionNumber"], v["StudyID"], v["ReferringPhysicianName"],
                v["StudyDescription"], modalities, classes, len(series), per_study,
            )
        )  # fmt: skip
        for k, (uid, modality, _cls, count) in enumerate(series):
            series_id += 1
            series_rows.append(
                (series_id, uid, s + 1, modality, k + 1, f"{modality} SERIES {k + 1}", count)
            )
    conn.executemany(
        "INSERT INTO study (id, study_instance_uid, patient_pk, study_date, study_time, "
        "accession_number, study_id, referring_physician_name, study_description, "
        "modalities_in_study, sop_classes_in_study, number_of_study_related_series, "
        "number_of_study_related_instances) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        study_rows,
    )
    conn.executemany(
        "INSERT INTO series (id, series_instance_uid, study_pk, modality, series_number, "
        "series_description, number_of_series_related_instances) VALUES (?, ?, ?, ?, ?, ?, ?)",
        series_rows,
    )

    def instances() -> Iterator[tuple[Any, ...]]:
        series_pk = 0
        done = 0
        for s in range(layout.studies):
            p = s // layout.per_patient
            study = layout.study(s) | {"FrameOfReferenceUID": f"{UID_ROOT}.2.{s + 1}.0"}
            parts = {"p": maker.part("p", layout.patient(p)), "s": maker.part("s", study)}
            for k, (uid, modality, sop_class, count) in enumerate(layout.series_of(s)):
                series_pk += 1
                parts["r"] = maker.part("r", series_values(uid, modality, sop_class, k, 512))
                for i in range(count):
                    if done >= n:
                        return
                    sop_uid = f"{uid}.{i + 1}"
                    header = maker.header(parts, maker.part("i", instance_values(sop_uid, i)))
                    yield (
                        sop_uid, series_pk, sop_class, i + 1, EXPLICIT_LE,
                        f"synthetic/{s}/{k}/{i}.dcm", 526_000 + len(header), f"{done:064x}",
                        header,
                    )  # fmt: skip
                    done += 1

    conn.executemany(
        "INSERT INTO instance (sop_instance_uid, series_pk, sop_class_uid, instance_number, "
        "transfer_syntax_uid, path, size, sha256, received_at, header) VALUES "
        "(?, ?, ?, ?, ?, ?, ?, ?, '2024-01-01 00:00:00.000000', ?)",
        instances(),
    )
    conn.commit()  # no ANALYZE: dicomd's own index has no statistics either
    conn.close()
    tmp.rename(db)
    print(f"  pre-filled {n:,} instances in {time.perf_counter() - t0:.0f} s", flush=True)
    return layout


# --- tables -----------------------------------------------------------------------------------


def pctl(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def find_table(samples: list[Sample], phase: str, servers: list[str]) -> list[str]:
    lines = [
        "| query | server | p50 ms | p95 ms | queries/s | first-time p50 ms | "
        "server CPU ms/query | answers/query | p50 / dicomd p50 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in KINDS:
        p50s: dict[str, float] = {}
        rows = []
        for server in servers:
            mine = [
                s for s in samples if s.phase == phase and s.server == server and s.kind == kind
            ]
            timed = [s for s in mine if s.rnd > 0]
            if not timed:
                continue
            ms = [m for s in timed for m in s.ms]
            qps = sum(len(s.ms) for s in timed) / sum(s.wall for s in timed)
            cpu = sum(s.cpu for s in timed) * 1000 / len(ms)
            first = [m for s in mine for m in s.first_ms]
            hits = [h for s in timed for h in s.hits]
            exp = [e for s in timed for e in s.expected]
            wrong = sum(1 for h, e in zip(hits, exp, strict=True) if h != e)
            p50s[server] = statistics.median(ms)
            rows.append(
                (server, p50s[server], pctl(ms, 0.95), qps, first, cpu, hits, wrong, len(ms))
            )
        for server, p50, p95, qps, first, cpu, hits, wrong, n in rows:
            ratio = p50 / p50s["dicomd"] if "dicomd" in p50s else float("nan")
            note = f" ({wrong} of {n} answer counts not as expected)" if wrong else ""
            first_text = f"{statistics.median(first):.2f} ({len(first)})" if first else "-"
            lines.append(
                f"| {kind} | {server} | {p50:.2f} | {p95:.2f} | {qps:.0f} | {first_text} | "
                f"{cpu:.2f} | {statistics.mean(hits):.1f}{note} | {ratio:.1f} |"
            )
    return lines


def retrieve_table(results: list[Retrieve], servers: list[str]) -> list[str]:
    lines = [
        "| op | receiver | server | inst/s (median) | rounds (inst/s) | ms RQ to final | "
        "getscu process ms | x dcmqrscp | received |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for op in ("move", "get"):
        for mode in ("write", "ignore"):
            rates: dict[str, float] = {}
            rows = []
            for server in servers:
                mine = [
                    r
                    for r in results
                    if r.op == op and r.mode == mode and r.server == server and r.rnd > 0
                ]
                if not mine:
                    continue
                per = [r.completed / r.seconds if r.seconds else 0.0 for r in mine]
                rates[server] = statistics.median(per)
                rows.append((server, mine, per))
            receiver = ("storescp" if op == "move" else "getscu") + (
                " (files)" if mode == "write" else " --ignore"
            )
            for server, mine, per in rows:
                ratio = rates[server] / rates["dcmqrscp"] if rates.get("dcmqrscp") else float("nan")
                proc = (
                    f"{statistics.median(r.process_seconds for r in mine) * 1000:.0f}"
                    if op == "get"
                    else "-"
                )
                notes = sorted({r.note for r in mine if r.note})
                received = f"{min(r.received for r in mine)}-{max(r.received for r in mine)}"
                lines.append(
                    f"| C-{op.upper()} | {receiver} | {server} | {rates[server]:.0f} | "
                    f"{', '.join(f'{x:.0f}' for x in per)} | "
                    f"{statistics.median(r.seconds for r in mine) * 1000:.1f} | {proc} | "
                    f"{ratio:.2f} | {received}{' ' + '; '.join(notes) if notes else ''} |"
                )
    return lines


@contextlib.contextmanager
def cleanup_on_signal() -> Iterator[None]:
    def handler(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# --- main -------------------------------------------------------------------------------------


def run_small(args: argparse.Namespace, work: Path, servers_wanted: list[str]) -> dict[str, Any]:
    small, ct = make_data(work)
    files = small + ct
    run = work / "runs" / time.strftime("%Y%m%d-%H%M%S")
    run.mkdir(parents=True)
    profile = work / "store.cfg"
    profile.write_text(PROFILE)
    log_cfg = work / "getscu-log.cfg"
    log_cfg.write_text(LOG_CONFIG)
    # Where the receivers (storescp, getscu) write: the run directory, or --receiver-dir
    # (a tmpfs takes the disk's moods out of the comparison of senders; see the docstring).
    received = args.receiver_dir / run.name if args.receiver_dir else run
    received.mkdir(parents=True, exist_ok=True)
    dest_dir = received / "storescp"
    dest_dir.mkdir()
    dests = {"STORESCP": free_port(), "IGNORESCP": free_port()}
    receivers = [
        Server(
            "storescp",
            "STORESCP",
            ["storescp", "-od", str(dest_dir), "-aet", "STORESCP", str(dests["STORESCP"])],
            run,
            dests["STORESCP"],
        ),
        Server(
            "storescp-ignore",
            "IGNORESCP",
            ["storescp", "--ignore", "-aet", "IGNORESCP", str(dests["IGNORESCP"])],
            run,
            dests["IGNORESCP"],
        ),
    ]
    servers = [build_server(kind, run / kind, dests) for kind in servers_wanted]
    out: dict[str, Any] = {"load": {}, "find": [], "retrieve": []}
    started: list[Server] = []
    try:
        for receiver in receivers:
            receiver.start()
            started.append(receiver)
        for s in servers:
            s.start()
            started.append(s)
            seconds, code, err = storescu(s, files, profile)
            if s.name == "dicomd":  # acknowledged before the index commit: wait for it
                deadline = time.monotonic() + 60
                while dicomd_count(s.run_dir / "index.sqlite") < len(files):
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.1)
            out["load"][s.name] = {"seconds": seconds, "exit": code, "error": err}
            print(
                f"loaded {len(files)} instances into {s.name} in {seconds:.1f} s "
                f"({len(files) / seconds:.0f} inst/s), storescu exit {code} {err}",
                flush=True,
            )
        if not args.skip_find:
            sets = query_sets(SMALL)
            out["find"] = asyncio.run(run_finds(servers, sets, args.rounds, args.queries, "small"))
        if not args.skip_retrieve:
            ops = set(args.ops.split(","))
            results: list[Retrieve] = []
            get_dir = received / "getscu"
            get_dir.mkdir()
            for rnd in range(args.retrieve_rounds + 1):
                order = servers if rnd % 2 == 0 else servers[::-1]
                for s in order:
                    for mode in ("write", "ignore"):
                        done: list[Retrieve] = []
                        if "move" in ops:
                            done.append(asyncio.run(one_move(s, dest_dir, rnd, mode)))
                        if "get" in ops:
                            done.append(one_get(s, get_dir, log_cfg, rnd, mode))
                        results += done
                        for x in done:
                            print(
                                f"  retrieve round {rnd or 'warm-up'} C-{x.op.upper()} {mode:<6} "
                                f"{s.name:<8} "
                                f"{x.completed / x.seconds if x.seconds else 0:6.0f} inst/s "
                                f"{x.seconds * 1000:7.1f} ms received {x.received} {x.note} "
                                f"(load {loadavg()})",
                                flush=True,
                            )
            out["retrieve"] = results
    finally:
        for s in reversed(started):
            s.stop()
    if not args.keep:
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(received, ignore_errors=True)
    return out


def run_big(args: argparse.Namespace, work: Path) -> list[Sample]:
    db = work / f"big-{args.big}.sqlite"
    layout = big_layout(args.big)
    if not db.exists():
        prefill(db, args.big)
    run = work / "runs" / f"big-{time.strftime('%Y%m%d-%H%M%S')}"
    run.mkdir(parents=True)
    server = dicomd_server(run, db, {})
    (run / "store").mkdir()
    try:
        server.start()
        sets = query_sets(layout)
        return asyncio.run(run_finds([server], sets, args.rounds, args.queries, "big"))
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(run, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/dicomd-bench-qr"))
    parser.add_argument(
        "--only", default="dicomd,dcmqrscp,orthanc", help="servers, comma-separated"
    )
    parser.add_argument("--rounds", type=int, default=10, help="C-FIND rounds after the warm-up")
    parser.add_argument("--queries", type=int, default=40, help="queries per batch")
    parser.add_argument("--retrieve-rounds", type=int, default=9, help="C-MOVE / C-GET rounds")
    parser.add_argument("--big", type=int, default=1_000_000, help="instances in the big index")
    parser.add_argument("--skip-big", action="store_true")
    parser.add_argument("--big-only", action="store_true")
    parser.add_argument("--skip-find", action="store_true")
    parser.add_argument("--skip-retrieve", action="store_true")
    parser.add_argument(
        "--ops", default="move,get", help="retrieve operations, comma-separated: move, get"
    )
    parser.add_argument("--quick", action="store_true", help="1 round, 10 queries, 100 k index")
    parser.add_argument("--keep", action="store_true", help="keep the run directory")
    parser.add_argument(
        "--receiver-dir",
        type=Path,
        help="where the C-MOVE/C-GET receivers write their files (default: the run "
        "directory; a tmpfs such as /dev/shm makes their disk writes repeatable)",
    )
    parser.add_argument("--json", type=Path, help="also write every sample here")
    args = parser.parse_args()
    configure_logging("warning", "console")
    if args.quick:
        args.rounds, args.queries, args.retrieve_rounds = 1, 10, 1
        if args.big == 1_000_000:
            args.big = 100_000
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    servers = [s for s in args.only.split(",") if s]
    if "orthanc" in servers and shutil.which("Orthanc") is None:
        print("Orthanc is not installed: left out", flush=True)
        servers.remove("orthanc")
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load_start = loadavg()
    print(f"{started}; load average at start: {load_start}", flush=True)
    print(machine(), flush=True)
    small: dict[str, Any] = {"load": {}, "find": [], "retrieve": []}
    big: list[Sample] = []
    with cleanup_on_signal():
        if not args.big_only:
            small = run_small(args, work, servers)
        if not args.skip_big and args.big:
            big = run_big(args, work)
    load_end = loadavg()
    print(f"load average at end: {load_end}\n", flush=True)
    report: list[str] = []
    if small["find"]:
        report += ["C-FIND, ~2,400-instance archive (Study Root, STUDY level):", ""]
        report += [*find_table(small["find"], "small", servers), ""]
    if big:
        report += [f"C-FIND, dicomd on a synthetic {args.big:,}-instance index:", ""]
        report += [*find_table(big, "big", ["dicomd"]), ""]
    if small["retrieve"]:
        report += [f"C-MOVE / C-GET of the {CT_COUNT}-instance CT study:", ""]
        report += [*retrieve_table(small["retrieve"], servers), ""]
    if small["load"]:
        loads = [
            f"{k} {2400 / v['seconds']:.0f} inst/s"
            + (f" (exit {v['exit']}: {v['error']})" if v["exit"] else "")
            for k, v in small["load"].items()
        ]
        report += ["Loading (storescu, 1 association): " + ", ".join(loads), ""]
    report += [f"Load average {load_start} at start, {load_end} at end; {machine()}."]
    print("\n".join(report))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "started": started,
                    "load": [load_start, load_end],
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "loading": small["load"],
                    "find": [s.__dict__ for s in small["find"]] + [s.__dict__ for s in big],
                    "retrieve": [r.__dict__ for r in small["retrieve"]],
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
