"""The *sql* worklist source: entries in a table of the index database.

The tables live beside the archive's in ``archive.index_url`` but have their own metadata
and their own version table (``worklist_schema_version``), so the two schemas migrate
independently. An entry is stored as its encoded data set (Explicit VR Little Endian, in
its own Specific Character Set) plus a few columns for listing. ``worklist_state`` holds a
revision per AE title, bumped by every change: a query compares one number and re-reads only
the rows whose revision changed, so answers come from the same in-memory index (and are
byte for byte the same) as with a folder source holding the same entries.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from sqlalchemy.engine import Engine

from dicomd.worklist.entry import Entry, decoded
from dicomd.worklist.files import encode_entry
from dicomd.worklist.index import EntryIndex
from dicomd.worklist.source import SourceUnavailable, WorklistSource

SCHEMA_VERSION = 1

metadata = sa.MetaData()
entries_table = sa.Table(
    "worklist_entry",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("ae_title", sa.String(16), nullable=False),
    sa.Column("revision", sa.Integer, nullable=False),
    sa.Column("patient_id", sa.String(64)),
    sa.Column("patient_name", sa.String(400)),
    sa.Column("accession_number", sa.String(64)),
    sa.Column("modality", sa.String(16)),
    sa.Column("station_ae", sa.String(100)),
    sa.Column("start_date", sa.String(8)),
    sa.Column("start_time", sa.String(16)),
    sa.Column("study_instance_uid", sa.String(64)),
    sa.Column("dataset", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Index("ix_worklist_entry_ae", "ae_title", "revision"),
)
state_table = sa.Table(
    "worklist_state",
    metadata,
    sa.Column("ae_title", sa.String(16), primary_key=True),
    sa.Column("revision", sa.Integer, nullable=False),
)
version_table = sa.Table(
    "worklist_schema_version",
    metadata,
    sa.Column("version", sa.Integer, nullable=False),
)


def _first(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value)


@dataclass(frozen=True)
class Row:
    id: int
    ae_title: str
    patient_id: str | None
    patient_name: str | None
    accession_number: str | None
    modality: str | None
    station_ae: str | None
    start_date: str | None
    start_time: str | None
    created_at: str


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


class WorklistStore:
    """Synchronous access to the worklist tables (the CLI, and the source in a thread)."""

    def __init__(self, url: str) -> None:
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = sa.create_engine(url)
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        self._ensure_schema()

    def _ensure_schema(self) -> None:
        with self.engine.begin() as conn:
            metadata.create_all(conn, checkfirst=True)
            version = conn.execute(sa.select(sa.func.max(version_table.c.version))).scalar()
            if version is None:
                conn.execute(version_table.insert().values(version=SCHEMA_VERSION))
            elif version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"worklist schema version {version} is newer than this dicomd "
                    f"({SCHEMA_VERSION}); upgrade dicomd"
                )

    def close(self) -> None:
        self.engine.dispose()

    def _bump(self, conn: sa.Connection, ae_title: str) -> int:
        current = conn.execute(
            sa.select(state_table.c.revision).where(state_table.c.ae_title == ae_title)
        ).scalar()
        if current is None:
            conn.execute(state_table.insert().values(ae_title=ae_title, revision=1))
            return 1
        conn.execute(
            state_table.update()
            .where(state_table.c.ae_title == ae_title)
            .values(revision=current + 1)
        )
        return int(current) + 1

    def add(self, ae_title: str, datasets: list[Dataset]) -> list[int]:
        ids: list[int] = []
        now = datetime.now(UTC).isoformat(timespec="seconds")
        with self.engine.begin() as conn:
            revision = self._bump(conn, ae_title)
            for ds in datasets:
                body = encode_entry(ds)
                sps = ds.get("ScheduledProcedureStepSequence")
                item = sps[0] if sps else Dataset()
                result = conn.execute(
                    entries_table.insert().values(
                        ae_title=ae_title,
                        revision=revision,
                        patient_id=_first(ds, "PatientID"),
                        patient_name=_first(ds, "PatientName"),
                        accession_number=_first(ds, "AccessionNumber"),
                        modality=_first(item, "Modality"),
                        station_ae=_first(item, "ScheduledStationAETitle"),
                        start_date=_first(item, "ScheduledProcedureStepStartDate"),
                        start_time=_first(item, "ScheduledProcedureStepStartTime"),
                        study_instance_uid=_first(ds, "StudyInstanceUID"),
                        dataset=body,
                        created_at=now,
                    )
                )
                ids.append(int(result.inserted_primary_key[0]))
        return ids

    def remove(self, ids: list[int]) -> int:
        with self.engine.begin() as conn:
            rows = conn.execute(
                sa.select(entries_table.c.id, entries_table.c.ae_title).where(
                    entries_table.c.id.in_(ids)
                )
            ).all()
            for ae_title in sorted({r.ae_title for r in rows}):
                self._bump(conn, ae_title)
            conn.execute(entries_table.delete().where(entries_table.c.id.in_(ids)))
        return len(rows)

    def rows(self, ae_title: str | None = None) -> list[Row]:
        c = entries_table.c
        query = sa.select(
            c.id,
            c.ae_title,
            c.patient_id,
            c.patient_name,
            c.accession_number,
            c.modality,
            c.station_ae,
            c.start_date,
            c.start_time,
            c.created_at,
        ).order_by(c.ae_title, c.id)
        if ae_title is not None:
            query = query.where(c.ae_title == ae_title)
        with self.engine.connect() as conn:
            return [Row(**r._mapping) for r in conn.execute(query)]

    def ae_titles(self) -> list[str]:
        with self.engine.connect() as conn:
            return list(
                conn.execute(sa.select(entries_table.c.ae_title).distinct().order_by("ae_title"))
                .scalars()
                .all()
            )

    def datasets(self, ids: list[int]) -> dict[int, bytes]:
        out: dict[int, bytes] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(ids), 500):
                rows = conn.execute(
                    sa.select(entries_table.c.id, entries_table.c.dataset).where(
                        entries_table.c.id.in_(ids[start : start + 500])
                    )
                ).all()
                out.update((int(r.id), bytes(r.dataset)) for r in rows)
        return out

    def revision(self, ae_title: str) -> int:
        with self.engine.connect() as conn:
            value = conn.execute(
                sa.select(state_table.c.revision).where(state_table.c.ae_title == ae_title)
            ).scalar()
        return int(value or 0)

    def revisions(self, ae_title: str) -> dict[int, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(entries_table.c.id, entries_table.c.revision).where(
                    entries_table.c.ae_title == ae_title
                )
            ).all()
        return {int(r.id): int(r.revision) for r in rows}


def load_entry(entry_id: int, body: bytes) -> Entry:
    ds = read_dataset(BytesIO(body), False, True)
    return Entry.load(f"sql:{entry_id:012d}", decoded(ds))


class _Area:
    def __init__(self) -> None:
        self.revision = -1
        self.entries: dict[int, tuple[int, Entry]] = {}
        self.index = EntryIndex.build(())
        self.lock = asyncio.Lock()


class SqlSource(WorklistSource):
    kind = "sql"

    def __init__(self, name: str, url: str) -> None:
        self.name = name
        self.url = url
        self._store: WorklistStore | None = None
        self._store_lock = threading.Lock()
        self.areas: dict[str, _Area] = {}

    def store(self) -> WorklistStore:
        with self._store_lock:
            if self._store is None:
                self._store = WorklistStore(self.url)
            return self._store

    async def snapshot(self, ae_title: str) -> EntryIndex:
        area = self.areas.setdefault(ae_title, _Area())
        async with area.lock:
            try:
                index = await asyncio.to_thread(self._refresh, ae_title, area)
            except sa.exc.SQLAlchemyError as exc:
                raise SourceUnavailable(
                    f"worklist database error: {exc.__class__.__name__}"
                ) from exc
            if index is not None:
                area.index = index
        return area.index

    def _refresh(self, ae_title: str, area: _Area) -> EntryIndex | None:
        store = self.store()
        revision = store.revision(ae_title)
        if revision == area.revision:
            return None
        revisions = store.revisions(ae_title)
        stale = [i for i, r in revisions.items() if area.entries.get(i, (None,))[0] != r]
        bodies = store.datasets(stale) if stale else {}
        entries = {i: v for i, v in area.entries.items() if i in revisions}
        for entry_id, body in bodies.items():
            entries[entry_id] = (revisions[entry_id], load_entry(entry_id, body))
        area.entries = entries
        area.revision = revision
        return EntryIndex.build(e for _, e in entries.values())

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
