"""Worklist query latency: dicomd (folder and SQL sources) vs DCMTK wlmscpfs, same entries.

    .venv/bin/python bench/bench_worklist.py                 # 100, 1,000, 10,000 entries
    .venv/bin/python bench/bench_worklist.py --sizes 100 1000 --queries 100
    .venv/bin/python bench/bench_worklist.py --append-results   # also add a section to RESULTS.md

For each size N, N entries are written as wlmscpfs .wl files (``ROOT/DICOMD/*.wl`` plus
``lockfile``) and the same entries are put in dicomd's SQL table. The entries are spread
over 100 Scheduled Station AE Titles, so each query (a modality's usual query: its own
station AE title, with the usual return keys) matches about 1 %. One client (dicomd's own
asyncio requestor, so the client's cost is the same for every server) opens one
association per server and sends queries one after the other, cycling through the 100
station titles; the first round is a warm-up (it also shows the cost of a first query,
reported as "cold"). Latency is request sent → final response received.

dicomd runs as a subprocess with its normal configuration (logging at warning level);
wlmscpfs runs with TCP_NODELAY=1. Both are stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from pydicom.dataset import Dataset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dicomd.association import associate  # noqa: E402
from dicomd.net import dimse  # noqa: E402
from dicomd.query.charset import encode_dataset  # noqa: E402
from dicomd.worklist.files import ensure_area, write_wl  # noqa: E402
from dicomd.worklist.sql import WorklistStore  # noqa: E402

MWL_FIND = "1.2.840.10008.5.1.4.31"
EXPLICIT = "1.2.840.10008.1.2.1"
STATIONS = 100
MODALITIES = ("CT", "MR", "US", "CR", "XA")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def entry(i: int) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.AccessionNumber = f"ACC{i:07d}"
    ds.ReferringPhysicianName = "REFERRER^A"
    ds.PatientName = f"PATIENT{i:06d}^GIVEN^^^"
    ds.PatientID = f"PID{i:07d}"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "FMO"[i % 3]
    ds.StudyInstanceUID = f"1.2.826.0.1.3680043.10.1138.77.{i}"
    ds.RequestedProcedureDescription = "EXAMINATION"
    ds.RequestedProcedureID = f"RP{i}"
    item = Dataset()
    item.Modality = MODALITIES[i % len(MODALITIES)]
    item.ScheduledStationAETitle = f"ST{i % STATIONS:03d}"
    item.ScheduledProcedureStepStartDate = f"202401{1 + (i // STATIONS) % 28:02d}"
    item.ScheduledProcedureStepStartTime = f"{8 + i % 10:02d}{(i * 7) % 60:02d}00"
    item.ScheduledPerformingPhysicianName = "TECH^ONE"
    item.ScheduledProcedureStepDescription = "STEP"
    item.ScheduledProcedureStepID = f"SPS{i}"
    ds.ScheduledProcedureStepSequence = [item]
    return ds


def query(station: int) -> bytes:
    ds = Dataset()
    for keyword in ("AccessionNumber", "PatientName", "PatientID", "PatientBirthDate"):
        setattr(ds, keyword, "")
    ds.PatientSex = ""
    ds.StudyInstanceUID = ""
    ds.RequestedProcedureDescription = ""
    ds.RequestedProcedureID = ""
    item = Dataset()
    item.ScheduledStationAETitle = f"ST{station:03d}"
    for keyword in (
        "Modality",
        "ScheduledProcedureStepStartDate",
        "ScheduledProcedureStepStartTime",
        "ScheduledPerformingPhysicianName",
        "ScheduledProcedureStepDescription",
        "ScheduledProcedureStepID",
    ):
        setattr(item, keyword, "")
    ds.ScheduledProcedureStepSequence = [item]
    return encode_dataset(ds, EXPLICIT)


async def measure(port: int, called: str, queries: int) -> dict[str, float]:
    assoc = await associate(
        "127.0.0.1",
        port,
        calling_ae="BENCH",
        called_ae=called,
        contexts=[(MWL_FIND, [EXPLICIT])],
        dimse_timeout=600,
    )
    cx = assoc.context_for(MWL_FIND)
    bodies = [query(k) for k in range(STATIONS)]
    times: list[float] = []
    matches: list[int] = []
    cold = 0.0
    total = min(queries, STATIONS) + queries
    for n in range(total):
        body = bodies[n % STATIONS]
        t0 = time.perf_counter()
        count = 0
        async for response in assoc.request(
            cx, dimse.c_find_rq(assoc.next_message_id(), MWL_FIND), body, timeout=600
        ):
            if response.is_pending:
                count += 1
            elif response.status != 0:
                raise RuntimeError(f"status 0x{response.status:04X}")
        elapsed = (time.perf_counter() - t0) * 1000
        if n == 0:
            cold = elapsed
        if n >= min(queries, STATIONS):
            times.append(elapsed)
            matches.append(count)
    await assoc.release()
    times.sort()
    return {
        "median": statistics.median(times),
        "p95": times[min(len(times) - 1, int(len(times) * 0.95))],
        "cold": cold,
        "matches": statistics.mean(matches),
        "queries": len(times),
    }


def run_size(n: int, queries: int, wlm_queries: int, work: Path) -> dict[str, dict[str, float]]:
    base = work / f"n{n}"
    area = base / "worklists" / "DICOMD"
    ensure_area(area)
    datasets = [entry(i) for i in range(n)]
    for i, ds in enumerate(datasets):
        write_wl(ds, area / f"entry{i:06d}.wl")
    index_url = f"sqlite:///{base / 'index.sqlite'}"
    store = WorklistStore(index_url)
    store.add("SQLWL", [entry(i) for i in range(n)])
    store.close()
    port = free_port()
    config = {
        "run_as": {"allow_root": True},
        "logging": {"level": "warning", "format": "json"},
        "listeners": [{"name": "dicom", "address": "127.0.0.1", "port": port}],
        "local_aes": [
            {"ae_title": "DICOMD", "services": {"worklist": None}},
            {"ae_title": "SQLWL", "services": {"worklist": {"source": "sql"}}},
        ],
        "worklist_sources": [
            {"name": "default", "kind": "folder", "path": str(base / "worklists")},
            {"name": "sql", "kind": "sql"},
        ],
        "archive": {"root": str(base / "archive"), "index_url": index_url},
        "access": {"default": "allow"},
    }
    (base / "dicomd.yaml").write_text(yaml.safe_dump(config))
    results: dict[str, dict[str, float]] = {}
    with open(base / "dicomd.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dicomd", "run", "-c", str(base / "dicomd.yaml")],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_port(port)
            results["dicomd folder"] = asyncio.run(measure(port, "DICOMD", queries))
            results["dicomd sql"] = asyncio.run(measure(port, "SQLWL", queries))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
    wlmscpfs = shutil.which("wlmscpfs")
    if wlmscpfs is not None:
        wport = free_port()
        proc = subprocess.Popen(
            [wlmscpfs, "-dfp", str(base / "worklists"), str(wport)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "TCP_NODELAY": "1"},
            start_new_session=True,
        )
        try:
            wait_port(wport)
            results["wlmscpfs"] = asyncio.run(measure(wport, "DICOMD", wlm_queries))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--queries", type=int, default=300, help="timed queries per dicomd source")
    parser.add_argument(
        "--wlm-queries", type=int, default=0, help="timed queries for wlmscpfs (default: scaled)"
    )
    parser.add_argument("--append-results", action="store_true", help="append to bench/RESULTS.md")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_worklist.") as tmp:
        for n in args.sizes:
            wlm_queries = args.wlm_queries or max(10, min(args.queries, 2_000_000 // (n * 60)))
            results = run_size(n, args.queries, wlm_queries, Path(tmp))
            for server, r in results.items():
                rows.append((n, server, r))
                print(
                    f"{n:>6} entries  {server:<14} median {r['median']:8.2f} ms  "
                    f"p95 {r['p95']:8.2f} ms  cold {r['cold']:8.2f} ms  "
                    f"matches {r['matches']:.0f}  ({r['queries']} queries)",
                    flush=True,
                )
    table = [
        "| entries | server | median ms | p95 ms | first query ms | matches/query | queries |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, server, r in rows:
        table.append(
            f"| {n:,} | {server} | {r['median']:.2f} | {r['p95']:.2f} | {r['cold']:.2f} | "
            f"{r['matches']:.0f} | {r['queries']} |"
        )
    speedups = []
    for n in args.sizes:
        by = {s: r for m, s, r in rows if m == n}
        if "wlmscpfs" in by:
            wlm = by["wlmscpfs"]["median"]
            folder = wlm / by["dicomd folder"]["median"]
            sql = wlm / by["dicomd sql"]["median"]
            speedups.append(
                f"- {n:,} entries: folder {folder:.0f}x, SQL {sql:.0f}x faster than wlmscpfs "
                "(medians)"
            )
    text = "\n".join([*table, "", *speedups])
    print(text)
    if args.append_results:
        command = (
            "python bench/bench_worklist.py "
            + " ".join(sys.argv[1:]).replace("--append-results", "").strip()
        )
        section = (
            "\n\n## Worklist queries (bench/bench_worklist.py)\n\n"
            f"Command: `{command.strip()}` ({time.strftime('%Y-%m-%d')}, "
            f"{os.cpu_count()} CPUs). Each query: one station AE title (about 1 % of the "
            "entries match), the usual return keys, sent by dicomd's requestor on one "
            "association; first round is warm-up. dicomd caches each entry's encoded answer "
            "per query shape, so the warm numbers are what a modality repeating its query "
            'sees; "first query" is the first after start (index load included).\n\n' + text + "\n"
        )
        results_path = ROOT / "bench" / "RESULTS.md"
        with open(results_path, "a", encoding="utf-8") as f:
            f.write(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
