"""Network-core benchmark: dicomd vs DCMTK storescp vs a plain pynetdicom SCP, in one run.

    .venv/bin/python bench/bench_echo.py            # full run (about 15 minutes)
    .venv/bin/python bench/bench_echo.py --quick    # short run for iteration
    .venv/bin/python bench/bench_echo.py --only dicomd --skip-idle

What it measures, against each server, alternating servers in rounds (medians reported):

* association rate: open + A-ASSOCIATE + one C-ECHO + A-RELEASE + close per second, with
  1 and with 4 concurrent client workers, and the server CPU spent per association; in two
  request modes (``--requests``): ``same``, every association sends the same A-ASSOCIATE-RQ
  bytes (a modality repeating its association), and ``new``, every association's request
  differs (a distinct calling AE title each time, from a pool larger than any of dicomd's
  caches), which measures the uncached set-up path;
* C-ECHO round trip inside one association (2,000 sequential echoes: median, p99);
* idle associations: N (default 1,000) associations opened and left idle: server RSS and
  PSS added, threads/processes, CPU over a few idle seconds, and the RTT, association rate
  and server CPU per association of one extra busy client before / while / after they are
  open. A full run adds a second pynetdicom idle test at 200 (``--extra-idle``), on a fresh
  pynetdicom process.

Servers: dicomd, DCMTK storescp (single process, and ``--fork``), a plain pynetdicom SCP
(pynetdicom_scp.py), and a floor that is not DICOM at all (canned_scp.py: uvloop answering
with canned PDUs), which shows what one Python process on uvloop costs per association.

The load generator is deliberately cheap: uvloop, raw pre-encoded PDUs (built once with
dicomd's own encoders), no decoding beyond the 6-byte PDU header and the echo status. It
runs in separate worker processes (``--worker``, JSON on stdin/stdout) so its CPU is
measured apart from the server's and does not disturb the orchestrator, which holds the
idle associations. DCMTK servers run with ``TCP_NODELAY=1`` (DESIGN.md).

Every server is started in its own session and stopped (SIGTERM, then SIGKILL) on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import calibrate  # bench/, on sys.path as the script's directory

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HOST = "127.0.0.1"
VERIFICATION = "1.2.840.10008.1.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
CLK_TCK = os.sysconf("SC_CLK_TCK")

A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RP = 0x06
A_ABORT = 0x07

# "new" request mode: the calling AE title (PS3.8 table 9-11, bytes 27-42 of the
# A-ASSOCIATE-RQ) is replaced per association from a pool of this many distinct titles per
# worker. dicomd's caches keyed by request hold at most 4,096 entries and are cleared when
# full, so a title comes back only after more distinct ones than any cache can hold.
CALLING_AE_SLICE = slice(26, 42)
NEW_RQ_POOL = 20_000


# ---------------------------------------------------------------------------------------
# Pre-encoded PDUs (built once with dicomd's encoders; the workers get them as hex)
# ---------------------------------------------------------------------------------------


def build_pdus(called_ae: str) -> dict[str, str]:
    from dicomd.net import dimse
    from dicomd.net.acse_codec import encode_rq
    from dicomd.net.negotiation import ProposedContext
    from dicomd.net.pdu import encode_release_rq

    rq = encode_rq(
        calling_ae="BENCHSCU",
        called_ae=called_ae,
        contexts=[ProposedContext(1, VERIFICATION, (EXPLICIT_LE, IMPLICIT_LE))],
        max_pdu_length=16384,
    )
    command = dimse.encode_command(dimse.c_echo_rq(1))
    echo = b"".join(bytes(c) for c in dimse.fragment_message(1, command, None, 16384))
    return {"rq": rq.hex(), "echo": echo.hex(), "release": encode_release_rq().hex()}


# ---------------------------------------------------------------------------------------
# The raw client (used by the workers and by the orchestrator's idle associations)
# ---------------------------------------------------------------------------------------


class PduClient(asyncio.Protocol):
    """Buffers bytes and hands out whole PDUs: (type, body)."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only look-alikes.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _complete(self) -> bool:
        buf = self.buf
        return len(buf) >= 6 and len(buf) >= 6 + int.from_bytes(buf[2:6], "big")

    def data_received(self, data: bytes) -> None:
        self.buf += data
        waiter = self.waiter
        if waiter is not None and self._complete():
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_exception(ConnectionError(f"connection closed ({exc})"))

    async def read_pdu(self) -> tuple[int, bytes]:
        if not self._complete():
            if self.closed:
                raise ConnectionError("connection closed")
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        buf = self.buf
        end = 6 + int.from_bytes(buf[2:6], "big")
        kind = buf[0]
        body = bytes(buf[6:end])
        del buf[:end]
        return kind, body


class Pdus:
    def __init__(self, spec: dict[str, str], new_rq_tag: str = "") -> None:
        self.rq = bytes.fromhex(spec["rq"])
        self.echo = bytes.fromhex(spec["echo"])
        self.release = bytes.fromhex(spec["release"])
        # "new" mode: a pre-built pool of requests that differ in their calling AE title
        # (``new_rq_tag`` keeps pools of different workers and windows apart).
        self.rq_pool: list[bytes] = []
        self._next = 0
        if new_rq_tag:
            template = bytearray(self.rq)
            for i in range(NEW_RQ_POOL):
                template[CALLING_AE_SLICE] = f"N{new_rq_tag}{i:07d}".ljust(16).encode()
                self.rq_pool.append(bytes(template))

    def next_rq(self) -> bytes:
        if not self.rq_pool:
            return self.rq
        rq = self.rq_pool[self._next]
        self._next = (self._next + 1) % len(self.rq_pool)
        return rq


def _check_echo_rsp(kind: int, body: bytes) -> None:
    # One PDV, command, last fragment (control header 0x03); the C-ECHO-RSP command set's
    # highest tag is Status (0000,0900), so its value is the last two bytes.
    if kind != P_DATA_TF:
        raise RuntimeError(f"expected P-DATA-TF, got PDU type {kind:#04x}")
    if body[5] & 0x03 != 0x03:
        raise RuntimeError("echo response is not one whole command PDV")
    if body[-2:] != b"\x00\x00":
        raise RuntimeError(f"echo status {body[-2:].hex()}")


async def open_association(port: int, pdus: Pdus) -> tuple[asyncio.Transport, PduClient]:
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_connection(PduClient, HOST, port)
    transport.write(pdus.next_rq())
    kind, _ = await client.read_pdu()
    if kind != A_ASSOCIATE_AC:
        transport.close()
        raise RuntimeError(f"association not accepted: PDU type {kind:#04x}")
    return transport, client


async def one_association(port: int, pdus: Pdus) -> None:
    transport, client = await open_association(port, pdus)
    try:
        transport.write(pdus.echo)
        _check_echo_rsp(*await client.read_pdu())
        transport.write(pdus.release)
        kind, _ = await client.read_pdu()
        if kind != A_RELEASE_RP:
            raise RuntimeError(f"expected A-RELEASE-RP, got PDU type {kind:#04x}")
    finally:
        transport.close()


async def worker_rate(spec: dict[str, Any]) -> dict[str, Any]:
    pdus = Pdus(spec["pdus"], spec.get("new_rq_tag", ""))
    port = int(spec["port"])
    concurrency = int(spec["concurrency"])
    await asyncio.sleep(max(0.0, float(spec["start_at"]) - time.time()))
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    deadline = t0 + float(spec["duration"])
    counts = [0] * concurrency
    errors: list[str] = []

    async def loop_one(i: int) -> None:
        while time.perf_counter() < deadline:
            try:
                async with asyncio.timeout(30):
                    await one_association(port, pdus)
                counts[i] += 1
            except TimeoutError:
                errors.append("association not completed within 30 s")
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.05)

    await asyncio.gather(*(loop_one(i) for i in range(concurrency)))
    return {
        "count": sum(counts),
        "elapsed": time.perf_counter() - t0,
        "cpu": time.process_time() - cpu0,
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:3],
    }


async def worker_rtt(spec: dict[str, Any]) -> dict[str, Any]:
    pdus = Pdus(spec["pdus"])
    n = int(spec["n"])
    budget = float(spec.get("budget", 120.0))
    samples: list[int] = []
    error = ""
    t_start = time.perf_counter()
    try:
        async with asyncio.timeout(budget + 30):
            transport, client = await open_association(int(spec["port"]), pdus)
            try:
                for _ in range(int(spec.get("warmup", 100))):
                    transport.write(pdus.echo)
                    _check_echo_rsp(*await client.read_pdu())
                deadline = time.perf_counter() + budget
                clock = time.perf_counter_ns
                for _ in range(n):
                    t0 = clock()
                    transport.write(pdus.echo)
                    kind, body = await client.read_pdu()
                    samples.append(clock() - t0)
                    _check_echo_rsp(kind, body)
                    if time.perf_counter() > deadline:
                        error = f"time budget {budget:.0f} s exhausted"
                        break
                transport.write(pdus.release)
                await client.read_pdu()
            finally:
                transport.close()
    except TimeoutError:
        error = f"no answer within {budget + 30:.0f} s"
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    return {
        "samples_us": [s / 1000 for s in samples],
        "error": error,
        "elapsed": time.perf_counter() - t_start,
    }


def worker_main() -> None:
    spec = json.loads(sys.stdin.read())
    import uvloop

    fn = worker_rate if spec["mode"] == "rate" else worker_rtt
    result = uvloop.run(fn(spec))
    sys.stdout.write(json.dumps(result))


# ---------------------------------------------------------------------------------------
# /proc accounting over a server's process tree
# ---------------------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces; fields after it start at ") ".
    return raw[raw.rindex(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def system_busy_seconds() -> float:
    """CPU time all CPUs spent busy (not idle, not iowait), from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK


def tree_cpu_seconds(root: int) -> float:
    """utime+stime of the live tree, plus what the tree's reaped children used."""
    ticks = 0
    for pid in process_tree(root):
        fields = _stat(pid)
        if fields is not None:
            # state is field 3 (index 0 here); utime 14, stime 15, cutime 16, cstime 17.
            ticks += sum(int(v) for v in fields[11:15])
    return ticks / CLK_TCK


@dataclass
class Mem:
    rss_kb: int = 0
    pss_kb: int = 0
    threads: int = 0
    processes: int = 0


def tree_memory(root: int) -> Mem:
    mem = Mem()
    for pid in process_tree(root):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        mem.processes += 1
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                mem.rss_kb += int(line.split()[1])
            elif line.startswith("Threads:"):
                mem.threads += int(line.split()[1])
        for line in rollup.splitlines():
            if line.startswith("Pss:"):
                mem.pss_kb += int(line.split()[1])
    return mem


# ---------------------------------------------------------------------------------------
# Servers
# ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def recv_pdu(sock: socket.socket) -> tuple[int, bytes]:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    kind, _, length = struct.unpack(">BBI", exactly(6))
    return kind, exactly(length)


def probe(port: int, pdus: Pdus, timeout: float = 5.0) -> None:
    """One whole association on a blocking socket: the readiness check."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(pdus.rq)
        kind, _ = recv_pdu(sock)
        if kind != A_ASSOCIATE_AC:
            raise RuntimeError(f"probe: PDU type {kind:#04x} instead of A-ASSOCIATE-AC")
        sock.sendall(pdus.echo)
        _check_echo_rsp(*recv_pdu(sock))
        sock.sendall(pdus.release)
        recv_pdu(sock)


def dicomd_config(workdir: Path, port: int, called_ae: str) -> dict[str, Any]:
    """dicomd's configuration in this benchmark: one AE with verification, access open."""
    return {
        "run_as": {"allow_root": True},
        "shutdown_timeout": 5,
        "logging": {"level": "warning", "format": "json"},
        "listeners": [{"name": "dicom", "address": HOST, "port": port, "backlog": 2048}],
        "local_aes": [{"ae_title": called_ae, "services": {"verification": None}}],
        "archive": {
            "root": str(workdir / "archive"),
            "index_url": f"sqlite:///{workdir / 'index.sqlite'}",
        },
        "access": {"default": "allow"},
        "limits": {"max_associations": 5000},
    }


@dataclass
class Server:
    key: str
    label: str
    called_ae: str
    workdir: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    pdu_spec: dict[str, str] = field(default_factory=dict)

    def command(self) -> tuple[list[str], dict[str, str]]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
        env.pop("JOURNAL_STREAM", None)
        storage = self.workdir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        if self.key.split("@")[0] == "dicomd":
            import yaml

            config = dicomd_config(self.workdir, self.port, self.called_ae)
            path = self.workdir / "dicomd.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            python = server_python(self.key)
            env["PYTHONPATH"] = str(HERE.parent)
            return [python, "-m", "dicomd", "run", "--config", str(path)], env
        if self.key.startswith("storescp"):
            env["TCP_NODELAY"] = "1"
            mode = "--fork" if self.key == "storescp-fork" else "--single-process"
            exe = shutil.which("storescp") or "storescp"
            cmd = [exe, mode, "--ignore", "-od", str(storage), "-aet", self.called_ae]
            return [*cmd, str(self.port)], env
        if self.key == "pynetdicom":
            return [sys.executable, str(HERE / "pynetdicom_scp.py"), str(self.port)], env
        if self.key == "canned":
            cmd = [sys.executable, str(HERE / "canned_scp.py"), str(self.port), self.called_ae]
            return cmd, env
        raise ValueError(self.key)

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.pdu_spec = build_pdus(self.called_ae)
        cmd, env = self.command()
        log = open(self.workdir / "server.log", "ab")  # noqa: SIM115 - closed below
        try:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,
                start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + 20
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.label} exited with {self.proc.returncode}:\n" + self.log_tail()
                )
            try:
                probe(self.port, Pdus(self.pdu_spec))
                return
            except (OSError, RuntimeError) as exc:
                last = exc
                time.sleep(0.1)
        raise RuntimeError(f"{self.label} not answering on port {self.port}: {last}")

    def log_tail(self) -> str:
        path = self.workdir / "server.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM to the server's own process group (it and any children it forked)."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the group is ours alone
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # Forked children outlive the parent if they still hold a connection.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


SERVER_DEFS = {
    "dicomd": ("dicomd", "DICOMD"),
    "storescp": ("DCMTK storescp (single process)", "STORESCP"),
    "storescp-fork": ("DCMTK storescp --fork", "STORESCP"),
    "pynetdicom": ("pynetdicom 3.0.4 SCP", "PYNETDICOM"),
    "canned": ("floor: uvloop canned replies (not DICOM)", "DICOMD"),
}
# --python LABEL=PATH: "dicomd@LABEL" runs this checkout's dicomd on another interpreter,
# side by side with "dicomd" (which runs on the one running this script). The Debian
# package runs dicomd on Debian's /usr/bin/python3 (built with PGO and LTO); a
# development interpreter (pyenv's default build has neither) is markedly slower.
PYTHONS: dict[str, str] = {}


def server_python(key: str) -> str:
    _, _, label = key.partition("@")
    return PYTHONS[label] if label else sys.executable


def add_python(spec: str) -> str:
    """Register ``LABEL=PATH`` (an interpreter with dicomd's dependencies); its key."""
    label, sep, path = spec.partition("=")
    if not sep or not label or not Path(path).exists():
        raise SystemExit(f"--python wants LABEL=PATH of an interpreter, not {spec!r}")
    PYTHONS[label] = path
    key = f"dicomd@{label}"
    version = subprocess.run(
        [path, "-c", "import sys; print(sys.version.split()[0])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    SERVER_DEFS[key] = (f"dicomd on {path} ({version})", "DICOMD")
    return key


NO_IDLE_TEST = {
    "storescp": "one association at a time: it cannot hold idle associations",
    "canned": "a reference for the association rate only",
}


# ---------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------


async def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    out, _ = await proc.communicate(json.dumps(spec).encode())
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed with {proc.returncode}")
    result: dict[str, Any] = json.loads(out)
    return result


_new_rq_tags = itertools.count()


async def measure_rate(
    server: Server,
    concurrency: int,
    duration: float,
    client_procs: int,
    new_requests: bool = False,
) -> dict[str, Any]:
    """Association rate; ``new_requests``: every association sends different RQ bytes."""
    procs = max(1, min(client_procs, concurrency))
    shares = [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]
    start_at = time.time() + 0.8  # the workers' interpreter start-up is not measured
    specs = [
        {
            "mode": "rate",
            "pdus": server.pdu_spec,
            "port": server.port,
            "concurrency": share,
            "duration": duration,
            "start_at": start_at,
            "new_rq_tag": f"{next(_new_rq_tags) % 10000:04d}" if new_requests else "",
        }
        for share in shares
    ]
    tasks = [asyncio.ensure_future(run_worker(s)) for s in specs]
    await asyncio.sleep(max(0.0, start_at - time.time()))
    cpu0, busy0, own0 = tree_cpu_seconds(server.pid), system_busy_seconds(), time.process_time()
    results = await asyncio.gather(*tasks)
    cpu1, busy1, own1 = tree_cpu_seconds(server.pid), system_busy_seconds(), time.process_time()
    count = sum(r["count"] for r in results)
    elapsed = max(r["elapsed"] for r in results)
    client_cpu = sum(r["cpu"] for r in results)
    # What the rest of the machine (other users, the workers' start-up) used meanwhile.
    background = (busy1 - busy0) - (cpu1 - cpu0) - client_cpu - (own1 - own0)
    return {
        "rate": count / elapsed,
        "count": count,
        "server_cpu_us_per_assoc": (cpu1 - cpu0) / count * 1e6 if count else None,
        "server_cpu_pct": (cpu1 - cpu0) / elapsed * 100,
        "client_cpu_pct": client_cpu / elapsed * 100,
        "background_cpu_pct": max(0.0, background / elapsed * 100),
        "errors": sum(r["errors"] for r in results),
        "error_samples": sorted({e for r in results for e in r["error_samples"]})[:3],
    }


async def measure_rtt(server: Server, n: int, budget: float = 120.0) -> dict[str, Any]:
    r = await run_worker(
        {"mode": "rtt", "pdus": server.pdu_spec, "port": server.port, "n": n, "budget": budget}
    )
    samples = sorted(r["samples_us"])
    out: dict[str, Any] = {"n": len(samples), "error": r["error"]}
    if samples:
        out["median_us"] = statistics.median(samples)
        out["p99_us"] = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    return out


async def busy_client(server: Server, duration: float, rtt_n: int) -> dict[str, Any]:
    """One extra busy client: echo RTT in one association, then the association rate with
    one worker over three short windows (median), each with the machine's background load."""
    rtt = await measure_rtt(server, rtt_n, budget=30)
    windows: list[dict[str, Any]] = []
    for _ in range(3):
        windows.append(await measure_rate(server, 1, max(1.0, duration / 2), 1))
        if windows[-1]["count"] == 0:
            break  # the server does not answer: do not wait out two more timeouts
    return {
        "rtt": rtt,
        "rate": statistics.median(w["rate"] for w in windows),
        "rates": [w["rate"] for w in windows],
        "background_cpu_pct": statistics.median(w["background_cpu_pct"] for w in windows),
        "server_cpu_us_per_assoc": median_of(windows, "server_cpu_us_per_assoc"),
        "errors": sum(w["errors"] for w in windows),
        "error_samples": sorted({e for w in windows for e in w["error_samples"]})[:3],
    }


async def idle_test(
    server: Server,
    n: int,
    idle_seconds: float,
    duration: float,
    rtt_n: int,
    open_timeout: float,
) -> dict[str, Any]:
    res: dict[str, Any] = {"target": n}
    pdus = Pdus(server.pdu_spec)
    print(f"  [{server.key}] busy client before opening idle associations", flush=True)
    res["busy_before"] = await busy_client(server, duration, rtt_n)
    await asyncio.sleep(0.5)
    mem0 = tree_memory(server.pid)
    res["mem_before"] = mem0.__dict__

    conns: list[tuple[asyncio.Transport, PduClient]] = []
    failures: list[str] = []
    gate = asyncio.Semaphore(50)  # connect in waves so no listen backlog overflows

    async def open_one() -> None:
        async with gate:
            try:
                async with asyncio.timeout(60):
                    conns.append(await open_association(server.port, pdus))
            except TimeoutError:
                failures.append("no A-ASSOCIATE-AC within 60 s")
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {exc}")

    print(f"  [{server.key}] opening {n} idle associations", flush=True)
    t0 = time.perf_counter()
    tasks = [asyncio.ensure_future(open_one()) for _ in range(n)]
    _done, pending = await asyncio.wait(tasks, timeout=open_timeout)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    res["open_seconds"] = time.perf_counter() - t0
    res["opened"] = len(conns)
    res["open_failures"] = len(failures) + len(pending)
    res["open_failure_samples"] = sorted(set(failures))[:3] + (
        [f"{len(pending)} still pending after {open_timeout:.0f} s"] if pending else []
    )
    print(f"  [{server.key}] opened {len(conns)} in {res['open_seconds']:.1f} s", flush=True)

    try:
        await asyncio.sleep(2.0)  # let the server settle
        mem1 = tree_memory(server.pid)
        res["mem_with"] = mem1.__dict__
        res["rss_added_mb"] = (mem1.rss_kb - mem0.rss_kb) / 1024
        res["pss_added_mb"] = (mem1.pss_kb - mem0.pss_kb) / 1024
        c0 = tree_cpu_seconds(server.pid)
        t_idle = time.perf_counter()
        await asyncio.sleep(idle_seconds)
        c1 = tree_cpu_seconds(server.pid)
        res["idle_cpu_pct"] = (c1 - c0) / (time.perf_counter() - t_idle) * 100
        print(f"  [{server.key}] busy client while they are open", flush=True)
        res["busy_with"] = await busy_client(server, duration, rtt_n)
        res["still_open"] = sum(1 for _, c in conns if not c.closed)
    finally:
        # Release them politely, then close whatever did not answer.
        async def release(t: asyncio.Transport, c: PduClient) -> None:
            if c.closed:
                return
            t.write(pdus.release)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(30):
                    await c.read_pdu()

        await asyncio.gather(*(release(t, c) for t, c in conns), return_exceptions=True)
        for t, _ in conns:
            t.close()
    # Forked servers take a moment to see every child exit: wait for the tree to shrink back.
    deadline = time.monotonic() + 30
    await asyncio.sleep(1.0)
    while tree_memory(server.pid).processes > mem0.processes and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    res["mem_after_close"] = tree_memory(server.pid).__dict__
    res["alive_after"] = server.alive()
    if res["alive_after"]:
        print(f"  [{server.key}] busy client after closing them", flush=True)
        res["busy_after"] = await busy_client(server, duration, rtt_n)
    return res


# --requests: which request modes to measure, as (new_requests, result-key suffix).
REQUEST_MODES = {
    "same": [(False, "")],
    "new": [(True, "_new")],
    "both": [(False, ""), (True, "_new")],
}


def rate_keys(suffix: str) -> tuple[str, str]:
    return f"rate1{suffix}", f"rate4{suffix}"


def median_of(rounds: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rounds if r.get(key) is not None]
    return statistics.median(values) if values else None


async def run_all(args: argparse.Namespace, servers: list[Server]) -> dict[str, Any]:
    modes = REQUEST_MODES[args.requests]
    results: dict[str, Any] = {
        s.key: {"rtt": [], **{key: [] for _, suffix in modes for key in rate_keys(suffix)}}
        for s in servers
    }
    for rnd in range(args.rounds):
        order = servers[rnd % len(servers) :] + servers[: rnd % len(servers)]
        print(f"round {rnd + 1}/{args.rounds}: {', '.join(s.key for s in order)}", flush=True)
        for server in order:
            r = results[server.key]
            line = f"  {server.key:14s}"
            for new, suffix in modes:
                k1, k4 = rate_keys(suffix)
                r[k1].append(await measure_rate(server, 1, args.duration, args.client_procs, new))
                r[k4].append(await measure_rate(server, 4, args.duration, args.client_procs, new))
                line += (
                    f"  {'new' if new else 'same'} RQ: c1 {r[k1][-1]['rate']:6.0f}/s"
                    f" c4 {r[k4][-1]['rate']:6.0f}/s"
                    f" ({r[k1][-1]['errors'] + r[k4][-1]['errors']} errors)"
                )
            r["rtt"].append(await measure_rtt(server, args.rtt_n))
            print(f"{line}  rtt {r['rtt'][-1].get('median_us', float('nan')):6.0f} µs", flush=True)
    if not args.skip_idle:
        for server in servers:
            if server.key in NO_IDLE_TEST:
                continue
            results[server.key]["idle"] = [
                await idle_test(
                    server,
                    args.idle_n,
                    args.idle_seconds,
                    args.duration,
                    args.rtt_n,
                    args.open_timeout,
                )
            ]
        for extra in args.extra_idle:
            key, _, n = extra.partition(":")
            for server in servers:
                if server.key == key and server.key not in NO_IDLE_TEST:
                    # A fresh process: the previous idle test may have left it degraded.
                    server.stop()
                    server.start()
                    results[key]["idle"].append(
                        await idle_test(
                            server,
                            int(n),
                            args.idle_seconds,
                            args.duration,
                            args.rtt_n,
                            args.open_timeout,
                        )
                    )
    for server in servers:
        results[server.key]["alive_at_end"] = server.alive()
    return results


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def fmt(value: float | None, spec: str = ".0f") -> str:
    return "—" if value is None else format(value, spec)


def ratio(value: float | None, ref: float | None, digits: int = 2) -> str:
    if value is None or ref is None or ref == 0:
        return "—"
    return f"{value / ref:.{digits}f}x"


def machine_info() -> dict[str, str]:
    import platform

    import pynetdicom
    import uvloop

    try:
        dcmtk = (
            subprocess.run(["echoscu", "--version"], capture_output=True, text=True, check=False)
            .stdout.split("\n")[0]
            .strip("$ ")
        )
    except OSError:
        dcmtk = "not installed"
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cpus": f"{os.cpu_count()} x {cpu}",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uvloop": uvloop.__version__,
        "pynetdicom": pynetdicom.__version__,
        "dcmtk": dcmtk,
    }


def paired_lines(
    results: dict[str, Any], servers: list[Server], ref_key: str, k1: str, k4: str
) -> list[str]:
    """Each server's rate over the reference's in the same round, and in how many rounds it
    was ahead: on a shared VM whose speed drifts, steadier than the ratio of the medians."""
    lines = [f"Round by round, rate ÷ {ref_key}'s in the same round (rounds ahead):\n"]
    ref = results[ref_key]
    for s in servers:
        if s.key == ref_key:
            continue
        parts = []
        for key, clients in ((k1, 1), (k4, 4)):
            pairs = zip(results[s.key][key], ref[key], strict=False)
            ratios = [a["rate"] / b["rate"] for a, b in pairs if a["rate"] and b["rate"]]
            if ratios:
                ahead = sum(x > 1 for x in ratios)
                parts.append(
                    f"{clients} client{'s' if clients > 1 else ''}: "
                    f"{' '.join(f'{x:.2f}' for x in ratios)} ({ahead} of {len(ratios)})"
                )
        if parts:
            lines.append(f"- {s.label}: {'; '.join(parts)}")
    lines.append("")
    return lines


def report(
    results: dict[str, Any],
    servers: list[Server],
    args: argparse.Namespace,
    info: dict[str, str],
) -> str:
    lines = [", ".join(f"{k} {v}" for k, v in info.items()), ""]
    ref_key = "storescp" if "storescp" in results else None
    modes = REQUEST_MODES[getattr(args, "requests", "same")]
    for index, (new, suffix) in enumerate(modes):
        k1, k4 = rate_keys(suffix)
        with_rtt = index == 0  # the echo RTT columns go with the first table only
        summary: dict[str, dict[str, float | None]] = {}
        for s in servers:
            r = results[s.key]
            summary[s.key] = {
                "rate1": median_of(r[k1], "rate"),
                "rate4": median_of(r[k4], "rate"),
                "cpu1": median_of(r[k1], "server_cpu_us_per_assoc"),
                "cpu4": median_of(r[k4], "server_cpu_us_per_assoc"),
                "ccpu1": median_of(r[k1], "client_cpu_pct"),
                "ccpu4": median_of(r[k4], "client_cpu_pct"),
                "rtt": median_of(r["rtt"], "median_us"),
                "p99": median_of(r["rtt"], "p99_us"),
                "errors": sum(x["errors"] for x in r[k1] + r[k4]),
            }
        ref = summary.get(ref_key or "", {})
        what = (
            "every association sends a different A-ASSOCIATE-RQ (a new calling AE title "
            f"each time, from a pool of {NEW_RQ_POOL:,} per worker)"
            if new
            else "every association sends the same A-ASSOCIATE-RQ bytes"
        )
        lines.append(
            f"Association rate (connect + A-ASSOCIATE + C-ECHO + A-RELEASE + close, per "
            f"second), {what}"
            + (f", and C-ECHO RTT in one association ({args.rtt_n} echoes)" if with_rtt else "")
            + f"; medians of {args.rounds} alternated rounds of {args.duration:g} s; ratios vs "
            "DCMTK storescp (single process); server CPU from /proc, children included.\n"
        )
        head = (
            "| server | assoc/s, 1 client | ratio | assoc/s, 4 clients | ratio "
            "| server CPU µs/assoc (1 / 4) | client CPU % (1 / 4) "
        )
        if with_rtt:
            lines.append(head + "| echo RTT median µs | p99 µs | RTT ratio | errors |")
            lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        else:
            lines.append(head + "| errors |")
            lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for s in servers:
            m = summary[s.key]
            row = (
                f"| {s.label} | {fmt(m['rate1'])} | {ratio(m['rate1'], ref.get('rate1'))} "
                f"| {fmt(m['rate4'])} | {ratio(m['rate4'], ref.get('rate4'))} "
                f"| {fmt(m['cpu1'])} / {fmt(m['cpu4'])} | {fmt(m['ccpu1'])} / {fmt(m['ccpu4'])} "
            )
            if with_rtt:
                row += f"| {fmt(m['rtt'])} | {fmt(m['p99'])} | {ratio(m['rtt'], ref.get('rtt'))} "
            lines.append(row + f"| {int(m['errors'] or 0)} |")
        lines.append("")
        lines.append(
            f"Per round ({'new' if new else 'same'} requests), assoc/s with 1 / 4 clients "
            "[CPU % used by everything else on the machine meanwhile, of 100 % x CPUs]:\n"
        )
        for s in servers:
            r = results[s.key]
            rounds = ", ".join(
                f"{a['rate']:.0f} / {b['rate']:.0f} "
                f"[{a['background_cpu_pct']:.0f} / {b['background_cpu_pct']:.0f}]"
                for a, b in zip(r[k1], r[k4], strict=True)
            )
            lines.append(f"- {s.label}: {rounds}")
            samples = {e for x in r[k1] + r[k4] for e in x["error_samples"]}
            if samples:
                lines.append(f"  - errors: {'; '.join(sorted(samples))}")
        lines.append("")
        if ref_key is not None:
            lines.extend(paired_lines(results, servers, ref_key, k1, k4))

    idle = [(s, i) for s in servers for i in results[s.key].get("idle", [])]
    if idle:
        fork = next((i for s, i in idle if s.key == "storescp-fork"), None)
        lines.append("")
        lines.append(
            "Idle associations held open: server RSS and PSS added (sum over the process "
            "tree), threads (processes), server CPU over "
            f"{args.idle_seconds:g} s of idleness. PSS ratio vs DCMTK storescp --fork.\n"
        )
        lines.append(
            "| server | N | opened (s) | RSS added MB | PSS added MB | ratio (PSS) "
            "| threads (procs) | idle CPU % | still open at the end "
            "| RSS MB before → with → after close |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for s, i in idle:
            mem = i.get("mem_with", {})
            same_n = fork is not None and fork["target"] == i["target"]
            pss_ratio = ratio(i.get("pss_added_mb"), fork.get("pss_added_mb"), 3) if same_n else "—"
            lines.append(
                f"| {s.label} | {i['target']} | {i['opened']} ({i['open_seconds']:.1f}) "
                f"| {fmt(i.get('rss_added_mb'), '.1f')} | {fmt(i.get('pss_added_mb'), '.1f')} "
                f"| {pss_ratio} | {mem.get('threads', '—')} ({mem.get('processes', '—')}) "
                f"| {fmt(i.get('idle_cpu_pct'), '.1f')} | {i.get('still_open', '—')} "
                f"| {i['mem_before']['rss_kb'] / 1024:.1f} → "
                f"{fmt(mem['rss_kb'] / 1024 if mem else None, '.1f')} → "
                f"{i['mem_after_close']['rss_kb'] / 1024:.1f} |"
            )
        lines.append("")
        lines.append(
            "One extra busy client before opening them → while they are open → after closing "
            f"them: echo RTT median ({args.rtt_n} echoes in one association) and association rate "
            "with 1 worker (median of 3 windows); kept = with / mean(before, after); the "
            "server's CPU per association of that client (not disturbed by other load on the "
            "machine, unlike the rate); background CPU % of the rest of the machine in the "
            "rate windows.\n"
        )
        lines.append(
            "| server | N | busy echo RTT µs | busy assoc/s | kept "
            "| server CPU µs/assoc | background CPU % |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        for s, i in idle:
            phases = [i.get(k, {}) for k in ("busy_before", "busy_with", "busy_after")]
            rtts = " → ".join(fmt(p.get("rtt", {}).get("median_us")) for p in phases)
            rates = " → ".join(fmt(p.get("rate")) for p in phases)
            backs = " / ".join(fmt(p.get("background_cpu_pct")) for p in phases)
            cpus = " → ".join(fmt(p.get("server_cpu_us_per_assoc")) for p in phases)
            ref_rates = [p["rate"] for p in (phases[0], phases[2]) if p.get("rate")]
            with_rate = phases[1].get("rate")
            kept = (
                f"{with_rate / statistics.mean(ref_rates) * 100:.0f} %"
                if with_rate is not None and ref_rates
                else "—"
            )
            lines.append(
                f"| {s.label} | {i['target']} | {rtts} | {rates} | {kept} | {cpus} | {backs} |"
            )
        for s, i in idle:
            notes = list(i["open_failure_samples"])
            for key in ("busy_before", "busy_with", "busy_after"):
                phase = i.get(key, {})
                if phase.get("rtt", {}).get("error"):
                    notes.append(
                        f"{key} RTT: {phase['rtt']['error']} after {phase['rtt']['n']} echoes"
                    )
                if phase.get("errors"):
                    samples = "; ".join(phase["error_samples"])
                    notes.append(f"{key} rate: {phase['errors']} errors ({samples})")
            if notes:
                lines.append(f"- {s.label}, N={i['target']}: {'; '.join(notes)}")
    for s in servers:
        if s.key in NO_IDLE_TEST and not args.skip_idle:
            lines.append(f"- no idle test for {s.label}: {NO_IDLE_TEST[s.key]}")
    dead = [s.label for s in servers if not results[s.key]["alive_at_end"]]
    if dead:
        lines.append(f"\nServers that died during the run: {', '.join(dead)}")
    return "\n".join(lines)


@contextlib.contextmanager
def started(servers: list[Server]) -> Iterator[None]:
    try:
        for s in servers:
            s.start()
            print(f"started {s.label} pid {s.pid} port {s.port}", flush=True)
        yield
    finally:
        for s in servers:
            s.stop()


def main() -> None:
    if "--worker" in sys.argv[1:]:
        worker_main()
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 round of 2 s, 500 echoes")
    p.add_argument(
        "--only",
        action="append",
        help=f"run only these servers (repeatable): {', '.join(SERVER_DEFS)}, or dicomd@LABEL",
    )
    p.add_argument(
        "--python",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="also run dicomd on this interpreter, as dicomd@LABEL (A/B of interpreters)",
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per rate measurement")
    p.add_argument("--rtt-n", type=int, default=2000)
    p.add_argument("--idle-n", type=int, default=1000)
    p.add_argument("--idle-seconds", type=float, default=5.0)
    p.add_argument(
        "--extra-idle",
        action="append",
        metavar="SERVER:N",
        help="one more idle test for SERVER with N associations (repeatable; "
        "default pynetdicom:200 in a full run)",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to this long for the 1-minute load average < 1",
    )
    p.add_argument(
        "--open-timeout",
        type=float,
        default=120.0,
        help="give up opening the idle associations after this long",
    )
    p.add_argument("--skip-idle", action="store_true")
    p.add_argument(
        "--requests",
        choices=list(REQUEST_MODES),
        default="both",
        help="association-rate request mode: the same A-ASSOCIATE-RQ bytes every time, a new "
        "one every time (distinct calling AE titles: dicomd's caches never hit), or both",
    )
    p.add_argument(
        "--client-procs",
        type=int,
        default=1,
        help="client worker processes the concurrent workers are spread over",
    )
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument(
        "--report-from",
        type=Path,
        metavar="JSON",
        help="only print the report of a run saved with --json",
    )
    args = p.parse_args()
    for spec in args.python:
        add_python(spec)
    for key in args.only or []:
        if key not in SERVER_DEFS:
            p.error(f"--only {key}: not one of {', '.join(SERVER_DEFS)}")
    if args.report_from:
        saved = json.loads(args.report_from.read_text())
        for key, value in saved["args"].items():
            setattr(args, key, value)
        servers = [
            Server(k, *SERVER_DEFS.get(k, (k, "DICOMD")), workdir=Path()) for k in saved["results"]
        ]
        print(report(saved["results"], servers, args, saved["info"]))
        return
    if args.quick:
        args.rounds, args.duration, args.rtt_n, args.idle_seconds = 1, 2.0, 500, 2.0
    if args.extra_idle is None:
        args.extra_idle = [] if args.quick else ["pynetdicom:200"]
    deadline = time.monotonic() + args.wait_quiet
    while os.getloadavg()[0] >= 1.0 and time.monotonic() < deadline:
        time.sleep(5)
    load_start = os.getloadavg()
    speed = calibrate.describe(calibrate.machine_speed())  # before any server runs

    def terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through started(): the servers are stopped

    signal.signal(signal.SIGTERM, terminate)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the servers
    keys = args.only or list(SERVER_DEFS)
    with tempfile.TemporaryDirectory(prefix="dicomd-bench-") as tmp:
        servers = [Server(k, *SERVER_DEFS[k], workdir=Path(tmp) / k) for k in keys]
        with started(servers):
            import uvloop

            results = uvloop.run(run_all(args, servers))
    info = machine_info()
    info["machine speed at start"] = speed
    info["load average at start / end"] = f"{load_start[0]:.2f} / {os.getloadavg()[0]:.2f}"
    info["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    text = report(results, servers, args, info)
    print()
    print(text)
    if args.json:
        saved_args = {k: v for k, v in vars(args).items() if k not in ("json", "report_from")}
        args.json.write_text(
            json.dumps({"info": info, "args": saved_args, "results": results}, indent=1)
        )


if __name__ == "__main__":
    main()
