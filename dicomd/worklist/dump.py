"""DCMTK's dump text format: what ``dcmdump`` writes and ``dump2dcm`` reads.

One element per line: ``(gggg,eeee) VR value  # comment``. The VR may be left out when the
data dictionary knows the tag. Values:

- ``[text]``: the text up to the *last* ``]`` of the line (so brackets inside are fine);
  several values are separated by ``\\``; the bytes are in the data set's Specific Character
  Set (dcmdump prints them unconverted), ISO 2022 escape sequences included;
- ``=Name``: a UID given by its dictionary name (``=ModalityWorklistInformationFind``);
- an unbracketed word without spaces, ``#``, brackets (as in the DCMTK example files:
  ``(0010,0010) PN VIVALDI^ANTONIO``);
- ``(no value available)``: empty; numbers as decimal text; OB/OW/UN as hex bytes
  separated by ``\\``; AT as ``(gggg,eeee)``.

Sequences: an ``SQ`` line opens one, ``(fffe,e000)`` starts an item, ``(fffe,e00d)`` ends it,
``(fffe,e0dd)`` ends the sequence. Errors are ``DumpError`` and print as
``file:line: message``.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_has_tag, dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import UID_dictionary

ITEM = 0xFFFEE000
ITEM_END = 0xFFFEE00D
SEQUENCE_END = 0xFFFEE0DD

VALID_VRS = frozenset(
    [
        "AE",
        "AS",
        "AT",
        "CS",
        "DA",
        "DS",
        "DT",
        "FD",
        "FL",
        "IS",
        "LO",
        "LT",
        "OB",
        "OD",
        "OF",
        "OL",
        "OV",
        "OW",
        "PN",
        "SH",
        "SL",
        "SQ",
        "SS",
        "ST",
        "SV",
        "TM",
        "UC",
        "UI",
        "UL",
        "UN",
        "UR",
        "US",
        "UT",
        "UV",
    ]
)
_STRING_VRS = frozenset(
    [
        "AE",
        "AS",
        "CS",
        "DA",
        "DS",
        "DT",
        "IS",
        "LO",
        "LT",
        "PN",
        "SH",
        "ST",
        "TM",
        "UC",
        "UI",
        "UR",
        "UT",
    ]
)
_INT_VRS = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "UV": "Q", "SV": "q"}
_FLOAT_VRS = {"FL": "f", "FD": "d"}
_BINARY_VRS = frozenset({"OB", "OW", "OD", "OF", "OL", "OV", "UN"})
_TAG = re.compile(rb"^\(\s*([0-9A-Fa-f]{4})\s*,\s*([0-9A-Fa-f]{4})\s*\)")
_UIDS_BY_NAME = {
    "".join(ch for ch in info[0].title() if ch.isalnum()): uid
    for uid, info in UID_dictionary.items()
}
_UIDS_BY_KEYWORD = {info[4]: uid for uid, info in UID_dictionary.items() if info[4]}
# DCMTK's own names (dcuid.h) where they differ from the standard's keywords.
_DCMTK_UID_NAMES = {
    "LittleEndianImplicit": "1.2.840.10008.1.2",
    "LittleEndianExplicit": "1.2.840.10008.1.2.1",
    "BigEndianExplicit": "1.2.840.10008.1.2.2",
    "DeflatedLittleEndianExplicit": "1.2.840.10008.1.2.1.99",
    "JPEGBaseline": "1.2.840.10008.1.2.4.50",
    "JPEGLossless": "1.2.840.10008.1.2.4.70",
    "JPEG2000LosslessOnly": "1.2.840.10008.1.2.4.90",
    "JPEG2000": "1.2.840.10008.1.2.4.91",
    "RLELossless": "1.2.840.10008.1.2.5",
    "FINDModalityWorklistInformationModel": "1.2.840.10008.5.1.4.31",
    "VerificationSOPClass": "1.2.840.10008.1.1",
    "PrivateDcmtkModalityWorklistSOPClass": "1.2.276.0.7230010.3.1.0.1",
}


class DumpError(ValueError):
    def __init__(self, file: str, line: int, message: str) -> None:
        super().__init__(f"{file}:{line}: {message}")
        self.file, self.line, self.message = file, line, message


@dataclass
class _Node:
    tag: int
    vr: str
    raw: bytes | None = None  # string VRs: the value's bytes as written
    value: object = None  # other VRs: the Python value
    items: list[list[_Node]] = field(default_factory=list)  # SQ
    line: int = 0


def _parse_value(
    vr: str, text: bytes, tag: int, where: tuple[str, int]
) -> tuple[bytes | None, object]:
    file, line = where
    if vr in _STRING_VRS:
        return text, None
    if text == b"":
        return None, None
    parts = text.split(b"\\")
    try:
        if vr in _INT_VRS:
            values: list[object] = [int(p) for p in parts]
        elif vr in _FLOAT_VRS:
            values = [float(p) for p in parts]
        elif vr == "AT":
            values = []
            for p in parts:
                m = _TAG.match(p.strip())
                if not m:
                    raise ValueError(f"{p.decode(errors='replace')!r} is not (gggg,eeee)")
                values.append(Tag(int(m.group(1), 16), int(m.group(2), 16)))
        elif vr in _BINARY_VRS:
            if vr == "OW":
                return None, b"".join(struct.pack("<H", int(p, 16)) for p in parts)
            return None, bytes(int(p, 16) for p in parts)
        else:
            raise ValueError(f"VR {vr} is not supported")
    except ValueError as exc:
        raise DumpError(file, line, f"bad {vr} value: {exc}") from None
    return None, values[0] if len(values) == 1 else values


def parse_dump(data: bytes, file: str = "<dump>", warnings: list[str] | None = None) -> Dataset:
    """Parse dump text (bytes, as the values may be in any character set).

    An element given twice at the same level keeps its first value, as dump2dcm does; a
    ``file:line: warning`` is added to ``warnings``.
    """
    root: list[_Node] = []
    # Stack of open containers: (element list, opening sequence node or None).
    stack: list[tuple[list[_Node], _Node | None]] = [(root, None)]
    for number, raw_line in enumerate(data.split(b"\n"), 1):
        line = raw_line.strip(b" \t\r\x00")
        if not line or line.startswith(b"#"):
            continue
        m = _TAG.match(line)
        if not m:
            snippet = line[:30].decode("utf-8", "replace")
            raise DumpError(file, number, f"expected a tag such as (0010,0010), got {snippet!r}")
        tag = (int(m.group(1), 16) << 16) | int(m.group(2), 16)
        rest = line[m.end() :].lstrip(b" \t")
        if tag == ITEM:
            _elements, node = stack[-1]
            if node is None or node.vr != "SQ":
                raise DumpError(file, number, "item (fffe,e000) outside a sequence")
            node.items.append([])
            stack.append((node.items[-1], None))
            continue
        if tag == ITEM_END:
            if len(stack) < 2 or stack[-1][1] is not None:
                raise DumpError(file, number, "item end (fffe,e00d) without an open item")
            stack.pop()
            continue
        if tag == SEQUENCE_END:
            if stack[-1][1] is None and len(stack) > 1 and stack[-2][1] is not None:
                stack.pop()  # an item left open: the sequence end closes it
            if len(stack) < 2 or stack[-1][1] is None:
                raise DumpError(file, number, "sequence end (fffe,e0dd) without an open sequence")
            stack.pop()
            continue
        if stack[-1][1] is not None:
            raise DumpError(
                file, number, "element inside a sequence but outside an item (missing (fffe,e000))"
            )
        vr = ""
        token = rest[:2].decode("ascii", "replace")
        if len(rest) >= 2 and (len(rest) == 2 or rest[2:3] in (b" ", b"\t")) and token in VALID_VRS:
            vr = token
            rest = rest[2:].lstrip(b" \t")
        elif token in ("na", "??", "xs", "ox", "lt", "up") and (
            len(rest) == 2 or rest[2:3] in (b" ", b"\t")
        ):
            rest = rest[2:].lstrip(b" \t")
        if not vr:
            if not dictionary_has_tag(tag):
                raise DumpError(
                    file,
                    number,
                    f"no VR given and ({tag >> 16:04x},{tag & 0xFFFF:04x}) "
                    "is not in the data dictionary",
                )
            vr = dictionary_VR(tag)
            if vr not in VALID_VRS:  # "US or SS" and the like
                raise DumpError(file, number, f"the VR of this tag is ambiguous ({vr}); write it")
        if vr == "SQ":
            node = _Node(tag, "SQ", line=number)
            stack[-1][0].append(node)
            stack.append((stack[-1][0], node))
            continue
        text = _value_text(rest, vr, (file, number))
        raw, value = _parse_value(vr, text, tag, (file, number))
        stack[-1][0].append(_Node(tag, vr, raw, value, line=number))
    while len(stack) > 1:  # dump2dcm closes what is left open at the end
        stack.pop()
    return _build(root, None, file, warnings if warnings is not None else [])


def _value_text(rest: bytes, vr: str, where: tuple[str, int]) -> bytes:
    file, line = where
    if rest.startswith(b"["):
        end = rest.rfind(b"]")
        if end == -1:
            raise DumpError(
                file,
                line,
                "value has no closing ']' (dcmdump shortens long values unless run with +L)",
            )
        return rest[1:end]
    if rest.startswith(b"="):
        name = rest[1:].split(b"#", 1)[0].strip().decode("ascii", "replace")
        uid = _DCMTK_UID_NAMES.get(name) or _UIDS_BY_KEYWORD.get(name) or _UIDS_BY_NAME.get(name)
        if uid is None:
            raise DumpError(file, line, f"unknown UID name {name!r}")
        return uid.encode("ascii")
    if rest.startswith(b"(no value available)") or rest.startswith(b"#") or not rest:
        return b""
    if rest.startswith(b"(") and vr != "AT":
        raise DumpError(file, line, f"cannot read value {rest[:40].decode('utf-8', 'replace')!r}")
    if vr == "AT" and rest.startswith(b"("):
        end = rest.find(b"#")
        return (rest if end == -1 else rest[:end]).strip()
    word = re.match(rb"[^\s#\[\]<>()]*", rest)
    assert word is not None
    return word.group(0)


def _build(
    nodes: list[_Node], parent_charset: list[str] | None, file: str, warnings: list[str]
) -> Dataset:
    ds = Dataset()
    charset = parent_charset
    first: dict[int, _Node] = {}
    unique: list[_Node] = []
    for node in nodes:
        if node.tag in first:
            warnings.append(
                f"{file}:{node.line}: warning: ({node.tag >> 16:04x},{node.tag & 0xFFFF:04x}) "
                f"given again; the first value (line {first[node.tag].line}) is kept"
            )
            continue
        first[node.tag] = node
        unique.append(node)
    nodes = unique
    for node in nodes:
        if node.tag == 0x00080005 and node.raw is not None:
            terms = node.raw.decode("ascii", "replace").split("\\")
            charset = [t.strip() for t in terms]
            try:
                convert_encodings(charset)
            except Exception as exc:
                raise DumpError(file, node.line, f"bad Specific Character Set: {exc}") from None
    for node in nodes:
        if node.vr == "SQ":
            items = [_build(item, charset, file, warnings) for item in node.items]
            ds.add(DataElement(node.tag, "SQ", Sequence(items)))
        elif node.raw is not None:
            value = node.raw
            if len(value) % 2:
                value += b"\0" if node.vr == "UI" else b" "
            raw = RawDataElement(Tag(node.tag), node.vr, len(value), value, 0, False, True)
            encodings = convert_encodings(charset) if charset else None
            elem = convert_raw_data_element(raw, encoding=encodings)
            ds.add(elem)
        else:
            ds.add(DataElement(node.tag, node.vr, node.value))
    return ds
