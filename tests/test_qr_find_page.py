"""C-FIND pages without a network: the raw path (answers written from the stored header
bytes) gives exactly the bytes of the pydicom path, for every level, matching type,
character set and transfer syntax; and the SQL reads the candidates it should."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pydicom.data
import pytest
import sqlalchemy as sa
from pydicom.dataset import Dataset

from dicomd.archive import index as ix
from dicomd.archive.extract import instance_from_bytes
from dicomd.qr import sql as qsql
from dicomd.query.charset import charset_terms, decode_identifier, encode_dataset
from dicomd.query.matching import MatchOptions, compile_query, text_values

EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
CT = "1.2.840.10008.5.1.4.1.1.2"
ROOT = "1.2.826.0.1.3680043.9.7779"


def _charset_name(filename: str) -> tuple[str, Any]:
    ds = pydicom.dcmread(pydicom.data.get_charset_files(filename)[0])
    return str(ds.PatientName), ds.SpecificCharacterSet


def _instances() -> Iterator[tuple[Dataset, str]]:
    """(data set, transfer syntax it is stored in)."""
    jp_name, jp_cs = _charset_name("chrH31.dcm")
    fr_name, fr_cs = _charset_name("chrFren.dcm")
    patients = [
        ("PID1", "DOE^JOHN", None),
        ("PID2", "DOE^JANE^^DR", None),
        ("PID3", "doe^lower", None),
        ("PID4", "SMITH^ANNA=SMITH^ANNA", None),
        ("PIDJP", jp_name, jp_cs),
        ("PIDFR", fr_name, fr_cs),
    ]
    n = 0
    for p, (pid, name, charset) in enumerate(patients):
        for s in range(2):
            study = f"{ROOT}.{p}.{s}"
            for k, modality in enumerate(("CT", "MR")[: 1 + s]):
                for i in range(2):
                    n += 1
                    ds = Dataset()
                    if charset:
                        ds.SpecificCharacterSet = charset
                    ds.SOPClassUID = CT
                    ds.SOPInstanceUID = f"{study}.{k}.{i}"
                    ds.StudyDate = f"2024{1 + p:02d}{10 + s:02d}"
                    ds.StudyTime = f"{9 + s:02d}3000"
                    ds.AccessionNumber = f"A{p}{s}" if n % 5 else ""
                    ds.Modality = modality
                    if s == 0:
                        ds.StudyDescription = "Head \\ neck" if p == 0 else f"Study {p}"
                    ds.ReferringPhysicianName = "REF^ONE" if p % 2 else ""
                    ds.PatientName = name
                    ds.PatientID = pid
                    ds.PatientBirthDate = "19700101"
                    ds.PatientSex = "MF"[p % 2]
                    ds.StudyInstanceUID = study
                    ds.SeriesInstanceUID = f"{study}.{k}"
                    ds.StudyID = str(s + 1)
                    ds.SeriesNumber = k + 1
                    ds.InstanceNumber = i + 1
                    ds.ImageComments = f"image {n}"
                    ds.ImageType = ["ORIGINAL", "PRIMARY"]
                    ds.Rows = ds.Columns = 2
                    if p == 1:
                        item = Dataset()
                        item.CodeValue = "X"
                        ds.ProcedureCodeSequence = [item]
                    ds.BitsAllocated = 8
                    ds.PixelData = b"\0" * 4
                    # Stored in several syntaxes: implicit and big endian headers too.
                    ts = (EXPLICIT, IMPLICIT, EXPLICIT, BIG_ENDIAN)[n % 4]
                    yield ds, ts


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sa.Engine]:
    tmp = tmp_path_factory.mktemp("findpage")
    engine = ix.create_index_engine(f"sqlite:///{tmp / 'index.sqlite'}", durable=False)
    ix.migrate(engine)
    with engine.connect() as conn:
        for ds, ts in _instances():
            data = encode_dataset(ds, ts)
            info = instance_from_bytes(data, ts)
            assert info.header is not None
            record = ix.InstanceRecord(info, f"x/{ds.SOPInstanceUID}", len(data), "0", ts)
            ix.add_instances(conn, [record])
        conn.commit()
    yield engine
    engine.dispose()


def _query(level: str, charset: Any = None, **keys: Any) -> Dataset:
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def _pages(
    engine: sa.Engine,
    query: Dataset,
    ts: str,
    *,
    raw: bool,
    fuzzy: bool = False,
    page: int = 3,
    direct: bool = True,
) -> list[bytes]:
    """The answers, page by page; ``raw``: the raw path where it applies; ``direct``: the
    candidate SQL as SQLite text (else through SQLAlchemy)."""
    decoded = decode_identifier(encode_dataset(query, EXPLICIT), EXPLICIT)
    level = str(decoded.QueryRetrieveLevel)
    match_query = Dataset()
    for elem in decoded:
        if elem.tag != qsql.QUERY_LEVEL:
            match_query.add(elem)
    compiled = compile_query(match_query, MatchOptions(fuzzy_names=fuzzy))
    conditions = qsql.build_conditions(level, decoded, compiled, fuzzy_names=fuzzy)
    if not direct:
        for condition in conditions:
            del condition._qr_qmark
    request = qsql.FindRequest(
        level, decoded, compiled, conditions, charset_terms(decoded), ts, "DICOMD",
        Path("/nonexistent"), raw=raw,
    )  # fmt: skip
    out: list[bytes] = []
    after: int | None = 0
    with engine.connect() as conn:
        while after is not None:
            after, answers = qsql.find_page(conn, request, after, limit=page)
            out += answers
    return out


STUDY_KEYS = dict(
    PatientName="", PatientID="", PatientBirthDate="", PatientSex="", StudyDate="",
    StudyTime="", AccessionNumber="", StudyID="", StudyInstanceUID="", StudyDescription="",
    ReferringPhysicianName="", ModalitiesInStudy="", NumberOfStudyRelatedSeries="",
    NumberOfStudyRelatedInstances="", RetrieveAETitle="", InstanceAvailability="",
    Occupation="", ImageComments="",
)  # fmt: skip

QUERIES: list[tuple[str, dict[str, Any], int | None]] = [
    ("STUDY", {}, 12),
    ("STUDY", {"PatientID": "PID1"}, 2),
    ("STUDY", {"PatientID": "PID9"}, 0),
    ("STUDY", {"PatientName": "DOE*"}, 4),
    ("STUDY", {"PatientName": "DOE^J*"}, 4),
    ("STUDY", {"PatientName": "D?E^JOHN"}, 2),
    ("STUDY", {"PatientName": "*OE*"}, 4),
    ("STUDY", {"PatientName": "DOE^JANE^^DR^"}, 2),
    ("STUDY", {"PatientName": "SMITH^ANNA"}, 2),
    ("STUDY", {"PatientName": "=SMITH*"}, None),
    ("STUDY", {"StudyDate": "20240101-20240301"}, 4),
    ("STUDY", {"StudyDate": "-20240111"}, 2),
    ("STUDY", {"StudyDate": "20240111", "StudyTime": "100000-"}, 1),
    ("STUDY", {"StudyDate": "20240110-20240611", "StudyTime": "-100000"}, None),
    ("STUDY", {"ModalitiesInStudy": "MR"}, 6),
    ("STUDY", {"AccessionNumber": "A1*"}, None),
    ("STUDY", {"StudyDescription": "Head \\ neck"}, None),
    ("STUDY", {"ReferringPhysicianName": "REF*"}, None),
    ("STUDY", {"StudyInstanceUID": [f"{ROOT}.0.0", f"{ROOT}.3.1", f"{ROOT}.9.9"]}, 2),
    ("STUDY", {"InstanceAvailability": "ONLINE"}, 12),
    ("STUDY", {"InstanceAvailability": "OFFLINE"}, 0),
    ("STUDY", {"Occupation": "*"}, 12),
    ("STUDY", {"ImageComments": "image 1"}, 1),
    ("STUDY", {"NumberOfStudyRelatedInstances": "4"}, None),
]


@pytest.mark.parametrize("answer_ts", [EXPLICIT, IMPLICIT, BIG_ENDIAN])
@pytest.mark.parametrize(("level", "keys", "expected"), QUERIES)
def test_raw_answers_equal_pydicom_answers(
    engine: sa.Engine, level: str, keys: dict[str, Any], expected: int | None, answer_ts: str
) -> None:
    query = _query(level, **(STUDY_KEYS | keys))
    raw = _pages(engine, query, answer_ts, raw=True)
    slow = _pages(engine, query, answer_ts, raw=False, direct=False)
    assert raw == slow
    assert _pages(engine, query, answer_ts, raw=True, page=200, direct=False) == raw
    if expected is not None:
        assert len(raw) == expected


@pytest.mark.parametrize(
    ("charset", "keys"),
    [
        ("ISO_IR 100", {"PatientName": "*"}),
        ("ISO_IR 192", {"PatientID": "PIDFR"}),
        (["", "ISO 2022 IR 87"], {}),
        ("ISO_IR 100", {"PatientName": "Buc*"}),
    ],
)
def test_character_sets(engine: sa.Engine, charset: Any, keys: dict[str, Any]) -> None:
    query = _query("STUDY", charset, **(STUDY_KEYS | keys))
    raw = _pages(engine, query, EXPLICIT, raw=True)
    assert raw == _pages(engine, query, EXPLICIT, raw=False)
    assert raw


def test_fuzzy_names(engine: sa.Engine) -> None:
    query = _query("STUDY", **(STUDY_KEYS | {"PatientName": "doe*"}))
    raw = _pages(engine, query, EXPLICIT, raw=True, fuzzy=True)
    assert raw == _pages(engine, query, EXPLICIT, raw=False, fuzzy=True)
    assert len(raw) == 6  # DOE^JOHN, DOE^JANE, doe^lower
    assert len(_pages(engine, query, EXPLICIT, raw=True)) == 2  # literal: doe^lower only


@pytest.mark.parametrize(
    ("level", "keys"),
    [
        ("PATIENT", dict(PatientName="", PatientID="", NumberOfPatientRelatedStudies="",
                         NumberOfPatientRelatedInstances="", PatientBirthDate="19700101")),
        ("PATIENT", dict(PatientName="DOE*", PatientID="", StudyDescription="")),
        ("SERIES", dict(StudyInstanceUID=f"{ROOT}.1.1", SeriesInstanceUID="", Modality="",
                        SeriesNumber="", NumberOfSeriesRelatedInstances="", ImageComments="")),
        ("SERIES", dict(StudyInstanceUID=f"{ROOT}.2.1", Modality="MR", SeriesDescription="")),
        ("SERIES", dict(StudyInstanceUID=f"{ROOT}.1.0", SeriesNumber="1")),
        ("IMAGE", dict(StudyInstanceUID=f"{ROOT}.1.1", SeriesInstanceUID=f"{ROOT}.1.1.1",
                       SOPInstanceUID="", InstanceNumber="", ImageComments="", ImageType="",
                       SOPClassUID="")),
        ("IMAGE", dict(StudyInstanceUID=f"{ROOT}.4.1", SeriesInstanceUID=f"{ROOT}.4.1.0",
                       SOPInstanceUID="", ProcedureCodeSequence=[], Rows="")),
        ("STUDY", dict(PatientID="PID2", StudyInstanceUID="", ProcedureCodeSequence=[])),
    ],
)  # fmt: skip
def test_other_levels_and_keys(engine: sa.Engine, level: str, keys: dict[str, Any]) -> None:
    query = _query(level, **keys)
    for ts in (EXPLICIT, IMPLICIT):
        raw = _pages(engine, query, ts, raw=True)
        assert raw == _pages(engine, query, ts, raw=False, direct=False)
        assert raw


def test_text_values_as_element_texts() -> None:
    from pydicom.dataelem import DataElement

    from dicomd.query.matching import element_texts

    cases = [
        ("PN", "DOE^JOHN^^^ "), ("PN", "A^B=C^D=="), ("PN", "X\\Y "), ("CS", " CT \\MR "),
        ("DA", "2024.01.02"), ("TM", "10:30:00 "), ("LO", "  a\\b  "), ("LT", "  a\\b  "),
        ("UC", " x\\ y "), ("UI", "1.2.3\0"), ("SH", "   "), ("LO", ""), ("ST", " t "),
    ]  # fmt: skip
    for vr, text in cases:
        elem = DataElement(0x00100010 if vr == "PN" else 0x00080050, vr, text)
        if vr != "PN":
            elem = DataElement(0x00099999, vr, text)
        assert text_values(vr, text) == element_texts(elem), (vr, text)


def test_date_range_query_uses_the_date_index(engine: sa.Engine) -> None:
    """Without statistics SQLite would walk the study table in primary key order; the
    first page of a selective query goes through the index instead."""
    query = _query("STUDY", StudyDate="20240101-20240131", StudyInstanceUID="")
    decoded = decode_identifier(encode_dataset(query, EXPLICIT), EXPLICIT)
    match_query = Dataset()
    for elem in decoded:
        if elem.tag != qsql.QUERY_LEVEL:
            match_query.add(elem)
    conditions = qsql.build_conditions(
        "STUDY", decoded, compile_query(match_query), fuzzy_names=False
    )
    assert qsql.selective(conditions)
    keys_sql, _rows_sql, pk = qsql._qmark_select("STUDY", None)
    where = " AND ".join([f"+{pk} > ?"] + [c._qr_qmark[0] for c in conditions])
    params = [0] + [p for c in conditions for p in c._qr_qmark[1]]
    with engine.connect() as conn:
        plan = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {keys_sql} WHERE {where}", tuple(params))
        assert any("ix_study_date" in str(row) for row in plan)


def test_remembered_answers_follow_the_index(
    engine: sa.Engine, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Answers are remembered by candidate row: a study that gains an instance is answered
    with its new counts (its row changed), not from the memo."""
    query = _query("STUDY", **(STUDY_KEYS | {"PatientID": "PID4"}))
    before = _pages(engine, query, EXPLICIT, raw=True)
    ds = next(
        d
        for d, _ts in _instances()
        if d.PatientID == "PID4" and d.SeriesInstanceUID.endswith(".0.0")
    )
    ds.SOPInstanceUID = f"{ds.SOPInstanceUID}.99"
    data = encode_dataset(ds, EXPLICIT)
    with engine.connect() as conn:
        info = instance_from_bytes(data, EXPLICIT)
        ix.add_instances(conn, [ix.InstanceRecord(info, "x/new", len(data), "0", EXPLICIT)])
        conn.commit()
    try:
        after = _pages(engine, query, EXPLICIT, raw=True)
        assert after == _pages(engine, query, EXPLICIT, raw=False, direct=False)
        assert after != before
        numbers = [decode_identifier(a, EXPLICIT).NumberOfStudyRelatedInstances for a in after]
        assert sorted(int(n) for n in numbers) == [3, 4]  # was 2 and 4
    finally:
        with engine.connect() as conn:
            row = conn.execute(
                sa.select(ix.INSTANCE.c.id).where(
                    ix.INSTANCE.c.sop_instance_uid == ds.SOPInstanceUID
                )
            ).one()
            ix.remove_instance(conn, row.id)
            conn.commit()


def test_plain_candidates_take_the_raw_path(
    engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only candidates the raw path cannot answer exactly go through pydicom: a header in
    big endian, non-ASCII values (the Japanese and French names), a value pydicom would
    rewrite ("Head \\ neck")."""
    slow: list[int] = []
    original = qsql._pydicom_candidate

    def counting(*args: Any) -> bytes | None:
        slow.append(args[2])
        return original(*args)

    monkeypatch.setattr(qsql, "_pydicom_candidate", counting)
    query = _query("STUDY", **STUDY_KEYS)
    answers = _pages(engine, query, EXPLICIT, raw=True)
    assert len(answers) == 12
    with engine.connect() as conn:
        reps = conn.execute(
            sa.select(ix.STUDY.c.id, ix.INSTANCE.c.transfer_syntax_uid, ix.PATIENT.c.patient_id)
            .join(ix.PATIENT, ix.STUDY.c.patient_pk == ix.PATIENT.c.id)
            .join(ix.SERIES, ix.SERIES.c.study_pk == ix.STUDY.c.id)
            .join(ix.INSTANCE, ix.INSTANCE.c.series_pk == ix.SERIES.c.id)
            .order_by(ix.STUDY.c.id, ix.SERIES.c.id, ix.INSTANCE.c.id)
        ).all()
    first: dict[int, tuple[str, str]] = {}
    for study, ts, pid in reps:
        first.setdefault(study, (ts, pid))
    expected = {
        study
        for study, (ts, pid) in first.items()
        if ts == BIG_ENDIAN or pid in ("PIDJP", "PIDFR") or (pid == "PID1" and study == 1)
    }
    assert set(slow) == expected
    assert len(slow) < len(answers)


TEXT_VRS = (
    "AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI",
    "UR", "UT",
)  # fmt: skip


@pytest.mark.parametrize("vr", TEXT_VRS)
def test_canonical_values_are_what_pydicom_writes_back(vr: str) -> None:
    """response.canonical (the raw path's copy of a stored value) against pydicom reading
    the value and writing it back, over generated values with padding, spaces, NULs,
    delimiters and component groups; None means the raw path leaves the value to pydicom."""
    import itertools
    import random
    import warnings

    from pydicom.dataelem import RawDataElement, convert_raw_data_element
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    from dicomd.query.response import _fresh, canonical

    alphabet = [b"A", b"1", b" ", b"\\", b"\0", b"^", b".", b"="]
    values = {b"".join(t) for n in range(5) for t in itertools.product(alphabet, repeat=n)}
    rng = random.Random(5)
    values |= {
        b"".join(rng.choice(alphabet) for _ in range(rng.randint(5, 12))) for _ in range(400)
    }
    tag = 0x00091010  # private: the VR is the one given
    checked = 0
    for raw in sorted(values):
        if len(raw) % 2:
            continue
        expected = canonical(vr, raw)
        if expected is None:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                elem = convert_raw_data_element(
                    RawDataElement(tag, vr, len(raw), raw, 0, False, True)
                )
                out = Dataset()
                out.add(_fresh(elem))
                fp = DicomBytesIO()
                fp.is_implicit_VR, fp.is_little_endian = True, True
                write_dataset(fp, out)
            except (ValueError, TypeError):
                continue  # a value pydicom refuses (a DS of letters): nothing to compare
        assert fp.getvalue()[8:] == expected, (vr, raw)
        checked += 1
    assert checked > 50


@pytest.mark.parametrize(
    "keys",
    [
        {0x00100020: ("PID2",)},
        {0x00100020: ("PID1", "PIDJP", "NOSUCH")},
        {0x0020000D: (f"{ROOT}.1.1", f"{ROOT}.4.0")},
        {0x00100020: ("PID1",), 0x0020000D: (f"{ROOT}.0.1",)},
        {0x0020000D: (f"{ROOT}.3.1",), 0x0020000E: (f"{ROOT}.3.1.1",)},
        {0x0020000E: (f"{ROOT}.0.0", f"{ROOT}.5.1.1")},
        {0x00080018: (f"{ROOT}.2.1.1.0", f"{ROOT}.2.0.0.1", f"{ROOT}.9.9.9.9")},
        # A key whose values are empty is no condition (relational retrieval).
        {0x00100020: (), 0x0020000D: (f"{ROOT}.2.0",)},
    ],
)
def test_instances_for_retrieve(engine: sa.Engine, keys: dict[int, tuple[str, ...]]) -> None:
    """C-MOVE/C-GET's instance list: what the unique keys name, in study, series and
    instance-number order, whatever set of keys and however many values each; the same
    statement serves later calls with other values."""
    keywords = {
        0x00100020: "PatientID",
        0x0020000D: "StudyInstanceUID",
        0x0020000E: "SeriesInstanceUID",
        0x00080018: "SOPInstanceUID",
    }
    expected = sorted(
        (
            (str(ds.StudyInstanceUID), int(ds.SeriesNumber), int(ds.InstanceNumber)),
            str(ds.SOPInstanceUID),
        )
        for ds, _ in _instances()
        if all(not values or str(ds[keywords[tag]].value) in values for tag, values in keys.items())
    )
    for _ in range(2):
        with engine.connect() as conn:
            found = qsql.instances_for(conn, "IMAGE", keys)
        assert [i.sop_instance_uid for i in found] == [uid for _, uid in expected]
        assert all(i.path == f"x/{i.sop_instance_uid}" and i.sop_class_uid == CT for i in found)
