"""Query/Retrieve reads of the archive index (SQLAlchemy Core, bound parameters only).

A C-FIND runs in two steps: SQL selects *candidates* at the query level using the keys the
index has columns for (necessary conditions only: PatientID, PatientName as a LIKE pattern,
UIDs and UID lists, AccessionNumber, Modality, ModalitiesInStudy, StudyDate ranges); each
candidate's stored header (one representative instance of the entity) plus the computed keys
of its row is then matched exactly in Python (``dicomd.query.matching``). Candidates are read
page by page (keyset pagination on the level's primary key), so the first answers go out
before the whole result is known.

Every read of an instance's stored header goes through :func:`stored_header`, the one place
to adapt if the archive changes how headers are kept.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.valuerep import PersonName
from sqlalchemy.engine import Connection

from dicomd.archive import index as ix
from dicomd.archive.extract import INSTANCE_KEYS, PATIENT_KEYS, SERIES_KEYS, STUDY_KEYS
from dicomd.query.matching import CompiledQuery, element_texts
from dicomd.worklist.entry import decoded

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
_INDEXED = (
    ("patient", PATIENT_KEYS),
    ("study", STUDY_KEYS),
    ("series", SERIES_KEYS),
    ("instance", INSTANCE_KEYS),
)
PAGE = 200

PATIENT_ID = 0x00100020
PATIENT_NAME = 0x00100010
STUDY_UID = 0x0020000D
SERIES_UID = 0x0020000E
SOP_UID = 0x00080018
QUERY_LEVEL = 0x00080052


def stored_header(conn: Connection, sop_instance_uid: str, root: Path) -> Dataset | None:
    """The stored data set of one instance (no pixel data), text decoded to Unicode.

    The only access to stored headers in query/retrieve: adapt here if the archive changes
    how it keeps them."""
    ds = ix.instance_header(conn, sop_instance_uid, root)
    return None if ds is None else decoded(ds)


@dataclass
class Candidate:
    """One entity at the query level: its row values and a representative instance."""

    pk: int
    values: dict[str, Any]
    sop_instance_uid: str | None


@dataclass
class LevelQuery:
    level: str
    conditions: list[Any] = field(default_factory=list)


def _tables() -> tuple[sa.Table, sa.Table, sa.Table, sa.Table]:
    return ix.PATIENT, ix.STUDY, ix.SERIES, ix.INSTANCE


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _like_pattern(dicom_pattern: str) -> str:
    """A DICOM wildcard value as a LIKE pattern (escape character ``\\``), open at the end
    (trailing ``^`` and further component groups of a PN are not significant)."""
    out = []
    for ch in dicom_pattern:
        if ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        else:
            out.append(_like_escape(ch))
    pattern = "".join(out)
    return pattern if pattern.endswith("%") else pattern + "%"


def build_conditions(
    level: str, query: Dataset, compiled: CompiledQuery, *, fuzzy_names: bool
) -> list[Any]:
    """SQL conditions every match must meet (a superset of the matches is selected)."""
    patient, study, series, instance = _tables()
    depth = LEVELS.index(level)
    columns: dict[int, Any] = {PATIENT_ID: patient.c.patient_id}
    if depth >= 1:
        columns |= {
            STUDY_UID: study.c.study_instance_uid,
            0x00080050: study.c.accession_number,
        }
    if depth >= 2:
        columns |= {SERIES_UID: series.c.series_instance_uid, 0x00080060: series.c.modality}
    if depth >= 3:
        columns |= {SOP_UID: instance.c.sop_instance_uid, 0x00080016: instance.c.sop_class_uid}
    conditions: list[Any] = []
    for path, values in compiled.exact_hints.items():
        if len(path) == 1 and path[0] in columns:
            conditions.append(columns[path[0]].in_(sorted(values)))
        elif len(path) == 1 and path[0] == 0x00080061 and depth >= 1:  # ModalitiesInStudy
            col = study.c.modalities_in_study
            conditions.append(
                sa.or_(
                    *(
                        sa.or_(
                            col == v,
                            col.like(f"{_like_escape(v)}\\\\%", escape="\\"),
                            col.like(f"%\\\\{_like_escape(v)}", escape="\\"),
                            col.like(f"%\\\\{_like_escape(v)}\\\\%", escape="\\"),
                        )
                        for v in sorted(values)
                    )
                )
            )
    date_range = compiled.range_hints.get((0x00080020,))
    if date_range is not None and depth >= 1:
        low, high = date_range
        col = study.c.study_date
        if low:
            conditions.append(col >= low)
        if high and high != "99999999":
            conditions.append(col <= high)
    name = query.get(PATIENT_NAME)
    if name is not None and not fuzzy_names:
        texts = element_texts(name)
        if len(texts) == 1 and "=" not in texts[0] and texts[0] not in ("", "*"):
            conditions.append(patient.c.patient_name.like(_like_pattern(texts[0]), escape="\\"))
    return conditions


def _representative(level: str) -> Any:
    """A correlated scalar subquery: the SOP Instance UID of one instance of the entity."""
    patient, study, series, instance = _tables()
    first = sa.func.min(instance.c.sop_instance_uid)
    if level == "SERIES":
        return sa.select(first).where(instance.c.series_pk == series.c.id).scalar_subquery()
    if level == "STUDY":
        return (
            sa.select(first)
            .select_from(instance.join(series, instance.c.series_pk == series.c.id))
            .where(series.c.study_pk == study.c.id)
            .scalar_subquery()
        )
    return (
        sa.select(first)
        .select_from(
            instance.join(series, instance.c.series_pk == series.c.id).join(
                study, series.c.study_pk == study.c.id
            )
        )
        .where(study.c.patient_pk == patient.c.id)
        .scalar_subquery()
    )


def _select(level: str) -> tuple[Any, Any]:
    patient, study, series, instance = _tables()
    pk: Any
    if level == "PATIENT":
        cols = [patient]
        source: Any = patient
        pk = patient.c.id
    elif level == "STUDY":
        cols = [patient, study]
        source = study.join(patient, study.c.patient_pk == patient.c.id)
        pk = study.c.id
    elif level == "SERIES":
        cols = [patient, study, series]
        source = series.join(study, series.c.study_pk == study.c.id).join(
            patient, study.c.patient_pk == patient.c.id
        )
        pk = series.c.id
    else:
        cols = [patient, study, series, instance]
        source = (
            instance.join(series, instance.c.series_pk == series.c.id)
            .join(study, series.c.study_pk == study.c.id)
            .join(patient, study.c.patient_pk == patient.c.id)
        )
        pk = instance.c.id
    selected: list[Any] = [pk.label("qr_pk")]
    for table in cols:
        for col in table.c:
            if col.name in ("header", "header_json", "id"):
                continue
            selected.append(col.label(f"{table.name}__{col.name}"))
    if level == "IMAGE":
        selected.append(instance.c.sop_instance_uid.label("qr_representative"))
    else:
        selected.append(_representative(level).label("qr_representative"))
    return sa.select(*selected).select_from(source), pk


def candidates_page(
    conn: Connection, level: str, conditions: Iterable[Any], after: int, limit: int = PAGE
) -> list[Candidate]:
    stmt, pk = _select(level)
    stmt = stmt.where(pk > after, *conditions).order_by(pk).limit(limit)
    out: list[Candidate] = []
    for row in conn.execute(stmt).mappings():
        values = {k: v for k, v in row.items() if "__" in k}
        out.append(Candidate(int(row["qr_pk"]), values, row["qr_representative"]))
    return out


# Computed keys: (tag, VR, "table__column", integer?)
_COMPUTED: dict[str, tuple[tuple[int, str, str], ...]] = {
    "PATIENT": (
        (0x00201200, "IS", "patient__number_of_patient_related_studies"),
        (0x00201202, "IS", "patient__number_of_patient_related_series"),
        (0x00201204, "IS", "patient__number_of_patient_related_instances"),
    ),
    "STUDY": (
        (0x00201206, "IS", "study__number_of_study_related_series"),
        (0x00201208, "IS", "study__number_of_study_related_instances"),
        (0x00080061, "CS", "study__modalities_in_study"),
        (0x00080062, "UI", "study__sop_classes_in_study"),
    ),
    "SERIES": ((0x00201209, "IS", "series__number_of_series_related_instances"),),
    "IMAGE": (),
}


def entity_dataset(
    level: str, candidate: Candidate, header: Dataset | None, retrieve_ae: str
) -> Dataset:
    """What a candidate is matched against and answered from: the representative header,
    the index's values (they win for the level's own keys), the computed keys."""
    ds = header if header is not None else Dataset()
    for tag in [e.tag for e in ds if e.tag.group == 0x0002]:
        del ds[tag]
    depth = LEVELS.index(level)
    for lvl in LEVELS[: depth + 1]:
        for tag, vr, key in _COMPUTED[lvl]:
            value = candidate.values.get(key)
            if value is None or value == "":
                continue
            if vr in ("CS", "UI"):
                ds.add_new(tag, vr, str(value).split("\\"))
            else:
                ds.add_new(tag, vr, str(int(value)))
    # Indexed values the header lacks (or all of them when the header is unreadable).
    for table, keywords in _INDEXED:
        for keyword in keywords:
            value = candidate.values.get(f"{table}__{ix.column_name(keyword)}")
            if value is None or value == "" or keyword == "SpecificCharacterSet":
                continue
            tag = tag_for_keyword(keyword)
            if tag is None or tag in ds:
                continue
            vr = dictionary_VR(tag)
            text = str(value)
            parts: list[Any] = text.split("\\")
            if vr == "PN":
                parts = [PersonName(v) for v in parts]
            ds.add_new(tag, vr, parts if len(parts) > 1 else parts[0])
    ds.add_new(QUERY_LEVEL, "CS", level)
    ds.add_new(0x00080054, "AE", retrieve_ae)  # Retrieve AE Title
    ds.add_new(0x00080056, "CS", "ONLINE")  # Instance Availability
    return ds


@dataclass(frozen=True)
class StoredInstance:
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    path: str


def instances_for(
    conn: Connection, level: str, uids: dict[int, tuple[str, ...]]
) -> list[StoredInstance]:
    """The instances a C-MOVE/C-GET Identifier names (unique keys down to ``level``)."""
    patient, study, series, instance = _tables()
    source = (
        instance.join(series, instance.c.series_pk == series.c.id)
        .join(study, series.c.study_pk == study.c.id)
        .join(patient, study.c.patient_pk == patient.c.id)
    )
    stmt = sa.select(
        instance.c.sop_class_uid,
        instance.c.sop_instance_uid,
        instance.c.transfer_syntax_uid,
        instance.c.path,
    ).select_from(source)
    columns = {
        PATIENT_ID: patient.c.patient_id,
        STUDY_UID: study.c.study_instance_uid,
        SERIES_UID: series.c.series_instance_uid,
        SOP_UID: instance.c.sop_instance_uid,
    }
    for tag, values in uids.items():
        if values:
            stmt = stmt.where(columns[tag].in_(list(values)))
    stmt = stmt.order_by(study.c.id, series.c.id, instance.c.instance_number, instance.c.id)
    return [
        StoredInstance(r.sop_class_uid, r.sop_instance_uid, r.transfer_syntax_uid, r.path)
        for r in conn.execute(stmt)
    ]
