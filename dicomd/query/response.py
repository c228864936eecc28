"""The answer Identifier of a C-FIND (PS3.4 C.4.1.1.3.2, K.4.1.1.3.2).

Every key of the query is in the answer, with the stored value, or zero-length when the
stored data set has none; nothing else is (the caller adds (0008,0005) when needed). A
sequence key returns every item of the stored sequence, each reduced to the keys of the
key's item; a zero-length sequence key (or one with an empty item) returns the items whole.
"""

from __future__ import annotations

import copy

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
