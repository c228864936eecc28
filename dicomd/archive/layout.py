"""Where an instance lives in the archive: ``archive.layout`` rendered with safe values."""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Callable
from pathlib import PurePosixPath

_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]")
MAX_COMPONENT = 64


def sanitize(value: str | None) -> str:
    """One path component from an attribute value: ASCII letters, digits and ``._=+-``
    only, never empty, never hidden (our own dot-directories live beside the instances),
    never ``.``/``..``, at most 64 characters."""
    text = _UNSAFE.sub("_", (value or "").strip())[:MAX_COMPONENT]
    if not text:
        return "_"
    if text.startswith("."):
        text = "_" + text[1:]
    return text


@functools.lru_cache(maxsize=16)
def _parsed(layout: str) -> tuple[tuple[str, str | None], ...]:
    return tuple((literal, name) for literal, name, _, _ in string.Formatter().parse(layout))


def render(layout: str, lookup: Callable[[str], str | None]) -> str:
    """The relative path for an instance; ``lookup`` gives attribute values by keyword."""
    parts: list[str] = []
    for literal, name in _parsed(layout):
        parts.append(literal)
        if name is not None:
            # A value must never add a directory level: '/' is not in the safe set.
            parts.append(sanitize(lookup(name)))
    text = "".join(parts)
    components = text.split("/")
    if "" in components or "." in components:
        # Not already in normal form ('a//b', 'a/./b', 'a/'): let pathlib normalise it.
        # (Checked on strings first: building a PurePosixPath per instance was ~2 % of
        # a small C-STORE's time on the event loop.)
        path = PurePosixPath(text)
        text, components = str(path), list(path.parts)
        if path.is_absolute() or text == ".":
            raise ValueError(f"layout {layout!r} gives an unsafe path {text!r}")
    if ".." in components or not text:
        raise ValueError(f"layout {layout!r} gives an unsafe path {text!r}")
    return text


def with_suffix_number(path: str, n: int) -> str:
    """``a/b/c.dcm`` → ``a/b/c_1.dcm``: the name for a collision with another file."""
    p = PurePosixPath(path)
    return str(p.with_name(f"{p.stem}_{n}{p.suffix}"))
