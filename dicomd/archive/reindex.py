"""``dicomd reindex``: bring the index in line with the files of the archive.

Every file under the archive root (but dicomd's own dot-directories) that the index does not
know with its current size is parsed and indexed; rows whose file is gone are removed.
Work is committed in batches, so an interrupted run loses at most one batch and the next
run resumes where it stopped (indexed files are skipped by path and size). ``rebuild``
empties the index first. Run it with the daemon stopped: the daemon's committer is the
index's only writer otherwise.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

from dicomd.archive import index as ix
from dicomd.archive.extract import UndecodableDataset, read_instance
from dicomd.archive.part10 import NotPart10Error
from dicomd.archive.store import INCOMING_DIR, STATE_DIR, dataset_digest

BATCH = 200


@dataclass
class ReindexStats:
    scanned: int = 0
    indexed: int = 0
    unchanged: int = 0
    duplicates: int = 0
    unreadable: int = 0
    removed_rows: int = 0


def _walk(root: Path) -> list[str]:
    out: list[str] = []
    for dirpath, dirs, files in os.walk(root):
        if Path(dirpath) == root:
            dirs[:] = [d for d in dirs if d not in (INCOMING_DIR, STATE_DIR)]
        dirs.sort()
        rel_dir = Path(dirpath).relative_to(root)
        for name in sorted(files):
            out.append((rel_dir / name).as_posix())
    return out


def reindex(
    root: Path,
    index_url: str,
    *,
    rebuild: bool = False,
    progress: Callable[[ReindexStats, int, bool], None] | None = None,
    durable: bool = True,
) -> ReindexStats:
    engine = ix.create_index_engine(index_url, durable=durable)
    stats = ReindexStats()
    try:
        ix.migrate(engine)
        with engine.connect() as conn:
            if rebuild:
                for table in (ix.INSTANCE, ix.SERIES, ix.STUDY, ix.PATIENT):
                    conn.execute(sa.delete(table))
                conn.commit()
            known = {
                row.path: row.size
                for row in conn.execute(sa.select(ix.INSTANCE.c.path, ix.INSTANCE.c.size))
            }
            conn.rollback()
            files = _walk(root)
            total = len(files)
            batch: list[ix.InstanceRecord] = []
            last = 0.0
            for rel in files:
                stats.scanned += 1
                full = root / rel
                try:
                    size = full.stat().st_size
                except OSError:
                    continue
                if known.get(rel) == size:
                    stats.unchanged += 1
                else:
                    try:
                        info = read_instance(full)
                        digest, size, meta = dataset_digest(full)
                    except (UndecodableDataset, NotPart10Error, OSError, ValueError):
                        stats.unreadable += 1
                        continue
                    batch.append(
                        ix.InstanceRecord(
                            info=info,
                            path=rel,
                            size=size,
                            sha256=digest,
                            transfer_syntax_uid=meta.transfer_syntax_uid,
                            calling_ae=meta.source_ae or None,
                            received_at=datetime.fromtimestamp(full.stat().st_mtime, UTC),
                        )
                    )
                if len(batch) >= BATCH:
                    _commit(conn, root, batch, stats)
                    batch = []
                if progress is not None and time.monotonic() - last > 1.0:
                    last = time.monotonic()
                    progress(stats, total, False)
            if batch:
                _commit(conn, root, batch, stats)
            # Rows whose file is gone.
            gone = [
                row.id
                for row in conn.execute(sa.select(ix.INSTANCE.c.id, ix.INSTANCE.c.path))
                if not (root / row.path).is_file()
            ]
            for instance_id in gone:
                ix.remove_instance(conn, instance_id)
            conn.commit()
            stats.removed_rows = len(gone)
            if progress is not None:
                progress(stats, total, True)
    finally:
        engine.dispose()
    return stats


def _commit(
    conn: sa.Connection, root: Path, batch: list[ix.InstanceRecord], stats: ReindexStats
) -> None:
    existing = ix.find_instances(conn, (r.info.sop_instance_uid for r in batch))
    add: list[ix.InstanceRecord] = []
    seen: set[str] = set()
    for record in batch:
        uid = record.info.sop_instance_uid
        old = existing.get(uid)
        if uid in seen or (
            old is not None and old.path != record.path and (root / old.path).is_file()
        ):
            stats.duplicates += 1  # another file holds this instance: the indexed one stays
            continue
        if old is not None:
            ix.remove_instance(conn, old.id)
        at_path = ix.find_by_path(conn, record.path)
        if at_path is not None:  # the file at this path was another instance before
            ix.remove_instance(conn, at_path.id)
        seen.add(uid)
        add.append(record)
    ix.add_instances(conn, add)
    conn.commit()
    stats.indexed += len(add)
