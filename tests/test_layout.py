"""archive.layout rendering: the string fast path agrees with pathlib's normal form."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dicomd.archive.layout import render, with_suffix_number


def reference_render(layout: str, values: dict[str, str | None]) -> str:
    """The definition render() had before its string fast path (pathlib all the way)."""
    from dicomd.archive.layout import _parsed, sanitize

    parts: list[str] = []
    for literal, name in _parsed(layout):
        parts.append(literal)
        if name is not None:
            parts.append(sanitize(values.get(name)))
    path = PurePosixPath("".join(parts))
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise ValueError("unsafe")
    return str(path)


literal = st.text(alphabet="ab/._", max_size=6)
value = st.one_of(st.none(), st.text(alphabet="ab./_\\ -", max_size=6))


@settings(max_examples=600, deadline=None)
@given(
    pieces=st.lists(st.tuples(literal, st.sampled_from(["A", "B"])), max_size=4),
    tail=literal,
    a=value,
    b=value,
)
def test_render_matches_pathlib(pieces: list[tuple[str, str]], tail: str, a, b) -> None:
    layout = "".join(f"{lit}{{{name}}}" for lit, name in pieces) + tail
    values = {"A": a, "B": b}
    try:
        expected: str | None = reference_render(layout, values)
    except ValueError:
        expected = None
    if expected is None:
        with pytest.raises(ValueError):
            render(layout, values.get)
    else:
        assert render(layout, values.get) == expected


@pytest.mark.parametrize(
    ("layout", "message"),
    [("/{A}", "unsafe"), ("{A}/../x", "unsafe"), ("", "unsafe"), ("./", "unsafe")],
)
def test_render_refuses_unsafe_paths(layout: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render(layout, {"A": "x"}.get)


def test_render_values_never_climb() -> None:
    assert render("{A}/{B}.dcm", {"A": "..", "B": "../etc"}.get) == "_./_._etc.dcm"


def test_with_suffix_number() -> None:
    assert with_suffix_number("a/b/c.dcm", 1) == "a/b/c_1.dcm"
    assert with_suffix_number("c", 12) == "c_12"
