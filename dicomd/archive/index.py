"""The archive index: patient / study / series / instance in SQL (SQLAlchemy Core 2).

SQLite in WAL mode by default (``archive.index_url``); only portable Core constructs are used
so PostgreSQL can follow without a rewrite. One writer (the archive's committer thread) does
every change, so "upsert by UID" is a read-then-write in the writer's transaction, and counts
(NumberOfStudyRelatedInstances, ...) and ModalitiesInStudy / SOPClassesInStudy are kept
current on insert: queries never have to count. Every lookup goes through a unique index on a
UID or the file path, so the insert rate does not fall as the archive grows.

The ingest path (``IndexWriter``) runs Core statements compiled once on the DBAPI cursor,
with UID → row caches for patients, studies and series, and writes each parent's counts once
per batch; queries and migrations use plain Core. Each instance keeps its header bytes
(``instance_header`` decodes them), so a query can return any attribute.

Schema versions are ordered migration functions recorded in ``schema_version``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pydicom.dataset import Dataset
from sqlalchemy.engine import Connection, Engine

from dicomd.archive.extract import (
    PATIENT_KEYS,
    SERIES_KEYS,
    STUDY_KEYS,
    InstanceInfo,
    decode_header,
    read_header,
)

SCHEMA_VERSION = 4
INTEGER_KEYS = frozenset({"SeriesNumber", "InstanceNumber", "NumberOfFrames"})
_SNAKE_1 = re.compile(r"(.)([A-Z][a-z]+)")
_SNAKE_2 = re.compile(r"([a-z0-9])([A-Z])")


def column_name(keyword: str) -> str:
    """``SOPInstanceUID`` → ``sop_instance_uid``; ``OtherPatientIDs`` → ``other_patient_ids``."""
    return _SNAKE_2.sub(r"\1_\2", _SNAKE_1.sub(r"\1_\2", keyword)).lower()


def _attr_columns(keys: Iterable[str], skip: Iterable[str] = ()) -> list[sa.Column[Any]]:
    skipped = set(skip)
    cols: list[sa.Column[Any]] = []
    for kw in keys:
        if kw in skipped:
            continue
        kind: Any = sa.Integer() if kw in INTEGER_KEYS else sa.String(512)
        cols.append(sa.Column(column_name(kw), kind, nullable=True))
    return cols


def define_tables(metadata: sa.MetaData, version: int = SCHEMA_VERSION) -> dict[str, sa.Table]:
    """The tables as they are at schema ``version`` (migrations create older shapes)."""
    patient = sa.Table(
        "patient",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("patient_key", sa.String(200), nullable=False, unique=True),
        *_attr_columns(PATIENT_KEYS),
        sa.Column("number_of_patient_related_studies", sa.Integer, nullable=False, default=0),
        sa.Column("number_of_patient_related_series", sa.Integer, nullable=False, default=0),
        sa.Column("number_of_patient_related_instances", sa.Integer, nullable=False, default=0),
        *(
            # C-FIND on Patient ID and (a prefix of) Patient's Name (schema version 4).
            [sa.Index("ix_patient_id", "patient_id"), sa.Index("ix_patient_name", "patient_name")]
            if version >= 4
            else []
        ),
    )
    study_extra = (
        [sa.Column("sop_classes_in_study", sa.Text, nullable=True)] if version >= 2 else []
    )
    study = sa.Table(
        "study",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("patient_pk", sa.Integer, sa.ForeignKey("patient.id"), nullable=False),
        *_attr_columns(STUDY_KEYS, skip=("StudyInstanceUID",)),
        sa.Column("modalities_in_study", sa.String(512), nullable=True),
        *study_extra,
        sa.Column("number_of_study_related_series", sa.Integer, nullable=False, default=0),
        sa.Column("number_of_study_related_instances", sa.Integer, nullable=False, default=0),
        sa.Index("ix_study_patient", "patient_pk"),
        sa.Index("ix_study_date", "study_date"),
        sa.Index("ix_study_accession", "accession_number"),
    )
    series = sa.Table(
        "series",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("series_instance_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("study_pk", sa.Integer, sa.ForeignKey("study.id"), nullable=False),
        *_attr_columns(SERIES_KEYS, skip=("SeriesInstanceUID",)),
        sa.Column("number_of_series_related_instances", sa.Integer, nullable=False, default=0),
        sa.Index("ix_series_study", "study_pk"),
    )
    instance_extra = [sa.Column("header_json", sa.Text, nullable=True)] if version >= 2 else []
    if version >= 3:
        # The data set as received up to its pixel data (extract.decode_header); NULL when
        # too long (the file is read instead). Rows of version 2 have header_json instead.
        instance_extra.append(sa.Column("header", sa.LargeBinary, nullable=True))
    instance = sa.Table(
        "instance",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("series_pk", sa.Integer, sa.ForeignKey("series.id"), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("instance_number", sa.Integer, nullable=True),
        sa.Column("content_date", sa.String(16), nullable=True),
        sa.Column("content_time", sa.String(32), nullable=True),
        sa.Column("number_of_frames", sa.Integer, nullable=True),
        sa.Column("specific_character_set", sa.String(200), nullable=True),
        sa.Column("transfer_syntax_uid", sa.String(64), nullable=False),
        sa.Column("path", sa.String(1024), nullable=False, unique=True),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("calling_ae", sa.String(16), nullable=True),
        sa.Column("called_ae", sa.String(16), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        *instance_extra,
        sa.Index("ix_instance_series", "series_pk"),
    )
    return {"patient": patient, "study": study, "series": series, "instance": instance}


METADATA = sa.MetaData()
TABLES = define_tables(METADATA)
PATIENT, STUDY, SERIES, INSTANCE = (TABLES[n] for n in ("patient", "study", "series", "instance"))

_VERSION_METADATA = sa.MetaData()
SCHEMA_VERSION_TABLE = sa.Table(
    "schema_version",
    _VERSION_METADATA,
    sa.Column("version", sa.Integer, nullable=False),
)


# --- migrations ----------------------------------------------------------------------------


def _migrate_1(conn: Connection) -> None:
    """The first schema: patient/study/series/instance with their unique UID indexes."""
    define_tables(sa.MetaData(), version=1)["patient"].metadata.create_all(conn)


def _migrate_2(conn: Connection) -> None:
    """SOPClassesInStudy, and each instance's header as DICOM JSON."""
    conn.execute(sa.text("ALTER TABLE study ADD COLUMN sop_classes_in_study TEXT"))
    conn.execute(sa.text("ALTER TABLE instance ADD COLUMN header_json TEXT"))
    # Fill SOPClassesInStudy for studies indexed under version 1.
    rows = conn.execute(
        sa.select(SERIES.c.study_pk, INSTANCE.c.sop_class_uid)
        .join(SERIES, INSTANCE.c.series_pk == SERIES.c.id)
        .distinct()
    ).all()
    by_study: dict[int, set[str]] = {}
    for study_pk, sop_class in rows:
        by_study.setdefault(study_pk, set()).add(sop_class)
    if by_study:
        conn.execute(
            sa.update(STUDY)
            .where(STUDY.c.id == sa.bindparam("b_id"))
            .values(sop_classes_in_study=sa.bindparam("b_classes")),
            [{"b_id": k, "b_classes": "\\".join(sorted(v))} for k, v in by_study.items()],
        )


def _migrate_3(conn: Connection) -> None:
    """Each instance's header as the received bytes (BLOB) instead of DICOM JSON: building
    JSON cost more than the rest of an ingest. Rows indexed before keep their header_json."""
    blob = conn.dialect.type_compiler_instance.process(sa.LargeBinary())
    conn.execute(sa.text(f"ALTER TABLE instance ADD COLUMN header {blob}"))


def _migrate_4(conn: Connection) -> None:
    """Indexes for C-FIND on Patient ID and Patient's Name (a full scan of the patients
    before, for every query on those keys)."""
    for index in define_tables(sa.MetaData(), version=4)["patient"].indexes:
        index.create(conn, checkfirst=True)


MIGRATIONS: list[tuple[int, Callable[[Connection], None]]] = [
    (1, _migrate_1),
    (2, _migrate_2),
    (3, _migrate_3),
    (4, _migrate_4),
]


def schema_version(conn: Connection) -> int:
    if not sa.inspect(conn).has_table("schema_version"):
        return 0
    value = conn.execute(sa.select(sa.func.max(SCHEMA_VERSION_TABLE.c.version))).scalar()
    return int(value or 0)


def migrate(engine: Engine, target: int = SCHEMA_VERSION) -> tuple[int, int]:
    """Bring the schema to ``target``; returns (version before, version after)."""
    with engine.begin() as conn:
        _VERSION_METADATA.create_all(conn)
        before = schema_version(conn)
    if before > SCHEMA_VERSION:
        raise RuntimeError(
            f"the index has schema version {before}, newer than this dicomd ({SCHEMA_VERSION})"
        )
    current = before
    for version, step in MIGRATIONS:
        if current < version <= target:
            with engine.begin() as conn:
                step(conn)
                conn.execute(sa.delete(SCHEMA_VERSION_TABLE))
                conn.execute(sa.insert(SCHEMA_VERSION_TABLE).values(version=version))
            current = version
    return before, current


# --- engine ----------------------------------------------------------------------------------


def create_index_engine(url: str, *, durable: bool = True) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and fsync on commit when durable."""
    engine = sa.create_engine(url)
    if engine.dialect.name == "sqlite":

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            # In WAL mode FULL syncs the WAL on every commit: a committed row survives power loss.
            cur.execute(f"PRAGMA synchronous={'FULL' if durable else 'OFF'}")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

    return engine


# --- writes ----------------------------------------------------------------------------------


@dataclass
class InstanceRecord:
    """One instance to index: its parsed header and where and how it was stored."""

    info: InstanceInfo
    path: str  # relative to the archive root, '/'-separated
    size: int
    sha256: str  # of the data set bytes as received (the file after its file meta)
    transfer_syntax_uid: str
    calling_ae: str | None = None
    called_ae: str | None = None
    received_at: datetime | None = None


@dataclass
class ExistingInstance:
    id: int
    sop_instance_uid: str
    path: str
    size: int
    sha256: str


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(str(value).split("\\")[0].strip())
    except ValueError:
        try:
            return int(float(str(value).split("\\")[0]))
        except ValueError:
            return None


def patient_key(info: InstanceInfo) -> str:
    return f"{info.get('IssuerOfPatientID') or ''}|{info.get('PatientID') or ''}"


def _add_to_list(current: str | None, value: str | None) -> str | None:
    if not value:
        return current
    items = current.split("\\") if current else []
    new = [v for v in value.split("\\") if v and v not in items]
    if not new:
        return current
    return "\\".join(sorted(items + new))


def find_instances(conn: Connection, uids: Iterable[str]) -> dict[str, ExistingInstance]:
    wanted = list(set(uids))
    found: dict[str, ExistingInstance] = {}
    for start in range(0, len(wanted), 500):
        rows = conn.execute(
            sa.select(
                INSTANCE.c.id,
                INSTANCE.c.sop_instance_uid,
                INSTANCE.c.path,
                INSTANCE.c.size,
                INSTANCE.c.sha256,
            ).where(INSTANCE.c.sop_instance_uid.in_(wanted[start : start + 500]))
        ).all()
        for row in rows:
            found[row.sop_instance_uid] = ExistingInstance(*row)
    return found


def find_by_path(conn: Connection, path: str) -> ExistingInstance | None:
    row = conn.execute(
        sa.select(
            INSTANCE.c.id,
            INSTANCE.c.sop_instance_uid,
            INSTANCE.c.path,
            INSTANCE.c.size,
            INSTANCE.c.sha256,
        ).where(INSTANCE.c.path == path)
    ).first()
    return ExistingInstance(*row) if row is not None else None


@dataclass
class _StudyState:
    id: int
    patient_pk: int
    modalities: str | None
    sop_classes: str | None


class _Prepared:
    """One Core statement compiled once for the connection's dialect and run on the raw
    DBAPI cursor: the per-statement work of the SQLAlchemy Connection (cache key, result
    wrapping, events) costs more than SQLite's own insert on the ingest path."""

    def __init__(self, stmt: Any, dialect: Any) -> None:
        compiled = stmt.compile(dialect=dialect)
        self.sql = str(compiled)
        self.positional = bool(dialect.positional)
        self.names: list[str] = list(
            compiled.positiontup or [] if self.positional else compiled.binds.keys()
        )
        self.processors: dict[str, Callable[[Any], Any]] = {}
        for name, bind in compiled.binds.items():
            proc = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if proc is not None:
                self.processors[name] = proc

    def params(self, values: dict[str, Any]) -> Any:
        if self.processors:
            values = {
                k: (self.processors[k](v) if k in self.processors else v) for k, v in values.items()
            }
        if self.positional:
            return tuple(values[name] for name in self.names)
        return values


def _insert_all(table: sa.Table, dialect: Any) -> _Prepared:
    """INSERT of every column but the id, named by column name (returning the new id)."""
    stmt = sa.insert(table).values(
        {c.name: sa.bindparam(c.name, type_=c.type) for c in table.c if c.name != "id"}
    )
    if dialect.insert_returning:
        stmt = stmt.returning(table.c.id)
    return _Prepared(stmt, dialect)


class _Statements:
    """The ingest path's statements, compiled once per dialect."""

    def __init__(self, dialect: Any) -> None:
        i, s, r, p = INSTANCE.c, STUDY.c, SERIES.c, PATIENT.c
        self.returning = bool(dialect.insert_returning)
        self.find_instance = _Prepared(
            sa.select(i.id, i.sop_instance_uid, i.path, i.size, i.sha256).where(
                i.sop_instance_uid == sa.bindparam("uid")
            ),
            dialect,
        )
        self.find_patient = _Prepared(
            sa.select(p.id).where(p.patient_key == sa.bindparam("key")), dialect
        )
        self.find_study = _Prepared(
            sa.select(s.id, s.patient_pk, s.modalities_in_study, s.sop_classes_in_study).where(
                s.study_instance_uid == sa.bindparam("uid")
            ),
            dialect,
        )
        self.find_series = _Prepared(
            sa.select(r.id, r.study_pk).where(r.series_instance_uid == sa.bindparam("uid")),
            dialect,
        )
        self.insert_patient = _insert_all(PATIENT, dialect)
        self.insert_study = _insert_all(STUDY, dialect)
        self.insert_series = _insert_all(SERIES, dialect)
        self.insert_instance = _Prepared(
            sa.insert(INSTANCE).values(
                {c.name: sa.bindparam(c.name, type_=c.type) for c in INSTANCE.c if c.name != "id"}
            ),
            dialect,
        )
        self.count_series = _Prepared(
            sa.update(SERIES)
            .where(r.id == sa.bindparam("b_id"))
            .values(
                number_of_series_related_instances=r.number_of_series_related_instances
                + sa.bindparam("b_instances")
            ),
            dialect,
        )
        self.count_study = _Prepared(
            sa.update(STUDY)
            .where(s.id == sa.bindparam("b_id"))
            .values(
                number_of_study_related_instances=s.number_of_study_related_instances
                + sa.bindparam("b_instances"),
                number_of_study_related_series=s.number_of_study_related_series
                + sa.bindparam("b_series"),
                modalities_in_study=sa.bindparam("b_modalities", type_=sa.String()),
                sop_classes_in_study=sa.bindparam("b_sop_classes", type_=sa.Text()),
            ),
            dialect,
        )
        self.count_patient = _Prepared(
            sa.update(PATIENT)
            .where(p.id == sa.bindparam("b_id"))
            .values(
                number_of_patient_related_instances=p.number_of_patient_related_instances
                + sa.bindparam("b_instances"),
                number_of_patient_related_series=p.number_of_patient_related_series
                + sa.bindparam("b_series"),
                number_of_patient_related_studies=p.number_of_patient_related_studies
                + sa.bindparam("b_studies"),
            ),
            dialect,
        )


_STATEMENTS: dict[str, _Statements] = {}


def _statements(dialect: Any) -> _Statements:
    key = f"{dialect.name}:{dialect.driver}:{dialect.paramstyle}"
    found = _STATEMENTS.get(key)
    if found is None:
        found = _STATEMENTS[key] = _Statements(dialect)
    return found


def _attr_values(info: InstanceInfo, columns: Sequence[tuple[str, str, bool]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    get = info.values.get
    for kw, col, is_int in columns:
        value = get(kw)
        if is_int:
            out[col] = _int(value)
        else:
            out[col] = value[:512] if value else value
    return out


def _columns(keys: Sequence[str], skip: Iterable[str] = ()) -> tuple[tuple[str, str, bool], ...]:
    skipped = set(skip)
    return tuple((kw, column_name(kw), kw in INTEGER_KEYS) for kw in keys if kw not in skipped)


_PATIENT_COLUMNS = _columns(PATIENT_KEYS)
_STUDY_COLUMNS = _columns(STUDY_KEYS, skip=("StudyInstanceUID",))
_SERIES_COLUMNS = _columns(SERIES_KEYS, skip=("SeriesInstanceUID",))


class IndexWriter:
    """Adds instances to the index in the caller's transaction, a batch at a time.

    Statements are compiled once and run on the connection's DBAPI cursor; patient, study
    and series rows are found through UID → row caches, and the counts,
    ModalitiesInStudy and SOPClassesInStudy are written once per batch per parent. With
    ``cache=True`` the caches live across batches, which is right only for the index's
    single writer (the archive's committer): call ``forget()`` after a rollback or after
    anything else changed parent rows (``remove_instance``).
    """

    MAX_CACHED = 20_000

    def __init__(self, conn: Connection, *, cache: bool = True) -> None:
        self.conn = conn
        self.keep_cache = cache
        self.stmts = _statements(conn.dialect)
        self.patients: dict[str, int] = {}
        self.studies: dict[str, _StudyState] = {}
        self.series: dict[str, tuple[int, int]] = {}  # uid → (id, study_pk)

    def forget(self) -> None:
        self.patients.clear()
        self.studies.clear()
        self.series.clear()

    def _cursor(self) -> Any:
        return self.conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]

    def find(self, uids: Iterable[str]) -> dict[str, ExistingInstance]:
        """The indexed instances among ``uids``."""
        stmt = self.stmts.find_instance
        cur = self._cursor()
        found: dict[str, ExistingInstance] = {}
        try:
            for uid in uids:
                cur.execute(stmt.sql, stmt.params({"uid": uid}))
                row = cur.fetchone()
                if row is not None:
                    found[uid] = ExistingInstance(*row)
        finally:
            cur.close()
        return found

    def commit(self) -> None:
        """Commit what ``add`` did outside a SQLAlchemy transaction (the DBAPI's own)."""
        self.conn.connection.dbapi_connection.commit()  # type: ignore[union-attr]

    def rollback(self) -> None:
        self.forget()
        self.conn.connection.dbapi_connection.rollback()  # type: ignore[union-attr]

    def _insert(self, cur: Any, stmt: _Prepared, values: dict[str, Any]) -> int:
        cur.execute(stmt.sql, stmt.params(values))
        if self.stmts.returning:
            return int(cur.fetchone()[0])
        return int(cur.lastrowid)

    def _one(self, cur: Any, stmt: _Prepared, values: dict[str, Any]) -> Any:
        cur.execute(stmt.sql, stmt.params(values))
        return cur.fetchone()

    def add(self, records: Sequence[InstanceRecord]) -> None:
        """Index new instances (their SOP Instance UIDs must not be indexed yet)."""
        if not records:
            return
        if not self.keep_cache or len(self.series) > self.MAX_CACHED:
            self.forget()
        st = self.stmts
        cur = self._cursor()
        d_series: Counter[int] = Counter()
        d_study: dict[int, list[int]] = {}  # id → [instances, series]
        d_patient: dict[int, list[int]] = {}  # id → [instances, series, studies]
        touched: dict[int, _StudyState] = {}
        rows: list[Any] = []
        now = datetime.now(UTC)
        try:
            for record in records:
                info = record.info
                values = info.values
                # Study (and its patient).
                study_uid = values.get("StudyInstanceUID") or ""
                study = self.studies.get(study_uid)
                if study is None:
                    row = self._one(cur, st.find_study, {"uid": study_uid})
                    if row is None:
                        patient_pk = self._patient(cur, info, d_patient)
                        pk = self._insert(
                            cur,
                            st.insert_study,
                            {
                                "study_instance_uid": study_uid,
                                "patient_pk": patient_pk,
                                "modalities_in_study": None,
                                "sop_classes_in_study": None,
                                "number_of_study_related_series": 0,
                                "number_of_study_related_instances": 0,
                                **_attr_values(info, _STUDY_COLUMNS),
                            },
                        )
                        d_patient.setdefault(patient_pk, [0, 0, 0])[2] += 1
                        study = _StudyState(pk, patient_pk, None, None)
                    else:
                        study = _StudyState(int(row[0]), int(row[1]), row[2], row[3])
                    self.studies[study_uid] = study
                counts = d_study.setdefault(study.id, [0, 0])
                pcounts = d_patient.setdefault(study.patient_pk, [0, 0, 0])
                # Series.
                series_uid = values.get("SeriesInstanceUID") or ""
                entry = self.series.get(series_uid)
                if entry is None:
                    row = self._one(cur, st.find_series, {"uid": series_uid})
                    if row is None:
                        pk = self._insert(
                            cur,
                            st.insert_series,
                            {
                                "series_instance_uid": series_uid,
                                "study_pk": study.id,
                                "number_of_series_related_instances": 0,
                                **_attr_values(info, _SERIES_COLUMNS),
                            },
                        )
                        counts[1] += 1
                        pcounts[1] += 1
                        entry = (pk, study.id)
                    else:
                        entry = (int(row[0]), int(row[1]))
                    self.series[series_uid] = entry
                series_pk = entry[0]
                study.modalities = _add_to_list(study.modalities, values.get("Modality"))
                study.sop_classes = _add_to_list(study.sop_classes, info.sop_class_uid)
                touched[study.id] = study
                rows.append(
                    st.insert_instance.params(
                        {
                            "sop_instance_uid": info.sop_instance_uid,
                            "series_pk": series_pk,
                            "sop_class_uid": info.sop_class_uid,
                            "instance_number": _int(values.get("InstanceNumber")),
                            "content_date": (values.get("ContentDate") or "")[:16] or None,
                            "content_time": (values.get("ContentTime") or "")[:32] or None,
                            "number_of_frames": _int(values.get("NumberOfFrames")),
                            "specific_character_set": (values.get("SpecificCharacterSet") or "")[
                                :200
                            ]
                            or None,
                            "transfer_syntax_uid": record.transfer_syntax_uid,
                            "path": record.path,
                            "size": record.size,
                            "sha256": record.sha256,
                            "calling_ae": record.calling_ae,
                            "called_ae": record.called_ae,
                            "received_at": record.received_at or now,
                            "header_json": None,
                            "header": info.header,
                        }
                    )
                )
                d_series[series_pk] += 1
                counts[0] += 1
                pcounts[0] += 1
            cur.executemany(st.insert_instance.sql, rows)
            stmt = st.count_series
            cur.executemany(
                stmt.sql, [stmt.params({"b_id": k, "b_instances": n}) for k, n in d_series.items()]
            )
            stmt = st.count_study
            cur.executemany(
                stmt.sql,
                [
                    stmt.params(
                        {
                            "b_id": k,
                            "b_instances": n[0],
                            "b_series": n[1],
                            "b_modalities": touched[k].modalities,
                            "b_sop_classes": touched[k].sop_classes,
                        }
                    )
                    for k, n in d_study.items()
                ],
            )
            stmt = st.count_patient
            cur.executemany(
                stmt.sql,
                [
                    stmt.params(
                        {"b_id": k, "b_instances": n[0], "b_series": n[1], "b_studies": n[2]}
                    )
                    for k, n in d_patient.items()
                ],
            )
        except BaseException:
            self.forget()  # the caller rolls back: rows created here may vanish
            raise
        finally:
            cur.close()

    def _patient(self, cur: Any, info: InstanceInfo, d_patient: dict[int, list[int]]) -> int:
        key = patient_key(info)
        pk = self.patients.get(key)
        if pk is None:
            row = self._one(cur, self.stmts.find_patient, {"key": key})
            if row is None:
                pk = self._insert(
                    cur,
                    self.stmts.insert_patient,
                    {
                        "patient_key": key,
                        "number_of_patient_related_studies": 0,
                        "number_of_patient_related_series": 0,
                        "number_of_patient_related_instances": 0,
                        **_attr_values(info, _PATIENT_COLUMNS),
                    },
                )
            else:
                pk = int(row[0])
            self.patients[key] = pk
        return pk


def add_instances(conn: Connection, records: Sequence[InstanceRecord]) -> None:
    """Index new instances (their SOP Instance UIDs must not be indexed yet) in the
    connection's transaction (begun here if need be; the caller commits)."""
    if not conn.in_transaction():
        conn.begin()
    IndexWriter(conn, cache=False).add(records)


def instance_header(conn: Connection, sop_instance_uid: str, root: Path) -> Dataset | None:
    """The indexed instance's data set without its pixel data (None if not indexed): from
    the header bytes in the index, the DICOM JSON of rows indexed by schema version 2, or
    else the stored file."""
    i = INSTANCE.c
    row = conn.execute(
        sa.select(i.header, i.header_json, i.transfer_syntax_uid, i.path).where(
            i.sop_instance_uid == sop_instance_uid
        )
    ).first()
    if row is None:
        return None
    if row.header is not None:
        return decode_header(bytes(row.header), row.transfer_syntax_uid)
    if row.header_json:
        return Dataset.from_json(row.header_json)
    return read_header(root / row.path)


def remove_instance(conn: Connection, instance_id: int) -> None:
    """Delete one instance row, keep the counts right, and drop emptied parents."""
    row = conn.execute(
        sa.select(INSTANCE.c.series_pk, SERIES.c.study_pk, STUDY.c.patient_pk)
        .join(SERIES, INSTANCE.c.series_pk == SERIES.c.id)
        .join(STUDY, SERIES.c.study_pk == STUDY.c.id)
        .where(INSTANCE.c.id == instance_id)
    ).first()
    if row is None:
        return
    series_pk, study_pk, patient_pk = row
    conn.execute(sa.delete(INSTANCE).where(INSTANCE.c.id == instance_id))
    p, s, r = PATIENT.c, STUDY.c, SERIES.c
    conn.execute(
        sa.update(SERIES)
        .where(r.id == series_pk)
        .values(number_of_series_related_instances=r.number_of_series_related_instances - 1)
    )
    conn.execute(
        sa.update(STUDY)
        .where(s.id == study_pk)
        .values(number_of_study_related_instances=s.number_of_study_related_instances - 1)
    )
    conn.execute(
        sa.update(PATIENT)
        .where(p.id == patient_pk)
        .values(number_of_patient_related_instances=p.number_of_patient_related_instances - 1)
    )
    left = conn.execute(
        sa.select(r.number_of_series_related_instances).where(r.id == series_pk)
    ).scalar()
    if not left:
        conn.execute(sa.delete(SERIES).where(r.id == series_pk))
        conn.execute(
            sa.update(STUDY)
            .where(s.id == study_pk)
            .values(number_of_study_related_series=s.number_of_study_related_series - 1)
        )
        conn.execute(
            sa.update(PATIENT)
            .where(p.id == patient_pk)
            .values(number_of_patient_related_series=p.number_of_patient_related_series - 1)
        )
    left = conn.execute(
        sa.select(s.number_of_study_related_instances).where(s.id == study_pk)
    ).scalar()
    if not left:
        conn.execute(sa.delete(STUDY).where(s.id == study_pk))
        conn.execute(
            sa.update(PATIENT)
            .where(p.id == patient_pk)
            .values(number_of_patient_related_studies=p.number_of_patient_related_studies - 1)
        )
    left = conn.execute(
        sa.select(p.number_of_patient_related_instances).where(p.id == patient_pk)
    ).scalar()
    if not left:
        conn.execute(sa.delete(PATIENT).where(p.id == patient_pk))
