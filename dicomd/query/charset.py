"""Character sets of C-FIND Identifiers (PS3.4 C.2.2.2, PS3.5 6.1).

- The query is decoded with its own Specific Character Set (pydicom handles every DICOM
  character set, ISO 2022 code extensions such as IR 87 Japanese included) and matched in
  Unicode.
- Each answer is encoded in the query's character set when every value fits in it, else in
  ISO_IR 192 (UTF-8).
- (0008,0005) is put in an answer whenever one of its values is not ASCII, and also when the
  query carried one (then it names the character set the answer really uses). An answer
  that is all ASCII and answers a query without (0008,0005) carries none.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from io import BytesIO

from pydicom.charset import (  # type: ignore[attr-defined]
    _encode_string_impl,
    _encode_string_parts,
    convert_encodings,
)
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from dicomd.query.matching import TEXT_VRS, QueryError

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
UTF8 = "ISO_IR 192"
_DEFAULT_TERMS = frozenset({"", "ISO_IR 6", "ISO 2022 IR 6"})


def syntax_flags(transfer_syntax: str) -> tuple[bool, bool]:
    """(is_implicit_VR, is_little_endian) of an uncompressed transfer syntax."""
    return (
        transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN,
        transfer_syntax != EXPLICIT_VR_BIG_ENDIAN,
    )


_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN"})
_LONG_VRS = _LONG_VRS | {b"UR", b"UT", b"UV"}


def _check_framing(raw: bytes, implicit: bool, little: bool) -> None:
    """Top-level element lengths must fit the data exactly (pydicom reads truncated data
    without complaint). Stops at the first undefined length, which pydicom checks itself."""
    order = "little" if little else "big"
    offset, end = 0, len(raw)
    while offset < end:
        if implicit:
            if offset + 8 > end:
                raise ValueError(f"truncated element header at byte {offset}")
            length = int.from_bytes(raw[offset + 4 : offset + 8], order)
            offset += 8
        else:
            if offset + 8 > end:
                raise ValueError(f"truncated element header at byte {offset}")
            vr = raw[offset + 4 : offset + 6]
            if vr in _LONG_VRS:
                if offset + 12 > end:
                    raise ValueError(f"truncated element header at byte {offset}")
                length = int.from_bytes(raw[offset + 8 : offset + 12], order)
                offset += 12
            else:
                length = int.from_bytes(raw[offset + 6 : offset + 8], order)
                offset += 8
        if length == 0xFFFFFFFF:
            return
        offset += length
        if offset > end:
            raise ValueError(f"element value runs {offset - end} bytes past the end")


def decode_identifier(raw: bytes, transfer_syntax: str) -> Dataset:
    """The Identifier as a pydicom Dataset whose text values are Unicode."""
    implicit, little = syntax_flags(transfer_syntax)
    try:
        _check_framing(raw, implicit, little)
        ds = read_dataset(BytesIO(raw), implicit, little)
        # Touch every element so undecodable data fails here and not half-way through.
        _ = [elem.value for elem in _walk(ds)]
    except Exception as exc:  # pydicom raises many kinds for damaged data
        raise QueryError(f"cannot decode the Identifier: {exc}", status=0xC000) from None
    return ds


def _walk(ds: Dataset) -> Iterator:  # type: ignore[type-arg]
    for elem in ds:
        yield elem
        if elem.VR == "SQ":
            for item in elem.value or ():
                yield from _walk(item)


def charset_terms(ds: Dataset) -> list[str]:
    """The defined terms of (0008,0005), [] when absent."""
    elem = ds.get(0x00080005)
    if elem is None or elem.value in (None, ""):
        return []
    value = elem.value
    terms = [value] if isinstance(value, str) else list(value)
    return [str(t).strip() for t in terms]


def _python_encodings(terms: Sequence[str]) -> list[str]:
    """Python codecs for strict checking: the default repertoire is ASCII, not Latin-1."""
    if not terms:
        return ["ascii"]
    encodings = convert_encodings(list(terms))
    return ["ascii" if t in _DEFAULT_TERMS else e for t, e in zip(terms, encodings, strict=False)]


def fits(value: str, encodings: Sequence[str]) -> bool:
    """True if ``value`` can be encoded with ``encodings`` without loss."""
    for encoding in encodings:
        try:
            _encode_string_impl(value, encoding)
            return True
        except (UnicodeError, LookupError):
            continue
    if len(encodings) > 1:
        try:
            _encode_string_parts(value, list(encodings))
            return True
        except (UnicodeError, ValueError, LookupError):
            return False
    return False


def non_ascii_texts(ds: Dataset) -> Iterator[str]:
    for elem in _walk(ds):
        if elem.VR not in TEXT_VRS or elem.value is None:
            continue
        value = elem.value
        values: Iterable[object] = value if isinstance(value, list | tuple) else (value,)
        for v in values:
            text = str(v)
            if not text.isascii():
                yield text


def answer_charset(answer: Dataset, query_terms: Sequence[str]) -> list[str] | None:
    """The (0008,0005) terms for an answer, None when it needs none."""
    texts = list(non_ascii_texts(answer))
    if not texts:
        return list(query_terms) if query_terms else None
    if query_terms and not set(query_terms) <= _DEFAULT_TERMS:
        encodings = _python_encodings(query_terms)
        if all(fits(t, encodings) for t in texts):
            return list(query_terms)
    return [UTF8]


def encode_dataset(ds: Dataset, transfer_syntax: str) -> bytes:
    """Encode a (decoded) data set in ``transfer_syntax``, text in its own (0008,0005)."""
    implicit, little = syntax_flags(transfer_syntax)
    fp = DicomBytesIO()
    fp.is_implicit_VR = implicit
    fp.is_little_endian = little
    write_dataset(fp, ds)
    return fp.getvalue()


def encode_answer(answer: Dataset, query_terms: Sequence[str], transfer_syntax: str) -> bytes:
    """Set the answer's (0008,0005) as the module docstring says, then encode it."""
    terms = answer_charset(answer, query_terms)
    if terms is None:
        if 0x00080005 in answer:
            del answer[0x00080005]
    else:
        answer.SpecificCharacterSet = terms if len(terms) > 1 else terms[0]
    return encode_dataset(answer, transfer_syntax)
