"""One C-STORE's round trip, instance by instance (companion of bench_store.py).

    .venv/bin/python bench/store_steps.py                                   # dicomd none, storescp
    .venv/bin/python bench/store_steps.py --only dicomd-none,dicomd-full,storescp --rounds 3
    .venv/bin/python bench/store_steps.py --python deb=/var/tmp/dicomd-venv-deb/bin/python \\
        --only dicomd-none@deb,storescp --set ct

bench_store.py's one-association rate comes from DCMTK storescu, whose own work (reading
and parsing each file) sits in every round trip, and from the wall time of whole runs, which
on this project's VM swings by 2x with the state of the page cache. This script sends the
same instances from memory instead: a plain blocking client (TCP_NODELAY) that has every
P-DATA-TF PDU encoded before it starts, sends each C-STORE-RQ as storescu does (the command
in one PDU, the data set in PDUs of the acceptor's maximum length), waits for the
C-STORE-RSP, checks its status and times it. Per server it prints the median, 90th
percentile and mean round trip and the rate they add up to: the server's time per instance
(receive, check, write, answer, and whatever else competes for its CPU meanwhile) with
little else in the way. Servers run one after the other, in an order that rotates over the
rounds; each run gets a fresh server and archive; the first 100 instances of a run are not
counted. The sets are bench_store.py's (generated there on first use). The archives go to a
tmpfs by default (``--runs``): on this project's VM, ext4 without a journal makes each file
created soon after many were deleted cost 0.2-0.6 ms (see bench_store.py), which would
measure the file system's state rather than the servers; fsync is free there, so read
``dicomd-full`` figures from it as the CPU path only.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import socket
import statistics
import struct
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_store as bs  # noqa: E402

from dicomd.archive.part10 import read_file_meta  # noqa: E402
from dicomd.net import dimse  # noqa: E402
from dicomd.net.acse_codec import decode_ac, encode_rq  # noqa: E402
from dicomd.net.negotiation import ProposedContext  # noqa: E402
from dicomd.net.pdu import encode_release_rq  # noqa: E402

WARMUP = 100
A_ASSOCIATE_AC = 0x02
P_DATA_TF = 0x04


def recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks: list[bytes] = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise EOFError("connection closed by the server")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv_pdu(sock: socket.socket) -> tuple[int, bytes]:
    header = recv_exact(sock, 6)
    (length,) = struct.unpack(">I", header[2:6])
    return header[0], header + recv_exact(sock, length)


def load(files: list[Path]) -> list[tuple[str, str, bytes]]:
    """(SOP class, SOP instance, data set bytes) of each file, in explicit VR little endian."""
    out = []
    for path in files:
        raw = path.read_bytes()
        meta = read_file_meta(io.BytesIO(raw))
        if meta.transfer_syntax_uid != bs.EXPLICIT_LE:
            raise SystemExit(f"{path}: not explicit VR little endian")
        out.append((meta.sop_class_uid, meta.sop_instance_uid, raw[meta.dataset_offset :]))
    return out


def associate(port: int, called_ae: str, classes: list[str]) -> tuple[socket.socket, dict, int]:
    contexts = [ProposedContext(2 * i + 1, uid, (bs.EXPLICIT_LE,)) for i, uid in enumerate(classes)]
    sock = socket.create_connection((bs.HOST, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(
        encode_rq(
            calling_ae="STORESTEPS", called_ae=called_ae, contexts=contexts, max_pdu_length=16384
        )
    )
    kind, pdu = recv_pdu(sock)
    if kind != A_ASSOCIATE_AC:
        raise SystemExit(f"association not accepted (PDU type {kind:#04x})")
    ac = decode_ac(pdu)
    accepted = {cx.context_id for cx in ac.contexts if cx.result == 0}
    by_class = {cx.abstract_syntax: cx.context_id for cx in contexts if cx.context_id in accepted}
    if set(by_class) != set(classes):
        raise SystemExit(f"contexts refused: {sorted(set(classes) - set(by_class))}")
    return sock, by_class, ac.max_pdu_length


def measure(kind: str, dataset: str, instances: list[tuple[str, str, bytes]], runs: Path) -> dict:
    run_dir = runs / f"steps-{kind}-{dataset}-{time.monotonic_ns()}"
    server = bs.build_server(kind, run_dir, 1)
    server.start()
    try:
        assert server.proc is not None
        time.sleep(0.3)
        cpu0 = bs.proc_cpu(server.proc.pid)
        classes = sorted({c for c, _, _ in instances})
        sock, by_class, max_pdu = associate(server.port, server.aet, classes)
        # Every PDU encoded before the clock starts: the client costs the same for all.
        messages = []
        for n, (sop_class, sop_instance, data) in enumerate(instances, 1):
            command = dimse.encode_command(dimse.c_store_rq(n % 65536, sop_class, sop_instance))
            chunks = dimse.fragment_message(by_class[sop_class], command, data, max_pdu)
            messages.append([bytes(c) for c in chunks])
        times: list[float] = []
        clock = time.perf_counter_ns
        for pdus in messages:
            start = clock()
            for pdu in pdus:
                sock.sendall(pdu)
            kind_, rsp = recv_pdu(sock)
            times.append((clock() - start) / 1000)
            if kind_ != P_DATA_TF:
                raise SystemExit(f"{server.name}: expected a C-STORE-RSP, got {kind_:#04x}")
            status = dimse.decode_command(rsp[12:]).status
            if status != 0:
                raise SystemExit(f"{server.name}: C-STORE-RSP status {status:#06x}")
        sock.sendall(encode_release_rq())
        with contextlib.suppress(OSError, EOFError):
            recv_pdu(sock)
        sock.close()
        time.sleep(0.2)
        cpu = bs.proc_cpu(server.proc.pid) - cpu0
    finally:
        server.stop()
    shutil.rmtree(run_dir, ignore_errors=True)
    counted = times[WARMUP:]
    ordered = sorted(counted)
    return {
        "median": statistics.median(counted),
        "p90": ordered[int(len(ordered) * 0.9)],
        "mean": statistics.fmean(counted),
        "cpu_us": cpu * 1e6 / len(instances),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="dicomd-none,storescp", help="servers, comma-separated")
    parser.add_argument("--set", default="small", choices=["small", "ct"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("/var/tmp/dicomd-bench-store"),
        help="where bench_store.py keeps its sets",
    )
    parser.add_argument(
        "--runs",
        type=Path,
        default=Path("/dev/shm/dicomd-store-steps"),
        help="where the servers' archives go (default: a tmpfs, see the module docstring)",
    )
    bs.add_label_options(parser)
    args = parser.parse_args()
    servers = [s for s in args.only.split(",") if s]
    bs.apply_label_options(parser, args, servers)
    work: Path = args.work
    args.runs.mkdir(parents=True, exist_ok=True)
    instances = load(bs.make_sets(work)[args.set])
    print(
        f"C-STORE round trip, µs ({len(instances)} {args.set} instances per run, first "
        f"{WARMUP} not counted); load {os.getloadavg()[0]:.2f}"
    )
    print(f"{'server':22s}{'median':>9s}{'p90':>9s}{'mean':>9s}{'inst/s':>9s}{'CPU µs':>9s}")
    results: dict[str, list[dict]] = {s: [] for s in servers}
    for rnd in range(args.rounds):
        shift = rnd % len(servers)
        for kind in servers[shift:] + servers[:shift]:
            r = measure(kind, args.set, instances, args.runs)
            results[kind].append(r)
            print(
                f"{kind:22s}{r['median']:9.1f}{r['p90']:9.1f}{r['mean']:9.1f}"
                f"{1e6 / r['mean']:9.0f}{r['cpu_us']:9.0f}",
                flush=True,
            )
    print("medians over the rounds:")
    for kind, rs in results.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        print(
            f"{kind:22s}{med['median']:9.1f}{med['p90']:9.1f}{med['mean']:9.1f}"
            f"{1e6 / med['mean']:9.0f}{med['cpu_us']:9.0f}"
        )
    print(f"load at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
