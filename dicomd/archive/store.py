"""The archive: streamed, durable, indexed storage of instances as received.

One C-STORE's walk (DESIGN.md "acknowledge only what is durable"):

1. ``Ingest`` (one per request, driven from the event loop) hashes (SHA-256) each fragment
   as it arrives (under ``none``, a data set of 64 KiB or more held in memory is hashed
   instead right after its answer is written, see ``Ingest.__init__``). A data set that
   arrives whole and fits in ``INLINE_MAX`` stays in memory; it is scanned
   (``extract.scan``: structure, identity against the command, the index values) on the
   event loop as soon as it is complete. A larger one is written by an I/O thread into
   ``ROOT/.incoming/<random>.part`` behind a file meta written by dicomd as its fragments
   arrive, and scanned there.
2. Placing a file: its final path is chosen (never an existing file: ``O_EXCL`` / ``link``,
   the next free name on a collision) and named in the archive journal (an *intent*
   record) before the file appears there; the data set is written behind the file meta
   (in memory ones) or linked from ``.incoming`` (streamed ones).
3. ``durability: full`` — the committer (one thread per archive) takes every instance
   waiting and commits them together (group commit): it places their files, appends one
   *data* record per instance to the journal (the whole Part-10 file, its path and digest;
   streamed files get a record without the data, and their file and directories are
   fsync'd instead), and then, at the same time, fdatasyncs the journal (one sync for the
   group) and writes the group's index rows in one transaction. Only when both are done
   are the requests answered: 0000 means the instance is in a journal record on disk (so
   it survives ``kill -9`` and power loss), its file is in place and its index row is
   committed (queryable at once). The files themselves and the index (SQLite
   synchronous=NORMAL) reach the disk at a journal *checkpoint*: when a journal segment
   is full (``SEGMENT_MAX``) or the archive is idle, a checkpoint thread fsyncs the files
   and directories that segment wrote, then the index, then deletes the segment.
4. ``durability: none`` (benchmarks) — the event loop places the file itself and, under the
   ``keep`` duplicate policy, answers 0000 as soon as it is written (not synced): the
   index row follows from an in-memory queue, within ``SUBMIT_DELAY``. Other duplicate
   policies wait for the committer's verdict. Nothing is fsync'd. A crash may lose
   acknowledged instances (power loss: also their files); a killed process loses no file
   that was written, and start-up indexes what the index lacks (see 5).
5. Start-up (``open``) replays the journal before anything is served: a data record's file
   is checked (size and digest) and rewritten from the record if missing or partial, and
   indexed if the index lacks it (with the record's duplicate policy); a file named only by
   an intent record (crash between placing and committing) is indexed if it is complete
   and valid and was written whole (``none``), otherwise removed unless indexed.
   ``.incoming`` is emptied. No file of the archive is unknown to the index, and every
   acknowledged instance is in it. Then everything is synced and the journal deleted.

With ``shared_index`` (several worker processes, one index), each worker has its own
journal (``journal-<worker>-<seq>``), the index caches live one transaction only, and each
group's duplicate check and inserts run in one write transaction (``BEGIN IMMEDIATE`` on
SQLite): the database's unique constraints decide between processes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hashlib
import json
import os
import queue
import string
import struct
import threading
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import sqlalchemy as sa

from dicomd.archive import index as ix
from dicomd.archive.extract import (
    InstanceInfo,
    UndecodableDataset,
    complete,
    instance_from_file,
    instance_from_parts,
)
from dicomd.archive.layout import render, with_suffix_number
from dicomd.archive.part10 import FileMeta, encode_file_meta, read_file_meta
from dicomd.logging import get_logger

log = get_logger("dicomd.archive")

INCOMING_DIR = ".incoming"
STATE_DIR = ".dicomd"
INTENT_LOG = "intent.log"  # the journal's predecessor, replayed when found
JOURNAL_PREFIX = "journal-"
# A journal segment is checkpointed (and a new one started) past this size, or when the
# archive has been idle for IDLE_CHECKPOINT seconds.
SEGMENT_MAX = 64 << 20
# Durable journals are zero-filled this far ahead of their records, this much at a time.
ZERO_STEP = 4 << 20
ZERO_AHEAD = 2 << 20
# Data sets up to this size are copied into the journal (one sync for a whole group);
# larger ones are synced in place with their directory (writing them twice, and zero-filling
# the journal ahead of them, costs more than their own sync), and so is every instance
# while less than JOURNAL_DATA_MIN_FREE is free (a copy would fill the disk twice as fast).
JOURNAL_DATA_MAX = 128 << 10
JOURNAL_DATA_MIN_FREE = 256 << 20
IDLE_CHECKPOINT = 2.0
MAX_BATCH = 256
INDEX_CACHE_KIB = 64 * 1024
# Instances answered before they are indexed (``none``) reach the committer in groups, this
# late. A group shares the committer's fixed cost (a wake-up, a transaction, the duplicate
# lookup, and the hand-offs of the interpreter lock that its SQLite calls cause with the busy
# event loop) among ~100 small instances instead of ~10. 50 ms against the former 5 ms, three
# side-by-side runs (bench_store.py --versus, RESULTS.md, sixth session): less CPU per
# instance in all 12 comparisons (3-39 %), rates with four associations +2-10 %, with one
# small +0-11 % and CT within the noise. The index lags the answers by as much, and their
# data waits in memory meanwhile (+30 MiB RSS under a CT stream; BACKLOG_MAX bounds it).
SUBMIT_DELAY = 0.05
# ... and at most this many bytes of them wait for the committer (then senders wait too).
BACKLOG_MAX = 32 << 20
IO_WORKERS = 4
SYNC_WORKERS = 8
# In-memory data sets under ``none`` at least this large are hashed after their answer.
HASH_AFTER_ANSWER_MIN = 64 << 10
# Data sets up to this size are kept in memory (and journaled whole); larger ones stream to
# a temporary file.
INLINE_MAX = 1 << 20

DuplicatePolicy = Literal["reject", "keep", "replace", "replace-if-different"]
Durability = Literal["full", "none"]

# C-STORE statuses (PS3.4 B.2.3, PS3.7 C).
STATUS_SUCCESS = 0x0000
STATUS_DUPLICATE_SOP_INSTANCE = 0x0111
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000

# Journal records: magic, kind, payload length, CRC-32 of the JSON part; the payload is a
# 4-byte JSON length, the JSON, and (data records) the Part-10 file.
_RECORD = struct.Struct("<2sBxII")
_U32 = struct.Struct("<I")
_MAGIC = b"DJ"
INTENT, DATA, FILE, CANCEL = ord("I"), ord("D"), ord("F"), ord("X")


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
class _Item:
    """One instance on its way into the archive: in memory (``data``) or in a temporary
    file (``tmp_path``, ``fd``), scanned (``info``) and hashed."""

    info: InstanceInfo
    sop_class_uid: str  # from the command
    sop_instance_uid: str  # from the command (checked against the data set)
    transfer_syntax_uid: str
    calling_ae: str | None
    called_ae: str | None
    received_at: datetime
    policy: DuplicatePolicy
    meta: bytes
    size: int  # of the file: meta + data set
    sha256: str  # of the data set
    data: list[bytes | memoryview] | None = None
    tmp_path: Path | None = None
    fd: int = -1
    future: asyncio.Future[Outcome] | None = None
    loop: asyncio.AbstractEventLoop | None = None
    final: str | None = None  # relative to the archive root
    placed: bool = False  # a file of ours is at ``final``
    segment: int = -1  # the journal segment holding its intent record
    journaled: bool = False  # a data/file record names it
    new_dirs: set[str] = field(default_factory=set)
    replaces: ix.ExistingInstance | None = None
    outcome: Outcome | None = None
    answered: bool = False  # the sender has its answer already
    early: bool = False  # answered before the committer saw it (``none``, ``keep``)


def _fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_path(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _writev_all(fd: int, parts: list[bytes | memoryview]) -> None:
    """``writev`` every part (in IOV_MAX slices), finishing short writes."""
    for start in range(0, len(parts), 512):
        chunk = parts[start : start + 512]
        want = sum(len(p) for p in chunk)
        written = os.writev(fd, chunk)
        if written < want:
            _write_all(fd, memoryview(b"".join(chunk))[written:])


def _pwrite_all(fd: int, parts: list[bytes | memoryview], offset: int) -> int:
    """``pwritev`` every part at ``offset`` (in IOV_MAX slices); the bytes written."""
    total = 0
    for start in range(0, len(parts), 512):
        chunk = parts[start : start + 512]
        want = sum(len(p) for p in chunk)
        written = os.pwritev(fd, chunk, offset + total)
        if written < want:
            rest = memoryview(b"".join(chunk))[written:]
            while rest:
                n = os.pwrite(fd, rest, offset + total + written)
                written += n
                rest = rest[n:]
        total += want
    return total


@functools.cache
def _zeros() -> bytes:
    return bytes(ZERO_STEP)


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


def _intact(path: Path, size: int, sha256: str) -> bool:
    try:
        if os.path.getsize(path) != size:
            return False
        digest, _, _ = dataset_digest(path)
    except (OSError, ValueError):
        return False
    return digest == sha256


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


# --- the journal -----------------------------------------------------------------------------


def encode_record(
    kind: int, header: dict[str, Any], blob: Sequence[bytes | memoryview] = ()
) -> list[bytes | memoryview]:
    """One journal record as a list of buffers (for ``writev``)."""
    text = json.dumps(header, separators=(",", ":")).encode()
    length = _U32.size + len(text) + sum(len(b) for b in blob)
    return [_RECORD.pack(_MAGIC, kind, length, zlib.crc32(text)), _U32.pack(len(text)), text, *blob]


def read_records(data: bytes | memoryview) -> list[tuple[int, dict[str, Any], memoryview]]:
    """The records of one journal segment, up to the first torn or damaged one."""
    view = memoryview(data)
    out: list[tuple[int, dict[str, Any], memoryview]] = []
    pos = 0
    while pos + _RECORD.size <= len(view):
        magic, kind, length, crc = _RECORD.unpack_from(view, pos)
        start = pos + _RECORD.size
        if magic != _MAGIC or start + length > len(view) or length < _U32.size:
            break
        (text_length,) = _U32.unpack_from(view, start)
        if _U32.size + text_length > length:
            break
        text = view[start + _U32.size : start + _U32.size + text_length]
        if zlib.crc32(text) != crc:
            break
        try:
            header = json.loads(bytes(text))
        except ValueError:
            break
        blob = view[start + _U32.size + text_length : start + length]
        if kind == DATA and hashlib.sha256(blob[int(header["m"]) :]).hexdigest() != header["h"]:
            break  # written in part: the instance was never acknowledged
        out.append((kind, header, blob))
        pos = start + length
    return out


@dataclass
class _Segment:
    seq: int
    path: Path
    pending: int = 0  # instances with an intent record here, not yet committed or dropped
    files: list[str] = field(default_factory=list)  # data records' files (synced later)
    dirs: set[str] = field(default_factory=set)
    closed: bool = False


class Journal:
    """The archive journal of one process: segments in ``ROOT/.dicomd``.

    Thread-safe appends (one lock), written with ``pwrite`` into space zero-filled ahead of
    them (``ZERO_STEP`` at a time, by the checkpoint thread) when durable: overwriting
    allocated blocks, an ``fdatasync`` has no file size or extent to record, only data
    (0.1 ms here instead of 0.2-4 ms for an append). Reading stops at the first record
    whose magic, length or checksum is wrong: the zeros after the last one, or a torn one.
    A segment is retired past ``SEGMENT_MAX`` (or when idle) and handed to ``on_retired``
    once every instance with an intent record in it is done.
    """

    def __init__(self, state_dir: Path, worker: int, durable: bool) -> None:
        self.state_dir = state_dir
        self.prefix = f"{JOURNAL_PREFIX}{worker}-"
        self.durable = durable
        self.lock = threading.Lock()
        self.segments: dict[int, _Segment] = {}
        self.current: _Segment | None = None
        self.fd = -1
        self.size = 0
        self.zeroed = 0  # bytes of the current segment zero-filled (and synced)
        self.on_retired: Any = None
        self.on_low_space: Any = None  # asks for ``extend()`` to be called (another thread)
        self._extending = False

    @staticmethod
    def existing(state_dir: Path, prefix: str = JOURNAL_PREFIX) -> list[Path]:
        """Journal segments on disk, oldest first per worker."""
        found = []
        for entry in os.scandir(state_dir):
            if entry.name.startswith(prefix) and entry.is_file():
                worker, _, seq = entry.name[len(JOURNAL_PREFIX) :].partition("-")
                with contextlib.suppress(ValueError):
                    found.append((int(worker), int(seq), Path(entry.path)))
        return [p for _, _, p in sorted(found)]

    def start(self) -> None:
        seqs = [int(p.name.rsplit("-", 1)[1]) for p in self.existing(self.state_dir, self.prefix)]
        with self.lock:
            self._new_segment(max(seqs, default=0) + 1)

    def _new_segment(self, seq: int) -> None:
        path = self.state_dir / f"{self.prefix}{seq:08d}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        zeroed = 0
        if self.durable:
            zeroed = self._zero_fill(fd, 0)
            if zeroed:
                os.fdatasync(fd)
            _fsync_dir(self.state_dir)  # the new segment's name survives power loss
        old_fd, old = self.fd, self.current
        self.fd, self.size, self.zeroed = fd, 0, zeroed
        self.current = self.segments[seq] = _Segment(seq, path)
        if old is not None:
            os.close(old_fd)
            old.closed = True
            self._maybe_retire(old)

    def _maybe_retire(self, seg: _Segment) -> None:
        if (
            seg.closed
            and seg.pending == 0
            and self.segments.pop(seg.seq, None) is not None
            and self.on_retired is not None
        ):
            self.on_retired(seg)

    def _write(self, parts: list[bytes | memoryview]) -> None:
        """Under the lock: write at the end of the records; ask for zeros ahead if low."""
        self.size += _pwrite_all(self.fd, parts, self.size)
        if (
            self.durable
            and not self._extending
            and self.zeroed - self.size < ZERO_AHEAD
            and self.on_low_space is not None
        ):
            self._extending = True
            self.on_low_space()

    def extend(self) -> None:
        """Zero-fill the next ``ZERO_STEP`` past the records (checkpoint thread)."""
        with self.lock:
            self._extending = False
            if self.current is None or self.zeroed - self.size >= ZERO_AHEAD:
                return
            fd, start = self.fd, max(self.zeroed, self.size)
            step = self._zero_fill(fd, start)
            if not step:
                return  # short of space: records extend the file themselves
            self.zeroed = start + step
            fd = os.dup(fd)  # a rotation may close the segment's own fd meanwhile
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _zero_fill(self, fd: int, start: int) -> int:
        """Write zeros at ``start``: ``ZERO_STEP`` (none on a file system short of space,
        never more than an eighth of what is free); the bytes written."""
        try:
            free = free_bytes(self.state_dir)
            if free < JOURNAL_DATA_MIN_FREE:
                return 0  # short of space: no data records, so little to gain
            step = min(ZERO_STEP, free // 8) & ~0xFFFF
            _pwrite_all(fd, [memoryview(_zeros())[:step]], start)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, max(start, self.size))
            return 0
        return step

    def intent(self, item: _Item, path: str) -> None:
        """Record that a file is about to appear at ``path`` (not synced)."""
        header: dict[str, Any] = {"p": path, "u": item.sop_instance_uid, "s": item.size}
        if item.sha256:
            header["h"] = item.sha256
        parts = encode_record(INTENT, header)
        with self.lock:
            assert self.current is not None
            self._write(parts)
            if item.segment < 0:
                item.segment = self.current.seq
                self.current.pending += 1

    def append(
        self, records: list[list[bytes | memoryview]], files: list[str], dirs: set[str]
    ) -> int:
        """Append data/file records; returns the fd to sync (valid until the next rotate)."""
        flat = [b for r in records for b in r]
        with self.lock:
            assert self.current is not None
            self._write(flat)
            self.current.files.extend(files)
            self.current.dirs |= dirs
            return self.fd

    def done(self, item: _Item) -> None:
        """The instance is committed (or dropped): its intent record is no longer needed."""
        if item.segment < 0:
            return
        with self.lock:
            seg = self.segments.get(item.segment)
            item.segment = -1
            if seg is not None:
                seg.pending -= 1
                self._maybe_retire(seg)

    def rotate(self, force: bool = False) -> None:
        with self.lock:
            if self.current is not None and (self.size >= SEGMENT_MAX or (force and self.size)):
                self._new_segment(self.current.seq + 1)

    def close(self) -> list[_Segment]:
        """Stop appending; the segments still to checkpoint (all of them)."""
        with self.lock:
            if self.current is not None:
                os.close(self.fd)
                self.fd = -1
                self.current.closed = True
                self.current = None
            left = list(self.segments.values())
            self.segments.clear()
            return left


# --- the archive -----------------------------------------------------------------------------


class Archive:
    """One archive root with its index; shared by every storage service in the process."""

    def __init__(
        self,
        root: Path,
        layout: str,
        index_url: str,
        durability: Durability = "full",
        *,
        worker: int = 0,
        shared_index: bool = False,
    ) -> None:
        self.root = Path(root)
        self.layout = layout
        self.index_url = index_url
        self.durable = durability == "full"
        self.worker = worker
        self.shared_index = shared_index
        self.incoming = self.root / INCOMING_DIR
        self.state_dir = self.root / STATE_DIR
        # The journal is the durability proof: the index need not fsync each commit.
        self.engine = ix.create_index_engine(index_url, durable=self.durable)
        self.io_pool = concurrent.futures.ThreadPoolExecutor(IO_WORKERS, "dicomd-archive-io")
        self._sync_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._queue: queue.SimpleQueue[list[_Item] | None] = queue.SimpleQueue()
        self._later: list[_Item] = []
        # Bytes of instances answered before being indexed (``none``), and of those indexed
        # since: the difference is held in memory, waiting for the committer.
        self.answered_bytes = 0
        self.indexed_bytes = 0
        self._thread: threading.Thread | None = None
        self._checkpointer: threading.Thread | None = None
        self._retired: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.journal = Journal(self.state_dir, worker, self.durable)
        self.journal.on_retired = self._retired.put
        self.journal.on_low_space = lambda: self._retired.put(self.journal.extend)
        self._conn: sa.Connection | None = None
        self._writer: ix.IndexWriter | None = None
        self._answers: list[_Item] = []
        self._known_dirs: set[str] = set()
        self.stats = {"committed": 0, "batches": 0, "checkpoints": 0}
        # Under ``none`` the event loop decodes only what placing a file needs; the
        # committer decodes the other index values.
        self.keys = frozenset(
            {"SOPInstanceUID", "SOPClassUID"}
            | {name for _, name, _, _ in string.Formatter().parse(layout) if name}
        )

    # -- life cycle -----------------------------------------------------------------------

    def prepare(self, *, recover: Literal["mine", "all", "none"] = "all") -> dict[str, int]:
        """Create directories, migrate the index, recover after a crash (no threads: the
        supervisor of worker processes runs this once before it forks them). ``recover``:
        the journals of every worker (``all``), only this worker's (``mine``: a restarted
        worker beside running ones), or none."""
        for d in (self.root, self.incoming, self.state_dir):
            d.mkdir(parents=True, exist_ok=True)
        before, after = ix.migrate(self.engine)
        if before != after:
            log.info("index_migrated", from_version=before, to_version=after)
        return self.recover(everyone=recover == "all") if recover != "none" else {}

    def open(self, *, recover: Literal["mine", "all", "none"] = "all") -> dict[str, int]:
        """``prepare``, then start the committer and checkpoint threads.

        Blocking: called once at start-up, before any association is served.
        """
        result = self.prepare(recover=recover)
        self._conn = self.engine.connect()
        if self.engine.dialect.name == "sqlite":
            cur = self._conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            if self.durable:
                cur.execute("PRAGMA synchronous=NORMAL")
            # The writer's page cache: the unique indexes' B-tree pages an insert walks stay
            # in memory as the archive grows (SQLite's default is 2 MiB).
            cur.execute(f"PRAGMA cache_size=-{INDEX_CACHE_KIB}")
            cur.close()
        self._writer = ix.IndexWriter(self._conn, cache=not self.shared_index)
        self.journal.start()
        self._sync_pool = concurrent.futures.ThreadPoolExecutor(SYNC_WORKERS, "dicomd-fsync")
        self._thread = threading.Thread(target=self._run, name="dicomd-committer", daemon=True)
        self._thread.start()
        self._checkpointer = threading.Thread(
            target=self._run_checkpoints, name="dicomd-checkpoint", daemon=True
        )
        self._checkpointer.start()
        log.info(
            "archive_open",
            root=str(self.root),
            index=self._safe_url(),
            durable=self.durable,
            worker=self.worker,
        )
        return result

    def _safe_url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def close(self) -> None:
        """Commit what is queued, checkpoint and delete the journal, stop the threads."""
        self._submit_later()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(30)
            self._thread = None
        left = self.journal.close()
        if self._checkpointer is not None:
            self._retired.put(None)
            self._checkpointer.join(60)
            self._checkpointer = None
        for seg in sorted(left, key=lambda s: s.seq):
            if seg.pending == 0:
                self._checkpoint(seg)
        self.io_pool.shutdown(wait=True)
        if self._sync_pool is not None:
            self._sync_pool.shutdown(wait=True)
            self._sync_pool = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
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
        loop: asyncio.AbstractEventLoop | None = None,
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
            loop,
        )

    def submit(self, item: _Item) -> None:
        if self._thread is None:
            raise RuntimeError("archive is not open")
        self._queue.put([item])

    def submit_later(self, item: _Item, loop: asyncio.AbstractEventLoop) -> None:
        """Hand an instance nobody waits for to the committer within ``SUBMIT_DELAY``,
        together with the others of that moment: one wake-up of the committer (and one
        round of contention for the interpreter lock) per group, not per instance."""
        if self._thread is None:
            raise RuntimeError("archive is not open")
        self._later.append(item)
        if len(self._later) == 1:
            loop.call_later(SUBMIT_DELAY, self._submit_later)

    def _submit_later(self) -> None:
        items, self._later = self._later, []
        if items:
            self._queue.put(items)

    # -- placing files (any thread) ---------------------------------------------------------

    def place(self, item: _Item) -> None:
        """Put the instance's file at a free final path, named in the journal first.
        Raises OSError (nothing of the instance is left then)."""
        base = render(self.layout, item.info.get)
        candidate, n = base, 0
        full = os.path.join(self.root, candidate)
        parent = os.path.dirname(full)
        item.new_dirs = self._make_dirs(parent)
        while True:
            if os.path.lexists(full):
                n += 1
                candidate = with_suffix_number(base, n)
                full = os.path.join(self.root, candidate)
                continue
            self.journal.intent(item, candidate)
            try:
                if item.data is not None:
                    self._create(item, full)
                else:
                    assert item.tmp_path is not None
                    os.link(item.tmp_path, full)
            except FileExistsError:
                continue  # someone took it since lexists: the next name
            break
        item.final = candidate
        item.placed = True

    def _create(self, item: _Item, full: str) -> None:
        assert item.data is not None
        fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        try:
            _writev_all(fd, [item.meta, *item.data])
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(full)
            raise
        os.close(fd)

    def _make_dirs(self, directory: str) -> set[str]:
        """Create ``directory`` and missing parents; the parents whose entries changed."""
        if directory in self._known_dirs:
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

    def _remove_file(self, item: _Item) -> None:
        if item.placed and item.final is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.root / item.final)
            item.placed = False
        if item.tmp_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(item.tmp_path)

    # -- committer ----------------------------------------------------------------------------

    def _run(self) -> None:
        deferred: list[_Item] = []
        while True:
            if deferred:
                batch, deferred = deferred, []
            else:
                try:
                    item = self._queue.get(timeout=IDLE_CHECKPOINT)
                except queue.Empty:
                    # Idle: checkpoint what the journal holds, so it does not linger.
                    try:
                        self.journal.rotate(force=True)
                    except OSError as exc:
                        log.error("journal_rotate_failed", error=str(exc))
                    continue
                if item is None:
                    return
                batch = list(item)
            stop = False
            while len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.extend(item)
            # Two stores of one SOP instance in one batch: the later waits for the next.
            seen: set[str] = set()
            current: list[_Item] = []
            for p in batch:
                if p.sop_instance_uid in seen:
                    deferred.append(p)
                else:
                    seen.add(p.sop_instance_uid)
                    current.append(p)
            try:
                if self.durable:
                    self._commit_durable(current)
                else:
                    self._commit_index_only(current)
            except Exception as exc:  # never leave a request unanswered
                log.error("archive_commit_failed", error=repr(exc), exc_info=True)
                self._fail_all(current, f"archive error: {exc}")
            for p in current:
                self.journal.done(p)
                if p.early:
                    self.indexed_bytes += p.size  # written by the committer only
            self._flush_answers()
            try:
                self.journal.rotate()
            except OSError as exc:
                log.error("journal_rotate_failed", error=str(exc))
            if stop:
                for p in deferred:
                    self._fail_all([p], "archive is closing")
                    self.journal.done(p)
                self._flush_answers()
                return

    def _commit_index_only(self, batch: list[_Item]) -> None:
        """``durability: none``: the files are in place (and hashed) already; index them."""
        for p in batch:
            if p.data is not None:
                hash_after_answer(p)  # done on the event loop already; never index without
                try:
                    complete(p.info, p.data, p.transfer_syntax_uid)
                except UndecodableDataset as exc:  # answered already: index what we have
                    log.warning("index_values_undecodable", error=str(exc), path=p.final)
            p.data = None
        self._index(batch, recovering=False)
        self._log_late(batch)

    def _commit_durable(self, batch: list[_Item]) -> None:
        assert self._sync_pool is not None
        placed: list[_Item] = []
        for p in batch:
            try:
                self.place(p)
                placed.append(p)
            except OSError as exc:
                self._io_failed(p, "cannot write the file into place", exc)
        if not placed:
            return
        # One journal write for the group: data records (the whole file) for instances in
        # memory, file records for streamed ones, whose file and directories sync instead.
        records = []
        files: list[str] = []
        dirs: set[str] = set()
        sync_dirs: set[str] = set()
        jobs: list[Any] = []
        # Short of space, a copy in the journal would fill the disk twice as fast: files
        # are synced in place then.
        try:
            roomy = free_bytes(self.root) > JOURNAL_DATA_MIN_FREE
        except OSError:
            roomy = False
        for p in placed:
            assert p.final is not None
            header = {
                "p": p.final,
                "u": p.sop_instance_uid,
                "c": p.sop_class_uid,
                "t": p.transfer_syntax_uid,
                "a": p.calling_ae,
                "d": p.called_ae,
                "r": p.received_at.isoformat(),
                "y": p.policy,
                "h": p.sha256,
                "s": p.size,
                "m": len(p.meta),
            }
            parent = os.path.dirname(os.path.join(self.root, p.final))
            if p.data is not None and roomy and p.size <= JOURNAL_DATA_MAX:
                records.append(encode_record(DATA, header, [p.meta, *p.data]))
                files.append(p.final)
                dirs.add(parent)
                dirs |= p.new_dirs
            else:
                records.append(encode_record(FILE, header))
                if p.fd >= 0:
                    jobs.append((_fsync_fd, p.fd))
                else:
                    jobs.append((_fsync_path, os.path.join(self.root, p.final)))
                sync_dirs |= {parent, *p.new_dirs}
        jobs += [(_fsync_dir, d) for d in sorted(sync_dirs)]
        try:
            fd = self.journal.append(records, files, dirs)
        except OSError as exc:
            for p in placed:
                self._io_failed(p, "cannot write the journal", exc)
            return
        for p in placed:
            p.journaled = True
        # Streamed files and their directories sync in the pool meanwhile; the index
        # transaction (not synced: the journal is the proof), then the journal's one sync,
        # run here (each hand-off to another thread costs more than it would save).
        syncs = [self._sync_pool.submit(_try, f, a) for f, a in jobs]
        self._index(placed, recovering=False, answer=False)
        errors = [_try(os.fdatasync, fd)]
        errors = [e for e in errors + [s.result() for s in syncs] if e is not None]
        if errors:
            self._unindex_failed(placed, errors[0])
            return
        for p in placed:
            if p.outcome is not None:
                self._answer(p, p.outcome)

    def _unindex_failed(self, items: list[_Item], error: OSError) -> None:
        """The journal (or a file) could not be synced: nothing of the group is kept."""
        log.error("archive_sync_failed", error=error.strerror or str(error), instances=len(items))
        assert self._conn is not None and self._writer is not None
        try:
            ids = [
                row.id
                for row in self._writer.find(p.sop_instance_uid for p in items).values()
                if row.path in {p.final for p in items}
            ]
            with self._conn.begin():
                for instance_id in ids:
                    ix.remove_instance(self._conn, instance_id)
        except Exception as exc:
            log.error("index_undo_failed", error=repr(exc))
        finally:
            self._writer.forget()
        cancel = [encode_record(CANCEL, {"p": p.final, "u": p.sop_instance_uid}) for p in items]
        with contextlib.suppress(OSError):
            self.journal.append(cancel, [], set())
        for p in items:
            p.outcome = None
            self._io_failed(p, "cannot sync", error)

    def _index(self, batch: list[_Item], *, recovering: bool, answer: bool = True) -> None:
        """One index transaction for the placed instances: duplicates decided by the index
        (the database's unique constraint across processes), rows added, replaced ones
        removed. Sets each item's outcome; answers it unless ``answer`` is False."""
        assert self._conn is not None and self._writer is not None
        conn, writer = self._conn, self._writer
        batch = [p for p in batch if p.placed]
        if not batch:
            return
        dbapi = conn.connection.dbapi_connection  # type: ignore[union-attr]
        try:
            if self.shared_index and conn.dialect.name == "sqlite" and not dbapi.in_transaction:
                dbapi.execute("BEGIN IMMEDIATE")
            existing = writer.find(p.sop_instance_uid for p in batch)
            store: list[_Item] = []
            already: list[_Item] = []
            for p in batch:
                old = existing.get(p.sop_instance_uid)
                if old is None:
                    store.append(p)
                    continue
                if old.path == p.final:  # recovery: indexed already
                    already.append(p)
                    continue
                policy = p.policy
                if policy == "replace-if-different":
                    if old.sha256 == p.sha256:
                        p.outcome = Outcome(STATUS_SUCCESS, path=old.path, duplicate="identical")
                        continue
                    policy = "replace"
                if policy == "keep":
                    p.outcome = Outcome(STATUS_SUCCESS, path=old.path, duplicate="kept")
                elif policy == "reject":
                    p.outcome = Outcome(
                        STATUS_DUPLICATE_SOP_INSTANCE,
                        "duplicate SOP instance: already stored",
                        path=old.path,
                        duplicate="rejected",
                    )
                else:
                    p.replaces = old
                    store.append(p)
            records = [
                ix.InstanceRecord(
                    info=p.info,
                    path=str(p.final),
                    size=p.size,
                    sha256=p.sha256,
                    transfer_syntax_uid=p.transfer_syntax_uid,
                    calling_ae=p.calling_ae,
                    called_ae=p.called_ae,
                    received_at=p.received_at,
                )
                for p in store
            ]
            replaced = [p.replaces.id for p in store if p.replaces is not None]
            if replaced:
                if not conn.in_transaction():
                    conn.begin()
                for instance_id in replaced:
                    ix.remove_instance(conn, instance_id)
                writer.forget()  # parents may be gone
            writer.add(records)
            if conn.in_transaction():
                conn.commit()
            else:
                writer.commit()
        except Exception as exc:
            with contextlib.suppress(Exception):
                if conn.in_transaction():
                    conn.rollback()
                else:
                    writer.rollback()
            writer.forget()
            if recovering:
                raise  # the journal stays for the next start
            log.error("index_write_failed", error=repr(exc), instances=len(batch))
            for p in batch:
                p.outcome = None
                self._discard(p)
                if not recovering:
                    self._answer(p, Outcome(STATUS_OUT_OF_RESOURCES, "index write failed"))
            if any(p.journaled for p in batch):
                cancel = [
                    encode_record(CANCEL, {"p": p.final, "u": p.sop_instance_uid}) for p in batch
                ]
                with contextlib.suppress(OSError):
                    self.journal.append(cancel, [], set())
            return
        self.stats["batches"] += 1
        self.stats["committed"] += len(store)
        for p in already:
            p.outcome = Outcome(STATUS_SUCCESS, path=p.final, duplicate="indexed")
        for p in batch:
            if p.outcome is not None and p.outcome.duplicate == "indexed":
                continue
            if p.outcome is not None:  # a duplicate that is not stored: its file goes
                self._discard(p)
                if answer and not recovering:
                    self._answer(p, p.outcome)
                continue
            duplicate = None
            if p.replaces is not None:
                duplicate = "replaced"
                if p.replaces.path != p.final:
                    with contextlib.suppress(OSError):
                        os.unlink(self.root / p.replaces.path)
            p.outcome = Outcome(STATUS_SUCCESS, path=p.final, duplicate=duplicate)
            if answer and not recovering:
                self._answer(p, p.outcome)

    def _log_late(self, batch: list[_Item]) -> None:
        """Duplicates of instances answered before the index saw them (``none``, keep)."""
        for p in batch:
            if p.answered and p.outcome is not None and p.outcome.duplicate is not None:
                log.info(
                    "store_duplicate",
                    policy=p.policy,
                    action=p.outcome.duplicate,
                    status=f"0x{p.outcome.status:04X}",
                    path=p.outcome.path,
                    sop_instance_uid=p.sop_instance_uid,
                )

    def _answer(self, p: _Item, outcome: Outcome) -> None:
        if p.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(p.fd)
            p.fd = -1
        if p.tmp_path is not None and p.placed:
            with contextlib.suppress(OSError):
                os.unlink(p.tmp_path)  # linked into place: the temporary name goes
        p.outcome = outcome
        if not p.answered:
            p.answered = True
            if p.future is not None:
                self._answers.append(p)

    def _flush_answers(self) -> None:
        """Hand the batch's outcomes to their event loops: one wake-up per loop."""
        answers, self._answers = self._answers, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Outcome], Outcome]]]
        by_loop = {}
        for p in answers:
            assert p.outcome is not None and p.future is not None and p.loop is not None
            by_loop.setdefault(p.loop, []).append((p.future, p.outcome))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(_deliver, items)

    def _discard(self, p: _Item) -> None:
        if p.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(p.fd)
            p.fd = -1
        self._remove_file(p)

    def _io_failed(self, p: _Item, what: str, exc: OSError) -> None:
        log.error(
            "archive_write_failed",
            what=what,
            error=exc.strerror or str(exc),
            errno=exc.errno,
            sop_instance_uid=p.sop_instance_uid,
        )
        self._discard(p)
        self._answer(p, Outcome(STATUS_OUT_OF_RESOURCES, f"{what}: {exc.strerror or exc}"[:64]))

    def _fail_all(self, batch: list[_Item], comment: str) -> None:
        for p in batch:
            if not p.answered:
                self._discard(p)
                self._answer(p, Outcome(STATUS_OUT_OF_RESOURCES, comment[:64]))

    # -- checkpoints --------------------------------------------------------------------------

    def _run_checkpoints(self) -> None:
        while True:
            seg = self._retired.get()
            if seg is None:
                return
            if callable(seg):
                try:
                    seg()
                except OSError as exc:
                    log.error("journal_extend_failed", error=str(exc))
                continue
            self._checkpoint(seg)

    def _checkpoint(self, seg: _Segment) -> None:
        """Make what the segment's records promise durable by other means, then drop it."""
        if self.durable:
            paths = [os.path.join(self.root, f) for f in dict.fromkeys(seg.files)]
            jobs = [(_fsync_path, p) for p in paths] + [(_fsync_dir, d) for d in seg.dirs]
            pool = self._sync_pool
            if pool is not None:
                results = list(pool.map(lambda job: _try(*job), jobs))
            else:
                results = [_try(*job) for job in jobs]
            # A file removed since (a duplicate, a replaced copy) needs no sync.
            errors = [e for e in results if e is not None and e.errno != 2]
            if errors:
                log.error("checkpoint_failed", segment=seg.path.name, error=str(errors[0]))
                return  # the segment stays: the next start-up replays it
            try:
                self._sync_index()
            except OSError as exc:
                log.error("checkpoint_failed", segment=seg.path.name, error=str(exc))
                return
        with contextlib.suppress(OSError):
            os.unlink(seg.path)
        self.stats["checkpoints"] += 1

    def _sync_index(self) -> None:
        """Make every committed index transaction durable (SQLite in WAL mode with
        synchronous=NORMAL: the committed frames are in the WAL file; sync it)."""
        url = self.engine.url
        if self.engine.dialect.name != "sqlite" or not url.database or url.database == ":memory:":
            return  # other databases commit durably themselves
        db = Path(url.database)
        for path in (db, Path(f"{db}-wal")):
            with contextlib.suppress(FileNotFoundError):
                _fsync_path(path)

    # -- recovery -----------------------------------------------------------------------------

    def recover(self, *, everyone: bool = True) -> dict[str, int]:
        """Replay the journal (see the module docstring); blocking, before serving."""
        removed = 0
        for entry in os.scandir(self.incoming):
            if everyone or entry.name.startswith(f"{self.worker}-"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += 1
        prefix = JOURNAL_PREFIX if everyone else f"{JOURNAL_PREFIX}{self.worker}-"
        segments = Journal.existing(self.state_dir, prefix)
        legacy = self.state_dir / INTENT_LOG
        result = {"partial_removed": removed, "recovered": 0, "rewritten": 0, "orphans_removed": 0}
        intents: dict[str, dict[str, Any]] = {}
        records: list[tuple[int, dict[str, Any], memoryview]] = []
        if legacy.exists():
            for line in legacy.read_text("utf-8", "replace").splitlines():
                if line.strip():
                    intents[line.strip()] = {"p": line.strip()}
        for seg in segments:
            for kind, header, blob in read_records(seg.read_bytes()):
                if kind == INTENT:
                    intents[header["p"]] = header
                elif kind in (DATA, FILE):
                    records.append((kind, header, blob))
                elif kind == CANCEL:
                    records = [r for r in records if r[1]["p"] != header["p"]]
        if not (segments or intents or legacy.exists()):
            return result
        conn = self.engine.connect()
        self._conn = conn
        self._writer = ix.IndexWriter(conn, cache=False)
        touched_dirs: set[str] = set()
        touched_files: list[str] = []
        try:
            for kind, header, blob in records:
                path = header["p"]
                intents.pop(path, None)
                if ".." in PurePosixPath(path).parts:
                    continue
                full = self.root / path
                size, sha = int(header["s"]), header["h"]
                if kind == FILE:
                    if not _intact(full, size, sha):
                        # A streamed file whose syncs did not all finish: never acknowledged.
                        if ix.find_by_path(conn, path) is None:
                            with contextlib.suppress(OSError):
                                os.unlink(full)
                                result["orphans_removed"] += 1
                        continue
                elif not _intact(full, size, sha):
                    owner = ix.find_by_path(conn, path)
                    if owner is not None and owner.sop_instance_uid != header["u"]:
                        continue  # cannot happen: paths are claimed with O_EXCL
                    full.parent.mkdir(parents=True, exist_ok=True)
                    tmp = self.incoming / f"{self.worker}-{uuid.uuid4().hex}.part"
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
                    try:
                        _write_all(fd, blob)
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    os.replace(tmp, full)
                    touched_dirs.add(str(full.parent))
                    result["rewritten"] += 1
                item = self._recovered_item(full, path, header)
                if item is None:
                    continue
                self._index([item], recovering=True)
                if item.outcome is not None and item.outcome.duplicate in (None, "replaced"):
                    result["recovered"] += 1
                touched_files.append(path)
                touched_dirs.add(str(full.parent))
            # Named by an intent only: placed, never committed (or committed, see the index).
            for path, header in intents.items():
                full = self.root / path
                if ".." in PurePosixPath(path).parts or not full.is_file():
                    continue
                if ix.find_by_path(conn, path) is not None:
                    continue
                item = None
                if not self.durable and full.stat().st_size == header.get("s"):
                    # durability none: a whole file the index never saw (answered already).
                    try:
                        digest, _, _ = dataset_digest(full)
                    except (OSError, ValueError):
                        digest = ""
                    if digest and header.get("h", digest) == digest:
                        item = self._recovered_item(
                            full, path, {**header, "h": digest, "y": "keep"}
                        )
                if item is not None:
                    self._index([item], recovering=True)
                    if item.outcome is not None and item.outcome.duplicate is None:
                        result["recovered"] += 1
                        continue
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(full)
                    result["orphans_removed"] += 1
                    touched_dirs.add(str(full.parent))
        finally:
            conn.close()
            self._conn = None
            self._writer = None
        if self.durable:
            for rel in touched_files:
                with contextlib.suppress(OSError):
                    _fsync_path(self.root / rel)
            for d in touched_dirs:
                with contextlib.suppress(OSError):
                    _fsync_dir(d)
            self._sync_index()
        for seg in segments:
            os.unlink(seg)
        if legacy.exists():
            os.unlink(legacy)
        if self.durable:
            _fsync_dir(self.state_dir)
        if any(result.values()) or segments:
            log.warning("archive_recovered", root=str(self.root), **result)
        return result

    def _recovered_item(self, full: Path, path: str, header: dict[str, Any]) -> _Item | None:
        try:
            with open(full, "rb") as fp:
                meta = read_file_meta(fp)
            info = instance_from_file(full, meta.dataset_offset, meta.transfer_syntax_uid)
            _check_identity(info, meta.sop_class_uid, meta.sop_instance_uid)
        except (OSError, ValueError, StoreFailed) as exc:
            log.warning("recovery_unreadable", path=path, error=str(exc))
            return None
        received = header.get("r")
        return _Item(
            info=info,
            sop_class_uid=meta.sop_class_uid,
            sop_instance_uid=meta.sop_instance_uid,
            transfer_syntax_uid=meta.transfer_syntax_uid,
            calling_ae=header.get("a") or meta.source_ae or None,
            called_ae=header.get("d"),
            received_at=datetime.fromisoformat(received) if received else datetime.now(UTC),
            policy=header.get("y", "keep"),
            meta=b"",
            size=int(header["s"]),
            sha256=header["h"],
            final=path,
            placed=True,
        )


def _fsync_fd(fd: int) -> None:
    os.fdatasync(fd)


def _try(func: Any, arg: Any) -> OSError | None:
    try:
        func(arg)
    except OSError as exc:
        return exc
    return None


def hash_after_answer(item: _Item) -> None:
    """The SHA-256 of an in-memory data set (see ``Ingest.__init__``). Normally run on the
    event loop before the committer sees the item; at shutdown the committer may get there
    first (``close`` hands it what is waiting), hence one read of ``data``."""
    data = item.data
    if data is not None and not item.sha256:
        h = hashlib.sha256()
        for part in data:
            h.update(part)
        item.sha256 = h.hexdigest()


class Ingest:
    """One incoming instance: fragments in, a committed file (or a failure status) out.

    Call ``add()`` with each fragment as it comes (it is hashed at once), and
    ``await flush()`` when ``add`` says enough is gathered (the chunk goes to an I/O
    thread, so reading the network and writing the disk overlap); then ``finish()``; on
    any error or abort, ``discard()``.
    """

    WRITE_CHUNK = 1 << 20

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
        loop: asyncio.AbstractEventLoop | None = None,
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
        self.tmp_path: Path | None = None
        self.fd = -1
        self.size = 0
        self.meta = b""
        # SHA-256 on the event loop, while the data is still in this CPU's cache: hashed
        # later in the committer thread, on the other CPU, it cost up to 0.26 ms more CPU
        # per CT instance (526 KiB) in some runs (bench_store.py; in others no difference,
        # see bench/RESULTS.md). A durable data set (its journal
        # record needs the digest) and a streamed one are hashed fragment by fragment as
        # they arrive; one held in memory under ``none`` right after its answer is written
        # (``hash_after_answer``), in the time the loop would otherwise wait for the peer's
        # next request.
        self._hash = hashlib.sha256()
        self._hash_now = archive.durable
        self._parts: list[bytes | memoryview] = []
        self._gathered = 0
        self._writing: asyncio.Future[Any] | None = None
        self._submitted = False
        # Passed by the caller where it can: asyncio.get_running_loop() costs a getpid().
        self._loop = loop if loop is not None else asyncio.get_running_loop()

    # loop side
    def add(self, fragment: bytes | memoryview) -> bool:
        """Take one fragment; True when a chunk should be flushed to disk."""
        if self._hash_now:
            self._hash.update(fragment)
        self._parts.append(fragment)
        self._gathered += len(fragment)
        return self._gathered > INLINE_MAX or (
            self._writing is not None and self._gathered >= self.WRITE_CHUNK
        )

    async def flush(self) -> None:
        """Hand what is gathered to an I/O thread (waiting for the previous chunk only)."""
        if not self._hash_now:  # streaming after all: hash what came so far, then the rest
            self._hash_now = True
            for part in self._parts:
                self._hash.update(part)
        chunk = b"".join(self._parts)
        self._parts, self._gathered = [], 0
        if self._writing is not None:
            await self._writing
        self._writing = self._loop.run_in_executor(self.archive.io_pool, self._write, chunk)

    def _check_space(self) -> None:
        if self.min_free_space > 0:
            free = free_bytes(self.archive.root)
            if free < self.min_free_space:
                raise StoreFailed(
                    STATUS_OUT_OF_RESOURCES,
                    f"archive below its free-space watermark ({free} bytes)",
                )

    def _meta(self) -> bytes:
        return encode_file_meta(
            self.sop_class_uid, self.sop_instance_uid, self.transfer_syntax_uid, self.calling_ae
        )

    # thread side (streamed data sets)
    def _open(self) -> None:
        self._check_space()
        self.tmp_path = self.archive.incoming / f"{self.archive.worker}-{uuid.uuid4().hex}.part"
        self.fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        self.meta = self._meta()
        _write_all(self.fd, self.meta)
        self.size = len(self.meta)

    def _write(self, chunk: bytes) -> None:
        if self.fd < 0:
            self._open()
        if chunk:
            _write_all(self.fd, chunk)
            self.size += len(chunk)

    def _finish_streamed(self, chunk: bytes) -> _Item:
        try:
            self._write(chunk)
        except OSError as exc:
            raise StoreFailed(
                STATUS_OUT_OF_RESOURCES, f"cannot write: {exc.strerror or exc}"
            ) from exc
        assert self.tmp_path is not None
        try:
            info = instance_from_file(self.tmp_path, len(self.meta), self.transfer_syntax_uid)
        except UndecodableDataset as exc:
            raise StoreFailed(STATUS_CANNOT_UNDERSTAND, str(exc)) from exc
        _check_identity(info, self.sop_class_uid, self.sop_instance_uid)
        item = self._item(info, tmp_path=self.tmp_path, fd=self.fd)
        self.fd = -1  # the item owns it now
        if not self.archive.durable:
            try:
                self.archive.place(item)
            except OSError as exc:
                self.archive._discard(item)
                raise StoreFailed(
                    STATUS_OUT_OF_RESOURCES, f"cannot place the file: {exc.strerror or exc}"
                ) from exc
        return item

    def _item(self, info: InstanceInfo, **kwargs: Any) -> _Item:
        return _Item(
            info=info,
            sop_class_uid=self.sop_class_uid,
            sop_instance_uid=self.sop_instance_uid,
            transfer_syntax_uid=self.transfer_syntax_uid,
            calling_ae=self.calling_ae,
            called_ae=self.called_ae,
            received_at=self.received_at,
            policy=self.policy,
            meta=self.meta,
            size=self.size,
            sha256=self._hash.hexdigest(),
            **kwargs,
        )

    def _cleanup(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        if self.tmp_path is not None:
            with contextlib.suppress(FileNotFoundError, OSError):
                os.unlink(self.tmp_path)

    def _inline_item(self) -> _Item:
        """Scan and check a data set held in memory; place it at once under ``none``."""
        parts = self._parts
        if not self._gathered:
            raise StoreFailed(STATUS_CANNOT_UNDERSTAND, "the data set is empty")
        self._check_space()
        try:
            # Under ``none`` only the values the answer needs (path, identity) are decoded
            # here; the committer decodes the rest before indexing.
            info = instance_from_parts(
                parts, self.transfer_syntax_uid, None if self.archive.durable else self.archive.keys
            )
        except UndecodableDataset as exc:
            raise StoreFailed(STATUS_CANNOT_UNDERSTAND, str(exc)) from exc
        _check_identity(info, self.sop_class_uid, self.sop_instance_uid)
        self.meta = self._meta()
        self.size = len(self.meta) + self._gathered
        item = self._item(info, data=list(parts))
        if not self._hash_now:
            item.sha256 = ""  # not hashed yet (see __init__)
            if self._gathered < HASH_AFTER_ANSWER_MIN:
                hash_after_answer(item)  # a few µs: not worth deferring
        if not self.archive.durable:
            try:
                self.archive.place(item)
            except OSError as exc:
                self.archive._discard(item)
                log.error(
                    "archive_write_failed",
                    what="cannot write the file into place",
                    error=exc.strerror or str(exc),
                    errno=exc.errno,
                    sop_instance_uid=self.sop_instance_uid,
                )
                raise StoreFailed(
                    STATUS_OUT_OF_RESOURCES, f"cannot write: {exc.strerror or exc}"
                ) from exc
        return item

    async def finish(self) -> Outcome:
        """Check, place and commit what was added; the outcome to answer with."""
        if self._writing is None and self.fd < 0:
            item = self._inline_item()
        else:
            chunk = b"".join(self._parts)
            self._parts, self._gathered = [], 0
            try:
                if self._writing is not None:
                    await self._writing
                    self._writing = None
                item = await self._loop.run_in_executor(
                    self.archive.io_pool, self._finish_streamed, chunk
                )
            except OSError as exc:
                raise StoreFailed(
                    STATUS_OUT_OF_RESOURCES, f"cannot write: {exc.strerror or exc}"
                ) from exc
        self._submitted = True
        archive = self.archive
        backlog = archive.answered_bytes - archive.indexed_bytes
        if not archive.durable and self.policy == "keep" and backlog < BACKLOG_MAX:
            # durability none: answered once written; the index follows (unless the
            # committer is that far behind: then this sender waits for it, and so slows).
            item.answered = item.early = True
            archive.answered_bytes += item.size  # written by the event loop only
            if not item.sha256:
                # Runs after this task step, i.e. after the answer is written; before
                # submit_later hands the item to the committer (SUBMIT_DELAY later).
                self._loop.call_soon(hash_after_answer, item)
            archive.submit_later(item, self._loop)
            return Outcome(STATUS_SUCCESS, path=item.final)
        if not item.sha256:
            hash_after_answer(item)  # the committer decides first: hash it now, while warm
        item.future = self._loop.create_future()
        item.loop = self._loop
        self.archive.submit(item)
        return await item.future

    async def discard(self) -> None:
        if self._submitted:
            return  # the committer owns the file now and answers for it
        self._parts = []
        if self._writing is not None:
            with contextlib.suppress(Exception):
                await self._writing
            self._writing = None
        if self.fd >= 0 or self.tmp_path is not None:
            await self._loop.run_in_executor(self.archive.io_pool, self._cleanup)
