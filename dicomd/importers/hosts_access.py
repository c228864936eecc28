"""``/etc/hosts.allow`` + ``/etc/hosts.deny`` (TCP wrappers, hosts_access(5)) → access rules.

tcpd's order is kept: every entry of hosts.allow whose daemon list names the daemon
(``dicomd`` by default, or ``ALL``) becomes an ``allow`` rule, then every such entry of
hosts.deny a ``deny`` rule, and ``access.default`` is ``allow`` (tcpd grants what no entry
matches). An option ``allow``/``deny`` at the end of an entry overrides its file, as in
hosts_options(5).

dicomd never resolves names. So the client patterns mean what tcpd makes of them when the
client's name lookup fails, which is also what Debian's ``tcpdmatch daemon ADDRESS`` predicts
(the oracle the tests compare against): host names, ``.domain`` suffixes, ``@netgroups``,
``KNOWN``, ``LOCAL`` and ``PARANOID`` match no client, and ``UNKNOWN`` (or a wildcard that
matches the word "unknown") matches every client. Each of those is listed in the notes.

Address patterns become exact networks: ``n.n.n.n``, ``n.n.`` (prefix), ``n.n.n.n/m.m.m.m``
and ``n.n.n.n/len`` (with tcpd's quirks: a mask of 255.255.255.255 or a length of 0 is
invalid and matches nothing, a network with bits outside its mask matches nothing, number
fields may be octal or hex), ``[v6]`` and ``[v6]/len``, ``ALL``, ``/file`` lists (read now and
inlined), and ``EXCEPT`` at any depth (computed as a set of networks: ``a EXCEPT b EXCEPT c``
is a minus (b minus c)). Wildcard patterns other than ``n.n.*`` cannot be expressed as
networks and are not converted.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatch
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    collapse_addresses,
)
from pathlib import Path

from dicomd.importers import Note, dump_yaml

Net = IPv4Network | IPv6Network

ALL4 = IPv4Network("0.0.0.0/0")
ALL6 = IPv6Network("::/0")
EVERYTHING: tuple[Net, ...] = (ALL4, ALL6)

# A non-contiguous net/mask is expanded into at most this many networks.
MAX_EXPANSION = 4096

KNOWN_OPTIONS = {
    # name: True = needs a value, False = takes none, None = value optional
    "allow": False,
    "deny": False,
    "keepalive": False,
    "severity": True,
    "spawn": True,
    "twist": True,
    "linger": True,
    "banners": True,
    "setenv": True,
    "umask": True,
    "user": True,
    "rfc931": None,
    "nice": None,
}


# --------------------------------------------------------------------------------------------
# Sets of addresses as collapsed lists of networks


def _collapse(nets: Iterable[Net]) -> tuple[Net, ...]:
    nets = list(nets)
    v4 = [n for n in nets if isinstance(n, IPv4Network)]
    v6 = [n for n in nets if isinstance(n, IPv6Network)]
    return (*collapse_addresses(v4), *collapse_addresses(v6))


def _union(*sets: Iterable[Net]) -> tuple[Net, ...]:
    return _collapse(n for s in sets for n in s)


def _difference(a: Iterable[Net], b: Iterable[Net]) -> tuple[Net, ...]:
    result = list(a)
    for cut in b:
        kept: list[Net] = []
        for net in result:
            if net.version != cut.version or not net.overlaps(cut):  # type: ignore[arg-type]
                kept.append(net)
            elif cut.supernet_of(net):  # type: ignore[arg-type]
                continue
            else:
                kept.extend(net.address_exclude(cut))  # type: ignore[arg-type]
        result = kept
    return _collapse(result)


# --------------------------------------------------------------------------------------------
# tcpd's number parsing


def _c_number(text: str) -> int | None:
    """One field of tcpd's dot_quad_addr(): decimal, 0-prefixed octal or 0x hex."""
    if re.fullmatch(r"0[xX][0-9a-fA-F]+", text):
        return int(text, 16)
    if re.fullmatch(r"0[0-7]*", text):
        return int(text, 8) if len(text) > 1 else 0
    if re.fullmatch(r"[1-9][0-9]*", text):
        return int(text)
    return None


def _dot_quad(text: str) -> int | None:
    parts = text.split(".")
    if len(parts) != 4:
        return None
    value = 0
    for part in parts:
        number = _c_number(part)
        if number is None or number > 255:
            return None
        value = (value << 8) | number
    return None if value == 0xFFFFFFFF else value  # INADDR_NONE


def _atoi(text: str) -> int:
    match = re.match(r"\s*([+-]?\d+)", text)
    return int(match.group(1)) if match else 0


def _canonical_octets(parts: list[str]) -> list[int] | None:
    """Address fields as tcpd's string comparison sees them: canonical decimal only."""
    out = []
    for part in parts:
        if not re.fullmatch(r"0|[1-9][0-9]{0,2}", part) or int(part) > 255:
            return None
        out.append(int(part))
    return out


def _split_at(text: str, delimiter: str) -> tuple[str, str | None]:
    """tcpd's split_at(): the first delimiter outside [brackets]."""
    depth = 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif depth == 0 and ch == delimiter:
            return text[:i], text[i + 1 :]
    return text, None


def _not_inaddr(token: str) -> bool:
    return bool(token.strip("0123456789./"))


# --------------------------------------------------------------------------------------------
# Patterns


@dataclass
class _Context:
    where: str
    notes: list[Note]
    read_file: Callable[[str], str | None]
    depth: int = 0

    def note(self, text: str, converted: bool = False) -> None:
        note = Note(self.where, text, converted)
        if note not in self.notes:
            self.notes.append(note)


def _masked(net_tok: str, mask_tok: str, ctx: _Context, token: str) -> tuple[Net, ...]:
    if net_tok.startswith("["):
        if not net_tok.endswith("]"):
            ctx.note(f"{token!r}: not an address pattern tcpd can match; matches no client")
            return ()
        try:
            address = IPv6Address(net_tok[1:-1])
        except ValueError:
            ctx.note(f"{token!r}: not an IPv6 address; matches no client")
            return ()
        length = _atoi(mask_tok)
        if not 0 <= length <= 128:
            ctx.note(f"{token!r}: prefix length out of range; matches no client (as in tcpd)")
            return ()
        if address.ipv4_mapped is not None:
            ctx.note(f"{token!r}: IPv4-mapped; tcpd compares IPv4 clients as IPv4: no match")
            return ()
        return (IPv6Network((address, length), strict=False),)
    net = _dot_quad(net_tok)
    if net is None:
        ctx.note(f"{token!r}: network is not a dotted quad; matches no client (as in tcpd)")
        return ()
    mask = _dot_quad(mask_tok)
    if mask is None:
        length = _atoi(mask_tok)
        if not 1 <= length <= 32:
            ctx.note(f"{token!r}: invalid mask; matches no client (as in tcpd)")
            return ()
        mask = (0xFFFFFFFF << (32 - length)) & 0xFFFFFFFF
    if net & ~mask & 0xFFFFFFFF:
        ctx.note(
            f"{token!r}: the network has bits outside the mask; matches no client (as in tcpd)"
        )
        return ()
    if re.search(r"(^|[./])0[0-9xX]", f"{net_tok}/{mask_tok}"):
        ctx.note(
            f"{token!r}: fields with a leading 0 are octal (0x: hex), as tcpd reads them", True
        )
    if mask == 0:
        return (ALL4,)
    trailing = (mask & -mask).bit_length() - 1
    prefix = 32 - trailing
    free = [bit for bit in range(trailing, 32) if not mask & (1 << bit)]
    if 2 ** len(free) > MAX_EXPANSION:
        ctx.note(f"{token!r}: non-contiguous mask too wide to express as networks: not converted")
        return ()
    if free:
        ctx.note(f"{token!r}: non-contiguous mask, expanded to {2 ** len(free)} networks", True)
    nets: list[Net] = []
    for combo in range(2 ** len(free)):
        value = net
        for i, bit in enumerate(free):
            if combo & (1 << i):
                value |= 1 << bit
        nets.append(IPv4Network((value, prefix)))
    return _collapse(nets)


def _host_pattern(token: str, ctx: _Context) -> tuple[Net, ...]:
    """The client addresses ``token`` matches when the client's name is unknown."""
    upper = token.upper()
    if token.startswith("@"):
        ctx.note(f"{token!r}: NIS netgroups need host names: matches no client")
        return ()
    if token.startswith("/"):
        if ctx.depth > 4:
            ctx.note(f"{token!r}: file lists nested too deep: not converted")
            return ()
        text = ctx.read_file(token)
        if text is None:
            ctx.note(f"{token!r}: cannot read the file: matches no client (as in tcpd)")
            return ()
        ctx.note(f"{token!r}: patterns read from the file now; later edits are not followed", True)
        inner = _Context(ctx.where, ctx.notes, ctx.read_file, ctx.depth + 1)
        return _union(*(_host_pattern(t, inner) for t in text.split()))
    if upper == "ALL":
        return EVERYTHING
    if upper in ("KNOWN", "LOCAL", "PARANOID"):
        ctx.note(f"{token!r} needs the client's host name; dicomd resolves none: matches no client")
        return ()
    net_tok, mask_tok = _split_at(token, "/")
    if mask_tok is not None:
        return _masked(net_tok, mask_tok, ctx, token)
    # string_match() against the address, then (for a non-address token) against the name,
    # which is "unknown" when the lookup failed.
    if _not_inaddr(token) and _string_matches(token, "unknown"):
        ctx.note(
            f"{token!r} matches clients whose host name is unknown; dicomd knows no names, "
            "so it matches every client",
            True,
        )
        return EVERYTHING
    return _address_pattern(token, ctx)


def _string_matches(token: str, string: str) -> bool:
    """tcpd's string_match() for a name (daemon names, the word "unknown")."""
    lowered, name = token.lower(), string.lower()
    if lowered.startswith("."):
        return len(name) > len(lowered) and name.endswith(lowered)
    if lowered == "all":
        return True
    if lowered == "known":
        return name != "unknown"
    if lowered.endswith("."):
        return name.startswith(lowered)
    if "*" in lowered or "?" in lowered:
        return fnmatch(name, lowered)
    return lowered == name


def _address_pattern(token: str, ctx: _Context) -> tuple[Net, ...]:
    if token.startswith("."):
        if _not_inaddr(token):
            ctx.note(f"{token!r}: a domain suffix needs host names: matches no client")
        else:
            ctx.note(f"{token!r}: an address suffix cannot be expressed as networks: not converted")
        return ()
    if token.endswith(".") and "*" not in token and "?" not in token:
        parts = token[:-1].split(".")
        octets = _canonical_octets(parts)
        if octets is None or len(octets) > 3 or _not_inaddr(token):
            if _not_inaddr(token):
                ctx.note(f"{token!r}: a host name prefix: matches no client")
            else:
                ctx.note(f"{token!r}: matches no address (as in tcpd)")
            return ()
        value = 0
        for octet in octets:
            value = (value << 8) | octet
        value <<= 8 * (4 - len(octets))
        return (IPv4Network((value, 8 * len(octets))),)
    if "*" in token or "?" in token:
        match = re.fullmatch(r"((?:\d+\.){1,3})\*(?:\.\*)*", token)
        if match:
            parts = match.group(1)[:-1].split(".")
            # Each ".*" after the first "*" needs one more dot in the rest of the address.
            if _canonical_octets(parts) is not None:
                if token.count("*") - 1 > 3 - len(parts):
                    ctx.note(f"{token!r}: matches no address (as in tcpd)")
                    return ()
                return _address_pattern(match.group(1), ctx)
        ctx.note(f"{token!r}: a wildcard tcpd matches against address text: not converted")
        return ()
    if token.startswith("[") and token.endswith("]"):
        try:
            address = IPv6Address(token[1:-1])
        except ValueError:
            ctx.note(f"{token!r}: not an IPv6 address: matches no client")
            return ()
        if address.ipv4_mapped is not None:
            ctx.note(f"{token!r}: IPv4-mapped; tcpd compares IPv4 clients as IPv4: no match")
            return ()
        return (IPv6Network(address),)
    octets = _canonical_octets(token.split("."))
    if octets is not None and len(octets) == 4:
        return (IPv4Network(IPv4Address(".".join(str(o) for o in octets))),)
    if _not_inaddr(token):
        ctx.note(f"{token!r}: a host name; dicomd resolves no names: matches no client")
    else:
        ctx.note(f"{token!r}: not an address in the form tcpd compares: matches no client")
    return ()


def _client_pattern(token: str, ctx: _Context) -> tuple[Net, ...]:
    user, host = _split_at(token[1:], "@") if token else ("", None)
    if host is None:
        return _host_pattern(token, ctx)
    user = token[0] + user
    # dicomd asks no ident server: the user is always unknown.
    if not _string_matches(user, "unknown") or user.upper() == "KNOWN":
        ctx.note(f"{token!r}: the client user is never known to dicomd: matches no client")
        return ()
    ctx.note(f"{token!r}: user part ignored (dicomd asks no ident server)", True)
    return _host_pattern(host, ctx)


def _except_split(tokens: list[str]) -> tuple[list[str], list[str] | None]:
    for i, token in enumerate(tokens):
        if token.upper() == "EXCEPT":
            return tokens[:i], tokens[i + 1 :]
    return tokens, None


def _client_set(tokens: list[str], ctx: _Context) -> tuple[Net, ...]:
    head, rest = _except_split(tokens)
    matched = _union(*(_client_pattern(t, ctx) for t in head))
    if rest is None:
        return matched
    return _difference(matched, _client_set(rest, ctx))


def _daemon_matches(tokens: list[str], daemon: str, ctx: _Context) -> bool:
    head, rest = _except_split(tokens)
    hit = False
    for token in head:
        name, server = _split_at(token[1:], "@") if token else ("", None)
        if server is None:
            hit = _string_matches(token, daemon)
        else:
            name = token[0] + name
            hit = _string_matches(name, daemon)
            if hit and server.upper() != "ALL":
                ctx.note(f"{token!r}: server endpoint patterns are not converted (entry skipped)")
                hit = False
        if hit:
            break
    if not hit:
        return False
    return rest is None or not _daemon_matches(rest, daemon, ctx)


# --------------------------------------------------------------------------------------------
# Files and entries


_SEPARATORS = re.compile(r"[,\s]+")


def _tokens(text: str) -> list[str]:
    return [t for t in _SEPARATORS.split(text) if t]


@dataclass
class _Entry:
    line: int
    daemons: str
    clients: str
    options: str | None


def _entries(text: str, name: str, notes: list[Note]) -> list[_Entry]:
    entries: list[_Entry] = []
    lines = text.split("\n")
    # A last line without a newline is skipped by tcpd ("missing newline").
    complete = lines[:-1]
    if lines[-1].strip():
        notes.append(Note(f"{name}:{len(lines)}", "no newline at the end: tcpd ignores it"))
    i = 0
    while i < len(complete):
        start = i
        logical = complete[i]
        while logical.endswith("\\") and i + 1 < len(complete):
            i += 1
            logical = logical[:-1] + complete[i]
        i += 1
        where = f"{name}:{start + 1}"
        if logical.startswith("#") or not logical.strip():
            continue
        daemons, rest = _split_at(logical, ":")
        if rest is None:
            notes.append(Note(where, "missing ':' separator: tcpd ignores the line"))
            continue
        clients, options = _split_at(rest, ":")
        entries.append(_Entry(start + 1, daemons, clients, options))
    return entries


def _options(options: str, ctx: _Context) -> tuple[str | None, bool]:
    """(the action an allow/deny option sets, or None; whether the options are valid)."""
    parts = [p.strip() for p in re.split(r"(?<!\\):", options)]
    action: str | None = None
    for index, part in enumerate(parts):
        name, value = [*re.split(r"[=\s]+", part, maxsplit=1), ""][:2]
        name = name.lower()
        value = value.strip()
        needs = KNOWN_OPTIONS.get(name, "unknown")
        if (
            not name
            or needs == "unknown"
            or (needs is True and not value)
            or (needs is False and value)
        ):
            ctx.note(f"option {part!r} is invalid: tcpd refuses the client on an option error")
            return None, False
        if name in ("allow", "deny"):
            if index != len(parts) - 1:
                ctx.note(f"option {name!r} must be the last: tcpd refuses the client")
                return None, False
            action = name
        elif name == "twist":
            ctx.note("option 'twist' hands the client to a command: converted as deny")
            action = "deny"
        else:
            ctx.note(f"option {name!r} has no dicomd equivalent: ignored", True)
    return action, True


@dataclass
class HostsImport:
    rules: list[dict[str, object]] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    daemon: str = "dicomd"

    def fragment(self) -> dict[str, object]:
        return {"access": {"default": "allow", "rules": self.rules}}

    def yaml(self, sources: tuple[str, str]) -> str:
        head = (
            f"# dicomd access rules converted from {sources[0]} and {sources[1]}\n"
            f"# (entries for daemon {self.daemon!r} and ALL) by `dicomd import-hosts`.\n"
            "# tcpd order: hosts.allow entries, then hosts.deny entries, then allow; so\n"
            "# access.default is allow here (dicomd's own default is deny). Rules from later\n"
            "# conf.d files come after these: a final catch-all deny hides them.\n"
        )
        body = dump_yaml(self.fragment())
        tail = ""
        problems = [n for n in self.notes if not n.converted]
        caveats = [n for n in self.notes if n.converted]
        if problems:
            tail += "# Not converted:\n" + "".join(f"#   {n}\n" for n in problems)
        if caveats:
            tail += "# Converted with a caveat:\n" + "".join(f"#   {n}\n" for n in caveats)
        return head + body + tail


def import_hosts(
    allow_text: str,
    deny_text: str,
    *,
    daemon: str = "dicomd",
    allow_name: str = "hosts.allow",
    deny_name: str = "hosts.deny",
    read_file: Callable[[str], str | None] | None = None,
) -> HostsImport:
    """Convert the two files' texts; ``read_file`` reads ``/file`` patterns (default: the
    real file system)."""

    def default_reader(path: str) -> str | None:
        try:
            return Path(path).read_text(errors="replace")
        except OSError:
            return None

    reader = read_file or default_reader
    result = HostsImport(daemon=daemon)
    for text, name, base_action in (
        (allow_text, allow_name, "allow"),
        (deny_text, deny_name, "deny"),
    ):
        label = Path(name).name
        for entry in _entries(text, name, result.notes):
            ctx = _Context(f"{name}:{entry.line}", result.notes, reader)
            if not _daemon_matches(_tokens(entry.daemons), daemon, ctx):
                continue
            action: str | None = base_action
            if entry.options is not None:
                option_action, valid = _options(entry.options, ctx)
                action = (option_action or base_action) if valid else "deny"
            head, rest = _except_split(_tokens(entry.clients))
            positive = _union(*(_client_pattern(t, ctx) for t in head))
            excluded = _client_set(rest, ctx) if rest is not None else ()
            if not _difference(positive, excluded):
                ctx.note("matches no address dicomd can see: no rule")
                continue
            rule: dict[str, object] = {"name": f"{label}:{entry.line}", "action": action}
            if positive != EVERYTHING:
                rule["from"] = [str(n) for n in positive]
            if excluded:
                rule["except_from"] = [str(n) for n in excluded]
            result.rules.append(rule)
    return result
