"""The manual page (debian/dicomd.8) documents every command and option the CLI has."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from dicomd.cli import build_parser

MANPAGE = Path(__file__).resolve().parent.parent / "debian" / "dicomd.8"


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _commands() -> list[tuple[str, argparse.ArgumentParser]]:
    out = []
    for name, sub in _subcommands(build_parser()).items():
        out.append((name, sub))
        for action, nested in _subcommands(sub).items():
            out.append((f"{name} {action}", nested))
    return out


def _text() -> str:
    """The page's words with roff's escaped hyphens and font changes removed."""
    raw = MANPAGE.read_text()
    raw = raw.replace("\\-", "-")
    return re.sub(r"\\f[BIRP]", "", raw)


COMMANDS = _commands()


@pytest.mark.parametrize(("command", "parser"), COMMANDS, ids=[c for c, _ in COMMANDS])
def test_every_command_and_option_is_documented(
    command: str, parser: argparse.ArgumentParser
) -> None:
    text = _text()
    name = command.split()[-1]
    assert re.search(rf"^\.(B|BR|BI)\b.*\b{re.escape(name)}\b", text, re.M), (
        f"`dicomd {command}` is not in {MANPAGE.name}"
    )
    missing = [
        option
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help" and option not in text
    ]
    assert not missing, f"`dicomd {command}` options not in {MANPAGE.name}: {missing}"
