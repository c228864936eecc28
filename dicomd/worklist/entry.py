"""One worklist entry, decoded and checked once when it is loaded.

Validation follows what DCMTK wlmscpfs checks with ``--enable-file-reject`` (the Return Key
Type 1 attributes of PS3.4 Table K.6-1), with a message per problem that names the
attribute, its tag, and where it is.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from dicomd.query.matching import Flat, flatten

SPS_SEQUENCE = 0x00400100

# (keyword, tag) of the Type 1 return keys inside the one Scheduled Procedure Step item.
_SPS_REQUIRED = (
    ("ScheduledStationAETitle", 0x00400001),
    ("ScheduledProcedureStepStartDate", 0x00400002),
    ("ScheduledProcedureStepStartTime", 0x00400003),
    ("Modality", 0x00080060),
    ("ScheduledProcedureStepID", 0x00400009),
)
_TOP_REQUIRED = (
    ("RequestedProcedureID", 0x00401001),
    ("StudyInstanceUID", 0x0020000D),
    ("PatientName", 0x00100010),
    ("PatientID", 0x00100020),
)


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _empty(ds: Dataset, tag: int) -> bool:
    elem = ds.get(tag)
    return elem is None or elem.value is None or elem.value == "" or elem.value == []


def _code_sequence_complete(ds: Dataset, tag: int) -> bool:
    elem = ds.get(tag)
    if elem is None or elem.VR != "SQ" or not elem.value:
        return False
    return all(not _empty(i, 0x00080100) and not _empty(i, 0x00080102) for i in elem.value)


def validate(ds: Dataset) -> list[str]:
    """Problems that make an entry incomplete (empty when it is complete)."""
    problems: list[str] = []
    sps = ds.get(SPS_SEQUENCE)
    if sps is None or sps.VR != "SQ":
        problems.append(f"ScheduledProcedureStepSequence {_tag(SPS_SEQUENCE)} is missing")
    elif len(sps.value) != 1:
        problems.append(
            f"ScheduledProcedureStepSequence {_tag(SPS_SEQUENCE)} has {len(sps.value)} items; "
            "it must have exactly one"
        )
    else:
        item = sps.value[0]
        where = "in ScheduledProcedureStepSequence item 1"
        for keyword, tag in _SPS_REQUIRED:
            if _empty(item, tag):
                problems.append(f"{keyword} {_tag(tag)} is missing or empty {where}")
        if _empty(item, 0x00400007) and not _code_sequence_complete(item, 0x00400008):
            problems.append(
                "ScheduledProcedureStepDescription (0040,0007) is empty and "
                f"ScheduledProtocolCodeSequence (0040,0008) is missing or incomplete {where}"
            )
    for keyword, tag in _TOP_REQUIRED:
        if _empty(ds, tag):
            problems.append(f"{keyword} {_tag(tag)} is missing or empty")
    if _empty(ds, 0x00321060) and not _code_sequence_complete(ds, 0x00321064):
        problems.append(
            "RequestedProcedureDescription (0032,1060) is empty and "
            "RequestedProcedureCodeSequence (0032,1064) is missing or incomplete"
        )
    for keyword, tag in (
        ("ReferencedStudySequence", 0x00081110),
        ("ReferencedPatientSequence", 0x00081120),
    ):
        elem = ds.get(tag)
        if elem is None or elem.VR != "SQ":
            continue  # type 2: an absent sequence is returned empty
        for n, item in enumerate(elem.value, 1):
            for sub, subtag in (
                ("ReferencedSOPClassUID", 0x00081150),
                ("ReferencedSOPInstanceUID", 0x00081155),
            ):
                if _empty(item, subtag):
                    problems.append(
                        f"{sub} {_tag(subtag)} is missing or empty in {keyword} item {n}"
                    )
    return problems


def decoded(ds: Dataset) -> Dataset:
    """``ds`` with every text value decoded to Unicode (in place) and no file meta.

    Person names keep no encoded bytes afterwards, so they are encoded afresh in whatever
    character set an answer uses. (pydicom's ``Dataset.decode()`` is not used: it garbles
    names that are already Unicode, as from DICOM JSON.)
    """
    for tag in [e.tag for e in ds if e.tag.group == 0x0002]:
        del ds[tag]
    _to_unicode(ds)
    return ds


def _to_unicode(ds: Dataset) -> None:
    for elem in ds:  # reading the value decodes it with the data set's character set
        if elem.VR == "SQ":
            for item in elem.value or ():
                _to_unicode(item)
        elif elem.VR == "PN" and elem.value is not None:
            value = elem.value
            if isinstance(value, MultiValue | list):
                elem.value = [PersonName(str(v)) for v in value]
            else:
                elem.value = PersonName(str(value))


@dataclass(eq=False)
class Entry:
    """A loaded entry: ``key`` names it (file name, or ``sql:<id>``)."""

    key: str
    dataset: Dataset
    flat: Flat
    problems: tuple[str, ...]
    answers: dict[Hashable, bytes] = field(default_factory=dict)  # encoded-answer cache

    @classmethod
    def load(cls, key: str, ds: Dataset) -> Entry:
        ds = decoded(ds)
        return cls(key, ds, flatten(ds), tuple(validate(ds)))

    @property
    def valid(self) -> bool:
        return not self.problems
