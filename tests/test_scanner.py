"""The index's tag scanner (dicomd.archive.extract) against pydicom's reading.

Every bundled pydicom file is scanned and must give pydicom's values for every index tag
(charsets included) and a header that decodes to pydicom's data set; the malformed ones
must be refused. Hypothesis checks the value decoder against pydicom's converters and that
mangled data sets are either read or refused with UndecodableDataset, nothing else.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.values import convert_value

from dicomd.archive import extract as ex
from dicomd.archive.part10 import NotPart10Error, read_file_meta

# Refused by the scanner (and by the storage service with C000): see test_storage.MALFORMED.
MALFORMED = {"MR_truncated.dcm", "rtplan_truncated.dcm", "SC_rgb_jpeg.dcm"}


def _part10_files() -> list[tuple[Path, int, str]]:
    files = sorted(
        {Path(f) for f in pydicom.data.get_testdata_files() + pydicom.data.get_charset_files()}
    )
    out = []
    for path in files:
        try:
            with open(path, "rb") as fp:
                meta = read_file_meta(fp)
        except (NotPart10Error, OSError):
            continue
        out.append((path, meta.dataset_offset, meta.transfer_syntax_uid))
    return out


PART10 = _part10_files()
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on bad values


def test_bundled_files_are_many() -> None:
    assert len(PART10) > 150
    syntaxes = {ts for _, _, ts in PART10}
    assert {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"} <= syntaxes


@pytest.mark.parametrize("path,offset,ts", PART10, ids=[p.name for p, _, _ in PART10])
def test_scanner_matches_pydicom(path: Path, offset: int, ts: str) -> None:
    data = path.read_bytes()[offset:]
    if path.name in MALFORMED:
        with pytest.raises(ex.UndecodableDataset):
            ex.instance_from_bytes(data, ts)
        return
    info = ex.instance_from_bytes(data, ts)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    expected = {kw: ex._value(ds, kw) for kw in ex.ALL_KEYS}
    assert info.values == expected
    assert info.sop_instance_uid == (expected["SOPInstanceUID"] or "")
    # The same from the stored file (the mmap path recovery and large data sets take).
    assert ex.instance_from_file(path, offset, ts).values == expected
    # The header bytes are the data set's prefix up to the pixel data, and decode to it.
    if info.header is None:
        assert ts in ex.DEFLATED or len(data) > ex.HEADER_MAX
        return
    assert data.startswith(info.header)
    header = ex.decode_header(info.header, ts)
    want = [e.tag for e in ds if e.tag < 0x7FE00000]
    assert [e.tag for e in header] == want
    for tag in want[:40]:
        if ds[tag].VR != "SQ":
            assert header[tag].value == ds[tag].value, (path.name, tag)


def test_scan_stops_nowhere_but_checks_everything() -> None:
    """A truncated pixel data element, after every index tag, is still refused."""
    path = Path(pydicom.data.get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
    with open(path, "rb") as fp:
        meta = read_file_meta(fp)
        data = fp.read()
    assert ex.instance_from_bytes(data, meta.transfer_syntax_uid).values["PatientID"]
    with pytest.raises(ex.UndecodableDataset, match="runs past the end"):
        ex.instance_from_bytes(data[:-1], meta.transfer_syntax_uid)
    with pytest.raises(ex.UndecodableDataset, match="empty"):
        ex.instance_from_bytes(b"", meta.transfer_syntax_uid)


# --- hypothesis -------------------------------------------------------------------------------

_CHARSETS = ["", "ISO_IR 100", "ISO_IR 192", "ISO_IR 144", "GB18030", "\\ISO 2022 IR 87"]
_TEXT = st.text(alphabet=st.sampled_from(list(" ^=\\-.,+0123456789AZaz\x00éÄжΩ山田")), max_size=24)
_ASCII = st.text(alphabet=st.sampled_from(list(" ^=\\-.+0123456789eEAZaz\x00\t\r\n")), max_size=24)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    keyword=st.sampled_from(ex.ALL_KEYS),
    text=st.one_of(_ASCII, _TEXT),
    charset=st.sampled_from(_CHARSETS),
)
def test_value_decoder_matches_pydicom(keyword: str, text: str, charset: str) -> None:
    tag = int(pydicom.datadict.tag_for_keyword(keyword) or 0)
    vr = ex.INDEX_TAGS[tag][1]
    encodings = pydicom.charset.convert_encodings(
        charset.split("\\") if "\\" in charset else charset
    )
    try:
        raw = pydicom.charset.encode_string(text, encodings)
    except Exception:
        raw = text.encode("utf-8")
    try:
        element = RawDataElement(Tag(tag), vr, len(raw), raw, 0, False, True)
        expected = ex._to_text(convert_value(vr, element, encodings))
    except Exception:
        return  # pydicom cannot read it either: the fallback reader decides
    if not raw:
        expected = None
    got = ex._decode(vr, raw, encodings, tag, True) if raw else None
    assert got == expected, (vr, raw)


def _small_dataset(explicit: bool) -> bytes:
    def el(group: int, element: int, vr: bytes, value: bytes) -> bytes:
        if explicit:
            return struct.pack("<HH2sH", group, element, vr, len(value)) + value
        return struct.pack("<HHI", group, element, len(value)) + value

    return b"".join(
        (
            el(0x0008, 0x0016, b"UI", b"1.2.840.10008.5.1.4.1.1.7\x00"),
            el(0x0008, 0x0018, b"UI", b"1.2.3.4\x00"),
            el(0x0010, 0x0010, b"PN", b"Doe^John"),
            el(0x0020, 0x000D, b"UI", b"1.2.3\x00"),
            el(0x0020, 0x0013, b"IS", b"7 "),
        )
    )


@settings(max_examples=300, deadline=None)
@given(
    explicit=st.booleans(),
    cuts=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=4),
    trim=st.integers(0, 10),
)
def test_mangled_data_sets_are_read_or_refused(
    explicit: bool, cuts: list[tuple[int, int]], trim: int
) -> None:
    data = bytearray(_small_dataset(explicit))
    for at, value in cuts:
        if at < len(data):
            data[at] = value
    data = data[: len(data) - trim]
    ts = "1.2.840.10008.1.2.1" if explicit else "1.2.840.10008.1.2"
    try:
        info = ex.instance_from_bytes(bytes(data), ts)
    except ex.UndecodableDataset:
        return
    assert isinstance(info.values, dict)
