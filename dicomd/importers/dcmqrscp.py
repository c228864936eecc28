"""DCMTK ``dcmqrscp.cfg`` → dicomd listeners, limits, run_as, peers, local AEs and rules.

The file is read the way DCMTK 3.6.7's ``DcmQueryRetrieveConfig`` reads it (lines starting
with ``#`` are comments; values are separated by blanks, ``=`` or ``,``; quotes and
parentheses group). What each part becomes:

- ``NetworkTCPPort``, ``MaxPDUSize``, ``MaxAssociations`` → a listener on all addresses,
  ``limits.max_pdu_length``, ``limits.max_associations`` (DCMTK's defaults 104, 16384 and
  16 when absent); ``UserName``/``GroupName`` → ``run_as``.
- HostTable entries ``name = (AE, host, port), ...`` → ``peers`` with
  ``move_destination: true`` (dcmqrscp moves to any AE it finds in its tables); entries
  that only group other names are expanded where the AETable uses them.
- AETable rows ``AE StorageArea Access Quota Peers`` → a local AE each, with the services
  that serve the access (``R``: echo, find, move, get; ``RW``: those and store; ``W``: echo
  and store) and one access rule per row: ``ANY`` allows every calling AE; a peer list
  allows those calling AE titles, from the peer's address when the host is an IP address.
  dcmqrscp compares host *names* (it resolves the caller); dicomd resolves none, so a rule
  for a peer known by name checks only its AE title: each such host is listed in the notes.
- ``access.default: deny``: dcmqrscp refuses any other caller with "calling AE title not
  recognized", and dicomd's default deny answers the same.

Not converted (listed in the notes): storage areas (dicomd has one archive), quotas, the
VendorTable (only dcmqrscp's ``-ZV`` and dcmqrti use it), ``SpecificCharacterSet``, and the
services of this dicomd that are not installed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import Any

from pydantic import TypeAdapter, ValidationError

from dicomd.config import Address, AETitle
from dicomd.importers import Note, dump_yaml
from dicomd.services.registry import Registry

_GAP = set(" \t\r\n=,")
_QUOTE = set("\"'()")

ACCESS_SERVICES = {
    "R": ("echo", "find", "move", "get"),
    "RW": ("echo", "store", "find", "move", "get"),
    "W": ("echo", "store"),
}
OBSOLETE = {
    "ApplicationTitle",
    "ApplicationContext",
    "ImplementationClass",
    "ImplementationVersion",
    "NetworkType",
    "Display",
    "DisplayPort",
}

_AE = TypeAdapter(AETitle)
_HOST = TypeAdapter(Address)


def _values(text: str) -> list[str]:
    """DCMTK's parsevalues(), repeated: the values of the rest of a line."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n and text[i] in _GAP:
        i += 1
    while i < n:
        if text[i] in _QUOTE:
            j = i + 1
            while j < n and text[j] not in _QUOTE:
                j += 1
            out.append(text[i + 1 : j])
            i = j + 1
        else:
            j = i
            while j < n and text[j] not in _GAP:
                j += 1
            out.append(text[i:j])
            i = j
        while i < n and text[i] in _GAP:
            i += 1
    return out


@dataclass(frozen=True)
class _PeerRef:
    ae_title: str
    host: str
    port: int


@dataclass
class DcmqrscpImport:
    fragment: dict[str, Any] = field(default_factory=dict)
    notes: list[Note] = field(default_factory=list)

    def yaml(self, source: str) -> str:
        head = (
            f"# dicomd configuration converted from {source} by `dicomd import-dcmqrscp`.\n"
            "# dcmqrscp's command-line options (-ZA/-ZH/-ZV move restrictions, --disable-get,\n"
            "# timeouts) are not in the file: set them here by hand if you used them.\n"
        )
        body = dump_yaml(self.fragment)
        tail = ""
        problems = [n for n in self.notes if not n.converted]
        caveats = [n for n in self.notes if n.converted]
        if problems:
            tail += "# Not converted:\n" + "".join(f"#   {n}\n" for n in problems)
        if caveats:
            tail += "# Converted with a caveat:\n" + "".join(f"#   {n}\n" for n in caveats)
        return head + body + tail


def _services_for(verbs: tuple[str, ...], registry: Registry) -> tuple[dict[str, None], list[str]]:
    """Service plug-ins to enable for ``verbs``, and the verbs no installed plug-in serves."""
    services: dict[str, None] = {}
    missing: list[str] = []
    for verb in verbs:
        plugin = next(
            (name for name, cls in sorted(registry.services.items()) if verb in cls.permissions),
            None,
        )
        if plugin is None:
            missing.append(verb)
        else:
            services.setdefault(plugin, None)
    return services, missing


def import_dcmqrscp(
    text: str, *, source: str = "dcmqrscp.cfg", registry: Registry | None = None
) -> DcmqrscpImport:
    if registry is None:
        from dicomd.services.registry import discover

        registry = discover()[0]
    result = DcmqrscpImport()
    notes = result.notes

    def note(line: int, message: str, converted: bool = False) -> None:
        notes.append(Note(f"{source}:{line}", message, converted))

    settings: dict[str, Any] = {"port": 104, "max_pdu": 16384, "max_assoc": 16}
    user = group = None
    hosts: dict[str, list[_PeerRef]] = {}  # HostTable: symbolic name → peers
    host_lines: dict[str, int] = {}
    rows: list[tuple[int, list[str]]] = []
    table: str | None = None
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        if not line or line[0] in "#\r\n":
            continue
        words = line.split()
        if not words:
            continue
        mnemonic = words[0]
        rest = line[line.index(mnemonic) + len(mnemonic) :]
        if table is not None:
            if mnemonic == table and _values(rest)[:1] == ["END"]:
                table = None
                continue
            if table == "HostTable":
                values = _values(line)
                name, items = values[0], values[1:]
                peers = _peer_list(items, hosts, number, note)
                if peers:
                    hosts[name] = peers
                    host_lines[name] = number
            elif table == "VendorTable":
                values = _values(line)
                note(
                    number,
                    f"VendorTable entry {values[0]!r}: used only by dcmqrscp -ZV and dcmqrti; "
                    "not converted (restrict move destinations per rule instead)",
                )
            else:
                rows.append((number, _values(line)))
            continue
        values = _values(rest)
        if mnemonic in ("HostTable", "VendorTable", "AETable"):
            if values[:1] == ["BEGIN"]:
                table = mnemonic
            else:
                note(number, f"{mnemonic} {' '.join(values)!r}: expected BEGIN; ignored")
        elif mnemonic == "NetworkTCPPort":
            settings["port"] = _leading_int(values[0] if values else "")
        elif mnemonic == "MaxPDUSize":
            settings["max_pdu"] = _leading_int(values[0] if values else "")
        elif mnemonic == "MaxAssociations":
            settings["max_assoc"] = _leading_int(values[0] if values else "")
        elif mnemonic == "UserName":
            user = values[0] if values else None
        elif mnemonic == "GroupName":
            group = values[0] if values else None
        elif mnemonic == "SpecificCharacterSet":
            note(number, f"SpecificCharacterSet {' '.join(values)!r}: not converted")
        elif mnemonic in OBSOLETE:
            note(number, f"{mnemonic}: obsolete, ignored by dcmqrscp too", True)
        else:
            note(number, f"unknown setting {mnemonic!r} (dcmqrscp would refuse to start)")
    if table is not None:
        note(len(lines), f"no '{table} END' (dcmqrscp would refuse to start)")

    fragment = result.fragment
    port = settings["port"]
    if not 1 <= port <= 65535:
        note(1, f"NetworkTCPPort {port} is not a port; using 104")
        port = 104
    fragment["listeners"] = [{"name": "dicom", "address": "0.0.0.0", "port": port}]
    max_pdu = settings["max_pdu"]
    if max_pdu != 0 and not 4096 <= max_pdu <= 0xFFFFFFFF:
        note(1, f"MaxPDUSize {max_pdu}: dicomd accepts 4096 or more; using 4096", True)
        max_pdu = 4096
    limits = {"max_pdu_length": max_pdu}
    if settings["max_assoc"] >= 1:
        limits["max_associations"] = settings["max_assoc"]
    fragment["limits"] = limits
    if user:
        fragment["run_as"] = {"user": user, "group": group or user}

    # Peers: every AE a HostTable or AETable names is a move destination for dcmqrscp.
    peers: dict[_PeerRef, str] = {}

    def add_peer(ref: _PeerRef, name: str) -> None:
        if ref in peers:
            return
        taken = set(peers.values())
        unique, i = name, 2
        while unique in taken:
            unique, i = f"{name}-{i}", i + 1
        peers[ref] = unique

    for name, refs in hosts.items():
        direct = [r for r in refs if r not in peers]
        for index, ref in enumerate(direct):
            add_peer(ref, name if len(direct) == 1 else f"{name}-{index + 1}")

    local_aes: list[dict[str, Any]] = []
    rules: list[dict[str, Any]] = []
    for number, values in rows:
        if len(values) < 5:
            note(number, "AETable row needs AE title, storage area, access, quota and peers")
            continue
        title, area, access, quota, *peer_items = values
        try:
            title = _AE.validate_python(title)
        except ValidationError:
            note(number, f"AE title {title!r} is not valid in dicomd: row not converted")
            continue
        access_key = access.upper()
        if access_key not in ACCESS_SERVICES:
            note(number, f"access {access!r} is not R, RW or W: treated as R (as dcmqrscp does)")
            access_key = "R"
        verbs = ACCESS_SERVICES[access_key]
        services, missing = _services_for(verbs, registry)
        if missing:
            note(
                number,
                f"{title}: {', '.join(missing)} (access {access_key}) not served: no installed "
                "service plug-in provides it",
            )
        local_aes.append(
            {
                "ae_title": title,
                "description": f"from {source}, storage area {area}",
                "services": services or {"verification": None},
            }
        )
        note(number, f"{title}: storage area {area!r} not converted (dicomd has one archive)")
        note(number, f"{title}: quota ({quota}) not converted (dicomd has no per-AE quota)")
        granted = [v for v in verbs if v not in missing]
        base_rule = {"called": [title], "services": granted}
        if [p.upper() for p in peer_items] == ["ANY"]:
            rules.append({"name": f"{title}: ANY", **base_rule})
            continue
        refs = _peer_list(peer_items, hosts, number, note)
        for ref in refs:
            add_peer(ref, ref.ae_title.lower())
        by_address: dict[str, list[str]] = {}
        by_name: list[str] = []
        for ref in refs:
            try:
                ip_address(ref.host)
            except ValueError:
                if ref.ae_title not in by_name:
                    by_name.append(ref.ae_title)
                note(
                    number,
                    f"{title}: peer {ref.ae_title} on host {ref.host!r}: dicomd resolves no "
                    "names, so only its AE title is checked (write an IP address to check it)",
                    True,
                )
            else:
                titles = by_address.setdefault(ref.host, [])
                if ref.ae_title not in titles:
                    titles.append(ref.ae_title)
        for host, titles in by_address.items():
            rules.append(
                {"name": f"{title}: {host}", "from": [host], "calling": titles, **base_rule}
            )
        if by_name:
            rules.append({"name": f"{title}: peers by host name", "calling": by_name, **base_rule})
    if not rows:
        note(len(lines) or 1, "the AETable is empty: dcmqrscp serves no AE; add local_aes")

    peer_list = []
    for ref, name in peers.items():
        try:
            _AE.validate_python(ref.ae_title)
            _HOST.validate_python(ref.host)
        except ValidationError:
            line = host_lines.get(name.rsplit("-", 1)[0], 1)
            note(
                line, f"peer ({ref.ae_title}, {ref.host}, {ref.port}): not a valid AE title or host"
            )
            continue
        if not 1 <= ref.port <= 65535:
            note(host_lines.get(name, 1), f"peer {name}: port {ref.port} is not valid")
            continue
        peer_list.append(
            {
                "name": name,
                "ae_title": ref.ae_title,
                "host": ref.host,
                "port": ref.port,
                "move_destination": True,
            }
        )
    if local_aes:
        fragment["local_aes"] = local_aes
    if peer_list:
        fragment["peers"] = peer_list
    fragment["access"] = {"default": "deny", "rules": rules}
    return result


def _leading_int(text: str) -> int:
    """sscanf("%d"): the leading digits, 0 when there are none."""
    match = re.match(r"[+-]?\d+", text)
    return int(match.group(0)) if match else 0


def _peer_list(
    items: list[str], hosts: dict[str, list[_PeerRef]], number: int, note: Any
) -> list[_PeerRef]:
    """DCMTK's readPeerList(): ``AE, host, port`` triples and HostTable names."""
    out: list[_PeerRef] = []
    for item in items:
        if "," in item:
            parts = _values(item)
            if len(parts) < 2:
                note(number, f"peer {item!r}: expected (AE title, host, port)")
                continue
            port = re.match(r"\s*(\d*)", parts[2] if len(parts) > 2 else "")
            out.append(_PeerRef(parts[0], parts[1], int(port.group(1) or 0) if port else 0))
        elif item in hosts:
            out.extend(hosts[item])
        else:
            note(number, f"symbolic name {item!r} is not defined (before this line)")
    return out
