"""Several worker processes serving the same listeners (``workers: N`` or ``auto``).

One event loop uses one core, and the storage path needs more than that with several
concurrent senders of large instances (bench/RESULTS.md, "Storage ingest"). With
``workers`` above 1 the process started by systemd (or by hand) becomes a supervisor:

* it binds (or inherits, socket activation) the listening sockets, reads TLS keys and drops
  privileges exactly as a single process does (``Supervisor.prepare``), replays the
  archive journals of every worker once (``Archive.prepare``), and forks the workers;
* it accepts every connection itself and hands it to the workers in turn over a Unix
  socket (``SCM_RIGHTS``): the spread is even (4 senders on 2 workers: 2 and 2), whatever
  the listening socket's origin, and socket activation needs nothing more;
* each worker is a whole dicomd serving what it is handed (its own event loop, services,
  archive journal and committer; one index shared through the database, whose unique
  constraints decide between duplicates), and reloads on SIGHUP, drains on SIGTERM;
* association limits (``limits.max_associations``, ``..._per_address``, and each local
  AE's ``max_associations``) count over all workers: counters in shared memory, checked
  and incremented under one lock;
* it alone talks to systemd: READY=1 once every worker serves (and again after a reload
  when every worker is done), STOPPING=1, and WATCHDOG=1 only while every worker's event
  loop keeps beating. A worker that dies is started again (its journal replayed first).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import mmap
import os
import selectors
import signal
import socket
import struct
import time
from typing import TYPE_CHECKING, Any

from dicomd.acceptor import AcceptorAssociation
from dicomd.logging import get_logger
from dicomd.system import sd_notify

if TYPE_CHECKING:
    from pathlib import Path

    from dicomd.config import LoadedConfig
    from dicomd.net import events as ev
    from dicomd.supervisor import Supervisor

log = get_logger("dicomd.workers")

WORKER_ENV = "DICOMD_WORKER"  # the worker's number, read by the storage service
RESTART_BACKOFF_MAX = 60.0
_MSG = struct.Struct("<BB")  # worker number, message kind
READY, HEARTBEAT = ord("R"), ord("H")


def worker_count(setting: int | str) -> int:
    if setting == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover - not Linux
            return max(1, os.cpu_count() or 1)
    return int(setting)


# --- association counts across processes ------------------------------------------------------


class SharedCounts:
    """Counters by key in shared memory (a memfd mapped before the workers are forked):
    one open-addressing table of (64-bit key hash, count) slots per worker, so that the
    supervisor can drop what a dead worker held; a total is the sum over the tables.
    ``lock()`` is a POSIX record lock on the memfd: per process, and released by the
    kernel when its holder dies (a worker killed while holding it blocks nobody)."""

    SLOTS = 1024
    _SLOT = struct.Struct("<Qq")

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.worker = 0  # set in each worker
        self.table = self.SLOTS * self._SLOT.size
        self.fd = os.memfd_create("dicomd-association-counts")
        os.ftruncate(self.fd, self.table * workers)
        self.mem = mmap.mmap(self.fd, self.table * workers)

    @contextlib.contextmanager
    def lock(self) -> Any:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    @staticmethod
    def _hash(key: str) -> int:
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest()) | 1

    def _slot(self, worker: int, h: int, create: bool) -> int | None:
        base = worker * self.table
        start = h % self.SLOTS
        free = None
        for n in range(self.SLOTS):
            at = base + ((start + n) % self.SLOTS) * self._SLOT.size
            slot_hash, count = self._SLOT.unpack_from(self.mem, at)
            if slot_hash == h:
                return at
            if slot_hash == 0:
                if free is None:
                    free = at
                break
            if count == 0 and free is None:
                free = at  # reusable: a key at zero reads the same as an absent one
        if not create or free is None:
            return None
        self._SLOT.pack_into(self.mem, free, h, 0)
        return free

    def total(self, key: str) -> int:
        """Over every worker (call with the lock held)."""
        h = self._hash(key)
        out = 0
        for worker in range(self.workers):
            at = self._slot(worker, h, create=False)
            if at is not None:
                out += self._SLOT.unpack_from(self.mem, at)[1]
        return out

    def add(self, key: str, delta: int) -> None:
        """To this worker's count (call with the lock held)."""
        h = self._hash(key)
        at = self._slot(self.worker, h, create=True)
        if at is None:
            return  # a table full of live keys: this key is counted per process only
        _, count = self._SLOT.unpack_from(self.mem, at)
        self._SLOT.pack_into(self.mem, at, h, max(0, count + delta))

    def clear(self, worker: int) -> None:
        """Forget what a worker held (it is gone)."""
        with self.lock():
            base = worker * self.table
            self.mem[base : base + self.table] = bytes(self.table)


class SharedLimitAssociation(AcceptorAssociation):
    """An acceptor whose limit checks see the associations of every worker: the check and
    the count happen under the shared lock, with the process's counters set to the
    totals for the duration."""

    counts: SharedCounts

    def _keys(self, ae_title: str | None) -> list[str]:
        keys = ["*", f"addr:{self.address}"]
        if ae_title is not None:
            keys.append(f"ae:{ae_title}")
        return keys

    def on_associate_indication(self, event: ev.AssociateIndication) -> None:
        gen = self.generation
        counters = gen.counters
        handle = gen.local_aes.get(event.request.called_ae)
        shared = self.counts
        with shared.lock():
            mine = (counters.active, counters.by_address.get(self.address, 0))
            mine_ae = handle.active if handle is not None else 0
            counters.active = shared.total("*")
            counters.by_address[self.address] = shared.total(f"addr:{self.address}")
            if handle is not None:
                handle.active = shared.total(f"ae:{handle.config.ae_title}")
            try:
                super().on_associate_indication(event)
            finally:
                counted = self._counted
                counters.active = mine[0] + counted
                if mine[1] + counted:
                    counters.by_address[self.address] = mine[1] + counted
                else:
                    counters.by_address.pop(self.address, None)
                if handle is not None:
                    handle.active = mine_ae + (counted and self.local_ae is handle)
                if counted:
                    ae = self.local_ae.config.ae_title if self.local_ae is not None else None
                    for key in self._keys(ae):
                        shared.add(key, 1)

    def on_closed(self) -> None:
        counted = self._counted
        ae = self.local_ae.config.ae_title if self.local_ae is not None else None
        super().on_closed()
        if counted:
            with self.counts.lock():
                for key in self._keys(ae):
                    self.counts.add(key, -1)


# --- the worker side ----------------------------------------------------------------------


class _PipeNotifier(sd_notify.Notifier):
    """A worker's notifier: READY (after start and after each reload) goes to the
    supervisor process, which tells systemd once every worker is ready."""

    def __init__(self, index: int, fd: int) -> None:
        super().__init__(None)
        self.index, self.fd = index, fd

    def ready(self, status: str | None = None) -> bool:
        with contextlib.suppress(OSError):
            os.write(self.fd, _MSG.pack(self.index, READY))
        return True


def _worker_main(sup: Supervisor, index: int, channel: socket.socket, pipe_w: int) -> int:
    """In the forked child: serve the connections the supervisor hands over."""
    from dicomd.supervisor import choose_event_loop

    os.environ[WORKER_ENV] = str(index)
    SharedLimitAssociation.counts.worker = index
    heartbeat = os.environ.pop("DICOMD_WORKER_HEARTBEAT", None)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    for bound in sup.listeners:
        bound.sock.close()  # the supervisor accepts; the worker never does
    sup.notifier = _PipeNotifier(index, pipe_w)
    choose_event_loop(sup.loaded.config.event_loop)

    async def no_listening() -> None:
        """The supervisor process listens and hands connections over."""

    sup._serve_listeners = no_listening  # type: ignore[method-assign]

    async def main() -> int:
        from dicomd.supervisor import StartupError

        loop = asyncio.get_running_loop()
        channel.setblocking(False)
        by_index = list(sup.listeners)

        def on_connections() -> None:
            while True:
                try:
                    data, fds, _flags, _addr = socket.recv_fds(channel, 1024, 64)
                except BlockingIOError:
                    return
                except OSError:
                    data, fds = b"", []
                if not data and not fds:  # the supervisor is gone
                    loop.remove_reader(channel.fileno())
                    sup.stopping.set()
                    return
                for n, fd in enumerate(fds):
                    sock = socket.socket(fileno=fd)
                    listener = data[n] if n < len(data) else 0
                    bound = by_index[listener]
                    sock.setblocking(False)
                    sup._spawn(loop.connect_accepted_socket(sup._factory(bound), sock))

        try:
            await sup.start()
        except StartupError as exc:
            log.error("startup_failed", reason=str(exc), worker=index)
            return 1
        loop.add_reader(channel.fileno(), on_connections)
        if heartbeat:

            async def beat() -> None:
                while True:
                    with contextlib.suppress(OSError):
                        os.write(pipe_w, _MSG.pack(index, HEARTBEAT))
                    await asyncio.sleep(float(heartbeat))

            sup._spawn(beat())
        log.info("worker_started", worker=index, pid=os.getpid())
        await sup.stopping.wait()
        with contextlib.suppress(Exception):
            loop.remove_reader(channel.fileno())
        await sup.shutdown()
        return 0

    return asyncio.run(main())


# --- the supervisor side ------------------------------------------------------------------


class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.pid = 0
        self.channel: socket.socket | None = None
        self.ready = False
        self.beat = 0.0
        self.restarts = 0
        self.next_start = 0.0


def _recover_archive(loaded: LoadedConfig) -> None:
    """Replay every worker's journal once, before any worker serves."""
    config = loaded.config
    if not any(
        {"storage", "query_retrieve"} & set(ae.enabled_services()) for ae in config.local_aes
    ):
        return
    from dicomd.archive.store import Archive

    cfg = config.archive
    if loaded.is_default:
        cfg.root.mkdir(parents=True, exist_ok=True)
    archive = Archive(cfg.root, cfg.layout, cfg.index_url, cfg.durability)
    try:
        archive.prepare(recover="all")
    finally:
        archive.engine.dispose()


def run_workers(loaded: LoadedConfig, config_path: Path | None) -> int:
    from dicomd.supervisor import StartupError, Supervisor, raise_file_limit

    config = loaded.config
    n = worker_count(config.workers)
    sup = Supervisor(loaded, config_path)
    try:
        sup.prepare()
        _recover_archive(loaded)
    except StartupError as exc:
        log.error("startup_failed", reason=str(exc))
        return 1
    except Exception as exc:
        log.error("startup_failed", reason=f"archive recovery failed: {exc!r}")
        return 1
    notifier = sup.notifier
    interval = sd_notify.watchdog_interval()
    # Only the supervisor talks to systemd.
    for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        os.environ.pop(key, None)
    if interval is not None:
        os.environ["DICOMD_WORKER_HEARTBEAT"] = str(interval / 2)
    raise_file_limit()
    counts = SharedCounts(n)
    SharedLimitAssociation.counts = counts
    sup.association_class = SharedLimitAssociation
    pipe_r, pipe_w = os.pipe()
    os.set_blocking(pipe_r, False)
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    flags = {"stop": False, "reload": False}

    def on_signal(signum: int, _frame: Any) -> None:
        if signum == signal.SIGHUP:
            flags["reload"] = True
        elif signum in (signal.SIGTERM, signal.SIGINT):
            flags["stop"] = True

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, on_signal)
    signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    workers = [_Worker(i) for i in range(n)]

    def spawn(w: _Worker) -> None:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                parent_end.close()
                wake_r.close()
                wake_w.close()
                os.close(pipe_r)
                for other in workers:
                    if other.channel is not None:
                        other.channel.close()
                code = _worker_main(sup, w.index, child_end, pipe_w)
            except BaseException:
                log.error("worker_failed", worker=w.index, exc_info=True)
            finally:
                os._exit(code)
        child_end.close()
        parent_end.setblocking(False)
        w.pid, w.channel, w.ready, w.beat = pid, parent_end, False, time.monotonic()
        log.info("worker_forked", worker=w.index, pid=pid)

    for bound in sup.listeners:
        log.info(
            "listening",
            listener=bound.config.name,
            address=bound.config.address,
            port=bound.config.port,
            tls=bound.ssl is not None,
            socket_activation=bound.inherited,
        )
    for w in workers:
        spawn(w)
    log.info(
        "started",
        workers=n,
        pid=os.getpid(),
        event_loop=config.event_loop,
        max_open_files=raise_file_limit()[0],
    )
    selector = selectors.DefaultSelector()
    for i, bound in enumerate(sup.listeners):
        selector.register(bound.sock, selectors.EVENT_READ, i)
    selector.register(wake_r, selectors.EVENT_READ, "wake")
    selector.register(pipe_r, selectors.EVENT_READ, "pipe")
    turn = 0
    exit_code = 0
    announced = False
    reloading = False
    last_ping = 0.0

    def live() -> list[_Worker]:
        return [w for w in workers if w.pid and w.channel is not None]

    def hand_over(conn: socket.socket, listener: int) -> None:
        nonlocal turn
        candidates = live()
        for _ in range(len(candidates)):
            w = candidates[turn % len(candidates)]
            turn += 1
            try:
                assert w.channel is not None
                socket.send_fds(w.channel, [bytes([listener])], [conn.fileno()])
                return
            except OSError:
                continue
        log.warning("connection_dropped", reason="no worker to take it")

    try:
        while True:
            now = time.monotonic()
            if flags["stop"]:
                break
            if flags["reload"]:
                flags["reload"] = False
                reloading = True
                notifier.reloading()
                for w in live():
                    w.ready = False
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(w.pid, signal.SIGHUP)
            for w in workers:
                if not w.pid and now >= w.next_start and not flags["stop"]:
                    spawn(w)
            timeout = 1.0 if interval is None else min(1.0, interval / 2)
            for key, _mask in selector.select(timeout):
                if key.data == "wake":
                    with contextlib.suppress(OSError):
                        wake_r.recv(4096)
                elif key.data == "pipe":
                    try:
                        data = os.read(pipe_r, 4096)
                    except BlockingIOError:
                        data = b""
                    for i in range(0, len(data) - 1, 2):
                        index, kind = _MSG.unpack_from(data, i)
                        if index < len(workers):
                            workers[index].beat = time.monotonic()
                            if kind == READY:
                                workers[index].ready = True
                else:
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    for _ in range(64):
                        try:
                            conn, _addr = sock.accept()
                        except (BlockingIOError, InterruptedError):
                            break
                        except OSError as exc:  # EMFILE, ECONNABORTED: next time
                            log.warning("accept_failed", error=str(exc))
                            break
                        with conn:
                            hand_over(conn, key.data)
            # Reap workers that ended; start them again with a backoff.
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                for w in workers:
                    if w.pid == pid:
                        if not announced and not w.ready:
                            # It never served: a configuration problem, as in one process.
                            log.error("startup_failed", reason=f"worker {w.index} did not start")
                            flags["stop"] = True
                            exit_code = 1
                        if w.channel is not None:
                            w.channel.close()
                        w.pid, w.channel, w.ready = 0, None, False
                        counts.clear(w.index)
                        delay = min(RESTART_BACKOFF_MAX, 2.0**w.restarts)
                        w.restarts += 1
                        w.next_start = time.monotonic() + delay
                        log.error(
                            "worker_exited",
                            worker=w.index,
                            pid=pid,
                            status=os.waitstatus_to_exitcode(status),
                            restart_in_s=delay,
                        )
            if all(w.ready for w in workers) and (not announced or reloading):
                announced, reloading = True, False
                notifier.ready(f"serving with {n} workers")
            # WATCHDOG=1 only while every worker's event loop beats (each every interval/2).
            if (
                interval is not None
                and time.monotonic() - last_ping >= interval
                and all(w.pid and time.monotonic() - w.beat < 2 * interval for w in workers)
            ):
                notifier.watchdog()
                last_ping = time.monotonic()
    finally:
        notifier.stopping()
        for bound in sup.listeners:
            with contextlib.suppress(Exception):
                selector.unregister(bound.sock)
            bound.sock.close()
        for w in live():
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.pid, signal.SIGTERM)
        deadline = time.monotonic() + config.shutdown_timeout + 30
        pending = {w.pid for w in workers if w.pid}
        while pending and time.monotonic() < deadline:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                pending.discard(pid)
            else:
                time.sleep(0.05)
        for pid in pending:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        log.info("stopped")
    return exit_code
