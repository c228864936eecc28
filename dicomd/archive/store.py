"""The archive: streamed, durable, indexed storage of instances as received.

One C-STORE's walk (DESIGN.md "acknowledge only what is durable"):

1. ``Ingest`` (one per request, driven from the event loop): a data set that arrives whole
   and fits in ``INLINE_MAX`` is handed to the committer in memory (one thread hop); a
   larger one is written by an I/O thread into ``ROOT/.incoming/<random>.part`` behind a
   file meta written by dicomd as its fragments arrive, its SHA-256 computed as it
   streams, and its header (never the pixel data) scanned there.
2. The committer (one thread per archive) takes every instance waiting and commits them
   together — group commit: the in-memory data sets are scanned (``extract.scan``) and
   checked against their command; final paths are chosen (never an existing file) and
   written to the intent log (fsync'd); small data sets are written at their final path,
   streamed ones linked there from ``.incoming``; one round of parallel fsyncs (files and
   directories); one index transaction (fsync'd). Only then are the requests answered,
   one wake-up of each event loop per batch: 0000 means on disk, fsync'd and indexed. A
   lone sender is never made to wait for company: the committer takes whatever is queued
   the moment it is free.
3. At start-up, ``.incoming`` is emptied (partial files of a crash) and the intent log is
   replayed: a listed file the index lacks was never acknowledged (and may be partial),
   so it is removed — without scanning the tree. No file of the archive is unknown to
   the index, and every acknowledged instance is in it.

``durability: none`` skips every fsync (benchmarks only; SQLite then runs synchronous=OFF).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import os
import queue
import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import sqlalchemy as sa

from dicomd.archive import index as ix
from dicomd.archive.extract import (
    InstanceInfo,
    UndecodableDataset,
    instance_from_bytes,
    instance_from_file,
)
from dicomd.archive.layout import render, with_suffix_number
from dicomd.archive.part10 import FileMeta, encode_file_meta, read_file_meta
from dicomd.logging import get_logger

log = get_logger("dicomd.archive")

INCOMING_DIR = ".incoming"
STATE_DIR = ".dicomd"
INTENT_LOG = "intent.log"
INTENT_LOG_TRUNCATE_AT = 64 * 1024
MAX_BATCH = 256
IO_WORKERS = 4
SYNC_WORKERS = 8
# Data sets up to this size go to the committer whole, without an I/O thread of their own.
INLINE_MAX = 1 << 20

DuplicatePolicy = Literal["reject", "keep", "replace", "replace-if-different"]

# C-STORE statuses (PS3.4 B.2.3, PS3.7 C).
STATUS_SUCCESS = 0x0000
STATUS_DUPLICATE_SOP_INSTANCE = 0x0111
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000


class StoreFailed(Exception):
    """A C-STORE that must not be answered with success: the status and a short comment."""

    def __init__(self, status: int, comment: str, offending: list[int] | None = None) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment[:64]
        self.offending = offending


@dataclass(frozen=True)
class Outcome:
    """The answer to one C-STORE once the committer is done with it."""

    status: int
    comment: str | None = None
    path: str | None = None
    duplicate: str | None = None  # None, "kept", "identical", "replaced", "rejected"
    offending: list[int] | None = None


@dataclass(eq=False)
class _Pending:
    """An instance waiting for the committer: a finished temp file (``fd``, ``info`` and
    ``sha256`` set), or a small data set still in memory (``data``) that the committer
    writes and scans itself."""

    tmp_path: Path
    fd: int
    size: int
    sha256: str
    info: InstanceInfo | None
    sop_class_uid: str  # from the command
    sop_instance_uid: str  # from the command (checked against the data set)
    transfer_syntax_uid: str
    calling_ae: str | None
    called_ae: str | None
    received_at: datetime
    policy: DuplicatePolicy
    future: asyncio.Future[Outcome]
    loop: asyncio.AbstractEventLoop
    data: bytes | bytearray | memoryview | None = None
    min_free_space: int = 0
    meta: bytes = b""
    final: str | None = None  # relative to the archive root
    linked: bool = False  # a file of ours is at ``final``
    replaces: ix.ExistingInstance | None = None
    outcome: Outcome | None = None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def dataset_digest(path: Path) -> tuple[str, int, FileMeta]:
    """(SHA-256 of the data set after the file meta, file size, file meta) of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fp:
        meta = read_file_meta(fp)
        while chunk := fp.read(1 << 20):
            h.update(chunk)
        size = fp.tell()
    return h.hexdigest(), size, meta


def _check_identity(info: InstanceInfo, sop_class_uid: str, sop_instance_uid: str) -> None:
    """PS3.4 B.2.3: the data set must be the instance the command names."""
    if info.sop_instance_uid != sop_instance_uid:
        raise StoreFailed(
            STATUS_DATASET_MISMATCH,
            f"SOP Instance UID {info.sop_instance_uid or '(none)'} in the data set",
            [0x00080018],
        )
    if info.sop_class_uid != sop_class_uid:
        raise StoreFailed(
            STATUS_DATASET_MISMATCH,
            f"SOP Class UID {info.sop_class_uid or '(none)'} in the data set",
            [0x00080016],
        )


def _deliver(answers: list[tuple[asyncio.Future[Outcome], Outcome]]) -> None:
    """Loop side: resolve the futures of one batch."""
    for future, outcome in answers:
        if not future.done():
            future.set_result(outcome)


class Archive:
    """One archive root with its index; shared by every storage service in the process."""

    def __init__(
        self,
        root: Path,
        layout: str,
        index_url: str,
        durability: Literal["full", "none"] = "full",
    ) -> None:
        self.root = Path(root)
        self.layout = layout
        self.index_url = index_url
        self.durable = durability == "full"
        self.incoming = self.root / INCOMING_DIR
        self.state_dir = self.root / STATE_DIR
        self.engine = ix.create_index_engine(index_url, durable=self.durable)
        self.io_pool = concurrent.futures.ThreadPoolExecutor(IO_WORKERS, "dicomd-archive-io")
        self._sync_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._intent_fd = -1
        self._intent_size = 0
        self._conn: sa.Connection | None = None
        self._writer: ix.IndexWriter | None = None
        self._answers: list[_Pending] = []
        self._known_dirs: set[str] = set()
        self.stats = {"committed": 0, "batches": 0}

    # -- life cycle -----------------------------------------------------------------------

    def open(self) -> dict[str, int]:
        """Create directories, migrate the index, clean up after a crash; start the committer.

        Blocking: called once at start-up, before any association is served.
        """
        for d in (self.root, self.incoming, self.state_dir):
            d.mkdir(parents=True, exist_ok=True)
        before, after = ix.migrate(self.engine)
        if before != after:
            log.info("index_migrated", from_version=before, to_version=after)
        removed = 0
        for entry in os.scandir(self.incoming):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed += 1
        self._intent_fd = os.open(
            self.state_dir / INTENT_LOG, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640
        )
        recovered, dropped = self._replay_intent_log()
        result = {"partial_removed": removed, "recovered": recovered, "orphans_removed": dropped}
        if removed or recovered or dropped:
            log.warning("archive_recovered", root=str(self.root), **result)
        self._conn = self.engine.connect()
        self._writer = ix.IndexWriter(self._conn)
        self._sync_pool = concurrent.futures.ThreadPoolExecutor(SYNC_WORKERS, "dicomd-fsync")
        self._thread = threading.Thread(target=self._run, name="dicomd-committer", daemon=True)
        self._thread.start()
        log.info("archive_open", root=str(self.root), index=self._safe_url(), durable=self.durable)
        return result

    def _safe_url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(30)
            self._thread = None
        self.io_pool.shutdown(wait=True)
        if self._sync_pool is not None:
            self._sync_pool.shutdown(wait=True)
        if self._conn is not None:
            self._conn.close()
        if self._intent_fd >= 0:
            os.close(self._intent_fd)
            self._intent_fd = -1
        self.engine.dispose()

    # -- request side -----------------------------------------------------------------------

    def ingest(
        self,
        *,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax_uid: str,
        calling_ae: str | None,
        called_ae: str | None,
        policy: DuplicatePolicy,
        min_free_space: int,
    ) -> Ingest:
        return Ingest(
            self,
            sop_class_uid,
            sop_instance_uid,
            transfer_syntax_uid,
            calling_ae,
            called_ae,
            policy,
            min_free_space,
        )

    def submit(self, pending: _Pending) -> asyncio.Future[Outcome]:
        if self._thread is None:
            raise RuntimeError("archive is not open")
        self._queue.put(pending)
        return pending.future

    # -- committer ----------------------------------------------------------------------------

    def _run(self) -> None:
        deferred: list[_Pending] = []
        while True:
            if deferred:
                batch, deferred = deferred, []
            else:
                item = self._queue.get()
                if item is None:
                    return
                batch = [item]
            stop = False
            while len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            # Two stores of one SOP instance in one batch: the later waits for the next.
            seen: set[str] = set()
            current: list[_Pending] = []
            for p in batch:
                if p.sop_instance_uid in seen:
                    deferred.append(p)
                else:
                    seen.add(p.sop_instance_uid)
                    current.append(p)
            try:
                self._commit(current)
            except Exception as exc:  # never leave a request unanswered
                log.error("archive_commit_failed", error=repr(exc), exc_info=True)
                self._fail_all(current, f"archive error: {exc}")
            self._flush_answers()
            if stop:
                for p in deferred:
                    self._fail_all([p], "archive is closing")
                self._flush_answers()
                return

    def _answer(self, p: _Pending, outcome: Outcome) -> None:
        if p.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(p.fd)
            p.fd = -1
        if p.outcome is None:
            p.outcome = outcome
            self._answers.append(p)

    def _flush_answers(self) -> None:
        """Hand the batch's outcomes to their event loops: one wake-up per loop."""
        answers, self._answers = self._answers, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Outcome], Outcome]]]
        by_loop = {}
        for p in answers:
            assert p.outcome is not None
            by_loop.setdefault(p.loop, []).append((p.future, p.outcome))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(_deliver, items)

    def _discard(self, p: _Pending) -> None:
        with contextlib.suppress(OSError):
            os.unlink(p.tmp_path)
        if p.linked and p.final is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.root / p.final)
            p.linked = False

    def _fail_all(self, batch: list[_Pending], comment: str) -> None:
        for p in batch:
            if p.outcome is None:
                self._discard(p)
                self._answer(p, Outcome(STATUS_OUT_OF_RESOURCES, comment[:64]))

    def _prepare_inline(self, batch: list[_Pending]) -> list[_Pending]:
        """Scan and check the data sets that came in memory (the watermark, the structure,
        the identity); the instances that may go on."""
        ready: list[_Pending] = []
        free: int | None = None
        for p in batch:
            if p.data is None:
                ready.append(p)
                continue
            try:
                if p.min_free_space > 0:
                    if free is None:
                        free = free_bytes(self.root)
                    if free < p.min_free_space:
                        raise StoreFailed(
                            STATUS_OUT_OF_RESOURCES,
                            f"archive below its free-space watermark ({free} bytes)",
                        )
                try:
                    info = instance_from_bytes(p.data, p.transfer_syntax_uid)
                except UndecodableDataset as exc:
                    raise StoreFailed(STATUS_CANNOT_UNDERSTAND, str(exc)) from exc
                _check_identity(info, p.sop_class_uid, p.sop_instance_uid)
            except StoreFailed as exc:
                p.data = None
                self._answer(p, Outcome(exc.status, exc.comment, offending=exc.offending))
                continue
            p.info = info
            p.meta = encode_file_meta(
                p.sop_class_uid, p.sop_instance_uid, p.transfer_syntax_uid, p.calling_ae
            )
            p.size = len(p.meta) + len(p.data)
            p.sha256 = hashlib.sha256(p.data).hexdigest()
            if free is not None:
                free -= p.size
            ready.append(p)
        return ready

    def _create(self, p: _Pending, claimed: set[str]) -> None:
        """Write an in-memory instance at its final path (never over an existing file)."""
        assert p.final is not None and p.data is not None
        while True:
            try:
                p.fd = os.open(
                    os.path.join(self.root, p.final),
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                    0o640,
                )
                break
            except FileExistsError:
                self._next_free_name(p, claimed)
        p.linked = True
        data, p.data = p.data, None
        written = os.writev(p.fd, (p.meta, data))
        if written < p.size:  # a short write: finish it (or fail with ENOSPC)
            _write_all(p.fd, memoryview(p.meta + bytes(data))[written:])

    def _next_free_name(self, p: _Pending, claimed: set[str]) -> None:
        """Someone else created ``p.final`` since we chose it: take the next free name,
        recorded in the intent log first like every other."""
        assert p.final is not None
        base, n = PurePosixPath(p.final), 1
        while True:
            candidate = str(with_suffix_number(base, n))
            if candidate not in claimed and not os.path.lexists(self.root / candidate):
                break
            n += 1
        p.final = candidate
        claimed.add(candidate)
        entry = f"{candidate}\n".encode()
        _write_all(self._intent_fd, entry)
        self._intent_size += len(entry)
        if self.durable:
            os.fsync(self._intent_fd)

    def _commit(self, batch: list[_Pending]) -> None:
        assert self._conn is not None and self._writer is not None
        batch = self._prepare_inline(batch)
        if not batch:
            return
        existing = self._writer.find(p.sop_instance_uid for p in batch)
        store: list[_Pending] = []
        for p in batch:
            old = existing.get(p.sop_instance_uid)
            if old is None:
                store.append(p)
                continue
            policy = p.policy
            if policy == "replace-if-different":
                if old.sha256 == p.sha256:
                    self._discard(p)
                    self._answer(p, Outcome(STATUS_SUCCESS, path=old.path, duplicate="identical"))
                    continue
                policy = "replace"
            if policy == "keep":
                self._discard(p)
                self._answer(p, Outcome(STATUS_SUCCESS, path=old.path, duplicate="kept"))
            elif policy == "reject":
                self._discard(p)
                self._answer(
                    p,
                    Outcome(
                        STATUS_DUPLICATE_SOP_INSTANCE,
                        "duplicate SOP instance: already stored",
                        path=old.path,
                        duplicate="rejected",
                    ),
                )
            else:
                p.replaces = old
                store.append(p)
        if not store:
            return
        # Place: choose each final path (never an existing file), create directories.
        dirs_to_sync: set[str] = set()
        claimed: set[str] = set()
        placed: list[_Pending] = []
        for p in store:
            try:
                p.final = self._choose_path(p, claimed)
                claimed.add(p.final)
                parent = os.path.dirname(os.path.join(self.root, p.final))
                dirs_to_sync |= self._make_dirs(parent)
                dirs_to_sync.add(parent)
                placed.append(p)
            except OSError as exc:
                self._io_failed(p, "cannot create directory", exc)
        if not placed:
            return
        # The intent log names every final path before a file appears there: whatever of
        # it the index lacks after a crash was never acknowledged, and is removed.
        intent = "".join(f"{p.final}\n" for p in placed).encode()
        try:
            _write_all(self._intent_fd, intent)
            self._intent_size += len(intent)
            if self.durable:
                os.fsync(self._intent_fd)
        except OSError as exc:
            for p in placed:
                self._io_failed(p, "cannot write the intent log", exc)
            return
        # Files into place: small ones written there, streamed ones linked from .incoming;
        # never over an existing file.
        linked: list[_Pending] = []
        for p in placed:
            try:
                if p.data is not None:
                    self._create(p, claimed)
                else:
                    self._link(p, claimed)
                linked.append(p)
            except OSError as exc:
                self._io_failed(p, "cannot write the file into place", exc)
        if not linked:
            return
        if self.durable:
            # One round of parallel syncs: every file's data and every changed directory.
            linked = self._sync_round(linked, sorted(dirs_to_sync))
            if not linked:
                return
        # One index transaction for the whole batch.
        conn, writer = self._conn, self._writer
        records = [
            ix.InstanceRecord(
                info=p.info,  # type: ignore[arg-type]  # set by now
                path=str(p.final),
                size=p.size,
                sha256=p.sha256,
                transfer_syntax_uid=p.transfer_syntax_uid,
                calling_ae=p.calling_ae,
                called_ae=p.called_ae,
                received_at=p.received_at,
            )
            for p in linked
        ]
        try:
            replaced = [p.replaces.id for p in linked if p.replaces is not None]
            if replaced:
                with conn.begin():
                    for instance_id in replaced:
                        ix.remove_instance(conn, instance_id)
                    writer.forget()  # parents may be gone
                    writer.add(records)
            else:
                # The common case on the DBAPI connection alone: no SQLAlchemy transaction.
                try:
                    writer.add(records)
                    writer.commit()
                except BaseException:
                    writer.rollback()
                    raise
        except Exception as exc:
            writer.forget()
            log.error("index_write_failed", error=repr(exc), instances=len(linked))
            for p in linked:
                self._discard(p)
                self._answer(p, Outcome(STATUS_OUT_OF_RESOURCES, "index write failed"))
            return
        self.stats["batches"] += 1
        self.stats["committed"] += len(linked)
        for p in linked:
            duplicate = None
            if p.replaces is not None:
                duplicate = "replaced"
                if p.replaces.path != str(p.final):
                    with contextlib.suppress(OSError):
                        os.unlink(self.root / p.replaces.path)
            self._answer(p, Outcome(STATUS_SUCCESS, path=str(p.final), duplicate=duplicate))
        self._maybe_truncate_intent_log()

    def _io_failed(self, p: _Pending, what: str, exc: OSError) -> None:
        log.error(
            "archive_write_failed",
            what=what,
            error=exc.strerror or str(exc),
            errno=exc.errno,
            sop_instance_uid=p.sop_instance_uid,
        )
        self._discard(p)
        self._answer(p, Outcome(STATUS_OUT_OF_RESOURCES, f"{what}: {exc.strerror or exc}"[:64]))

    def _sync_round(self, files: list[_Pending], dirs: list[str]) -> list[_Pending]:
        assert self._sync_pool is not None
        jobs: list[Any] = [(_try_fsync, p.fd) for p in files]
        jobs += [(_try_fsync_dir, d) for d in dirs]
        results = list(self._sync_pool.map(lambda job: job[0](job[1]), jobs))
        dir_errors = [e for e in results[len(files) :] if e is not None]
        ok: list[_Pending] = []
        for p, error in zip(files, results, strict=False):
            if error is not None or dir_errors:
                self._io_failed(p, "cannot sync the file", error or dir_errors[0])
            else:
                ok.append(p)
        return ok

    def _choose_path(self, p: _Pending, claimed: set[str]) -> str:
        assert p.info is not None
        base = render(self.layout, p.info.get)
        candidate, n = str(base), 0
        while candidate in claimed or os.path.lexists(os.path.join(self.root, candidate)):
            n += 1
            candidate = str(with_suffix_number(base, n))
        return candidate

    def _make_dirs(self, directory: str) -> set[str]:
        """Create ``directory`` and missing parents; the parents whose entries changed."""
        if directory in self._known_dirs and os.path.isdir(directory):
            return set()
        if len(self._known_dirs) > 10_000:
            self._known_dirs.clear()
        missing: list[str] = []
        d = directory
        while not os.path.isdir(d):
            missing.append(d)
            d = os.path.dirname(d)
        os.makedirs(directory, exist_ok=True)
        self._known_dirs.add(directory)
        return {os.path.dirname(m) for m in missing}

    def _link(self, p: _Pending, claimed: set[str]) -> None:
        assert p.final is not None
        while True:
            try:
                os.link(p.tmp_path, os.path.join(self.root, p.final))
                break
            except FileExistsError:
                self._next_free_name(p, claimed)
        p.linked = True
        with contextlib.suppress(OSError):
            os.unlink(p.tmp_path)

    def _maybe_truncate_intent_log(self) -> None:
        # Everything in the log is committed now (one committer): it can start afresh.
        if self._intent_size > INTENT_LOG_TRUNCATE_AT:
            try:
                os.ftruncate(self._intent_fd, 0)
                self._intent_size = 0
            except OSError:
                pass

    # -- recovery -----------------------------------------------------------------------------

    def _replay_intent_log(self) -> tuple[int, int]:
        """Remove what a crash left between placing files and committing them to the index.

        Every path is in the intent log (durably, in ``full`` mode) before a file appears
        there, and a request is acknowledged only after the index commit: a listed file
        the index lacks was never acknowledged, and may be incomplete. It is removed, so
        no file of the archive is unknown to the index. Returns (0, files removed); the
        first number (files recovered into the index) is kept for the log's sake.
        """
        os.lseek(self._intent_fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(self._intent_fd, 1 << 20):
            chunks.append(chunk)
        lines = b"".join(chunks).decode("utf-8", "replace").splitlines()
        dropped = 0
        paths = list(dict.fromkeys(line.strip() for line in lines if line.strip()))
        dirs: set[str] = set()
        with self.engine.connect() as conn:
            for rel in paths:
                full = self.root / rel
                if ".." in PurePosixPath(rel).parts or not full.is_file():
                    continue
                if ix.find_by_path(conn, rel) is not None:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(full)
                    dropped += 1
                    dirs.add(str(full.parent))
        if self.durable:
            for d in dirs:
                with contextlib.suppress(OSError):
                    _fsync_dir(Path(d))
        os.ftruncate(self._intent_fd, 0)
        if self.durable:
            os.fsync(self._intent_fd)
        return 0, dropped


def _try_fsync(fd: int) -> OSError | None:
    try:
        os.fdatasync(fd)
    except OSError as exc:
        return exc
    return None


def _try_fsync_dir(path: str) -> OSError | None:
    try:
        _fsync_dir(Path(path))
    except OSError as exc:
        return exc
    return None


class Ingest:
    """One incoming instance: chunks in, a committed file (or a failure status) out.

    Call ``write()`` with chunks as they come (it waits only for the previous write of this
    instance, so reading the network and writing the disk overlap), then ``finish()``; on
    any error or abort, ``discard()``. A data set that arrives whole in ``finish()`` and
    fits in ``INLINE_MAX`` goes straight to the committer.
    """

    def __init__(
        self,
        archive: Archive,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax_uid: str,
        calling_ae: str | None,
        called_ae: str | None,
        policy: DuplicatePolicy,
        min_free_space: int,
    ) -> None:
        self.archive = archive
        self.sop_class_uid = sop_class_uid
        self.sop_instance_uid = sop_instance_uid
        self.transfer_syntax_uid = transfer_syntax_uid
        self.calling_ae = calling_ae
        self.called_ae = called_ae
        self.policy = policy
        self.min_free_space = min_free_space
        self.received_at = datetime.now(UTC)
        self.tmp_path = archive.incoming / f"{uuid.uuid4().hex}.part"
        self.fd = -1
        self.size = 0
        self.meta_length = 0
        self._hash = hashlib.sha256()
        self._writing: asyncio.Future[Any] | None = None
        self._submitted = False
        self._loop = asyncio.get_running_loop()

    # thread side
    def _open(self) -> None:
        free = free_bytes(self.archive.root)
        if free < self.min_free_space:
            raise StoreFailed(
                STATUS_OUT_OF_RESOURCES, f"archive below its free-space watermark ({free} bytes)"
            )
        self.fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        meta = encode_file_meta(
            self.sop_class_uid, self.sop_instance_uid, self.transfer_syntax_uid, self.calling_ae
        )
        _write_all(self.fd, meta)
        self.size = self.meta_length = len(meta)

    def _write(self, chunk: bytes | bytearray | memoryview) -> None:
        if self.fd < 0:
            self._open()
        if chunk:
            _write_all(self.fd, chunk)
            self._hash.update(chunk)
            self.size += len(chunk)

    def _finish(self, chunk: bytes | bytearray | memoryview) -> _Pending:
        whole = self.fd < 0  # the data set is all in this chunk
        try:
            self._write(chunk)
        except OSError as exc:
            raise StoreFailed(
                STATUS_OUT_OF_RESOURCES, f"cannot write: {exc.strerror or exc}"
            ) from exc
        try:
            if whole:
                info = instance_from_bytes(chunk, self.transfer_syntax_uid)
            else:
                info = instance_from_file(self.tmp_path, self.meta_length, self.transfer_syntax_uid)
        except UndecodableDataset as exc:
            raise StoreFailed(STATUS_CANNOT_UNDERSTAND, str(exc)) from exc
        _check_identity(info, self.sop_class_uid, self.sop_instance_uid)
        pending = self._pending(info=info)
        self.fd = -1  # the committer owns it now
        return pending

    def _pending(self, **kwargs: Any) -> _Pending:
        return _Pending(
            tmp_path=self.tmp_path,
            fd=self.fd,
            size=self.size,
            sha256=self._hash.hexdigest(),
            sop_class_uid=self.sop_class_uid,
            sop_instance_uid=self.sop_instance_uid,
            transfer_syntax_uid=self.transfer_syntax_uid,
            calling_ae=self.calling_ae,
            called_ae=self.called_ae,
            received_at=self.received_at,
            policy=self.policy,
            future=self._loop.create_future(),
            loop=self._loop,
            **kwargs,
        )

    def _cleanup(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(FileNotFoundError, OSError):
            os.unlink(self.tmp_path)

    # loop side
    async def write(self, chunk: bytes | bytearray | memoryview) -> None:
        if self._writing is not None:
            await self._writing
        self._writing = self._loop.run_in_executor(self.archive.io_pool, self._write, chunk)

    async def finish(self, chunk: bytes | bytearray | memoryview) -> Outcome:
        """Write the last chunk, check, commit; the outcome to answer with."""
        if self._writing is None and self.fd < 0 and len(chunk) <= INLINE_MAX:
            # Small and whole: the committer writes, hashes and scans it in its batch.
            pending = self._pending(info=None, data=chunk, min_free_space=self.min_free_space)
        else:
            try:
                if self._writing is not None:
                    await self._writing
                    self._writing = None
                pending = await self._loop.run_in_executor(
                    self.archive.io_pool, self._finish, chunk
                )
            except OSError as exc:
                raise StoreFailed(
                    STATUS_OUT_OF_RESOURCES, f"cannot write: {exc.strerror or exc}"
                ) from exc
        self._submitted = True
        return await self.archive.submit(pending)

    async def discard(self) -> None:
        if self._submitted:
            return  # the committer owns the file now and answers for it
        if self._writing is not None:
            with contextlib.suppress(Exception):
                await self._writing
            self._writing = None
        if self.fd >= 0 or self.size:
            await self._loop.run_in_executor(self.archive.io_pool, self._cleanup)
