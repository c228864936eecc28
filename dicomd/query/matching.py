"""PS3.4 C.2.2.2 attribute matching of a C-FIND Identifier against stored data sets.

Both sides are decoded to Unicode first (``charset.decode_identifier`` for the query; stored
data is decoded once, when it is loaded), so matching is by character, never by byte.

Stored data is matched in a *flat* form built once per stored data set (:func:`flatten`):
``{tag: (value, ...)}`` for elements (values as normalised strings) and
``{tag: [flat item, ...]}`` for sequences. Matching a compiled query against that is a few
dictionary look-ups and string comparisons.

Matching types (PS3.4 C.2.2.2.1-C.2.2.2.7):

- single value: literal, case-sensitive; Person Names by component group (a key without
  ``=`` is matched against the alphabetic group), trailing ``^`` and spaces not significant;
  with ``fuzzy_names`` (an option the standard allows for PN) case- and accent-insensitive;
- list of UIDs: a UI key with several values matches any of them;
- universal: a zero-length key (or ``*`` alone) matches everything, even an absent value;
- wild card: ``*`` and ``?`` in AE, CS, LO, LT, PN, SH, ST, UC, UR, UT keys; ``?`` is one
  character, not one byte;
- range: ``A-B``, ``-B``, ``A-`` for DA, TM, DT; a partial TM/DT bound covers its whole unit
  (``-10`` ends at 10:59:59.999999); with ``combined_datetime`` a DA key and its TM partner
  (Study Date/Time, Scheduled Procedure Step Start Date/Time, ...) are matched together as one
  date-time range (C.2.2.2.5 "combined Date Time matching");
- sequence: an item in the key holds the keys an item of the stored sequence must match (any
  one item is enough); an empty sequence or item is universal sequence matching.

A stored attribute with several values matches when any value matches. A non-universal key
does not match an absent or empty stored value.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

Flat = dict[int, Any]  # tag -> tuple[str, ...] | list[Flat]

SPECIFIC_CHARACTER_SET = 0x00080005
WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
TEXT_VRS = frozenset({"SH", "LO", "ST", "PN", "LT", "UC", "UT"})  # affected by the charset
# Leading spaces are significant in these (PS3.5 6.2); trailing ones never are.
_KEEP_LEADING = frozenset({"LT", "ST", "UT", "UC"})
# (date tag, time tag) pairs matched together by combined date-time matching.
DATE_TIME_PAIRS: dict[int, int] = {
    0x00080020: 0x00080030,  # Study Date / Time
    0x00080021: 0x00080031,  # Series
    0x00080022: 0x00080032,  # Acquisition
    0x00080023: 0x00080033,  # Content
    0x00400002: 0x00400003,  # Scheduled Procedure Step Start Date / Time
    0x00400004: 0x00400005,  # Scheduled Procedure Step End Date / Time
    0x00400244: 0x00400245,  # Performed Procedure Step Start Date / Time
    0x00400250: 0x00400251,  # Performed Procedure Step End Date / Time
    0x00402004: 0x00402005,  # Issue Date / Time of Imaging Service Request
    0x00100030: 0x00100032,  # Patient's Birth Date / Time
}


class QueryError(Exception):
    """The Identifier cannot be matched as it stands (answered with a failure status)."""

    def __init__(self, message: str, status: int = 0xA900, offending: Iterable[int] = ()):
        super().__init__(message)
        self.status = status
        self.offending = tuple(offending)


@dataclass(frozen=True)
class MatchOptions:
    fuzzy_names: bool = False  # case- and accent-insensitive PN matching
    combined_datetime: bool = True


# --------------------------------------------------------------------------------------------
# Values


def element_texts(elem: DataElement) -> tuple[str, ...]:
    """The values of an element as strings, without insignificant spaces."""
    value = elem.value
    if value is None or value == "" or value == b"":
        return ()
    if isinstance(value, MultiValue | list | tuple):
        items: Iterable[Any] = value
    else:
        items = (value,)
    vr = elem.VR
    out: list[str] = []
    for item in items:
        text = item.hex() if isinstance(item, bytes) else str(item)
        text = text.rstrip(" \0") if vr in _KEEP_LEADING else text.strip(" \0")
        if vr == "DA":
            text = text.replace(".", "")
        elif vr == "TM":
            text = text.replace(":", "")
        elif vr == "PN":
            text = _normalise_pn(text)
        out.append(text)
    if all(t == "" for t in out):
        return ()
    return tuple(out)


# VRs of one value: a backslash in them is no delimiter (pydicom does not split them).
_SINGLE_VALUED = frozenset({"LT", "ST", "UT", "UR"})


def text_values(vr: str, text: str) -> tuple[str, ...]:
    """What :func:`element_texts` gives for an element of ``vr`` whose value, as stored, is
    ``text`` (values separated by backslashes), without building the element."""
    if not text:
        return ()
    items = (text,) if vr in _SINGLE_VALUED else text.split("\\")
    keep_leading = vr in _KEEP_LEADING
    out: list[str] = []
    for item in items:
        item = item.rstrip(" \0") if keep_leading else item.strip(" \0")
        if vr == "DA":
            item = item.replace(".", "")
        elif vr == "TM":
            item = item.replace(":", "")
        elif vr == "PN":
            item = _normalise_pn(item)
        out.append(item)
    if all(t == "" for t in out):
        return ()
    return tuple(out)


def _normalise_pn(text: str) -> str:
    groups = [g.rstrip("^ ") for g in text.split("=")]
    while groups and groups[-1] == "":
        groups.pop()
    return "=".join(groups)


def flatten(ds: Dataset) -> Flat:
    """The flat, matchable form of a decoded data set (see the module docstring)."""
    flat: Flat = {}
    for elem in ds:
        if elem.tag.group in (0x0000, 0x0002) or elem.tag == SPECIFIC_CHARACTER_SET:
            continue
        if elem.VR == "SQ":
            flat[int(elem.tag)] = [flatten(item) for item in elem.value or ()]
        else:
            flat[int(elem.tag)] = element_texts(elem)
    return flat


@functools.lru_cache(maxsize=65536)
def fold(text: str) -> str:
    """Case- and accent-insensitive form: NFKD, combining marks dropped, casefolded."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).casefold()


@functools.lru_cache(maxsize=4096)
def _wildcard(pattern: str) -> re.Pattern[str]:
    parts = []
    for ch in pattern:
        if ch == "*":
            parts.append(".*")
        elif ch == "?":
            parts.append(".")
        else:
            parts.append(re.escape(ch))
    return re.compile("".join(parts), re.DOTALL)


def _has_wildcard(text: str) -> bool:
    return "*" in text or "?" in text


# Date and time bounds: fixed-width strings that compare correctly as strings.
_TM_LOW = "000000.000000"
_TM_HIGH = "235959.999999"
_DT_LOW = "00010101000000.000000"
_DT_HIGH = "99991231235959.999999"


def _tm_bounds(text: str) -> tuple[str, str]:
    text = text.replace(":", "").strip()
    main, _, frac = text.partition(".")
    if not main.isdigit() or len(main) % 2 or len(main) > 6:
        raise ValueError(f"not a time: {text!r}")
    low = main + _TM_LOW[len(main) : 6]
    high = main + _TM_HIGH[len(main) : 6]
    if frac:
        if not frac.isdigit() or len(frac) > 6:
            raise ValueError(f"not a time: {text!r}")
        return f"{low}.{frac.ljust(6, '0')}", f"{high}.{frac.ljust(6, '9')}"
    return f"{low}.000000", f"{high}.999999"


def _dt_bounds(text: str) -> tuple[str, str]:
    text = text.strip()
    for sign in ("+", "-"):  # drop a UTC offset &ZZXX (offsets are not adjusted)
        cut = text.find(sign, 4)
        if cut != -1:
            text = text[:cut]
    main, _, frac = text.partition(".")
    if not main.isdigit() or len(main) < 4 or len(main) > 14 or len(main) % 2:
        raise ValueError(f"not a date-time: {text!r}")
    low = main + _DT_LOW[len(main) : 14]
    high = main + _DT_HIGH[len(main) : 14]  # YYYYMM ends on day 31: an upper bound is enough
    if frac:
        if not frac.isdigit() or len(frac) > 6:
            raise ValueError(f"not a date-time: {text!r}")
        return f"{low}.{frac.ljust(6, '0')}", f"{high}.{frac.ljust(6, '9')}"
    return f"{low}.000000", f"{high}.999999"


def _da_bounds(text: str) -> tuple[str, str]:
    text = text.replace(".", "").strip()
    if len(text) != 8 or not text.isdigit():
        raise ValueError(f"not a date: {text!r}")
    return text, text


_BOUNDS: dict[str, Callable[[str], tuple[str, str]]] = {
    "DA": _da_bounds,
    "TM": _tm_bounds,
    "DT": _dt_bounds,
}
_OPEN = {"DA": ("", "99999999"), "TM": (_TM_LOW, _TM_HIGH), "DT": (_DT_LOW, _DT_HIGH)}


def range_bounds(vr: str, text: str) -> tuple[str, str]:
    """(low, high) of a DA/TM/DT key value, single or range; raises ValueError."""
    bounds = _BOUNDS[vr]
    if "-" in text and not (vr == "DT" and text.count("-") != 1):
        start, _, end = text.partition("-")
        low = bounds(start)[0] if start.strip() else _OPEN[vr][0]
        high = bounds(end)[1] if end.strip() else _OPEN[vr][1]
        if not start.strip() and not end.strip():
            raise ValueError("a range needs at least one bound")
        return low, high
    return bounds(text)


def _point(vr: str, text: str) -> str | None:
    """A stored DA/TM/DT value as a comparable point (its lowest instant), None if invalid."""
    try:
        return _BOUNDS[vr](text)[0]
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------
# Compiled keys


class Key:
    """One matching key; ``tag`` is where it looks in a flat item."""

    tag: int

    def matches(self, flat: Flat) -> bool:
        raise NotImplementedError


@dataclass
class ValueKey(Key):
    tag: int
    vr: str
    values: tuple[str, ...]  # the key's values (several: list matching)
    fuzzy: bool = False
    patterns: tuple[re.Pattern[str] | None, ...] = ()
    exact: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        wild = self.vr in WILDCARD_VRS
        if self.vr == "PN":
            self.patterns = ()
            return
        self.patterns = tuple(
            _wildcard(v) if wild and _has_wildcard(v) else None for v in self.values
        )
        self.exact = frozenset(
            v for v, p in zip(self.values, self.patterns, strict=True) if p is None
        )

    def matches(self, flat: Flat) -> bool:
        stored = flat.get(self.tag)
        if not stored:
            return False
        if self.vr == "PN":
            return any(_pn_match(q, s, self.fuzzy) for q in self.values for s in stored)
        exact = self.exact
        for s in stored:
            if s in exact:
                return True
            for pattern in self.patterns:
                if pattern is not None and pattern.fullmatch(s):
                    return True
        return False


def _pn_match(query: str, stored: str, fuzzy: bool) -> bool:
    qgroups = query.split("=")
    sgroups = stored.split("=")
    for i, qg in enumerate(qgroups):
        if qg == "" or qg == "*":
            continue
        sg = sgroups[i] if i < len(sgroups) else ""
        if fuzzy:
            qg, sg = fold(qg), fold(sg)
        if _has_wildcard(qg):
            if not _wildcard(qg).fullmatch(sg):
                return False
        elif qg != sg:
            return False
    return True


@dataclass
class RangeKey(Key):
    """DA/TM/DT single value or range."""

    tag: int
    vr: str
    low: str
    high: str

    def matches(self, flat: Flat) -> bool:
        for s in flat.get(self.tag) or ():
            point = _point(self.vr, s)
            if point is not None and self.low <= point <= self.high:
                return True
        return False


@dataclass
class DateTimeKey(Key):
    """Combined date-time matching of a DA key and its TM partner."""

    tag: int  # the date tag
    time_tag: int
    low: str  # YYYYMMDDHHMMSS.ffffff
    high: str

    def matches(self, flat: Flat) -> bool:
        dates = flat.get(self.tag)
        if not dates:
            return False
        times = flat.get(self.time_tag) or ("",)
        date = _point("DA", dates[0])
        if date is None:
            return False
        time = (_point("TM", times[0]) if times[0] else None) or _TM_LOW
        point = date + time
        return self.low <= point <= self.high


@dataclass
class SequenceKey(Key):
    tag: int
    item: CompiledQuery

    def matches(self, flat: Flat) -> bool:
        items = flat.get(self.tag)
        if not items or not isinstance(items, list):
            return False
        return any(self.item.matches(item) for item in items)


@dataclass
class CompiledQuery:
    """The matching keys of one Identifier (or of one sequence item in it)."""

    keys: list[Key] = field(default_factory=list)
    # Hints for pre-filtering indexes: path of tags -> the exact value or (low, high) range
    # any match must have. Only necessary conditions are recorded.
    exact_hints: dict[tuple[int, ...], frozenset[str]] = field(default_factory=dict)
    range_hints: dict[tuple[int, ...], tuple[str, str]] = field(default_factory=dict)
    shape: Hashable = ()

    def matches(self, flat: Flat) -> bool:
        return all(key.matches(flat) for key in self.keys)

    @property
    def is_universal(self) -> bool:
        return not self.keys


def _query_shape(ds: Dataset) -> Hashable:
    """What the answer to this Identifier depends on besides the stored data: its keys."""
    out: list[Hashable] = []
    for elem in ds:
        if elem.VR == "SQ":
            items = elem.value or ()
            out.append((int(elem.tag), "SQ", _query_shape(items[0]) if len(items) else None))
        else:
            out.append((int(elem.tag), elem.VR))
    return tuple(out)


def compile_query(ds: Dataset, options: MatchOptions = MatchOptions()) -> CompiledQuery:
    """Compile a decoded Identifier; raises QueryError for keys that cannot be matched."""
    compiled = _compile(ds, options, ())
    compiled.shape = _query_shape(ds)
    return compiled


def _compile(ds: Dataset, options: MatchOptions, path: tuple[int, ...]) -> CompiledQuery:
    compiled = CompiledQuery()
    elements = {int(e.tag): e for e in ds}
    consumed: set[int] = set()
    if options.combined_datetime:
        for date_tag, time_tag in DATE_TIME_PAIRS.items():
            d, t = elements.get(date_tag), elements.get(time_tag)
            if d is None or t is None:
                continue
            dv, tv = element_texts(d), element_texts(t)
            if not dv or not tv or dv == ("*",) or tv == ("*",):
                continue
            try:
                d_low, d_high = range_bounds("DA", dv[0])
                t_low, t_high = range_bounds("TM", tv[0])
            except ValueError as exc:
                raise QueryError(str(exc), offending=(date_tag, time_tag)) from None
            low = "" if d_low == "" else d_low + t_low
            high = "~" if d_high == "99999999" else d_high + t_high
            compiled.keys.append(DateTimeKey(date_tag, time_tag, low, high))
            compiled.range_hints[(*path, date_tag)] = (d_low, d_high)
            consumed.update((date_tag, time_tag))
    for tag, elem in elements.items():
        if tag in consumed or tag == SPECIFIC_CHARACTER_SET or (tag >> 16) in (0, 2):
            continue
        if tag & 0xFFFF == 0:  # group length
            continue
        vr = elem.VR
        if vr == "SQ":
            items = elem.value or ()
            if len(items) > 1:
                raise QueryError(
                    f"{len(items)} items in sequence key; at most one: {elem.keyword or elem.tag}",
                    offending=(tag,),
                )
            if not items:
                continue  # universal sequence matching
            item = _compile(items[0], options, (*path, tag))
            if item.is_universal:
                continue
            compiled.keys.append(SequenceKey(tag, item))
            compiled.exact_hints.update(item.exact_hints)
            compiled.range_hints.update(item.range_hints)
            continue
        values = element_texts(elem)
        if not values or values == ("*",):
            continue  # universal matching
        if vr in _BOUNDS:
            if len(values) != 1:
                raise QueryError(
                    f"{elem.keyword or elem.tag}: a {vr} key has one value", offending=(tag,)
                )
            try:
                low, high = range_bounds(vr, values[0])
            except ValueError as exc:
                raise QueryError(f"{elem.keyword or elem.tag}: {exc}", offending=(tag,)) from None
            compiled.keys.append(RangeKey(tag, vr, low, high))
            if vr == "DA":
                compiled.range_hints[(*path, tag)] = (low, high)
            continue
        fuzzy = vr == "PN" and options.fuzzy_names
        key = ValueKey(tag, vr, values, fuzzy=fuzzy)
        compiled.keys.append(key)
        if vr != "PN" and key.exact and all(p is None for p in key.patterns):
            compiled.exact_hints[(*path, tag)] = key.exact
    # Cheap keys first: exact values, then ranges, then wildcards and sequences.
    compiled.keys.sort(key=_cost)
    return compiled


def _cost(key: Key) -> int:
    if isinstance(key, ValueKey):
        return 0 if key.vr != "PN" and all(p is None for p in key.patterns) else 2
    if isinstance(key, RangeKey | DateTimeKey):
        return 1
    return 3


def matched_items(key_item: CompiledQuery | None, items: list[Flat]) -> list[int]:
    """Indexes of the stored sequence items a sequence key's item matches."""
    if key_item is None or key_item.is_universal:
        return list(range(len(items)))
    return [i for i, item in enumerate(items) if key_item.matches(item)]
