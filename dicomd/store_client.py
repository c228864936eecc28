"""``dicomd store``: send Part-10 files with C-STORE, data sets exactly as they are on disk.

Each file is sent in its own transfer syntax (the only one proposed for its SOP class), so
nothing is re-encoded: the bytes after the file meta go on the wire unchanged. ``jobs``
associations run in parallel, each proposing one presentation context per (SOP class,
transfer syntax) pair of the files (several associations in turn beyond 128 pairs).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import pydicom

from dicomd.archive.part10 import FileMeta, NotPart10Error, read_file_meta
from dicomd.association import AssociationError, RequestorAssociation, associate
from dicomd.net import dimse

MAX_CONTEXTS = 128

STATUS_NAMES = {
    0x0000: "Success",
    0x0111: "Duplicate SOP Instance",
    0x0122: "SOP Class Not Supported",
    0x0211: "Unrecognized Operation",
    0xA700: "Out of Resources",
    0xA900: "Data Set does not match SOP Class",
    0xC000: "Cannot understand",
}
# Pseudo statuses for what never got a C-STORE-RSP.
NOT_SENT = -1


def status_name(status: int) -> str:
    if status == NOT_SENT:
        return "not sent (association failed)"
    if status in STATUS_NAMES:
        return STATUS_NAMES[status]
    if 0xA700 <= status <= 0xA7FF:
        return "Out of Resources"
    if 0xA900 <= status <= 0xA9FF:
        return "Data Set does not match SOP Class"
    if 0xC000 <= status <= 0xCFFF:
        return "Cannot understand"
    if status in (0xB000, 0xB006, 0xB007):
        return "Warning"
    return "Failure"


def is_success(status: int) -> bool:
    return status == 0 or status in (0xB000, 0xB006, 0xB007)


@dataclass(frozen=True)
class Item:
    path: Path
    meta: FileMeta
    sop_class_uid: str  # from the data set (PS3.4: the command names the data set's)
    sop_instance_uid: str


@dataclass
class Report:
    statuses: Counter[int] = field(default_factory=Counter)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    failures: list[tuple[Path, int, str]] = field(default_factory=list)
    sent_bytes: int = 0
    done: int = 0

    @property
    def ok(self) -> bool:
        return not self.failures and all(is_success(s) for s in self.statuses)


def iter_files(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    yield Path(root) / name
        else:
            yield path


def scan(paths: Iterable[Path], report: Report) -> list[Item]:
    items: list[Item] = []
    for path in iter_files(paths):
        try:
            with open(path, "rb") as fp:
                meta = read_file_meta(fp)
                fp.seek(0)
                ds = pydicom.dcmread(
                    fp, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"]
                )
            sop_class = str(ds.get("SOPClassUID", "") or "")
            sop_instance = str(ds.get("SOPInstanceUID", "") or "")
        except (OSError, NotPart10Error) as exc:
            report.skipped.append((path, str(exc)))
            continue
        except Exception as exc:  # pydicom's errors are of many kinds
            report.skipped.append((path, f"unreadable data set: {exc}"))
            continue
        if not sop_class or not sop_instance:
            report.skipped.append((path, "the data set lacks SOP Class UID or SOP Instance UID"))
            continue
        items.append(Item(path, meta, sop_class, sop_instance))
    return items


def _read_dataset(item: Item) -> bytes:
    with open(item.path, "rb") as fp:
        fp.seek(item.meta.dataset_offset)
        return fp.read()


class Sender:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        calling_ae: str,
        called_ae: str,
        jobs: int = 1,
        max_pdu: int = 65536,
        timeout: float = 60.0,
        progress: TextIO | None = sys.stderr,
    ) -> None:
        self.host, self.port = host, port
        self.calling_ae, self.called_ae = calling_ae, called_ae
        self.jobs = max(1, jobs)
        self.max_pdu = max_pdu
        self.timeout = timeout
        self.progress = progress
        self.report = Report()
        self._total = 0
        self._last_progress = 0.0
        self._started = time.monotonic()

    async def send(self, items: list[Item]) -> Report:
        self._total = len(items)
        # Group the files by presentation context; at most 128 contexts per association.
        pairs = sorted({(i.sop_class_uid, i.meta.transfer_syntax_uid) for i in items})
        for start in range(0, len(pairs), MAX_CONTEXTS):
            chunk = pairs[start : start + MAX_CONTEXTS]
            wanted = set(chunk)
            todo = [
                i for i in items if (i.meta.sop_class_uid, i.meta.transfer_syntax_uid) in wanted
            ]
            queue: asyncio.Queue[Item] = asyncio.Queue()
            for item in todo:
                queue.put_nowait(item)
            workers = min(self.jobs, len(todo))
            await asyncio.gather(*(self._worker(chunk, queue) for _ in range(workers)))
            while not queue.empty():  # left over after every worker failed to associate
                self._record(queue.get_nowait(), NOT_SENT, "no association")
        self._show_progress(final=True)
        return self.report

    async def _associate(self, contexts: list[tuple[str, str]]) -> RequestorAssociation:
        return await associate(
            self.host,
            self.port,
            calling_ae=self.calling_ae,
            called_ae=self.called_ae,
            contexts=[(sop, [ts]) for sop, ts in contexts],
            max_pdu_length=self.max_pdu,
            connect_timeout=self.timeout,
            acse_timeout=self.timeout,
            dimse_timeout=self.timeout,
        )

    async def _worker(self, contexts: list[tuple[str, str]], queue: asyncio.Queue[Item]) -> None:
        assoc: RequestorAssociation | None = None
        failures_in_a_row = 0
        try:
            while not queue.empty():
                if assoc is None:
                    try:
                        assoc = await self._associate(contexts)
                    except (OSError, TimeoutError, AssociationError) as exc:
                        failures_in_a_row += 1
                        if failures_in_a_row >= 3:
                            self._message(f"store: cannot associate: {exc}")
                            return
                        await asyncio.sleep(0.5)
                        continue
                item = queue.get_nowait()
                try:
                    context_id = assoc.context_for(
                        item.sop_class_uid, item.meta.transfer_syntax_uid
                    )
                except AssociationError:
                    self._record(item, 0x0122, "presentation context not accepted")
                    continue
                dataset = await asyncio.to_thread(_read_dataset, item)
                fields = dimse.c_store_rq(
                    assoc.next_message_id(), item.sop_class_uid, item.sop_instance_uid
                )
                try:
                    status, comment = -1, ""
                    async for response in assoc.request(
                        context_id, fields, dataset, timeout=self.timeout
                    ):
                        status = response.status
                        comment = response.command.error_comment or ""
                    failures_in_a_row = 0
                    self.report.sent_bytes += len(dataset)
                    self._record(item, status, comment)
                except (AssociationError, OSError, TimeoutError) as exc:
                    self._record(item, NOT_SENT, str(exc) or type(exc).__name__)
                    assoc.abort()
                    assoc = None
        finally:
            if assoc is not None:
                try:
                    await assoc.release(timeout=self.timeout)
                except (AssociationError, OSError, TimeoutError):
                    assoc.abort()

    def _record(self, item: Item, status: int, comment: str) -> None:
        self.report.statuses[status] += 1
        self.report.done += 1
        if not is_success(status):
            self.report.failures.append((item.path, status, comment))
            code = f"0x{status:04X}" if status >= 0 else "-"
            self._message(f"store: {item.path}: {code} {status_name(status)} {comment}".rstrip())
        self._show_progress()

    def _message(self, text: str) -> None:
        if self.progress is not None:
            self.progress.write("\r\033[K" if self.progress.isatty() else "")
            self.progress.write(text + "\n")

    def _show_progress(self, final: bool = False) -> None:
        if self.progress is None:
            return
        now = time.monotonic()
        if not final and now - self._last_progress < 0.5:
            return
        self._last_progress = now
        elapsed = max(now - self._started, 1e-6)
        line = (
            f"store: {self.report.done}/{self._total} instances, "
            f"{self.report.sent_bytes / 1e6:.1f} MB, {self.report.done / elapsed:.0f} inst/s"
        )
        if self.progress.isatty():
            self.progress.write("\r\033[K" + line + ("\n" if final else ""))
        else:
            self.progress.write(line + "\n")
        self.progress.flush()
