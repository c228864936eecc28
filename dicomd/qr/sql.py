"""Query/Retrieve reads of the archive index (SQLAlchemy Core, bound parameters only).

A C-FIND runs in two steps: SQL selects *candidates* at the query level using the keys the
index has columns for (necessary conditions only: PatientID, PatientName as a LIKE pattern
and, on SQLite, a prefix range an index serves, UIDs and UID lists, AccessionNumber,
Modality, ModalitiesInStudy, StudyDate ranges); each candidate's stored header (one
representative instance of the entity: the first indexed instance of its first series) plus
the computed keys of its row is then matched exactly (``dicomd.query.matching``).
Candidates are read page by page (keyset pagination on the level's primary key), so the
first answers go out before the whole result is known.

:func:`find_page` reads a page in two statements: the page's primary keys (through the
conditions' index on the first page, SQLite having no statistics to choose it), then their
rows with the representatives' header bytes. On SQLite both run as SQLite text on the
DBAPI cursor (the conditions carry it, see ``_qmark``): SQLAlchemy's statement cache key
costs more than SQLite takes for a small query. When every key of the query is a plain text
attribute, the values a candidate needs are picked straight out of its header bytes (no
pydicom data set is built) and the answer is written from those bytes, the bytes the
pydicom path gives (tests/test_qr_find_page.py compares them). Those answers are remembered
per query shape and candidate row (``MEMO_SIZE``): the same entity answered to the same
kind of query costs a look-up. A candidate whose needed values are not all ASCII (or whose
header is not little endian, is missing, or holds a value pydicom would rewrite) goes
through pydicom: decoded to Unicode, matched, answered in the query's character set.

Every read of an instance's stored header goes through :func:`stored_header` or
:func:`_header_of`, the places to adapt if the archive changes how headers are kept.
"""

from __future__ import annotations

import functools
import itertools
import struct
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.valuerep import PersonName
from sqlalchemy.engine import Connection
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import ColumnElement
from sqlalchemy.sql.visitors import InternalTraversal

from dicomd.archive import index as ix
from dicomd.archive.extract import (
    INSTANCE_KEYS,
    PATIENT_KEYS,
    SERIES_KEYS,
    STUDY_KEYS,
    decode_header,
    read_header,
)
from dicomd.logging import get_logger
from dicomd.query.charset import encode_answer
from dicomd.query.matching import (
    CompiledQuery,
    DateTimeKey,
    RangeKey,
    ValueKey,
    element_texts,
    flatten,
    text_values,
)
from dicomd.query.response import RawAnswer, build_answer, canonical
from dicomd.worklist.entry import decoded

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
_INDEXED = (
    ("patient", PATIENT_KEYS),
    ("study", STUDY_KEYS),
    ("series", SERIES_KEYS),
    ("instance", INSTANCE_KEYS),
)
PAGE = 200
# The first page of a C-FIND is short: its answers go out at once, and a C-CANCEL sent on
# seeing them is read before the next page's answers are.
FIRST_PAGE = 16

PATIENT_ID = 0x00100020
PATIENT_NAME = 0x00100010
STUDY_UID = 0x0020000D
SERIES_UID = 0x0020000E
SOP_UID = 0x00080018
QUERY_LEVEL = 0x00080052
SPECIFIC_CHARACTER_SET = 0x00080005
RETRIEVE_AE_TITLE = 0x00080054
INSTANCE_AVAILABILITY = 0x00080056

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
# Stored syntaxes whose header bytes are not explicit VR little endian (deflated ones have
# no header bytes in the index).
_NOT_EXPLICIT_LE = frozenset(
    {IMPLICIT_LE, "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95"}
)

log = get_logger("dicomd.qr")


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


class PrefixRange(ColumnElement[bool]):
    """``column`` starts with ``prefix`` (case-sensitively), as a range an index can serve.

    SQLite's LIKE ignores ASCII case, so it cannot use an ordinary index: on SQLite this
    renders ``column >= prefix AND column < prefix-successor`` (binary collation: byte
    order is code point order). Elsewhere it renders as true and the LIKE beside it does
    the work (a collation-aware range would not be exact there)."""

    inherit_cache = True
    type = sa.types.NullType()
    _traverse_internals = [
        ("column", InternalTraversal.dp_clauseelement),
        ("low", InternalTraversal.dp_clauseelement),
        ("high", InternalTraversal.dp_clauseelement),
    ]

    def __init__(self, column: Any, prefix: str) -> None:
        self.column = column
        self.low = sa.literal(prefix, sa.String())
        self.high = sa.literal(prefix[:-1] + chr(ord(prefix[-1]) + 1), sa.String())


@compiles(PrefixRange)
def _prefix_range_default(element: PrefixRange, compiler: Any, **kw: Any) -> str:
    return compiler.process(sa.true(), **kw)  # type: ignore[no-any-return]


@compiles(PrefixRange, "sqlite")
def _prefix_range_sqlite(element: PrefixRange, compiler: Any, **kw: Any) -> str:
    expr = sa.and_(element.column >= element.low, element.column < element.high)
    return compiler.process(expr, **kw)  # type: ignore[no-any-return]


class Unindexed(ColumnElement[Any]):
    """``column`` as an operand no index may serve: ``+column`` on SQLite, which then
    drives a query by its other conditions (without statistics, SQLite prefers walking
    the primary key in ORDER BY order and filtering, even past a selective date index)."""

    inherit_cache = True
    _traverse_internals = [("column", InternalTraversal.dp_clauseelement)]

    def __init__(self, column: Any) -> None:
        self.column = column
        self.type = column.type


@compiles(Unindexed)
def _unindexed_default(element: Unindexed, compiler: Any, **kw: Any) -> str:
    return compiler.process(element.column, **kw)  # type: ignore[no-any-return]


@compiles(Unindexed, "sqlite")
def _unindexed_sqlite(element: Unindexed, compiler: Any, **kw: Any) -> str:
    return "+" + compiler.process(element.column, **kw)


def _indexed_columns() -> frozenset[Any]:
    patient, study, series, instance = _tables()
    return frozenset(
        {
            patient.c.patient_id,
            study.c.study_instance_uid,
            study.c.accession_number,
            study.c.study_date,
            series.c.series_instance_uid,
            instance.c.sop_instance_uid,
        }
    )


def selective(conditions: Iterable[Any]) -> bool:
    """Whether one of ``conditions`` (from build_conditions) can be served by an index:
    a value list or range on an indexed column, or a Patient's Name prefix."""
    indexed = _indexed_columns()
    for cond in conditions:
        if isinstance(cond, PrefixRange):
            return True
        left = getattr(cond, "left", None)
        if left is not None and any(left is col for col in indexed):
            return True
    return False


def _literal_prefix(dicom_pattern: str) -> str:
    """The characters before the first wildcard of a DICOM pattern."""
    for i, ch in enumerate(dicom_pattern):
        if ch in "*?":
            return dicom_pattern[:i]
    return dicom_pattern


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
            col = columns[path[0]]
            listed = sorted(values)
            marks = ", ".join("?" * len(listed))
            conditions.append(_qmark(col.in_(listed), f"{_name(col)} IN ({marks})", listed))
        elif len(path) == 1 and path[0] == 0x00080061 and depth >= 1:  # ModalitiesInStudy
            col = study.c.modalities_in_study
            patterns = [
                (
                    v,
                    f"{_like_escape(v)}\\\\%",
                    f"%\\\\{_like_escape(v)}",
                    f"%\\\\{_like_escape(v)}\\\\%",
                )
                for v in sorted(values)
            ]
            one = (
                f"({_name(col)} = ? OR "
                + " OR ".join([f"{_name(col)} LIKE ? ESCAPE '\\'"] * 3)
                + ")"
            )
            conditions.append(
                _qmark(
                    sa.or_(
                        *(
                            sa.or_(
                                col == v,
                                col.like(starts, escape="\\"),
                                col.like(ends, escape="\\"),
                                col.like(inside, escape="\\"),
                            )
                            for v, starts, ends, inside in patterns
                        )
                    ),
                    "(" + " OR ".join([one] * len(patterns)) + ")",
                    [p for group in patterns for p in group],
                )
            )
    date_range = compiled.range_hints.get((0x00080020,))
    if date_range is not None and depth >= 1:
        low, high = date_range
        col = study.c.study_date
        if low:
            conditions.append(_qmark(col >= low, f"{_name(col)} >= ?", [low]))
        if high and high != "99999999":
            conditions.append(_qmark(col <= high, f"{_name(col)} <= ?", [high]))
    name = query.get(PATIENT_NAME)
    if name is not None and not fuzzy_names:
        texts = element_texts(name)
        if len(texts) == 1 and "=" not in texts[0] and texts[0] not in ("", "*"):
            col = patient.c.patient_name
            pattern = _like_pattern(texts[0])
            conditions.append(
                _qmark(
                    col.like(pattern, escape="\\"), f"{_name(col)} LIKE ? ESCAPE '\\'", [pattern]
                )
            )
            prefix = _literal_prefix(texts[0])
            if prefix:
                ranged = PrefixRange(col, prefix)
                conditions.append(
                    _qmark(
                        ranged,
                        f"{_name(col)} >= ? AND {_name(col)} < ?",
                        [ranged.low.value, ranged.high.value],
                    )
                )
    return conditions


def _name(column: Any) -> str:
    return f"{column.table.name}.{column.name}"


def _qmark(condition: Any, sql: str, params: Iterable[Any]) -> Any:
    """``condition`` carrying its SQLite text (qmark parameters) for find_page's direct
    path (SQLAlchemy's statement cache key costs more than SQLite runs a small query)."""
    condition._qr_qmark = (sql, tuple(params))
    return condition


def _representative(level: str) -> Any:
    """A correlated scalar subquery: the row id of the entity's representative instance,
    the first indexed instance of its first series (a few index look-ups, however many
    instances the entity has)."""
    patient, study, series, _instance = _tables()
    inst = ix.INSTANCE.alias("qr_rep_i")
    ser = ix.SERIES.alias("qr_rep_s")
    if level == "SERIES":
        series_pk: Any = series.c.id
        outer: Any = series
    elif level == "STUDY":
        series_pk = (
            sa.select(sa.func.min(ser.c.id))
            .where(ser.c.study_pk == study.c.id)
            .correlate(study)
            .scalar_subquery()
        )
        outer = study
    else:
        stu = ix.STUDY.alias("qr_rep_st")
        first_study = (
            sa.select(sa.func.min(stu.c.id))
            .where(stu.c.patient_pk == patient.c.id)
            .correlate(patient)
            .scalar_subquery()
        )
        series_pk = (
            sa.select(sa.func.min(ser.c.id))
            .where(ser.c.study_pk == first_study)
            .correlate(patient)
            .scalar_subquery()
        )
        outer = patient
    return (
        sa.select(inst.c.id)
        .where(inst.c.series_pk == series_pk)
        .order_by(inst.c.id)
        .limit(1)
        .correlate(outer)
        .scalar_subquery()
    )


@dataclass(frozen=True)
class _Select:
    stmt: Any
    pk: Any
    positions: dict[str, int]  # result label → column position
    level: str = ""
    labels: tuple[str, ...] | None = None


_REPRESENTATIVE_LABELS = (
    "qr_representative",
    "qr_header",
    "qr_header_json",
    "qr_transfer_syntax",
    "qr_path",
)


@functools.lru_cache(maxsize=8)
def _level_source(level: str) -> tuple[Any, Any, dict[str, Any], list[Any], Any]:
    """(FROM clause, primary key, {"table__column": column} of the level's rows and those
    above, the representative instance's columns labelled as _REPRESENTATIVE_LABELS, the
    FROM clause without the representative)."""
    patient, study, series, instance = _tables()
    pk: Any
    if level == "PATIENT":
        tables = [patient]
        source: Any = patient
        pk = patient.c.id
    elif level == "STUDY":
        tables = [patient, study]
        source = study.join(patient, study.c.patient_pk == patient.c.id)
        pk = study.c.id
    elif level == "SERIES":
        tables = [patient, study, series]
        source = series.join(study, series.c.study_pk == study.c.id).join(
            patient, study.c.patient_pk == patient.c.id
        )
        pk = series.c.id
    else:
        tables = [patient, study, series, instance]
        source = (
            instance.join(series, instance.c.series_pk == series.c.id)
            .join(study, series.c.study_pk == study.c.id)
            .join(patient, study.c.patient_pk == patient.c.id)
        )
        pk = instance.c.id
    columns = {
        f"{table.name}__{col.name}": col
        for table in tables
        for col in table.c
        if col.name not in ("header", "header_json", "id")
    }
    plain = source
    if level == "IMAGE":
        rep: Any = instance
    else:
        rep = ix.INSTANCE.alias("qr_rep")
        source = source.outerjoin(rep, rep.c.id == _representative(level))
    rep_columns = [
        rep.c.sop_instance_uid,
        rep.c.header,
        rep.c.header_json,
        rep.c.transfer_syntax_uid,
        rep.c.path,
    ]
    labelled = [c.label(n) for c, n in zip(rep_columns, _REPRESENTATIVE_LABELS, strict=True)]
    return source, pk, columns, labelled, plain


@functools.lru_cache(maxsize=256)
def _select_for(level: str, labels: tuple[str, ...] | None = None) -> _Select:
    """The candidate statement of a level (without WHERE), built once: its primary key, the
    row values named by ``labels`` ("table__column"; None: all of the level's rows and those
    above), and the representative instance's UID and stored header."""
    source, pk, columns, rep, _plain = _level_source(level)
    names = list(columns) if labels is None else list(labels)
    selected: list[Any] = [pk.label("qr_pk")]
    selected += [columns[name].label(name) for name in names]
    selected += rep
    positions = {name: i for i, name in enumerate(["qr_pk", *names, *_REPRESENTATIVE_LABELS])}
    return _Select(sa.select(*selected).select_from(source), pk, positions, level, labels)


@functools.lru_cache(maxsize=256)
def _qmark_select(level: str, labels: tuple[str, ...] | None) -> tuple[str, str, str]:
    """SQLite text, without WHERE, of the statements that read a page: its primary keys,
    then their candidate rows; and the primary key column."""
    from sqlalchemy.dialects import sqlite

    sel = _select_for(level, labels)
    dialect, literal = sqlite.dialect(), {"literal_binds": True}
    keys = sa.select(sel.pk).select_from(_level_source(level)[4])
    return (
        str(keys.compile(dialect=dialect, compile_kwargs=literal)),
        str(sel.stmt.compile(dialect=dialect, compile_kwargs=literal)),
        _name(sel.pk),
    )


def _first(row: Sequence[Any]) -> Any:
    return row[0]


def _select(level: str) -> tuple[Any, Any]:
    found = _select_for(level)
    return found.stmt, found.pk


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
    ds.add_new(RETRIEVE_AE_TITLE, "AE", retrieve_ae)
    ds.add_new(INSTANCE_AVAILABILITY, "CS", "ONLINE")
    return ds


# --- C-FIND pages -------------------------------------------------------------------------

# Attribute VRs whose values are text: the ones the raw path reads and writes.
_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC"}
    | {"UI", "UR", "UT"}
)
_TEXT_VR_NAMES = {vr.encode(): vr for vr in _TEXT_VRS}
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_EXPLICIT_HEAD = struct.Struct("<HH2sH")
_IMPLICIT_HEAD = struct.Struct("<HHI")
_ULONG = struct.Struct("<I")
_UNDEFINED = 0xFFFFFFFF


class _Slow(Exception):
    """This candidate needs the pydicom path."""


@functools.lru_cache(maxsize=1024)
def _dictionary_vr(tag: int) -> str | None:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return None


def _skip_undefined(buf: bytes, pos: int, explicit: bool) -> int:
    """Where a sequence (or other value) of undefined length that starts at ``pos`` ends."""
    from dicomd.archive.extract import _scan_items

    return _scan_items(buf, pos, len(buf), explicit, "<")


def scan_header(
    buf: bytes, explicit: bool, wanted: frozenset[int], last: int
) -> dict[int, tuple[bytes | None, int, int, int]]:
    """Where the top-level elements of little endian header bytes whose tags are in
    ``wanted`` are: ``{tag: (VR or None when implicit, element start, value start, value
    end)}``; stops after ``last``. Raises ValueError (or struct.error) on bytes that do not
    parse."""
    found: dict[int, tuple[bytes | None, int, int, int]] = {}
    pos, end = 0, len(buf)
    vr: bytes | None = None
    unpack = _EXPLICIT_HEAD.unpack_from if explicit else _IMPLICIT_HEAD.unpack_from
    while pos + 8 <= end:
        start = pos
        if explicit:
            group, element, vr, length = unpack(buf, pos)
            tag = group << 16 | element
            if tag > last or group == 0xFFFE:
                break
            if vr in _LONG_VRS:
                (length,) = _ULONG.unpack_from(buf, pos + 8)
                pos += 12
            else:
                pos += 8
        else:
            group, element, length = unpack(buf, pos)
            tag = group << 16 | element
            if tag > last or group == 0xFFFE:
                break
            pos += 8
        if length == _UNDEFINED:
            if tag in wanted:
                raise ValueError("a wanted element of undefined length")
            pos = _skip_undefined(buf, pos, explicit and vr != b"UN")
            continue
        if pos + length > end:
            raise ValueError("an element runs past the end of the header")
        if tag in wanted:
            found[tag] = (vr, start, pos, pos + length)
        pos += length
    return found


def _plain(text: str) -> bool:
    """ASCII without ISO 2022 escapes: reads the same in every DICOM character set."""
    return text.isascii() and "\x1b" not in text


_FIXED, _CONST, _ROW = 0, 1, 2


@dataclass(frozen=True)
class _RawPlan:
    """How the raw path answers one query: per answer element, in tag order, where its
    value comes from, in entity_dataset's order of precedence.

    ``layout`` entries: (tag, mode, element bytes (_FIXED, _CONST), the value's match texts
    (_CONST), computed key row position and VR, indexed column row position and VR, the
    element without a value, whether a matching key looks at it). _ROW: a computed key's
    row value, or else the header's element, or else an indexed column's value.
    """

    key: tuple[Any, ...]  # the query shape it was made for
    select: _Select  # the candidate statement with the row values the layout names
    layout: tuple[
        tuple[int, int, bytes, tuple[str, ...], int | None, str, int | None, str, bytes, bool],
        ...,
    ]
    header_tags: frozenset[int]
    last_tag: int  # the last tag to scan for (computed keys only when the row lacks them)
    answer: RawAnswer  # element writer


@functools.lru_cache(maxsize=8)
def _level_sources(
    level: str,
) -> tuple[dict[int, tuple[str, str]], dict[int, tuple[str, str]]]:
    """Of a level's candidate rows: {tag: ("table__column", VR)} of the computed keys, and
    of the indexed attributes (SpecificCharacterSet aside), as entity_dataset uses them."""
    columns = _level_source(level)[2]
    depth = LEVELS.index(level)
    computed: dict[int, tuple[str, str]] = {}
    for lvl in LEVELS[: depth + 1]:
        for tag, vr, column in _COMPUTED[lvl]:
            computed[tag] = (column, vr)
    indexed: dict[int, tuple[str, str]] = {}
    for table, keywords in _INDEXED[: depth + 1]:
        for keyword in keywords:
            tag = tag_for_keyword(keyword)
            label = f"{table}__{ix.column_name(keyword)}"
            if keyword == "SpecificCharacterSet" or tag is None or label not in columns:
                continue
            indexed.setdefault(tag, (label, str(dictionary_VR(tag))))
    return computed, indexed


def _raw_plan(
    level: str, query: Dataset, compiled: CompiledQuery, terms: Sequence[str],
    transfer_syntax: str, retrieve_ae: str,
) -> _RawPlan | None:  # fmt: skip
    """The raw path's plan, or None when the query needs the pydicom path (a sequence, a
    binary or numeric matching key, big endian answers)."""
    if transfer_syntax not in (EXPLICIT_LE, IMPLICIT_LE):
        return None
    keys: list[tuple[int, str]] = []
    for elem in query:
        tag = int(elem.tag)
        if tag == SPECIFIC_CHARACTER_SET or elem.tag.group in (0x0000, 0x0002):
            continue
        if elem.tag.element == 0:
            continue
        if elem.VR not in _TEXT_VRS:
            return None
        keys.append((tag, elem.VR))
    match_tags: list[int] = []
    for key in compiled.keys:
        if isinstance(key, ValueKey):
            if key.vr in ("IS", "DS"):
                return None
            match_tags.append(key.tag)
        elif isinstance(key, RangeKey):
            match_tags.append(key.tag)
        elif isinstance(key, DateTimeKey):
            match_tags += [key.tag, key.time_tag]
        else:
            return None
    return _plan_for(
        level,
        tuple(keys),
        tuple(dict.fromkeys(match_tags)),
        tuple(terms),
        transfer_syntax == IMPLICIT_LE,
        retrieve_ae,
    )


@functools.lru_cache(maxsize=1024)
def _plan_for(
    level: str,
    keys: tuple[tuple[int, str], ...],
    match_tags: tuple[int, ...],
    terms: tuple[str, ...],
    implicit: bool,
    retrieve_ae: str,
) -> _RawPlan | None:
    """The raw path's plan for one query shape (its keys and their VRs, the tags its
    matching keys look at, the character set terms, the answers' syntax, the AE)."""
    consts = {
        QUERY_LEVEL: ("CS", level.encode()),
        RETRIEVE_AE_TITLE: ("AE", retrieve_ae.encode("ascii", "replace")),
        INSTANCE_AVAILABILITY: ("CS", b"ONLINE"),
    }
    computed, indexed = _level_sources(level)
    key_tags = {t for t, _vr in keys}
    if not set(match_tags) <= key_tags:
        return None
    labels = tuple(
        sorted(
            {computed[t][0] for t in key_tags if t in computed and t not in consts}
            | {indexed[t][0] for t in key_tags if t in indexed and t not in consts}
        )
    )
    select = _select_for(level, labels)
    pos = select.positions
    charset = "\\".join(terms) if terms else None
    answer = RawAnswer(keys, charset, implicit=implicit)
    matched = set(match_tags)
    layout = []
    for tag, empty, fixed in answer.layout:
        if fixed:
            layout.append((tag, _FIXED, empty, (), None, "", None, "", empty, False))
        elif tag in consts:
            vr, value = consts[tag]
            elem = answer.element(tag, vr, value)
            texts = text_values(vr, value.decode("ascii"))
            layout.append((tag, _CONST, elem, texts, None, "", None, "", empty, tag in matched))
        else:
            c_pos, c_vr = (
                (pos[computed[tag][0]], computed[tag][1]) if tag in computed else (None, "")
            )
            i_pos, i_vr = (pos[indexed[tag][0]], indexed[tag][1]) if tag in indexed else (None, "")
            layout.append((tag, _ROW, b"", (), c_pos, c_vr, i_pos, i_vr, empty, tag in matched))
    header_tags = frozenset(t for t in key_tags if t not in consts)
    return _RawPlan(
        (level, keys, match_tags, terms, implicit, retrieve_ae),
        select,
        tuple(layout),
        header_tags,
        max((t for t in header_tags if t not in computed), default=0),
        answer,
    )


def _raw_answer(
    plan: _RawPlan, row: Sequence[Any], header: bytes, explicit: bool
) -> tuple[bytes, dict[int, Any]]:
    """The answer for one candidate from its row and header bytes, and the flat values its
    matching keys look at; raises _Slow when the pydicom path must decide."""
    element = plan.answer.element
    copy = explicit and not plan.answer.implicit  # header elements are copied as they are
    parts: list[bytes] = []
    flat: dict[int, Any] = {}
    try:
        fields = scan_header(header, explicit, plan.header_tags, plan.last_tag)
        for tag, mode, elem, texts, c_pos, c_vr, i_pos, i_vr, empty, match in plan.layout:
            if mode != _ROW:
                parts.append(elem)
                if match:
                    flat[tag] = texts
                continue
            vr = ""
            raw = b""
            if c_pos is not None:
                value = row[c_pos]
                if value is not None and value != "":
                    text = str(int(value)) if c_vr == "IS" else str(value)
                    if not text.isascii() or "\x1b" in text:
                        raise _Slow
                    vr, raw = c_vr, text.encode()
                elif tag > plan.last_tag:  # not scanned for: scan again, to the end
                    fields = scan_header(header, explicit, plan.header_tags, 0xFFFFFFFF)
            if not vr:
                found = fields.get(tag)
                if found is not None:
                    raw_vr, start, begin, end = found
                    raw = header[begin:end]
                    vr = _TEXT_VR_NAMES.get(raw_vr) if raw_vr is not None else _dictionary_vr(tag)
                    if vr not in _TEXT_VRS or not raw.isascii() or b"\x1b" in raw:
                        raise _Slow
                    value_bytes = canonical(vr, raw)
                    if value_bytes is None:
                        raise _Slow
                    if match:
                        flat[tag] = text_values(vr, raw.decode())
                    if copy and value_bytes == raw:
                        parts.append(header[start:end])
                    else:
                        parts.append(element(tag, vr, value_bytes))
                    continue
                elif i_pos is not None:
                    value = row[i_pos]
                    if value is not None and value != "":
                        text = str(value)
                        if not text.isascii() or "\x1b" in text:
                            raise _Slow
                        vr, raw = i_vr, text.encode()
            if not vr:
                parts.append(empty)
                continue
            parts.append(element(tag, vr, raw))
            if match:
                flat[tag] = text_values(vr, raw.decode())
    except (ValueError, UnicodeError, struct.error) as exc:
        raise _Slow from exc
    return b"".join(parts), flat


# Raw answers by (query shape, candidate row): the same entity answered to the same kind of
# query again costs a look-up. The row holds everything the answer depends on (the header
# bytes included), so an entry can never be stale; the oldest entries go first.
MEMO_SIZE = 8192
_memo: dict[tuple[Any, ...], tuple[bytes, dict[int, Any]] | None] = {}
_memo_lock = threading.Lock()
_MISSING = object()


def _memo_answer(
    plan: _RawPlan, row: Sequence[Any], header: bytes, explicit: bool
) -> tuple[bytes, dict[int, Any]] | None:
    """_raw_answer, remembered; None when the candidate needs the pydicom path."""
    key = (plan.key, tuple(row))
    found = _memo.get(key, _MISSING)
    if found is _MISSING:
        try:
            found = _raw_answer(plan, row, header, explicit)
        except _Slow:
            found = None
        with _memo_lock:
            if len(_memo) >= MEMO_SIZE:
                for old in list(itertools.islice(_memo, MEMO_SIZE // 8)):
                    _memo.pop(old, None)
            _memo[key] = found
    return found  # type: ignore[return-value]


@dataclass
class FindRequest:
    """One C-FIND as :func:`find_page` needs it, page after page."""

    level: str
    query: Dataset  # decoded, QueryRetrieveLevel included
    compiled: CompiledQuery
    conditions: list[Any]
    terms: list[str]  # the query's (0008,0005) terms
    transfer_syntax: str  # of the answers
    retrieve_ae: str
    root: Path
    raw: bool = True  # False: every candidate through pydicom (tests compare the two)
    _plan: _RawPlan | None = field(default=None, init=False, repr=False)
    _planned: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        self.selective = selective(self.conditions)

    def plan(self) -> _RawPlan | None:
        if not self._planned:
            self._planned = True
            if self.raw:
                self._plan = _raw_plan(
                    self.level, self.query, self.compiled, self.terms,
                    self.transfer_syntax, self.retrieve_ae,
                )  # fmt: skip
        return self._plan


def _header_of(row: Sequence[Any], pos: dict[str, int], root: Path) -> Dataset | None:
    """The representative's stored data set, decoded (None when there is none): from the
    header bytes in the row, the DICOM JSON of schema-2 rows, or the stored file."""
    if row[pos["qr_representative"]] is None:
        return None
    header = row[pos["qr_header"]]
    if header is not None:
        ds = decode_header(bytes(header), row[pos["qr_transfer_syntax"]])
    elif row[pos["qr_header_json"]]:
        ds = Dataset.from_json(row[pos["qr_header_json"]])
    else:
        ds = read_header(root / row[pos["qr_path"]])
    return decoded(ds)


def find_page(
    conn: Connection, request: FindRequest, after: int, limit: int | None = None
) -> tuple[int | None, list[bytes]]:
    """One page of a C-FIND: (the key to continue after, or None at the end; the encoded
    answers of the page's matches)."""
    if limit is None:
        limit = FIRST_PAGE if after == 0 else PAGE
    plan = request.plan()
    sel = plan.select if plan is not None else _select_for(request.level)
    # Two statements: the page's primary keys (the conditions' index serves the first page
    # when there is one; later pages, a large result, walk the primary key from where the
    # last page ended), then their rows and representatives' headers. Sorting keys only
    # keeps a broad first page cheap.
    unindexed = after == 0 and request.selective
    conditions = request.conditions
    if conn.dialect.name == "sqlite" and all(hasattr(c, "_qr_qmark") for c in conditions):
        keys_sql, rows_sql, pk_name = _qmark_select(sel.level, sel.labels)
        where = [f"{'+' if unindexed else ''}{pk_name} > ?"]
        params: list[Any] = [after]
        for cond in conditions:
            where.append(cond._qr_qmark[0])
            params += cond._qr_qmark[1]
        params.append(limit)
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            keys = [k for (k,) in cursor.execute(
                f"{keys_sql} WHERE {' AND '.join(where)} ORDER BY {pk_name} LIMIT ?", params
            )]  # fmt: skip
            rows: list[Any] = (
                cursor.execute(
                    f"{rows_sql} WHERE {pk_name} IN ({', '.join('?' * len(keys))})", keys
                ).fetchall()
                if keys
                else []
            )
        finally:
            cursor.close()
    else:
        pk = Unindexed(sel.pk) if unindexed else sel.pk
        keys_stmt = sa.select(sel.pk).select_from(_level_source(sel.level)[4])
        keys_stmt = keys_stmt.where(pk > after, *conditions).order_by(sel.pk).limit(limit)
        keys = list(conn.execute(keys_stmt).scalars())
        rows = list(conn.execute(sel.stmt.where(sel.pk.in_(keys))).fetchall()) if keys else []
    rows.sort(key=_first)
    pos = sel.positions
    compiled = request.compiled
    at_header, at_ts = pos["qr_header"], pos["qr_transfer_syntax"]
    out: list[bytes] = []
    for row in rows:
        header = row[at_header]
        if plan is not None and header is not None:
            ts = row[at_ts]
            if ts == IMPLICIT_LE or ts not in _NOT_EXPLICIT_LE:
                found = _memo_answer(plan, row, header, ts != IMPLICIT_LE)
                if found is not None:
                    if compiled.matches(found[1]):
                        out.append(found[0])
                    continue
        answer = _pydicom_candidate(conn, request, row[0], row if plan is None else None)
        if answer is not None:
            out.append(answer)
    more = len(keys) == limit
    return (int(keys[-1]) if more else None), out


def _pydicom_candidate(
    conn: Connection, request: FindRequest, pk: int, row: Sequence[Any] | None
) -> bytes | None:
    """The answer for one candidate through pydicom (None when it does not match); ``row``
    is its full candidate row, read here by primary key when None."""
    sel = _select_for(request.level)
    if row is None:
        row = conn.execute(sel.stmt.where(sel.pk == pk)).one()
    pos = sel.positions
    values = {k: row[i] for k, i in pos.items() if "__" in k}
    candidate = Candidate(int(pk), values, row[pos["qr_representative"]])
    try:
        stored_ds = _header_of(row, pos, request.root)
    except (OSError, ValueError) as exc:
        # Matched and answered from the index's values alone.
        log.warning(
            "qr_header_unreadable",
            sop_instance_uid=candidate.sop_instance_uid,
            error=str(exc) or repr(exc),
        )
        stored_ds = None
    stored = entity_dataset(request.level, candidate, stored_ds, request.retrieve_ae)
    if not request.compiled.matches(flatten(stored)):
        return None
    return encode_answer(
        build_answer(request.query, stored), request.terms, request.transfer_syntax
    )


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
    keys = tuple(tag for tag, values in uids.items() if values)
    params = {f"k{tag:08x}": list(uids[tag]) for tag in keys}
    return [StoredInstance(*row) for row in conn.execute(_instances_statement(keys), params)]


@functools.lru_cache(maxsize=16)
def _instances_statement(keys: tuple[int, ...]) -> sa.Select[Any]:
    """The statement for a set of unique keys, built once: every C-MOVE/C-GET of a study
    asks the same question with another UID, and building the joins again each time
    cost more than running the query (for a 25-instance study, ~0.5 ms of ~0.8 ms)."""
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
    for tag in keys:
        stmt = stmt.where(columns[tag].in_(sa.bindparam(f"k{tag:08x}", expanding=True)))
    return stmt.order_by(study.c.id, series.c.id, instance.c.instance_number, instance.c.id)
