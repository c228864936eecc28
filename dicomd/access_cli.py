"""Sub-commands about access: ``dicomd explain``, ``import-hosts``, ``import-dcmqrscp``.

``explain`` runs the acceptor's decision path (``dicomd.access.explain``, which calls the
same ``decide()`` the daemon does) on facts given on the command line, without any network
traffic. The importers print a YAML fragment for ``/etc/dicomd/conf.d/`` on stdout, with what
they could not convert as comments at its end, and a one-line summary on stderr.

Exit status of ``explain``: 0 allowed, 1 refused, 2 bad arguments or configuration.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from collections.abc import Callable
from pathlib import Path

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2


def cmd_explain(args: argparse.Namespace) -> int:
    from dicomd.access import AssociationFacts, explain
    from dicomd.config import ConfigError, load_config

    try:
        ipaddress.ip_address(args.source.split("%", 1)[0])
    except ValueError:
        print(f"explain: --from {args.source!r} is not an IP address", file=sys.stderr)
        return EXIT_USAGE
    try:
        loaded = load_config(args.config)
    except ConfigError as exc:
        for finding in exc.findings:
            print(finding, file=sys.stderr)
        return EXIT_USAGE
    config = loaded.config
    names = [listener.name for listener in config.listeners]
    listener = args.listener or names[0]
    if listener not in names:
        print(
            f"explain: unknown listener {listener!r} (known: {', '.join(names)})",
            file=sys.stderr,
        )
        return EXIT_USAGE
    facts = AssociationFacts(
        address=args.source,
        calling_ae=args.calling.strip(" "),
        called_ae=args.called.strip(" "),
        listener=listener,
        tls_subject=args.cert_subject,
        tls_names=tuple(args.cert_san or ()),
        user_identity=args.user,
    )
    result = explain(config, facts, service=args.service)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return EXIT_OK if result.allowed else EXIT_REFUSED
    default = "" if args.listener else " (the first configured; see --listener)"
    print(
        f"peer:      {args.source}, calling {facts.calling_ae!r}, called {facts.called_ae!r}, "
        f"listener {listener!r}{default}"
    )
    if args.cert_subject or args.cert_san:
        names_text = ", ".join(args.cert_san or ()) or "-"
        print(f"TLS:       certificate subject CN {args.cert_subject or '-'}, names {names_text}")
    if args.user:
        print(f"user:      {args.user}")
    if result.stage == "connect":
        print(f"connect:   refused by {result.rule}")
    elif result.connect.provisional:
        print(f"connect:   passes ({result.connect.rule} may allow it; the request decides)")
    else:
        print(f"connect:   passes ({result.connect.rule})")
    verdict = "allowed" if result.allowed else "REFUSED"
    print(f"decision:  {verdict} by {result.rule}")
    print(f"outcome:   {result.outcome}")
    if result.decision is not None and result.allowed and "move" in result.granted:
        destinations = ", ".join(result.decision.move_destinations) or (
            "any peer with move_destination: true"
        )
        print(f"move to:   {destinations}")
    for note in result.notes:
        print(f"note:      {note}")
    return EXIT_OK if result.allowed else EXIT_REFUSED


def _read_optional(path: Path, what: str) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        print(f"import-hosts: {path} does not exist: read as empty ({what})", file=sys.stderr)
        return ""


def cmd_import_hosts(args: argparse.Namespace) -> int:
    from dicomd.importers.hosts_access import import_hosts

    try:
        allow = _read_optional(args.allow, "tcpd does the same")
        deny = _read_optional(args.deny, "tcpd does the same")
    except OSError as exc:
        print(f"import-hosts: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    result = import_hosts(
        allow, deny, daemon=args.daemon, allow_name=str(args.allow), deny_name=str(args.deny)
    )
    sys.stdout.write(result.yaml((str(args.allow), str(args.deny))))
    problems = sum(1 for n in result.notes if not n.converted)
    print(
        f"import-hosts: {len(result.rules)} rule(s); {problems} item(s) not converted "
        "(listed at the end of the output)",
        file=sys.stderr,
    )
    return EXIT_OK


def cmd_import_dcmqrscp(args: argparse.Namespace) -> int:
    from dicomd.importers.dcmqrscp import import_dcmqrscp

    try:
        text = args.path.read_text(errors="replace")
    except OSError as exc:
        print(f"import-dcmqrscp: cannot read {args.path}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_REFUSED
    result = import_dcmqrscp(text, source=str(args.path))
    sys.stdout.write(result.yaml(str(args.path)))
    problems = sum(1 for n in result.notes if not n.converted)
    print(
        f"import-dcmqrscp: {len(result.fragment.get('local_aes', []))} local AE(s), "
        f"{len(result.fragment.get('peers', []))} peer(s), "
        f"{len(result.fragment['access']['rules'])} rule(s); {problems} item(s) not converted "
        "(listed at the end of the output)",
        file=sys.stderr,
    )
    return EXIT_OK


def add_access_commands(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    add_config_option: Callable[[argparse.ArgumentParser], None],
) -> None:
    explain = sub.add_parser(
        "explain",
        help="show the access decision for a peer, and the rule that makes it (no network)",
    )
    explain.add_argument("--from", dest="source", required=True, metavar="ADDR")
    explain.add_argument("--calling", required=True, metavar="AE", help="calling AE title")
    explain.add_argument("--called", required=True, metavar="AE", help="called AE title")
    explain.add_argument("--listener", default=None, help="listener name (default: the first)")
    explain.add_argument(
        "--service", default=None, help="a service verb: echo, store, find, move, get, worklist…"
    )
    explain.add_argument("--cert-subject", default=None, metavar="CN", help="TLS subject CN")
    explain.add_argument(
        "--cert-san", action="append", metavar="NAME", help="TLS subjectAltName (repeatable)"
    )
    explain.add_argument("--user", default=None, help="negotiated user identity")
    explain.add_argument("--json", action="store_true", help="print the result as JSON")
    add_config_option(explain)
    explain.set_defaults(func=cmd_explain)

    hosts = sub.add_parser(
        "import-hosts", help="convert /etc/hosts.allow + hosts.deny into access rules (YAML)"
    )
    hosts.add_argument("--allow", type=Path, default=Path("/etc/hosts.allow"))
    hosts.add_argument("--deny", type=Path, default=Path("/etc/hosts.deny"))
    hosts.add_argument(
        "--daemon", default="dicomd", help="daemon name the entries are for (default dicomd)"
    )
    hosts.set_defaults(func=cmd_import_hosts)

    dcmqrscp = sub.add_parser(
        "import-dcmqrscp", help="convert DCMTK's dcmqrscp.cfg into dicomd configuration (YAML)"
    )
    dcmqrscp.add_argument(
        "path", type=Path, nargs="?", default=Path("/etc/dcmtk/dcmqrscp.cfg"), metavar="PATH"
    )
    dcmqrscp.set_defaults(func=cmd_import_dcmqrscp)
