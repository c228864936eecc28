"""Where dicomd's time goes per association (companion of bench_echo.py).

    .venv/bin/python bench/profile_echo.py            # both parts
    .venv/bin/python bench/profile_echo.py --micro    # only the in-process step timings
    .venv/bin/python bench/profile_echo.py --callbacks

1. ``--micro``: the sans-IO steps of one association set-up and one C-ECHO timed in
   process (timeit, best of 5), no network: decode the A-ASSOCIATE-RQ, negotiate, encode
   the A-ASSOCIATE-AC, and the echo's command decode + response encode; and, for
   comparison, the same set-up through pynetdicom's classes (tests/acse_reference.py).
2. ``--callbacks``: dicomd run with its protocol callbacks (and the main steps of the
   association set-up inside them) wrapped to add up ``time.thread_time_ns()`` per
   association, while the load generator opens associations with 4 workers. Cheap (two
   clock reads per call), so the shares are close to the unwrapped daemon's.
3. ``--daemon``: dicomd run under cProfile with a CPU-time clock (time.process_time, so
   time the process spends preempted on a busy machine is not counted) while
   bench_echo.py's load generator opens associations with 4 workers; prints the top
   functions by inclusive and by own time. cProfile inflates call-heavy Python code, so
   read the shares as an upper bound for pure-Python parts and compare with part 1.

With ``--new-requests`` the load of parts 2 and 3 sends a different A-ASSOCIATE-RQ every
time (bench_echo.py's "new" mode), so dicomd's per-request caches never hit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pstats
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import timeit
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_echo as bench  # noqa: E402

PROFILED_MAIN = textwrap.dedent(
    """
    import cProfile, runpy, sys, time
    out = sys.argv[1]
    sys.argv = ["dicomd", *sys.argv[2:]]
    profile = cProfile.Profile(time.process_time)
    profile.enable()
    try:
        runpy.run_module("dicomd", run_name="__main__")
    except SystemExit:
        pass
    finally:
        profile.disable()
        profile.dump_stats(out)
    """
)


CALLBACKS_MAIN = textwrap.dedent(
    """
    import atexit, json, runpy, sys, time
    out = sys.argv[1]
    sys.argv = ["dicomd", *sys.argv[2:]]
    import dicomd.acceptor as acceptor
    import dicomd.association as association
    import dicomd.net.pdu as pdu
    import dicomd.transport as transport
    clock = time.thread_time_ns
    acc = {}

    def add(key, ns):
        entry = acc.setdefault(key, [0, 0])
        entry[0] += ns
        entry[1] += 1

    PDU_NAMES = {1: "data_received A-ASSOCIATE-RQ", 4: "data_received P-DATA",
                 5: "data_received A-RELEASE-RQ"}
    original_data_received = transport.Link.data_received

    def data_received(self, data):
        t = clock()
        original_data_received(self, data)
        add(PDU_NAMES.get(data[0], "data_received other PDU"), clock() - t)

    transport.Link.data_received = data_received

    def timed_method(cls, name, label):
        original = getattr(cls, name)

        def method(self, *args):
            t = clock()
            result = original(self, *args)
            add(label, clock() - t)
            return result

        setattr(cls, name, method)

    def timed_function(module, name, label):
        original = getattr(module, name, None)
        if original is None:
            return

        def function(*args, **kwargs):
            t = clock()
            result = original(*args, **kwargs)
            add(label, clock() - t)
            return result

        setattr(module, name, function)

    timed_method(transport.Link, "connection_made", "connection_made")
    timed_method(transport.Link, "connection_lost", "connection_lost")
    timed_method(transport.Link, "associate_accept",
                 "  . Link.associate_accept (FSM, write)")
    timed_function(pdu, "decode_associate_rq", "  . decode_associate_rq")
    timed_function(pdu, "encode_associate", "  . encode_associate")
    timed_function(acceptor, "negotiate_contexts", "  . negotiate_contexts")
    timed_function(acceptor, "encode_ac", "  . encode_ac")
    timed_function(acceptor, "decide", "  . access decide (acceptor)")
    timed_method(acceptor.AcceptorAssociation, "connection_started",
                 "  . AcceptorAssociation.connection_started")
    timed_method(acceptor.AcceptorAssociation, "on_associate_indication",
                 "  . AcceptorAssociation.on_associate_indication")
    timed_method(acceptor.AcceptorAssociation, "on_closed", "  . AcceptorAssociation.on_closed")

    class Timed:
        def __init__(self, coro):
            self.coro = coro

        def __await__(self):
            inner = self.coro.__await__()
            value = None
            while True:
                t = clock()
                try:
                    yielded = inner.send(value)
                except StopIteration as stop:
                    add("_serve (service + response, inline or task)", clock() - t)
                    return stop.value
                add("_serve (service + response, inline or task)", clock() - t)
                value = yield yielded

    original_serve = association.Association._serve

    async def _serve(self, *args):
        return await Timed(original_serve(self, *args))

    association.Association._serve = _serve
    atexit.register(lambda: json.dump(acc, open(out, "w")))
    try:
        runpy.run_module("dicomd", run_name="__main__")
    except SystemExit:
        pass
    """
)


def micro() -> None:
    from dicomd.net import acse_codec, dimse, negotiation, pdu

    rq = bytes.fromhex(bench.build_pdus("DICOMD")["rq"])
    echo = bytes.fromhex(bench.build_pdus("DICOMD")["echo"])
    offers = [
        negotiation.ContextOffer(
            bench.VERIFICATION,
            ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"),
            True,
            False,
        )
    ]
    request = acse_codec.decode_rq(rq)
    negotiated = negotiation.negotiate_contexts(request, offers)

    def whole() -> bytes:
        r = acse_codec.decode_rq(rq)
        n = negotiation.negotiate_contexts(r, offers)
        return acse_codec.encode_ac(r, n, max_pdu_length=65536)

    def echo_path() -> bytes:
        command = dimse.decode_command(pdu.decode_pdata(echo)[0].data)
        rsp = dimse.encode_command(dimse.response_for(command, 0))
        return b"".join(bytes(c) for c in dimse.fragment_message(1, rsp, None, 16384))

    steps: list[tuple[str, Callable[[], object]]] = [
        (
            "acse_codec.decode_rq (A-ASSOCIATE-RQ bytes → AssociationRequest)",
            lambda: acse_codec.decode_rq(rq),
        ),
        ("negotiate_contexts", lambda: negotiation.negotiate_contexts(request, offers)),
        (
            "acse_codec.encode_ac (Negotiated → A-ASSOCIATE-AC bytes)",
            lambda: acse_codec.encode_ac(request, negotiated, max_pdu_length=65536),
        ),
        ("= whole A-ASSOCIATE-RQ → AC bytes", whole),
        ("C-ECHO: decode P-DATA + command, encode response", echo_path),
    ]
    try:  # the pynetdicom path dicomd took before acse_codec (tests/acse_reference.py)
        sys.path.insert(0, str(HERE.parent / "tests"))
        from acse_reference import reference_decode_rq, reference_encode_ac

        steps.append(
            (
                "  for comparison: the same through pynetdicom's classes (before acse_codec)",
                lambda: reference_encode_ac(
                    r := reference_decode_rq(rq),
                    negotiation.negotiate_contexts(r, offers),
                    max_pdu_length=65536,
                ),
            )
        )
    except ImportError:
        pass
    print("In-process step timings, µs per call (best of 5):")
    for name, fn in steps:
        n = 1000
        best = min(timeit.repeat(fn, number=n, repeat=5)) / n
        print(f"  {best * 1e6:8.1f}  {name}")


class _FakeTransport:
    """Just enough of a transport for ``transport.Link``: writes are dropped, a close is
    reported back as ``connection_lost`` from the event loop, as uvloop does."""

    def __init__(self, link: object, port: int) -> None:
        self._link = link
        self._closing = False
        self._extra = {"peername": ("127.0.0.1", port), "sockname": ("127.0.0.1", 11112)}
        self.written = 0

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self._extra.get(name, default)

    def is_closing(self) -> bool:
        return self._closing

    def writelines(self, chunks: list[bytes]) -> None:
        self.written += len(chunks)

    def write(self, data: bytes) -> None:
        self.written += 1

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            asyncio.get_running_loop().call_soon(self._link.connection_lost, None)  # type: ignore[attr-defined]

    abort = close

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _cycles(n: int, new: bool, profile: object = None) -> float:
    """``n`` whole associations (connect, A-ASSOCIATE, C-ECHO, A-RELEASE, close) through
    dicomd's acceptor objects with a fake transport; returns CPU µs per association."""
    import io

    from dicomd.acceptor import AcceptorAssociation, Counters, Generation
    from dicomd.config import parse_config
    from dicomd.logging import configure_logging
    from dicomd.services.registry import discover
    from dicomd.supervisor import Supervisor, build_services

    configure_logging("warning", "json", stream=io.StringIO())
    pdus = bench.Pdus(bench.build_pdus("DICOMD"), "0000" if new else "")
    with tempfile.TemporaryDirectory(prefix="dicomd-cycle-") as tmp:
        registry = discover()[0]
        config = parse_config(bench.dicomd_config(Path(tmp), 11112, "DICOMD"), registry=registry)
        generation = Generation(config, build_services(config, registry), Counters())
        new_link = Supervisor._new_link
        holder = type(
            "Holder", (), {"links": set(), "association_class": AcceptorAssociation, "loop": None}
        )()
        loop = asyncio.get_running_loop()

        async def one(i: int) -> None:
            link = new_link(holder, generation, "dicom", 0.0)  # type: ignore[arg-type]
            transport = _FakeTransport(link, 1024 + i % 60000)
            link.connection_made(transport)  # type: ignore[arg-type]
            link.data_received(pdus.next_rq())
            link.data_received(pdus.echo)
            while link.busy:  # a C-ECHO served by a task (answered inline: never)
                await asyncio.sleep(0)
            link.data_received(pdus.release)
            link.eof_received()
            transport.close()
            await link.closed

        for i in range(200):  # warm-up
            await one(i)
        if profile is not None:
            profile.enable()  # type: ignore[attr-defined]
        cpu = time.process_time()
        for i in range(n):
            await one(i)
        cpu = time.process_time() - cpu
        if profile is not None:
            profile.disable()  # type: ignore[attr-defined]
        del loop
    return cpu / n * 1e6


def cycle(n: int, new: bool, top: int) -> None:
    import cProfile

    import uvloop

    per = uvloop.run(_cycles(n, new))
    print(
        f"In process, fake transport, {'new' if new else 'the same'} A-ASSOCIATE-RQ each "
        f"time: {per:.1f} µs CPU per association (connect, A-ASSOCIATE, C-ECHO, A-RELEASE, "
        "close; no sockets, no kernel)"
    )
    if top:
        profile = cProfile.Profile(time.process_time)
        uvloop.run(_cycles(n, new, profile))
        stats = pstats.Stats(profile)
        stats.sort_stats("tottime").print_stats(top)


async def _load(server: bench.Server, duration: float, new: bool) -> dict[str, object]:
    return await bench.measure_rate(server, 4, duration, 1, new)


def run_wrapped(
    wrapper: str, out: Path, duration: float, new: bool = False
) -> tuple[dict[str, object], float]:
    """dicomd started through ``wrapper`` (which writes ``out`` at exit) under 4-worker load.
    Returns the load result and the daemon's CPU µs per association (user + system)."""
    wd = out.parent
    main_path = wd / "wrapped_main.py"
    main_path.write_text(wrapper)
    server = bench.Server("dicomd", "dicomd", "DICOMD", wd)
    server.port = bench.free_port()
    server.pdu_spec = bench.build_pdus("DICOMD")
    cmd, env = server.command()
    cmd = [cmd[0], str(main_path), str(out), *cmd[3:]]  # replaces "-m dicomd"
    server.proc = subprocess.Popen(cmd, env=env, cwd=wd, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                bench.probe(server.port, bench.Pdus(server.pdu_spec))
                break
            except (OSError, RuntimeError):
                if time.monotonic() > deadline or server.proc.poll() is not None:
                    raise
                time.sleep(0.2)
        result = asyncio.run(_load(server, duration, new))
    finally:
        server.proc.send_signal(signal.SIGTERM)  # dicomd exits cleanly: `out` is written
        try:
            server.proc.wait(30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(5)
    return result, float(result["server_cpu_us_per_assoc"])  # type: ignore[arg-type]


def callbacks(duration: float, new: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="dicomd-profile-") as tmp:
        out = Path(tmp) / "callbacks.json"
        result, per_assoc = run_wrapped(CALLBACKS_MAIN, out, duration, new)
        acc: dict[str, list[int]] = json.loads(out.read_text())
    n = acc["data_received A-ASSOCIATE-RQ"][1]
    print(
        f"{result['rate']:.0f} assoc/s, {n} associations, {per_assoc:.0f} µs CPU per "
        "association (user + system, from /proc); thread CPU time per association:"
    )
    covered = 0.0
    for name, (ns, calls) in sorted(acc.items(), key=lambda kv: -kv[1][0]):
        us = ns / n / 1000
        if not name.startswith(" "):
            covered += us
        print(f"  {us:7.1f} µs {us / per_assoc * 100:5.1f} %  {name}  ({calls} calls)")
    rest = per_assoc - covered
    print(
        f"  {rest:7.1f} µs {rest / per_assoc * 100:5.1f} %  outside the callbacks "
        "(event loop, accept/read/close, kernel)"
    )


def daemon(duration: float, top: int, new: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="dicomd-profile-") as tmp:
        prof_path = Path(tmp) / "dicomd.prof"
        result, per_assoc = run_wrapped(PROFILED_MAIN, prof_path, duration, new)
        print(
            f"under cProfile: {result['rate']:.0f} assoc/s, {per_assoc:.0f} µs CPU per association"
        )
        stats = pstats.Stats(str(prof_path))
        stats.sort_stats("cumulative").print_stats(r"dicomd|pynetdicom|pydicom", top)
        stats.sort_stats("tottime").print_stats(top // 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--micro", action="store_true", help="only the in-process step timings")
    p.add_argument("--callbacks", action="store_true", help="only the timed callbacks")
    p.add_argument("--daemon", action="store_true", help="only the cProfiled daemon")
    p.add_argument(
        "--cycle",
        type=int,
        metavar="N",
        default=0,
        help="N whole associations in process through a fake transport (CPU per association "
        "without sockets; with --top > 0 also a cProfile of them)",
    )
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--top", type=int, default=50)
    p.add_argument(
        "--new-requests",
        action="store_true",
        help="the load sends a different A-ASSOCIATE-RQ every time (bench_echo.py's "
        "'new' request mode: dicomd's per-request caches never hit)",
    )
    args = p.parse_args()
    if args.cycle:
        cycle(args.cycle, args.new_requests, args.top)
        return
    every = not (args.micro or args.callbacks or args.daemon)
    if args.micro or every:
        micro()
    if args.callbacks or every:
        callbacks(args.duration, args.new_requests)
    if args.daemon or every:
        daemon(args.duration, args.top, args.new_requests)


if __name__ == "__main__":
    main()
