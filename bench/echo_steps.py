"""Where one association's wall time goes, step by step (companion of bench_echo.py).

    .venv/bin/python bench/echo_steps.py                      # dicomd, storescp, canned
    .venv/bin/python bench/echo_steps.py --only dicomd --only storescp --rounds 3 -n 20000

bench_echo.py's one-client association rate is a chain of round trips: the client's
connect, then A-ASSOCIATE-RQ → AC, C-ECHO-RQ → RSP, A-RELEASE-RQ → RP, and the close. This
script times each of those steps separately from a plain blocking client (one socket at a
time, TCP_NODELAY, pre-encoded PDUs from bench_echo.py) and prints the median of each per
server, so a difference between two servers can be put on one step: what the server does
between reading a PDU and writing its answer (plus its wake-up) is inside the step of that
PDU; accepting the connection falls inside "assoc" (the client's connect returns once the
kernel has completed the handshake, before the server has accepted it).

Servers run one after the other, alternating over the rounds; run it on a quiet machine
(or under the benchmarks' exclusive lock, /tmp/dicomd-cpu.lock). The first 100
associations of each run are warm-up and not counted.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import struct
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_echo as bench  # noqa: E402

STEPS = ("connect", "assoc", "echo", "release", "close")
WARMUP = 100


def recv_pdu(sock: socket.socket) -> int:
    """Read one whole PDU; return its type."""
    header = b""
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        if not chunk:
            raise EOFError("connection closed by the server")
        header += chunk
    (length,) = struct.unpack(">I", header[2:6])
    while length:
        chunk = sock.recv(length)
        if not chunk:
            raise EOFError("connection closed by the server")
        length -= len(chunk)
    return header[0]


def measure(key: str, n: int, workdir: Path) -> dict[str, float]:
    """Median µs per step over ``n`` associations against a fresh ``key`` server."""
    server = bench.Server(key, key, "BENCH", workdir / key)
    server.start()
    samples: dict[str, list[float]] = {step: [] for step in (*STEPS, "total")}
    try:
        pdus = bench.Pdus(server.pdu_spec)
        bench.probe(server.port, pdus)
        clock = time.perf_counter_ns
        expected = (0x02, 0x04, 0x06)  # A-ASSOCIATE-AC, P-DATA-TF, A-RELEASE-RP
        for _ in range(n + WARMUP):
            t0 = clock()
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t1 = clock()
            answers = []
            sock.sendall(pdus.next_rq())
            answers.append(recv_pdu(sock))
            t2 = clock()
            sock.sendall(pdus.echo)
            answers.append(recv_pdu(sock))
            t3 = clock()
            sock.sendall(pdus.release)
            answers.append(recv_pdu(sock))
            t4 = clock()
            sock.close()
            t5 = clock()
            if tuple(answers) != expected:
                raise RuntimeError(f"{key}: unexpected PDU types {answers}")
            for step, ns in zip(
                (*STEPS, "total"),
                (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t5 - t0),
                strict=True,
            ):
                samples[step].append(ns / 1000)
    finally:
        server.stop()
    result = {step: statistics.median(values[WARMUP:]) for step, values in samples.items()}
    result["rate"] = 1e6 / statistics.mean(samples["total"][WARMUP:])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only",
        action="append",
        default=None,
        help="dicomd, storescp, canned or dicomd@LABEL (repeatable)",
    )
    parser.add_argument(
        "--python",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="also run dicomd on this interpreter, as dicomd@LABEL",
    )
    parser.add_argument("-n", type=int, default=15000, help="associations per run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/dicomd-echo-steps"))
    args = parser.parse_args()
    added = [bench.add_python(spec) for spec in args.python]
    keys = args.only or ["dicomd", *added, "storescp", "canned"]
    for key in keys:
        if key not in bench.SERVER_DEFS:
            parser.error(f"--only {key}: not a server (use --python LABEL=PATH for dicomd@LABEL)")
    print(f"median µs per step, {args.n} associations per run, load {os.getloadavg()[0]:.2f}")
    print(f"{'server':14s}" + "".join(f"{s:>9s}" for s in (*STEPS, "total")) + "   assoc/s")
    for _ in range(args.rounds):
        for key in keys:
            r = measure(key, args.n, args.work)
            row = "".join(f"{r[s]:9.1f}" for s in (*STEPS, "total"))
            print(f"{key:14s}{row}   {r['rate']:7.0f}", flush=True)
    print(f"load at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
