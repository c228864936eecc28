"""Storage ingest benchmark: DCMTK storescu sending to dicomd and its peers, side by side.

    .venv/bin/python bench/bench_store.py                    # full run
    .venv/bin/python bench/bench_store.py --rounds 1         # short run for iteration
    .venv/bin/python bench/bench_store.py --only dicomd-none,storescp --sets small
    .venv/bin/python bench/bench_store.py --prefill-only     # ingest at 0 / 100 k / 1 M
    .venv/bin/python bench/bench_store.py --src old=/tmp/old --only dicomd-none@old,dicomd-none \
        --sets ct --assocs 1 --multi '' --prefill '' --rounds 6    # A/B two builds

Client: DCMTK ``storescu`` with ``TCP_NODELAY=1`` and an association profile (``-xf``)
proposing only explicit VR little endian, the files' own transfer syntax, so nothing is
converted. Sets (generated once into the work directory, new UIDs):

* ``small``: 2,000 instances of 5-9 KiB, from pydicom's CT_small.dcm / MR_small.dcm with the
  pixel data cut to 32x32 / 48x48, 20 studies of 2 series;
* ``ct``: 500 synthetic CT instances, 512x512x16 bit (~513 KiB), one study.

Each set is sent over 1 association, and over 4 concurrent associations (4 storescu
processes, a quarter of the files each), to every server: dicomd (``durability: none`` and
``full``), DCMTK storescp (``--fork`` for 4), dcmqrscp, a plain pynetdicom SCP writing each
data set to a file, and Orthanc when installed. The order of the servers rotates from round
to round (each takes each place equally often over as many rounds as there are servers),
and an uncounted warm-up run starts each group (``--no-warmup``): the first run of a group
was the slow one on this project's VM, whoever ran it. The table gives medians over rounds.
Per run: instances/s (first client start to last client end), MB/s of Part-10 files sent,
server CPU ms per instance (utime+stime of the server and its reaped children,
/proc/PID/stat), server peak RSS (VmHWM of the main process), and
failures (instances not acknowledged, from storescu's exit status and stored counts).

With several associations, dicomd also runs with 2 worker processes (``workers: 2``,
servers ``dicomd-none-w2`` and ``dicomd-full-w2``; ``--multi``). dicomd's CPU and RSS add up
its worker processes.

``--prefill`` measures dicomd's ingest of the small set (1 association, ``none`` and
``full``: ``--prefill-servers``) with 0, 100,000 and 1,000,000 synthetic instance rows
already in the index (inserted directly into its SQLite database; their header column is
empty).

Every run's archive stays on disk until the end of the benchmark (see ``main``).

Every server runs in its own session and is stopped (SIGTERM, then SIGKILL) at the end of
its run and on exit. The work directory defaults to /var/tmp/dicomd-bench-store.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
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
PYTHON = sys.executable
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
EXPLICIT_LE = "1.2.840.10008.1.2.1"
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
PYNETDICOM_SCP = """
import sys, logging
from pathlib import Path
from pynetdicom import AE, evt, AllStoragePresentationContexts
out = Path(sys.argv[2])
logging.getLogger("pynetdicom").setLevel(logging.ERROR)
def on_store(event):
    with open(out / event.request.AffectedSOPInstanceUID, "wb") as fp:
        fp.write(event.encoded_dataset())
    return 0x0000
ae = AE(ae_title="PYNETDICOM")
ae.supported_contexts = AllStoragePresentationContexts
ae.add_supported_context("1.2.840.10008.1.1")  # C-ECHO: the benchmark's readiness check
ae.maximum_associations = 16
ae.start_server(("127.0.0.1", int(sys.argv[1])), block=True,
                evt_handlers=[(evt.EVT_C_STORE, on_store)])
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), 0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def wait_echo(aet: str, port: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Wait until the server answers a C-ECHO: a port that accepts connections may belong
    to a server still starting (dicomd binds its listeners first, then opens the archive),
    and that start-up must not count in the first run's time or CPU."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        echo = subprocess.run(
            ["echoscu", "-aec", aet, "-to", "5", HOST, str(port)],
            capture_output=True,
            timeout=30,
            check=False,
        )
        if echo.returncode == 0:
            return
        time.sleep(0.05)
    raise TimeoutError(f"no C-ECHO answer from {aet} on {port}")


def _children(pid: int) -> list[int]:
    """Live descendants of ``pid`` (dicomd's worker processes)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                parents[int(entry.name)] = int(fields[1])
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        out += kids
        todo += kids
    return out


def proc_cpu(pid: int) -> float:
    """utime+stime+cutime+cstime of a process and its live descendants, in seconds."""
    total = 0.0
    for p in [pid, *_children(pid)]:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(fields[i]) for i in (11, 12, 13, 14)) / CLK_TCK
    return total


def proc_hwm_kib(pid: int) -> int:
    """Peak RSS (VmHWM) of a process plus that of its live descendants."""
    total = 0
    for p in [pid, *_children(pid)]:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
    return total


# --- data sets -------------------------------------------------------------------------------


def make_sets(work: Path) -> dict[str, list[Path]]:
    import pydicom
    import pydicom.data
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sets: dict[str, list[Path]] = {}
    small = work / "data" / "small"
    if len(list(small.glob("*.dcm"))) != 2000:
        shutil.rmtree(small, ignore_errors=True)
        small.mkdir(parents=True)
        sources = [
            pydicom.dcmread(pydicom.data.get_testdata_file(name))  # type: ignore[arg-type]
            for name in ("CT_small.dcm", "MR_small.dcm")
        ]
        series: list[str] = []
        study = ""
        for i in range(2000):
            ds = sources[i % 2].copy()
            if i % 100 == 0:
                study, series = generate_uid(), [generate_uid(), generate_uid()]
            ds.StudyInstanceUID = study
            ds.SeriesInstanceUID = series[i % 2]
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = i // 2 + 1
            side = 32 if i % 2 == 0 else 48
            raw, cols, bpp = ds.PixelData, int(ds.Columns), int(ds.BitsAllocated) // 8
            ds.PixelData = b"".join(
                raw[r * cols * bpp : (r * cols + side) * bpp] for r in range(side)
            )
            ds.Rows = ds.Columns = side
            ds.save_as(small / f"s{i:05d}.dcm", enforce_file_format=True)
    sets["small"] = sorted(small.glob("*.dcm"))
    ct = work / "data" / "ct"
    if len(list(ct.glob("*.dcm"))) != 500:
        shutil.rmtree(ct, ignore_errors=True)
        ct.mkdir(parents=True)
        template = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
        del template.PixelData
        study, series_uid = generate_uid(), generate_uid()
        pixels = bytes(range(256)) * 2048  # 512 x 512 x 2 bytes
        for i in range(500):
            ds = template.copy()
            ds.file_meta = FileMetaDataset(template.file_meta)
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uid
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = i + 1
            ds.Rows = ds.Columns = 512
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
            ds.PixelData = pixels[i % 256 :] + pixels[: i % 256]
            ds["PixelData"].VR = "OW"
            ds.save_as(ct / f"c{i:04d}.dcm", enforce_file_format=True)
    sets["ct"] = sorted(ct.glob("*.dcm"))
    return sets


# --- servers ---------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    aet: str
    cmd: list[str]
    store_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    # dicomd runs from its checkout: ``python -m`` puts the working directory first on
    # sys.path, ahead of PYTHONPATH, so started from another checkout it would import that
    # one's dicomd (an A/B with --src would compare a build with itself).
    cwd: Path | None = None

    def start(self) -> None:
        env = {**os.environ, "TCP_NODELAY": "1", **self.env}
        log = open(self.store_dir.parent / f"{self.name}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            cwd=self.cwd,
        )
        log.close()
        wait_port(self.port, self.proc)
        wait_echo(self.aet, self.port, self.proc)

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


# --src LABEL=PATH: "dicomd-none@LABEL" runs dicomd from the checkout at PATH (an A/B of two
# builds side by side, in the same rounds; a git worktree of the other commit will do).
SOURCES: dict[str, Path] = {}
# --python LABEL=PATH: "dicomd-none@LABEL" runs dicomd on that interpreter (with --src of the
# same label too: that checkout on that interpreter). The Debian package runs dicomd on
# Debian's /usr/bin/python3, built with PGO and LTO; pyenv's default build has neither.
PYTHONS: dict[str, str] = {}


def add_label_options(parser: argparse.ArgumentParser) -> None:
    """--src and --python (also used by store_steps.py)."""
    parser.add_argument(
        "--src",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="a dicomd checkout to run as dicomd-<durability>@LABEL (A/B of two builds)",
    )
    parser.add_argument(
        "--python",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="an interpreter (with dicomd's dependencies) to run dicomd-<durability>@LABEL on",
    )


def apply_label_options(
    parser: argparse.ArgumentParser, args: argparse.Namespace, servers: list[str]
) -> None:
    """Fill SOURCES and PYTHONS from the options; every LABEL in ``servers`` must be known."""
    for spec in args.src:
        label, _, path = spec.partition("=")
        if not label or not (Path(path) / "dicomd" / "__init__.py").is_file():
            parser.error(f"--src {spec!r}: want LABEL=PATH of a dicomd checkout")
        SOURCES[label] = Path(path).resolve()
    for spec in args.python:
        label, _, path = spec.partition("=")
        if not label or not Path(path).is_file():
            parser.error(f"--python {spec!r}: want LABEL=PATH of an interpreter")
        PYTHONS[label] = path
    for s in servers:
        label = s.partition("@")[2]
        if "@" in s and label not in SOURCES and label not in PYTHONS:
            parser.error(f"{s}: no --src or --python {label}=PATH")


def build_server(kind: str, run_dir: Path, assocs: int) -> Server:
    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    store = run_dir / "store"
    store.mkdir()
    port = free_port()
    if kind.startswith("dicomd"):
        # dicomd-<durability>[-w<workers>][@<source label>]
        base_kind, _, label = kind.partition("@")
        source = SOURCES.get(label, ROOT)
        python = PYTHONS.get(label, PYTHON)
        durability, _, workers = base_kind.split("-", 1)[1].partition("-w")
        config: dict[str, Any] = {
            "run_as": {"allow_root": True},
            "shutdown_timeout": 5,
            "logging": {"level": "warning", "format": "json"},
            "listeners": [{"name": "dicom", "address": HOST, "port": port}],
            "local_aes": [
                {
                    "ae_title": "DICOMD",
                    "services": {"verification": None, "storage": {"min_free_space": 0}},
                }
            ],
            "archive": {
                "root": str(store),
                "index_url": f"sqlite:///{run_dir / 'index.sqlite'}",
                "durability": durability,
            },
            "access": {"default": "allow"},
        }
        if workers:
            config["workers"] = int(workers)
        (run_dir / "dicomd.yaml").write_text(yaml.safe_dump(config))
        cmd = [python, "-m", "dicomd", "run", "--config", str(run_dir / "dicomd.yaml")]
        return Server(
            kind, "DICOMD", cmd, store, env={"PYTHONPATH": str(source)}, port=port, cwd=source
        )
    if kind == "storescp":
        cmd = ["storescp", "-od", str(store), "-aet", "STORESCP"]
        if assocs > 1:
            cmd.append("--fork")
        return Server(kind, "STORESCP", [*cmd, str(port)], store, port=port)
    if kind == "dcmqrscp":
        cfg = run_dir / "dcmqrscp.cfg"
        cfg.write_text(
            f"NetworkTCPPort = {port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n"
            "HostTable BEGIN\nHostTable END\nVendorTable BEGIN\nVendorTable END\n"
            f"AETable BEGIN\nDCMQRSCP {store} RW (1000, 4096mb) ANY\nAETable END\n"
        )
        return Server(kind, "DCMQRSCP", ["dcmqrscp", "-c", str(cfg)], store, port=port)
    if kind == "pynetdicom":
        script = run_dir / "scp.py"
        script.write_text(PYNETDICOM_SCP)
        return Server(
            kind, "PYNETDICOM", [PYTHON, str(script), str(port), str(store)], store, port=port
        )
    if kind == "orthanc":
        http = free_port()
        cfg = run_dir / "orthanc.json"
        cfg.write_text(
            json.dumps(
                {
                    "Name": "bench",
                    "StorageDirectory": str(store),
                    "IndexDirectory": str(run_dir / "orthanc-index"),
                    "DicomAet": "ORTHANC",
                    "DicomPort": port,
                    "HttpPort": http,
                    "RemoteAccessAllowed": False,
                    "DicomCheckCalledAet": False,
                    "StorageCompression": False,
                    "Plugins": [],
                    "DicomServerEnabled": True,
                }
            )
        )
        return Server(kind, "ORTHANC", ["Orthanc", str(cfg)], store, port=port)
    raise ValueError(kind)


# --- one run ---------------------------------------------------------------------------------


@dataclass
class Result:
    server: str
    dataset: str
    assocs: int
    inst_per_s: float
    mb_per_s: float
    cpu_ms: float
    rss_mib: float
    failed: int
    note: str = ""
    round: int = 0  # 1-based in the side-by-side rounds; 0 elsewhere (pre-filled runs)


def warm_up(kind: str, dataset: str, files: list[Path], assocs: int, work: Path) -> None:
    """A run whose figures are thrown away, before each group of runs of one round.

    The first run of a group takes page-cache pages the guest has not touched for a while
    (the small set before it freed ~20x fewer than a CT run needs), and on this VM such a
    page costs a host fault; measured, that run paid up to twice the CPU per CT instance.
    """
    r = run_once(kind, dataset, files, assocs, work)
    print(f"  warm-up {dataset}x{assocs} {kind}: {r.inst_per_s:.0f} inst/s (not counted)")


def release_page_cache(run_dir: Path) -> None:
    """Write a finished run's files back and drop them from the page cache.

    On this VM a page the guest has not used lately costs the host a fault when the page
    cache takes it (writing 526 KiB into a new file: 0.2 ms of system time with pages a
    process just freed, 1-2 ms without), so a server's CPU per CT instance doubled from the
    first run of a round to the last as the cache grew. Handing every run the pages the
    previous one used (the same amount for every server: they all store the same data)
    keeps that out of the comparison; the files themselves stay (see ``main``).
    """
    for path in run_dir.rglob("*"):
        if path.is_file():
            with contextlib.suppress(OSError):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fdatasync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def stored_count(server: Server, run_dir: Path) -> int:
    if server.name.startswith("dicomd"):
        db = run_dir / "index.sqlite"
        with contextlib.closing(sqlite3.connect(db)) as conn:
            return int(conn.execute("SELECT count(*) FROM instance").fetchone()[0])
    if server.name == "orthanc":
        return sum(1 for p in server.store_dir.rglob("*") if p.is_file() and "-" in p.name)
    return sum(1 for p in server.store_dir.rglob("*") if p.is_file() and p.name != "index.dat")


def run_once(kind: str, dataset: str, files: list[Path], assocs: int, work: Path) -> Result:
    run_dir = work / "runs" / f"{kind}-{dataset}-{assocs}-{time.monotonic_ns()}"
    server = build_server(kind, run_dir, assocs)
    profile = work / "store.cfg"
    profile.write_text(PROFILE)
    try:
        server.start()
        assert server.proc is not None
        pid = server.proc.pid
        time.sleep(0.3)
        cpu0 = proc_cpu(pid)
        parts = [files[i::assocs] for i in range(assocs)]
        env = {**os.environ, "TCP_NODELAY": "1"}
        t0 = time.perf_counter()
        clients = [
            subprocess.Popen(
                [
                    "storescu",
                    "-aec",
                    server.aet,
                    "-xf",
                    str(profile),
                    "Bench",
                    HOST,
                    str(server.port),
                    *map(str, part),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=env,
            )
            for part in parts
        ]
        errors = [c.communicate()[1] for c in clients]
        elapsed = time.perf_counter() - t0
        time.sleep(0.2)  # let forked children be reaped into cutime
        cpu = proc_cpu(pid) - cpu0
        rss = proc_hwm_kib(pid) / 1024
        codes = [c.returncode for c in clients]
    finally:
        server.stop()
    stored = stored_count(server, run_dir)
    failed = max(0, len(files) - stored)
    note = ""
    if any(codes):
        first = next(e for e, c in zip(errors, codes, strict=True) if c).decode(errors="replace")
        lines = [ln for ln in first.splitlines() if "E:" in ln or "F:" in ln][:2]
        note = f"storescu exit {codes}: {' | '.join(lines)[:160]}"
    size = sum(p.stat().st_size for p in files)
    release_page_cache(run_dir)
    return Result(
        kind,
        dataset,
        assocs,
        (len(files) - failed) / elapsed,
        size / elapsed / 1e6,
        cpu * 1000 / len(files),
        rss,
        failed,
        note,
    )


# --- pre-filled index ------------------------------------------------------------------------


def prefill(db: Path, n: int) -> None:
    """``n`` synthetic instances straight into a fresh index (schema by dicomd's migrate)."""
    sys.path.insert(0, str(ROOT))
    from dicomd.archive import index as ix

    engine = ix.create_index_engine(f"sqlite:///{db}", durable=False)
    ix.migrate(engine)
    engine.dispose()
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA synchronous=OFF")
    per_series, per_study = 100, 4
    n_series = max(1, n // per_series)
    n_study = max(1, n_series // per_study)
    conn.executemany(
        "INSERT INTO patient (id, patient_key, patient_id, patient_name, "
        "number_of_patient_related_studies, number_of_patient_related_series, "
        "number_of_patient_related_instances) VALUES (?, ?, ?, ?, 1, ?, ?)",
        (
            (s + 1, f"|P{s}", f"P{s}", f"Name^{s}", per_study, per_study * per_series)
            for s in range(n_study)
        ),
    )
    conn.executemany(
        "INSERT INTO study (id, study_instance_uid, patient_pk, study_date, "
        "modalities_in_study, number_of_study_related_series, "
        "number_of_study_related_instances) VALUES (?, ?, ?, '20240101', 'CT', ?, ?)",
        (
            (s + 1, f"1.2.826.0.1.3680043.9.7777.100.{s}", s + 1, per_study, per_study * per_series)
            for s in range(n_study)
        ),
    )
    conn.executemany(
        "INSERT INTO series (id, series_instance_uid, study_pk, modality, "
        "number_of_series_related_instances) VALUES (?, ?, ?, 'CT', ?)",
        (
            (
                r + 1,
                f"1.2.826.0.1.3680043.9.7777.100.{r // per_study}.{r}",
                r // per_study + 1,
                per_series,
            )
            for r in range(n_series)
        ),
    )
    conn.executemany(
        "INSERT INTO instance (sop_instance_uid, series_pk, sop_class_uid, instance_number, "
        "transfer_syntax_uid, path, size, sha256, received_at) VALUES "
        "(?, ?, '1.2.840.10008.5.1.4.1.1.2', ?, '1.2.840.10008.1.2.1', ?, 8556, ?, "
        "'2024-01-01 00:00:00.000000')",
        (
            (
                f"1.2.826.0.1.3680043.9.7777.200.{i // per_series}.{i}",
                i // per_series + 1,
                i % per_series,
                f"1.2.826.0.1.3680043.9.7777.100.{i // per_series}/{i}.dcm",
                f"{i:064x}",
            )
            for i in range(n)
        ),
    )
    conn.commit()
    conn.close()


def run_prefilled(
    files: list[Path], work: Path, n: int, rounds: int, kind: str = "dicomd-none"
) -> list[Result]:
    base = work / f"prefill-{n}.sqlite"
    if not base.exists():
        t = time.perf_counter()
        prefill(base, n)
        print(f"  pre-filled {n:,} rows in {time.perf_counter() - t:.0f} s", flush=True)
    out = []
    for _ in range(rounds):
        run_dir = work / "runs" / f"prefill-{n}-{time.monotonic_ns()}"
        server = build_server(kind, run_dir, 1)
        shutil.copy(base, run_dir / "index.sqlite")
        server.store_dir.rmdir()
        server.store_dir.mkdir()
        # build_server wrote the config; run it against the copied index.
        out.append(_run_server(server, run_dir, files, f"small@{n}"))
    return out


def _run_server(server: Server, run_dir: Path, files: list[Path], label: str) -> Result:
    profile = run_dir.parent.parent / "store.cfg"
    try:
        server.start()
        assert server.proc is not None
        pid = server.proc.pid
        time.sleep(0.3)
        cpu0 = proc_cpu(pid)
        t0 = time.perf_counter()
        client = subprocess.run(
            [
                "storescu",
                "-aec",
                server.aet,
                "-xf",
                str(profile),
                "Bench",
                HOST,
                str(server.port),
                *map(str, files),
            ],
            capture_output=True,
            env={**os.environ, "TCP_NODELAY": "1"},
            check=False,
        )
        elapsed = time.perf_counter() - t0
        cpu = proc_cpu(pid) - cpu0
        rss = proc_hwm_kib(pid) / 1024
    finally:
        server.stop()
    size = sum(p.stat().st_size for p in files)
    release_page_cache(run_dir)
    return Result(
        server.name,
        label,
        1,
        len(files) / elapsed,
        size / elapsed / 1e6,
        cpu * 1000 / len(files),
        rss,
        0 if client.returncode == 0 else -1,
    )


# --- main ------------------------------------------------------------------------------------


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def table(results: list[Result]) -> str:
    groups: dict[tuple[str, int, str], list[Result]] = {}
    for r in results:
        groups.setdefault((r.dataset, r.assocs, r.server), []).append(r)
    ref: dict[tuple[str, int], float] = {}
    for (ds, n, server), rs in groups.items():
        if server == "storescp":
            ref[(ds, n)] = statistics.median(r.inst_per_s for r in rs)
    lines = [
        "| set | assocs | server | inst/s | MB/s | CPU ms/inst | RSS MiB | x storescp | "
        "failed | rounds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (ds, n, server), rs in sorted(groups.items()):
        ips = statistics.median(r.inst_per_s for r in rs)
        # "—" when storescp was not among the servers (an A/B of dicomd builds)
        ratio = f"{ips / ref[(ds, n)]:.2f}" if (ds, n) in ref else "—"
        name = "storescp --fork" if server == "storescp" and n > 1 else server
        failed = max(r.failed for r in rs)
        lines.append(
            f"| {ds} | {n} | {name} | {ips:.0f} | "
            f"{statistics.median(r.mb_per_s for r in rs):.1f} | "
            f"{statistics.median(r.cpu_ms for r in rs):.2f} | "
            f"{statistics.median(r.rss_mib for r in rs):.0f} | {ratio} | "
            f"{failed} | {len(rs)} |"
        )
    notes = sorted({f"{r.server} {r.dataset}x{r.assocs}: {r.note}" for r in results if r.note})
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])


def paired(results: list[Result], versus: str) -> str:
    """Each server against ``versus`` round by round (same set, same associations).

    On this project's VM a server's rate swings by up to 2x from round to round (the host,
    the page cache), in step for the servers of one round more than across rounds: the
    ratio within each round, and in how many rounds a build is ahead, separate two builds
    better than the medians of the table do."""
    rates: dict[tuple[str, int, str], dict[int, float]] = {}
    for r in results:
        if r.round:
            rates.setdefault((r.dataset, r.assocs, r.server), {})[r.round] = r.inst_per_s
    lines = [
        f"| set | assocs | server | ÷ {versus}, median of the rounds | ahead in | per round |",
        "|---|---|---|---:|---:|---|",
    ]
    for (ds, n, server), by_round in sorted(rates.items()):
        ref = rates.get((ds, n, versus))
        if server == versus or not ref:
            continue
        ratios = [by_round[k] / ref[k] for k in sorted(by_round) if ref.get(k)]
        if not ratios:
            continue
        ahead = sum(x > 1 for x in ratios)
        lines.append(
            f"| {ds} | {n} | {server} | {statistics.median(ratios):.2f} | "
            f"{ahead} of {len(ratios)} | {' '.join(f'{x:.2f}' for x in ratios)} |"
        )
    return "\n".join(lines)


@contextlib.contextmanager
def cleanup_on_signal() -> Iterator[None]:
    def handler(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/dicomd-bench-store"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sets", default="small,ct")
    parser.add_argument("--assocs", default="1,4")
    parser.add_argument(
        "--only",
        default="dicomd-none,dicomd-full,storescp,dcmqrscp,pynetdicom,orthanc",
        help="servers, comma-separated",
    )
    parser.add_argument(
        "--multi",
        default="dicomd-none-w2,dicomd-full-w2",
        help="servers added to the runs with several associations (dicomd with 2 worker "
        "processes: workers: 2); '' for none",
    )
    parser.add_argument("--prefill", default="0,100000,1000000", help="rows; '' to skip")
    parser.add_argument("--prefill-only", action="store_true")
    parser.add_argument(
        "--prefill-servers",
        default="dicomd-none,dicomd-full",
        help="dicomd variants measured at the pre-filled indexes",
    )
    parser.add_argument("--json", type=Path, help="also write every run here")
    parser.add_argument(
        "--versus",
        metavar="SERVER",
        action="append",
        default=[],
        help="also compare every server with this one round by round (an A/B: the ratio "
        "in each round and in how many rounds each is ahead); repeatable",
    )
    add_label_options(parser)
    parser.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="skip the uncounted run before each group of runs (see warm_up)",
    )
    args = parser.parse_args()
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    # Every run's files stay until the end: this VM's ext4 has no journal, and there a file
    # created soon after many were deleted pays for skipping each recently deleted inode
    # (ext4 recently_deleted(): 0.2-0.6 ms per create instead of 15 us), so deleting one
    # server's archive right before the next server runs would charge that server for it.
    shutil.rmtree(work / "runs", ignore_errors=True)
    (work / "runs").mkdir()
    (work / "store.cfg").write_text(PROFILE)
    sets = make_sets(work)
    servers = [s for s in args.only.split(",") if s]
    apply_label_options(parser, args, servers)
    args.multi = [s for s in args.multi.split(",") if s]
    for ref in args.versus:
        if ref not in servers + args.multi:
            parser.error(f"--versus {ref}: not among the servers (--only, --multi)")
    if "orthanc" in servers and shutil.which("Orthanc") is None:
        print("Orthanc is not installed: left out", flush=True)
        servers.remove("orthanc")
    results: list[Result] = []
    print(f"load average at start: {loadavg()}", flush=True)
    print(f"machine speed at start: {calibrate.describe(calibrate.machine_speed())}", flush=True)
    try:
        with cleanup_on_signal():
            run_all(args, servers, sets, work, results)
    finally:
        shutil.rmtree(work / "runs", ignore_errors=True)
    print(f"load average at end: {loadavg()}\n", flush=True)
    print(table(results))
    for ref in args.versus:
        print()
        print(paired(results, ref))
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in results], indent=1))


def run_all(
    args: argparse.Namespace,
    servers: list[str],
    sets: dict[str, list[Path]],
    work: Path,
    results: list[Result],
) -> None:
    if not args.prefill_only:
        for rnd in range(args.rounds):
            # The VM's speed for Python drifts within a run (bench/calibrate.py): say it.
            loop_us = calibrate.python_loop_us(repeat=3)
            print(f"round {rnd + 1}: Python dict loop {loop_us:.1f} µs", flush=True)
            for ds in args.sets.split(","):
                for n in (int(x) for x in args.assocs.split(",")):
                    these = servers + (args.multi if n > 1 else [])
                    # Rotated, not reversed, from round to round: each server takes each
                    # place in the order equally often over len(these) rounds. With the
                    # order reversed every other round, the server listed first ran first
                    # in two of three rounds, and the first run of a group is the slow one
                    # on this VM (see warm_up): 5 of 5 first runs of a CT group paid
                    # 1.9-2.1 ms CPU per instance, the same build 1.0-1.3 ms second.
                    shift = rnd % len(these)
                    order = these[shift:] + these[:shift]
                    if args.warmup:
                        warm_up(order[0], ds, sets[ds], n, work)
                    for kind in order:
                        r = run_once(kind, ds, sets[ds], n, work)
                        r.round = rnd + 1
                        results.append(r)
                        print(
                            f"round {rnd + 1} {ds}x{n} {kind}: {r.inst_per_s:.0f} inst/s "
                            f"{r.cpu_ms:.2f} ms cpu {r.rss_mib:.0f} MiB failed {r.failed} "
                            f"{r.note} (load {loadavg()})",
                            flush=True,
                        )
    for n in (int(x) for x in args.prefill.split(",") if x):
        for kind in args.prefill_servers.split(","):
            for r in run_prefilled(sets["small"], work, n, args.rounds, kind):
                results.append(r)
                print(
                    f"prefill {n:,} {kind}: {r.inst_per_s:.0f} inst/s (load {loadavg()})",
                    flush=True,
                )


if __name__ == "__main__":
    main()
