"""The *folder* worklist source: a DCMTK wlmscpfs worklist tree, unchanged.

Layout (as ``wlmscpfs -dfp ROOT``): ``ROOT/<called AE title>/*.wl``, one Part-10 file per
entry, and a file named ``lockfile`` in each AE directory. As wlmscpfs does, a query takes
a shared lock (flock) on ``lockfile`` while it reads entry files, so a writer holding an
exclusive lock is never read half-way; and when ``lockfile`` is missing the query fails
with 0xA700 (Refused: Out of Resources), which is what wlmscpfs answers when it cannot open
it. A missing AE directory is an empty worklist (wlmscpfs refuses the association instead;
dicomd's local AEs come from the configuration, not from the directory).

Unlike wlmscpfs, files are not re-read per query: an in-memory index (``EntryIndex``) is
kept current. Changes are found with inotify where it is available (one non-blocking read
per query), else by the directory's mtime (every query: one stat) plus a sweep of every
file's (mtime, size, inode) at most every ``SWEEP_INTERVAL`` seconds; only changed files are
parsed again. A file that cannot be read is skipped with a warning naming it; it never
breaks the other answers.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom

from dicomd.logging import get_logger
from dicomd.worklist import inotify
from dicomd.worklist.entry import Entry
from dicomd.worklist.index import EntryIndex
from dicomd.worklist.source import SourceUnavailable, WorklistSource

log = get_logger("dicomd.worklist")

LOCKFILE = "lockfile"
SUFFIX = ".wl"
SWEEP_INTERVAL = 2.0  # seconds between per-file stat sweeps without inotify
SAFETY_SWEEP_INTERVAL = 60.0  # with inotify (an event can be missed on network file systems)
LOCK_TIMEOUT = 5.0

Signature = tuple[int, int, int]  # (mtime_ns, size, inode)
Messages = list[tuple[str, str, dict[str, Any]]]


@dataclass
class _File:
    signature: Signature
    entry: Entry | None  # None: unreadable (not retried until the file changes)


def _signature(st: os.stat_result) -> Signature:
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def read_entry_file(path: Path, key: str) -> Entry:
    ds = pydicom.dcmread(path, force=True)
    groups = {elem.tag.group for elem in ds}
    if not groups or 0x0000 in groups or max(groups) < 0x0008:
        raise ValueError("not a DICOM data set")
    return Entry.load(key, ds)


class FolderArea:
    """The entries of one AE directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.files: dict[str, _File] = {}
        self.index = EntryIndex.build(())
        self.lock = asyncio.Lock()
        self.watcher: inotify.Watcher | None = None
        self.use_inotify = True
        self.loaded = False
        self.dir_signature: tuple[int, int] | None = None
        self.last_sweep = 0.0
        self.missing_logged = False

    async def current(self) -> EntryIndex:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if not self.missing_logged:
                log.warning("worklist_directory_missing", directory=str(self.path))
                self.missing_logged = True
            self._forget()
            return self.index
        self.missing_logged = False
        if not os.path.exists(self.path / LOCKFILE):
            raise SourceUnavailable(
                f"no {LOCKFILE} in {self.path} (create an empty file named {LOCKFILE}, "
                "as for DCMTK wlmscpfs)"
            )
        async with self.lock:
            names, full = self._pending(st)
            if not (full or names):
                return self.index
            index, messages = await asyncio.to_thread(self._refresh, None if full else names)
            if index is not None:
                self.index = index
        for level, event, fields in messages:
            getattr(log, level)(event, **fields)
        return self.index

    def _forget(self) -> None:
        if self.watcher is not None:
            self.watcher.close()
            self.watcher = None
        if self.files:
            self.files = {}
            self.index = EntryIndex.build(())
        self.loaded = False
        self.dir_signature = None

    def _pending(self, st: os.stat_result) -> tuple[set[str], bool]:
        """What to re-read: (names, everything)."""
        now = time.monotonic()
        dir_signature = (st.st_mtime_ns, st.st_ino)
        if not self.loaded or dir_signature[1] != (self.dir_signature or (0, -1))[1]:
            if self.watcher is not None:
                self.watcher.close()
                self.watcher = None
            if self.use_inotify:
                try:
                    self.watcher = inotify.Watcher(self.path)
                except OSError as exc:
                    self.use_inotify = False
                    log.info(
                        "worklist_inotify_unavailable", directory=str(self.path), error=str(exc)
                    )
            self.dir_signature = dir_signature
            return set(), True
        if self.watcher is not None:
            names, rescan = self.watcher.changes()
            if rescan or now - self.last_sweep > SAFETY_SWEEP_INTERVAL:
                return set(), True
            return {n for n in names if n.endswith(SUFFIX)}, False
        if dir_signature != self.dir_signature or now - self.last_sweep > SWEEP_INTERVAL:
            self.dir_signature = dir_signature
            return set(), True
        return set(), False

    # -- in a worker thread ---------------------------------------------------------------

    def _refresh(self, names: set[str] | None) -> tuple[EntryIndex | None, Messages]:
        messages: Messages = []
        try:
            lock_fd = os.open(self.path / LOCKFILE, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            messages.append(
                (
                    "warning",
                    "worklist_lockfile_unreadable",
                    {"directory": str(self.path), "error": str(exc)},
                )
            )
            return None, messages
        try:
            if not self._lock_shared(lock_fd):
                messages.append(
                    (
                        "warning",
                        "worklist_locked",
                        {
                            "directory": str(self.path),
                            "detail": f"{LOCKFILE} held exclusively for {LOCK_TIMEOUT} s; "
                            "answering from the entries already loaded",
                        },
                    )
                )
                return None, messages
            changed = self._scan(names, messages)
        finally:
            os.close(lock_fd)  # releases the lock
        if names is None:
            self.last_sweep = time.monotonic()
            self.loaded = True
        if not changed:
            return None, messages
        entries = [f.entry for f in self.files.values() if f.entry is not None]
        return EntryIndex.build(entries), messages

    @staticmethod
    def _lock_shared(fd: int) -> bool:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return True
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    return True  # no locking on this file system: read anyway
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.02)

    def _scan(self, names: set[str] | None, messages: Messages) -> bool:
        if names is None:
            try:
                listing = {n for n in os.listdir(self.path) if n.endswith(SUFFIX)}
            except OSError as exc:
                messages.append(
                    (
                        "warning",
                        "worklist_directory_unreadable",
                        {"directory": str(self.path), "error": str(exc)},
                    )
                )
                return False
            gone = set(self.files) - listing
            names = listing
        else:
            gone = set()
        changed = False
        for name in gone:
            del self.files[name]
            changed = True
        for name in sorted(names):
            path = self.path / name
            try:
                st = os.stat(path)
            except FileNotFoundError:
                if self.files.pop(name, None) is not None:
                    changed = True
                continue
            except OSError as exc:
                messages.append(
                    ("warning", "worklist_file_unreadable", {"file": str(path), "error": str(exc)})
                )
                continue
            signature = _signature(st)
            known = self.files.get(name)
            if known is not None and known.signature == signature:
                continue
            changed = True
            try:
                entry = read_entry_file(path, name)
            except Exception as exc:  # any parse failure: skip this file only
                messages.append(
                    (
                        "warning",
                        "worklist_file_skipped",
                        {"file": str(path), "error": f"cannot read: {exc}"},
                    )
                )
                self.files[name] = _File(signature, None)
                continue
            if entry.problems:
                messages.append(
                    (
                        "warning",
                        "worklist_entry_incomplete",
                        {"file": str(path), "problems": list(entry.problems)},
                    )
                )
            self.files[name] = _File(signature, entry)
        return changed


class FolderSource(WorklistSource):
    kind = "folder"

    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        self.root = root
        self.areas: dict[str, FolderArea] = {}

    def area(self, ae_title: str) -> FolderArea:
        area = self.areas.get(ae_title)
        if area is None:
            area = self.areas[ae_title] = FolderArea(self.root / ae_title)
        return area

    async def snapshot(self, ae_title: str) -> EntryIndex:
        return await self.area(ae_title).current()

    def close(self) -> None:
        for area in self.areas.values():
            area._forget()
