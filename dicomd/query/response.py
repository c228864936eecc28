"""The answer Identifier of a C-FIND (PS3.4 C.4.1.1.3.2, K.4.1.1.3.2).

Every key of the query is in the answer, with the stored value, or zero-length when the
stored data set has none; nothing else is (the caller adds (0008,0005) when needed). A
sequence key returns every item of the stored sequence, each reduced to the keys of the
key's item; a zero-length sequence key (or one with an empty item) returns the items whole.
"""

from __future__ import annotations

import copy
import struct
from collections.abc import Iterable, Mapping

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.valuerep import PersonName

from dicomd.query.matching import SPECIFIC_CHARACTER_SET


def _fresh(elem: DataElement) -> DataElement:
    """A copy whose text values hold no encoded bytes of the stored data's character set."""
    value = elem.value
    if elem.VR == "PN" and value is not None:
        if isinstance(value, MultiValue | list):
            value = [str(v) for v in value]
        else:
            value = str(value) if isinstance(value, PersonName) else value
        return DataElement(elem.tag, elem.VR, value)
    return DataElement(elem.tag, elem.VR, copy.deepcopy(value))


def _whole_item(item: Dataset) -> Dataset:
    out = Dataset()
    for elem in item:
        if elem.tag == SPECIFIC_CHARACTER_SET or elem.tag.group in (0x0000, 0x0002):
            continue
        if elem.VR == "SQ":
            out.add(DataElement(elem.tag, "SQ", Sequence([_whole_item(i) for i in elem.value])))
        else:
            out.add(_fresh(elem))
    return out


def build_answer(query: Dataset, stored: Dataset) -> Dataset:
    """The answer to ``query`` from one matching stored data set (both decoded)."""
    answer = Dataset()
    for key in query:
        tag = key.tag
        if tag == SPECIFIC_CHARACTER_SET or tag.group in (0x0000, 0x0002) or tag.element == 0:
            continue
        elem = stored.get(tag)
        if key.VR == "SQ":
            if elem is None or elem.VR != "SQ":
                answer.add(DataElement(tag, "SQ", Sequence()))
                continue
            key_items = key.value or ()
            key_item = key_items[0] if len(key_items) else None
            if key_item is None or len(key_item) == 0:
                items = [_whole_item(i) for i in elem.value or ()]
            else:
                items = [build_answer(key_item, i) for i in elem.value or ()]
            answer.add(DataElement(tag, "SQ", Sequence(items)))
            continue
        if elem is None or elem.VR == "SQ":
            answer.add(DataElement(tag, key.VR if key.VR not in ("UN", "SQ") else "UN", None))
        else:
            answer.add(_fresh(elem))
    return answer


def canonical(vr: str, raw: bytes) -> bytes | None:
    """The bytes pydicom writes back after reading the ASCII text value ``raw`` (what
    :func:`build_answer`'s copy of the element holds), for *plain* values: no NUL but a
    UID's final padding, no leading space, no space next to a value delimiter, no empty
    trailing component group in a person name. Then the
    only change is the trailing padding of the whole value, removed and put back to even
    length. None for other values (pydicom's rules for them differ by VR)."""
    last = raw[-1:]
    if (
        last != b" "
        and last != b"\0"
        and raw[:1] != b" "
        and b"\0" not in raw
        and b"\\" not in raw
        and (vr != "PN" or last != b"=")
        and not len(raw) % 2
    ):
        return raw  # the usual value: nothing to change
    if b"\0" in raw and not (vr == "UI" and b"\0" not in raw.rstrip(b"\0")):
        return None
    core = raw.rstrip(b" \0")
    if core[:1] == b" " or b" \\" in core or b"\\ " in core:
        return None
    if vr == "PN" and (core.endswith(b"=") or b"=\\" in core):
        return None  # pydicom drops empty trailing component groups
    if len(core) % 2:
        core += b"\0" if vr == "UI" else b" "
    return core


_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT"})
_EXPLICIT_LONG = struct.Struct("<HH2sHI")
_IMPLICIT = struct.Struct("<HHI")


class RawAnswer:
    """Answers written straight from value bytes (little endian, explicit or implicit VR),
    for queries whose keys are all text and matches whose values are all ASCII: the bytes
    :func:`build_answer` and ``charset.encode_answer`` give for the same values.

    ``keys``: (tag, VR) of the query's keys as ``build_answer`` walks them; ``charset``: the
    (0008,0005) value the answers carry (the query's, as ``answer_charset`` keeps it for
    all-ASCII answers), None for none.
    """

    def __init__(
        self, keys: Iterable[tuple[int, str]], charset: str | None, *, implicit: bool
    ) -> None:
        self.implicit = implicit
        self._heads: dict[tuple[int, str], tuple[bytes, bool]] = {}
        layout: list[tuple[int, str]] = [
            (tag, vr if vr not in ("UN", "SQ") else "UN") for tag, vr in keys
        ]
        fixed: dict[int, bytes] = {}
        if charset is not None:
            layout.append((SPECIFIC_CHARACTER_SET, "CS"))
            fixed[SPECIFIC_CHARACTER_SET] = self.element(
                SPECIFIC_CHARACTER_SET, "CS", charset.encode("ascii")
            )
        # (tag, the element when it has no value / a fixed element or None)
        self.layout: list[tuple[int, bytes, bool]] = []
        for tag, vr in sorted(layout):
            if tag in fixed:
                self.layout.append((tag, fixed[tag], True))
            else:
                self.layout.append((tag, self.element(tag, vr, b""), False))

    def _head(self, tag: int, vr: str) -> tuple[bytes, bool]:
        """(the element header up to its length, whether the length has 4 bytes)."""
        key = (tag, vr)
        found = self._heads.get(key)
        if found is None:
            if self.implicit:
                found = (struct.pack("<HH", tag >> 16, tag & 0xFFFF), True)
            elif vr in _LONG_VRS:
                found = (struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), 0), True)
            else:
                found = (struct.pack("<HH2s", tag >> 16, tag & 0xFFFF, vr.encode()), False)
            self._heads[key] = found
        return found

    def element(self, tag: int, vr: str, value: bytes) -> bytes:
        if len(value) % 2:
            value += b"\0" if vr == "UI" else b" "
        head, long = self._head(tag, vr)
        if long:
            return head + len(value).to_bytes(4, "little") + value
        if len(value) > 0xFFFF:
            raise ValueError(f"a {vr} value of {len(value)} bytes")
        return head + len(value).to_bytes(2, "little") + value

    def encode(self, values: Mapping[int, tuple[str, bytes]]) -> bytes:
        """The answer from ``{tag: (VR, value bytes)}``; keys without a value are empty."""
        parts: list[bytes] = []
        append = parts.append
        heads = self._heads
        for tag, empty, fixed in self.layout:
            found = None if fixed else values.get(tag)
            if found is None:
                append(empty)
                continue
            vr, value = found
            n = len(value)
            if n & 1:
                value += b"\0" if vr == "UI" else b" "
                n += 1
            head = heads.get((tag, vr)) or self._head(tag, vr)
            if head[1]:
                append(head[0] + n.to_bytes(4, "little"))
            elif n > 0xFFFF:
                raise ValueError(f"a {vr} value of {n} bytes")
            else:
                append(head[0] + n.to_bytes(2, "little"))
            append(value)
        return b"".join(parts)
