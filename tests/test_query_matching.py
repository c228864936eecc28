"""PS3.4 C.2.2.2 matching, character sets and answers, without a network."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from dicomd.query.charset import answer_charset, decode_identifier, encode_answer
from dicomd.query.matching import MatchOptions, QueryError, compile_query, flatten
from dicomd.query.response import build_answer


def stored(**kw: object) -> Dataset:
    ds = Dataset()
    sps = {k[4:]: v for k, v in kw.items() if k.startswith("sps_")}
    for key, value in kw.items():
        if not key.startswith("sps_"):
            setattr(ds, key, value)
    if sps:
        item = Dataset()
        for key, value in sps.items():
            setattr(item, key, value)
        ds.ScheduledProcedureStepSequence = [item]
    return ds


def matches(query: Dataset, entry: Dataset, **options: bool) -> bool:
    return compile_query(query, MatchOptions(**options)).matches(flatten(entry))


def q(**kw: object) -> Dataset:
    return stored(**kw)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("PatientName", "DOE^JOHN", True),
        ("PatientName", "DOE^JOHN^^", True),  # trailing empty components are not significant
        ("PatientName", "doe^john", False),  # literal matching is case-sensitive by default
        ("PatientName", "DOE*", True),
        ("PatientName", "D?E^J*", True),
        ("PatientName", "*", True),
        ("PatientName", "", True),
        ("PatientID", "P1", True),
        ("PatientID", "P", False),
        ("PatientID", "P?", True),
        ("StudyInstanceUID", "1.2.3\\1.2.4", True),  # list of UIDs
        ("StudyInstanceUID", "1.2.5\\1.2.6", False),
        ("StudyDate", "20240101-20240131", True),
        ("StudyDate", "-20231231", False),
        ("StudyDate", "20240115-", True),
        ("StudyDate", "20240115", True),
        ("StudyTime", "08-09", True),  # a partial upper bound covers its whole hour
        ("StudyTime", "0831-", False),
    ],
)
def test_single_keys(key: str, value: str, expected: bool) -> None:
    entry = stored(
        PatientName="DOE^JOHN",
        PatientID="P1",
        StudyInstanceUID="1.2.3",
        StudyDate="20240115",
        StudyTime="083000",
    )
    query = q(**{key: value})
    assert matches(query, entry, combined_datetime=False) is expected


def test_combined_date_time() -> None:
    entry = stored(
        sps_ScheduledProcedureStepStartDate="20240116", sps_ScheduledProcedureStepStartTime="0900"
    )

    def key(date: str, time: str) -> Dataset:
        return q(sps_ScheduledProcedureStepStartDate=date, sps_ScheduledProcedureStepStartTime=time)

    assert matches(key("20240115-20240116", "1000-1500"), entry)  # 15th 10:00 .. 16th 15:00
    assert not matches(key("20240115-20240116", "1000-1500"), entry, combined_datetime=False)
    assert not matches(key("20240116", "1000-1500"), entry)
    assert matches(key("20240116", "0800-0900"), entry)


def test_person_name_groups_and_fuzzy() -> None:
    entry = stored(PatientName="Yamada^Tarou=山田^太郎=やまだ^たろう")
    assert matches(q(PatientName="Yamada^Tarou"), entry)
    assert matches(q(PatientName="=山田^*"), entry)
    assert matches(q(PatientName="==やまだ^たろう"), entry)
    assert not matches(q(PatientName="=山本^*"), entry)
    accented = stored(PatientName="MÜLLER^Jürgen")
    assert not matches(q(PatientName="muller^jurgen"), accented)
    assert matches(q(PatientName="muller^jurgen"), accented, fuzzy_names=True)
    assert matches(q(PatientName="MÜ?LER*"), accented)


def test_sequence_matching() -> None:
    entry = Dataset()
    a, b = Dataset(), Dataset()
    a.Modality, a.ScheduledStationAETitle = "CT", ["CT1", "CT2"]
    b.Modality, b.ScheduledStationAETitle = "MR", "MR1"
    entry.ScheduledProcedureStepSequence = [a, b]
    assert matches(q(sps_Modality="MR"), entry)  # any item
    assert matches(q(sps_ScheduledStationAETitle="CT2"), entry)  # any value
    assert not matches(q(sps_Modality="MR", sps_ScheduledStationAETitle="CT1"), entry)
    universal = Dataset()
    universal.ScheduledProcedureStepSequence = []
    assert matches(universal, Dataset())  # universal sequence matching, even when absent
    empty_item = Dataset()
    empty_item.ScheduledProcedureStepSequence = [Dataset()]
    answer = build_answer(empty_item, entry)
    assert len(answer.ScheduledProcedureStepSequence) == 2
    assert answer.ScheduledProcedureStepSequence[1].Modality == "MR"  # whole items


def test_absent_value_matches_only_universal() -> None:
    assert not matches(q(PatientID="X"), stored(PatientName="A"))
    assert matches(q(PatientID=""), stored(PatientName="A"))


def test_bad_keys() -> None:
    with pytest.raises(QueryError) as info:
        compile_query(q(StudyDate="2024-01-01-02"))
    assert info.value.status == 0xA900
    two = q()
    two.ScheduledProcedureStepSequence = [Dataset(), Dataset()]
    with pytest.raises(QueryError):
        compile_query(two)
    with pytest.raises(QueryError) as info:
        decode_identifier(b"\x10\x00\x10\x00PN\x10\x00ab", "1.2.840.10008.1.2.1")
    assert info.value.status == 0xC000


def test_answer_only_asked_keys_and_charset() -> None:
    entry = stored(PatientName="Иванов^Иван", PatientID="P6", PatientSex="M")
    query = q(PatientName="", PatientID="", AccessionNumber="")
    answer = build_answer(query, entry)
    assert [e.keyword for e in answer] == ["AccessionNumber", "PatientName", "PatientID"]
    assert answer.AccessionNumber in ("", None)
    assert answer_charset(answer, []) == ["ISO_IR 192"]
    assert answer_charset(answer, ["ISO_IR 144"]) == ["ISO_IR 144"]
    assert answer_charset(answer, ["ISO_IR 100"]) == ["ISO_IR 192"]
    raw = encode_answer(answer, ["ISO_IR 144"], "1.2.840.10008.1.2.1")
    back = decode_identifier(raw, "1.2.840.10008.1.2.1")
    assert back.SpecificCharacterSet == "ISO_IR 144"
    assert str(back.PatientName) == "Иванов^Иван"
    ascii_answer = build_answer(query, stored(PatientName="A^B", PatientID="1"))
    assert answer_charset(ascii_answer, []) is None
