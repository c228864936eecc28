"""An immutable, pre-filtered snapshot of one worklist (one called AE title).

Full matching costs a few microseconds per entry; at 10,000 entries that is too slow for a
query, so a query first narrows the candidates with small inverted indexes on the keys
modalities actually send (Scheduled Station AE Title, Modality, Scheduled Procedure Step
Start Date, Patient ID, Accession Number) and fully matches only those.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field

from dicomd.query.matching import CompiledQuery
from dicomd.worklist.entry import SPS_SEQUENCE, Entry

# Paths (tags from the top level) indexed for exact values.
EXACT_PATHS: tuple[tuple[int, ...], ...] = (
    (SPS_SEQUENCE, 0x00400001),  # Scheduled Station AE Title
    (SPS_SEQUENCE, 0x00080060),  # Modality
    (0x00100020,),  # Patient ID
    (0x00080050,),  # Accession Number
    (0x00401001,),  # Requested Procedure ID
    (0x0020000D,),  # Study Instance UID
)
DATE_PATH = (SPS_SEQUENCE, 0x00400002)  # Scheduled Procedure Step Start Date


def _values(flat: dict, path: tuple[int, ...]) -> Iterable[str]:  # type: ignore[type-arg]
    head, rest = path[0], path[1:]
    value = flat.get(head)
    if not value:
        return ()
    if not rest:
        return value if isinstance(value, tuple) else ()
    if not isinstance(value, list):
        return ()
    out: list[str] = []
    for item in value:
        out.extend(_values(item, rest))
    return out


@dataclass
class EntryIndex:
    entries: list[Entry]  # in key order
    exact: dict[tuple[int, ...], dict[str, list[int]]] = field(default_factory=dict)
    dates: list[tuple[str, int]] = field(default_factory=list)  # sorted (date, position)

    @classmethod
    def build(cls, entries: Iterable[Entry]) -> EntryIndex:
        ordered = sorted(entries, key=lambda e: e.key)
        index = cls(ordered)
        for path in EXACT_PATHS:
            table: dict[str, list[int]] = {}
            for pos, entry in enumerate(ordered):
                for value in set(_values(entry.flat, path)):
                    table.setdefault(value, []).append(pos)
            index.exact[path] = table
        dates = []
        for pos, entry in enumerate(ordered):
            for value in set(_values(entry.flat, DATE_PATH)):
                dates.append((value.replace(".", ""), pos))
        dates.sort()
        index.dates = dates
        return index

    def __len__(self) -> int:
        return len(self.entries)

    def candidates(self, query: CompiledQuery) -> list[int] | None:
        """Positions that may match (a superset), sorted; None when no index applies."""
        sets: list[set[int]] = []
        for path, values in query.exact_hints.items():
            table = self.exact.get(path)
            if table is None:
                continue
            found: set[int] = set()
            for value in values:
                found.update(table.get(value, ()))
            sets.append(found)
        date_range = query.range_hints.get(DATE_PATH)
        if date_range is not None:
            low, high = date_range
            start = bisect.bisect_left(self.dates, (low, -1))
            end = bisect.bisect_right(self.dates, (high, len(self.entries)))
            sets.append({pos for _, pos in self.dates[start:end]})
        if not sets:
            return None
        sets.sort(key=len)
        result = sets[0]
        for other in sets[1:]:
            result = result & other
            if not result:
                break
        return sorted(result)

    def match(self, query: CompiledQuery, *, include_invalid: bool = False) -> list[Entry]:
        positions = self.candidates(query)
        pool: Iterable[Entry] = (
            self.entries if positions is None else (self.entries[p] for p in positions)
        )
        return [
            entry
            for entry in pool
            if (include_invalid or entry.valid) and query.matches(entry.flat)
        ]
