"""What the index needs from a stored instance, read from its data set bytes.

Never decode what you only store (DESIGN.md): a hand-written scanner walks the top level of
the data set once (explicit VR little endian, implicit VR little endian, explicit VR big
endian), checks that every element and item fits and every undefined length is terminated,
and picks out only the few values the index keeps. Text values are decoded with the
instance's Specific Character Set; pure-ASCII values of the plain string VRs are decoded
here, everything else (non-ASCII text, person names, IS/DS numbers) by pydicom's own value
converters, so the results are pydicom's. A deflated data set, or a value the scanner cannot
decode, falls back to pydicom's reader for the values.

Instead of a decoded copy of the header, the index keeps the header *bytes*: the data set as
received up to its pixel data (in the instance's own transfer syntax), at most
``HEADER_MAX`` bytes. ``decode_header`` turns them into a pydicom ``Dataset`` when a query
needs an attribute the columns lack; without them (a larger header, a deflated data set)
the stored file is read instead (``read_header``).
"""

from __future__ import annotations

import io
import mmap
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.valuerep import PersonName
from pydicom.values import convert_value

# pydicom both logs and warns about what it tolerates in a data set; the log is enough.
warnings.filterwarnings("ignore", module=r"pydicom(\..*)?$")

# Attributes kept in columns, by level (everything dcmqrscp can query, and a few more).
PATIENT_KEYS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "OtherPatientIDs",
    "OtherPatientNames",
    "EthnicGroup",
    "PatientComments",
)
STUDY_KEYS = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
    "StudyDescription",
    "NameOfPhysiciansReadingStudy",
    "AdmittingDiagnosesDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "Occupation",
    "AdditionalPatientHistory",
)
SERIES_KEYS = (
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "SeriesDate",
    "SeriesTime",
    "BodyPartExamined",
)
INSTANCE_KEYS = (
    "SOPInstanceUID",
    "SOPClassUID",
    "InstanceNumber",
    "ContentDate",
    "ContentTime",
    "NumberOfFrames",
    "SpecificCharacterSet",
)
ALL_KEYS = (*PATIENT_KEYS, *STUDY_KEYS, *SERIES_KEYS, *INSTANCE_KEYS)

# The index keeps a header of at most this many bytes (else the file is read on demand).
HEADER_MAX = 64 * 1024

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED = frozenset({"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95"})


class UndecodableDataset(ValueError):
    """The data set cannot be parsed (PS3.4 B.2.3: Error, Cannot understand, Cxxx)."""


class _NeedPydicom(Exception):
    """A value the scanner does not decode itself: let pydicom read the values."""


@dataclass
class InstanceInfo:
    """Index values of one instance; ``values`` maps keywords to decoded strings (or None).

    ``header`` is the data set up to its pixel data as received (None when longer than
    ``HEADER_MAX`` or deflated): what ``decode_header`` turns back into a data set.
    """

    values: dict[str, str | None]
    header: bytes | None = None
    sop_instance_uid: str = ""
    sop_class_uid: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def get(self, keyword: str) -> str | None:
        return self.values.get(keyword)


def _to_text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, MultiValue | list | tuple):
        parts = [_to_text(v) or "" for v in value]
        text = "\\".join(parts)
        return text or None
    if isinstance(value, PersonName):
        return str(value) or None
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip() or None
    return str(value).strip() or None


def _value(ds: Dataset, keyword: str) -> str | None:
    try:
        elem = ds.data_element(keyword)
    except (KeyError, ValueError):
        return None
    if elem is None:
        return None
    try:
        return _to_text(elem.value)
    except Exception:
        return None


# --- the scanner ---------------------------------------------------------------------------

_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_SHORT_VRS = frozenset(
    {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN"}
    | {b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
)
_ITEM, _ITEM_END, _SEQ_END = 0xE000, 0xE00D, 0xE0DD
UNDEFINED = 0xFFFFFFFF

# tag → (keyword, dictionary VR) of every value the index keeps.
INDEX_TAGS: dict[int, tuple[str, str]] = {
    int(tag_for_keyword(kw) or 0): (kw, str(dictionary_VR(kw))) for kw in ALL_KEYS
}
_CHARSET_TAG = 0x00080005
# VRs whose pure-ASCII values are decoded here, split on '\' as pydicom does: string VRs
# lose trailing padding as a whole, text VRs per value; then every value is stripped.
_STRING_VRS = frozenset({"AS", "CS", "DA", "DT", "TM", "UI"})
_TEXT_SPLIT_VRS = frozenset({"SH", "LO", "UC"})
_SPLIT_VRS = _STRING_VRS | _TEXT_SPLIT_VRS
# Text VRs of one value (backslash is no delimiter).
_SINGLE_VRS = frozenset({"LT", "ST", "UT", "UR"})
# Numbers: pure-ASCII values made only of these characters read the same as pydicom's
# IS / DS objects print; anything else (IS "1.0", DS "NaN", ...) goes to pydicom.
_NUMBER_CHARS = {"IS": frozenset(b"0123456789+- \\"), "DS": frozenset(b"0123456789+-.eE \\")}
_TEXT_VRS = _SPLIT_VRS | _SINGLE_VRS | {"PN", "IS", "DS"}

_STRUCTS = {
    fmt: (
        struct.Struct(fmt + "HH2sH"),
        struct.Struct(fmt + "HHI"),
        struct.Struct(fmt + "I"),
        struct.Struct(fmt + "HH"),
    )
    for fmt in ("<", ">")
}


def _scan_elements(buf: Any, pos: int, end: int, explicit: bool, fmt: str) -> int:
    """Walk elements from ``pos``; returns where a (FFFE,xxxx) delimiter or the end is."""
    short, implicit_hdr, ulong, _ = _STRUCTS[fmt]
    while pos < end:
        if pos + 8 > end:
            raise UndecodableDataset(f"truncated element header at byte {pos}")
        if explicit:
            group, element, vr, length = short.unpack_from(buf, pos)
            if group == 0xFFFE:
                return pos
            is_un = False
            if vr in _LONG_VRS:
                if pos + 12 > end:
                    raise UndecodableDataset(f"truncated element header at byte {pos}")
                (length,) = ulong.unpack_from(buf, pos + 8)
                pos += 12
                is_un = vr == b"UN"
            elif vr.isalpha() and vr.isupper():
                pos += 8
            else:
                raise UndecodableDataset(
                    f"invalid VR {vr!r} in ({group:04X},{element:04X}) at byte {pos}"
                )
        else:
            group, element, length = implicit_hdr.unpack_from(buf, pos)
            if group == 0xFFFE:
                return pos
            is_un = False
            pos += 8
        if length == UNDEFINED:
            # A sequence or encapsulated pixel data; UN of undefined length is implicit VR.
            pos = _scan_items(buf, pos, end, explicit and not is_un, "<" if is_un else fmt)
        elif pos + length > end:
            raise UndecodableDataset(
                f"({group:04X},{element:04X}) of length {length} runs past the end of the data"
            )
        else:
            pos += length
    return pos


def _scan_items(buf: Any, pos: int, end: int, explicit: bool, fmt: str) -> int:
    implicit_hdr = _STRUCTS[fmt][1]
    tag_hdr = _STRUCTS[fmt][3]
    while True:
        if pos + 8 > end:
            raise UndecodableDataset("a sequence of undefined length is not terminated")
        group, element, length = implicit_hdr.unpack_from(buf, pos)
        pos += 8
        if group == 0xFFFE and element == _SEQ_END:
            return pos
        if group != 0xFFFE or element != _ITEM:
            raise UndecodableDataset(f"expected an item at byte {pos - 8}")
        if length == UNDEFINED:
            pos = _scan_elements(buf, pos, end, explicit, fmt)
            if pos + 8 > end:
                raise UndecodableDataset("an item of undefined length is not terminated")
            group, element = tag_hdr.unpack_from(buf, pos)
            if group != 0xFFFE or element != _ITEM_END:
                raise UndecodableDataset(f"expected an item delimiter at byte {pos}")
            pos += 8
        elif pos + length > end:
            raise UndecodableDataset("an item runs past the end of the data")
        else:
            pos += length


class _NeedMore(Exception):
    """The scan needs bytes past the part of the data set it was given."""


def _scan_top(
    buf: Any, start: int, end: int, explicit: bool, fmt: str, avail: int | None = None
) -> tuple[dict[int, tuple[bytes | None, int, int]], int]:
    """Walk the top level of a data set: check its structure, and return where the values
    of the index tags are ({tag: (VR or None, offset, length)}) and where the pixel data
    (the first element of group 7FE0 or higher) starts.

    The hot loop of the ingest path: one ``unpack_from`` and a few comparisons per element.
    """
    short, implicit_hdr, ulong, _ = _STRUCTS[fmt]
    unpack = short.unpack_from if explicit else implicit_hdr.unpack_from
    unpack_long = ulong.unpack_from
    wanted = INDEX_TAGS
    found: dict[int, tuple[bytes | None, int, int]] = {}
    pixels = -1
    pos = start
    # ``buf`` may hold only the first ``avail`` bytes of the data set (the rest is in later
    # fragments): element headers and index values must lie there; values are skipped.
    limit = end if avail is None else avail
    vr: bytes | None = None
    while pos < end:
        if pos + 8 > limit:
            if limit < end:
                raise _NeedMore
            raise UndecodableDataset(f"truncated element header at byte {pos - start}")
        at = pos
        if explicit:
            group, element, vr, length = unpack(buf, pos)
            if group == 0xFFFE:
                break
            if vr in _SHORT_VRS:
                pos += 8
            elif vr in _LONG_VRS:
                if pos + 12 > limit:
                    if limit < end:
                        raise _NeedMore
                    raise UndecodableDataset(f"truncated element header at byte {pos - start}")
                (length,) = unpack_long(buf, pos + 8)
                pos += 12
                if length == UNDEFINED:
                    # A sequence or encapsulated pixel data; UN of undefined length is
                    # implicit VR little endian inside.
                    if group >= 0x7FE0 and pixels < 0:
                        pixels = at
                    is_un = vr == b"UN"
                    pos = _scan_items(buf, pos, limit, not is_un, "<" if is_un else fmt)
                    continue
            elif vr.isalpha() and vr.isupper():  # a VR newer than this list
                pos += 8
            else:
                raise UndecodableDataset(
                    f"invalid VR {vr!r} in ({group:04X},{element:04X}) at byte {pos - start}"
                )
        else:
            group, element, length = unpack(buf, pos)
            if group == 0xFFFE:
                break
            pos += 8
            if length == UNDEFINED:
                if group >= 0x7FE0 and pixels < 0:
                    pixels = at
                pos = _scan_items(buf, pos, limit, False, fmt)
                continue
        if pos + length > end:
            raise UndecodableDataset(
                f"({group:04X},{element:04X}) of length {length} runs past the end of the data"
            )
        if group >= 0x7FE0:
            if pixels < 0:
                pixels = at
        elif (group << 16 | element) in wanted:
            if pos + length > limit:
                raise _NeedMore
            found[group << 16 | element] = (vr, pos, length)
        pos += length
    if pos != end:
        if limit < end:
            raise _NeedMore
        raise UndecodableDataset(f"unexpected delimiter at byte {pos - start}")
    if pixels < 0 and limit < end:
        raise _NeedMore  # the header would run past what we have
    return found, end if pixels < 0 else pixels


def _decode(vr: str, raw: bytes, encodings: list[str], tag: int, little: bool) -> str | None:
    """The text of one value as ``_to_text(pydicom's value)`` gives it."""
    if raw.isascii() and b"\x1b" not in raw:
        # Every character set DICOM allows reads ASCII bytes as ASCII (without escapes).
        if vr in _TEXT_SPLIT_VRS:
            items = raw.decode("ascii").split("\\")
            if len(items) == 1:
                return items[0].rstrip("\x00 ").strip() or None
            return "\\".join(item.rstrip("\x00 ").strip() for item in items) or None
        if vr in _STRING_VRS or (vr in _NUMBER_CHARS and _NUMBER_CHARS[vr].issuperset(raw)):
            items = raw.decode("ascii").rstrip(" \x00").split("\\")
            if len(items) == 1:
                return items[0].strip() or None
            return "\\".join(item.strip() for item in items) or None
        if vr in _SINGLE_VRS:
            return raw.decode("ascii").rstrip(" \x00").strip() or None
        if vr == "PN":
            text = raw.rstrip(b"\x00 ").decode("ascii")
            if "=" not in text:  # one component group: PersonName prints it as it is
                return text or None
    if vr not in _TEXT_VRS:
        raise _NeedPydicom(vr)
    element = RawDataElement(Tag(tag), vr, len(raw), raw, 0, False, little)
    return _to_text(convert_value(vr, element, encodings))


def _values(
    buf: Any,
    found: dict[int, tuple[bytes | None, int, int]],
    little: bool,
    keys: frozenset[str] | None = None,
) -> dict[str, str | None]:
    encodings = ["iso8859"]
    charset = found.get(_CHARSET_TAG)
    if charset is not None:
        raw = bytes(buf[charset[1] : charset[1] + charset[2]])
        # As pydicom reads it: trailing padding off, split, each term as it is.
        terms = raw.decode("latin-1").rstrip(" \x00").split("\\")
        encodings = convert_encodings(terms[0] if len(terms) == 1 else terms)
    values: dict[str, str | None] = dict.fromkeys(ALL_KEYS)
    for tag, (vr_bytes, at, length) in found.items():
        keyword, dict_vr = INDEX_TAGS[tag]
        if length == 0 or (keys is not None and keyword not in keys):
            continue
        vr = dict_vr if vr_bytes is None or vr_bytes == b"UN" else vr_bytes.decode("ascii")
        values[keyword] = _decode(vr, bytes(buf[at : at + length]), encodings, tag, little)
    return values


def _info(values: dict[str, str | None], header: bytes | None) -> InstanceInfo:
    return InstanceInfo(
        values=values,
        header=header,
        sop_instance_uid=values.get("SOPInstanceUID") or "",
        sop_class_uid=values.get("SOPClassUID") or "",
    )


def scan(
    buf: Any,
    start: int,
    end: int,
    transfer_syntax_uid: str,
    avail: int | None = None,
    keys: frozenset[str] | None = None,
) -> InstanceInfo:
    """Index values of the data set ``buf[start:end]`` (bytes, bytearray or mmap) encoded
    in ``transfer_syntax_uid`` (not deflated). Raises UndecodableDataset when the data set
    is not well formed; ``_NeedPydicom`` when a value needs pydicom's reader. With
    ``keys``, only those values are decoded now; ``complete()`` decodes the rest later
    (``buf`` must stay unchanged until then)."""
    if end <= start:
        raise UndecodableDataset("the data set is empty")
    explicit = transfer_syntax_uid != IMPLICIT_VR_LITTLE_ENDIAN
    little = transfer_syntax_uid != EXPLICIT_VR_BIG_ENDIAN
    found, pixels = _scan_top(buf, start, end, explicit, "<" if little else ">", avail)
    values = _values(buf, found, little, keys)
    header = bytes(buf[start:pixels]) if pixels - start <= HEADER_MAX else None
    info = _info(values, header)
    if keys is not None:
        info.extra["pending"] = (buf, found, little)
    return info


def complete(info: InstanceInfo, parts: list[bytes | memoryview], transfer_syntax_uid: str) -> None:
    """Decode the values a ``scan(keys=...)`` left out (``parts``: the whole data set)."""
    pending = info.extra.pop("pending", None)
    if pending is None:
        return
    buf, found, little = pending
    try:
        values = _values(buf, found, little)
    except _NeedPydicom:
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        values = _read_with_pydicom(io.BytesIO(bytes(data)), transfer_syntax_uid, meta=False).values
    info.values = values


def instance_from_bytes(
    data: bytes | bytearray | memoryview, transfer_syntax_uid: str
) -> InstanceInfo:
    """Index values of a received data set held in memory (no file meta)."""
    if transfer_syntax_uid not in DEFLATED:
        try:
            return scan(data, 0, len(data), transfer_syntax_uid)
        except _NeedPydicom:
            pass
    return _read_with_pydicom(io.BytesIO(bytes(data)), transfer_syntax_uid, meta=False)


def instance_from_parts(
    parts: list[bytes | memoryview],
    transfer_syntax_uid: str,
    keys: frozenset[str] | None = None,
) -> InstanceInfo:
    """Index values of a received data set held in memory as fragments: scanned in the
    first fragment when it holds every element header and index value (the pixel data
    of a single frame image is one element whose length reaches the end), without joining
    the fragments; otherwise joined."""
    if len(parts) > 1 and transfer_syntax_uid not in DEFLATED:
        first = parts[0]
        total = sum(len(p) for p in parts)
        try:
            return scan(first, 0, total, transfer_syntax_uid, len(first), keys)
        except (_NeedMore, _NeedPydicom, UndecodableDataset):
            pass  # decided on the whole data set
    data = parts[0] if len(parts) == 1 else b"".join(parts)
    if keys is not None and transfer_syntax_uid not in DEFLATED:
        try:
            return scan(data, 0, len(data), transfer_syntax_uid, None, keys)
        except _NeedPydicom:
            pass
    return instance_from_bytes(data, transfer_syntax_uid)


def instance_from_file(path: Path | str, offset: int, transfer_syntax_uid: str) -> InstanceInfo:
    """Index values of a stored Part-10 file whose data set starts at ``offset``."""
    if transfer_syntax_uid not in DEFLATED:
        with open(path, "rb") as fp:
            size = os.fstat(fp.fileno()).st_size
            if size <= offset:
                raise UndecodableDataset("the data set is empty")
            with mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                try:
                    return scan(buf, offset, size, transfer_syntax_uid)
                except _NeedPydicom:
                    pass
    return _read_with_pydicom(Path(path), transfer_syntax_uid, meta=True)


def read_instance(path: Path | str) -> InstanceInfo:
    """Parse a stored Part-10 file's header; raises UndecodableDataset."""
    from dicomd.archive.part10 import NotPart10Error, read_file_meta

    try:
        with open(path, "rb") as fp:
            meta = read_file_meta(fp)
    except NotPart10Error as exc:
        raise UndecodableDataset(f"cannot parse the data set: {exc}") from exc
    return instance_from_file(path, meta.dataset_offset, meta.transfer_syntax_uid)


def _read_with_pydicom(source: Any, transfer_syntax_uid: str, *, meta: bool) -> InstanceInfo:
    try:
        if meta:
            ds = pydicom.dcmread(source, stop_before_pixels=True)
        else:
            ds = _dataset_from(source, transfer_syntax_uid)
    except Exception as exc:
        raise UndecodableDataset(f"cannot parse the data set: {exc}") from exc
    return info_from_dataset(ds)


def info_from_dataset(ds: Dataset) -> InstanceInfo:
    try:
        values = {kw: _value(ds, kw) for kw in ALL_KEYS}
    except Exception as exc:
        raise UndecodableDataset(f"cannot decode the data set: {exc}") from exc
    return _info(values, None)


# --- the header, decoded on demand ----------------------------------------------------------


def _dataset_from(fp: Any, transfer_syntax_uid: str) -> Dataset:
    if transfer_syntax_uid in DEFLATED:
        import zlib

        data = zlib.decompress(fp.read(), -zlib.MAX_WBITS)
        fp = io.BytesIO(data)
        transfer_syntax_uid = "1.2.840.10008.1.2.1"
    return read_dataset(
        fp,
        is_implicit_VR=transfer_syntax_uid == IMPLICIT_VR_LITTLE_ENDIAN,
        is_little_endian=transfer_syntax_uid != EXPLICIT_VR_BIG_ENDIAN,
        stop_when=lambda tag, _vr, _length: tag.group >= 0x7FE0,
    )


def decode_header(header: bytes, transfer_syntax_uid: str) -> Dataset:
    """The data set (pixel data excluded) from the header bytes the index keeps."""
    return _dataset_from(io.BytesIO(header), transfer_syntax_uid)


def read_header(path: Path | str) -> Dataset:
    """The data set (pixel data excluded) of a stored file, for headers the index lacks."""
    return pydicom.dcmread(path, stop_before_pixels=True)
