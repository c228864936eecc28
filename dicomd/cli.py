"""Command line: ``dicomd run | check-config | echo | store | find | move | get | reindex |
worklist``.

Each sub-command is a small function; the daemon itself lives in ``supervisor``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from dicomd import __version__

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        type=Path,
        default=None,
        help="main configuration file (default /etc/dicomd/dicomd.yaml, plus conf.d/*.yaml "
        "beside it; without any file, embedded development defaults are used)",
    )


def cmd_check_config(args: argparse.Namespace) -> int:
    from dicomd.config import check_config

    findings, loaded = check_config(args.config)
    for finding in findings:
        print(finding, file=sys.stderr if finding.severity == "error" else sys.stdout)
    errors = [f for f in findings if f.severity == "error"]
    if errors or loaded is None:
        print(f"{len(errors)} error(s)", file=sys.stderr)
        return EXIT_FAILURE
    if loaded.is_default:
        print("no configuration file: the embedded development defaults are valid")
    else:
        print("configuration OK: " + ", ".join(str(f) for f in loaded.files))
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from dicomd.config import ConfigError, load_config
    from dicomd.logging import configure_logging
    from dicomd.supervisor import StartupError, run

    try:
        loaded = load_config(args.config)
    except ConfigError as exc:
        configure_logging()
        for finding in exc.findings:
            print(finding, file=sys.stderr)
        print("dicomd: not started: the configuration has errors", file=sys.stderr)
        return EXIT_FAILURE
    logging_config = loaded.config.logging
    configure_logging(
        level=args.log_level or logging_config.level,
        fmt=logging_config.format,
        levels=logging_config.levels,
    )
    try:
        return run(loaded, args.config)
    except StartupError as exc:
        print(f"dicomd: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def cmd_echo(args: argparse.Namespace) -> int:
    from dicomd.association import AssociationError, associate
    from dicomd.logging import configure_logging

    # Client commands print their results on stdout; only warnings go to stderr as log lines.
    configure_logging(level="warning", fmt="console" if sys.stderr.isatty() else "json")
    from dicomd.net.dimse import VERIFICATION as VERIFICATION_SOP_CLASS

    async def main() -> int:
        start = time.perf_counter()
        try:
            assoc = await associate(
                args.host,
                args.port,
                calling_ae=args.aet,
                called_ae=args.aec,
                contexts=[(VERIFICATION_SOP_CLASS, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])],
                max_pdu_length=args.max_pdu,
                connect_timeout=args.timeout,
                acse_timeout=args.timeout,
            )
        except (OSError, TimeoutError) as exc:
            print(f"echo: cannot connect to {args.host}:{args.port}: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        except AssociationError as exc:
            print(f"echo: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        assoc_ms = (time.perf_counter() - start) * 1000
        print(
            f"association accepted by {args.aec} at {args.host}:{args.port} "
            f"in {assoc_ms:.2f} ms (peer implementation {assoc.peer_implementation[1] or '-'}"
            f" {assoc.peer_implementation[0]})"
        )
        failures = 0
        try:
            for i in range(1, args.count + 1):
                t0 = time.perf_counter()
                status = await assoc.echo(timeout=args.timeout)
                rtt = (time.perf_counter() - t0) * 1000
                ok = status == 0
                failures += not ok
                print(
                    f"C-ECHO {i}: status 0x{status:04X} {'Success' if ok else 'FAILED'}"
                    f" rtt={rtt:.3f} ms"
                )
            await assoc.release(timeout=args.timeout)
        except (AssociationError, OSError, TimeoutError) as exc:
            print(f"echo: {exc or type(exc).__name__}", file=sys.stderr)
            assoc.abort()
            return EXIT_FAILURE
        return EXIT_OK if failures == 0 else EXIT_FAILURE

    return asyncio.run(main())


def cmd_store(args: argparse.Namespace) -> int:
    from dicomd.logging import configure_logging
    from dicomd.store_client import Report, Sender, scan, status_name

    configure_logging(level="warning")
    report = Report()
    items = scan(args.paths, report)
    for path, why in report.skipped:
        print(f"store: skipped {path}: {why}", file=sys.stderr)
    if not items:
        print("store: no DICOM Part-10 files to send", file=sys.stderr)
        return EXIT_FAILURE
    sender = Sender(
        args.host,
        args.port,
        calling_ae=args.aet,
        called_ae=args.aec,
        jobs=args.jobs,
        max_pdu=args.max_pdu,
        timeout=args.timeout,
        progress=None if args.quiet else sys.stderr,
    )
    sender.report = report
    start = time.perf_counter()
    asyncio.run(sender.send(items))
    elapsed = time.perf_counter() - start
    print(
        f"sent {report.done} instances ({report.sent_bytes / 1e6:.1f} MB) in {elapsed:.2f} s "
        f"({report.done / max(elapsed, 1e-9):.0f} inst/s) with {args.jobs} association(s); "
        f"skipped {len(report.skipped)} file(s)"
    )
    for status, count in sorted(report.statuses.items()):
        code = f"0x{status:04X}" if status >= 0 else "-"
        print(f"  {code} {status_name(status)}: {count}")
    return EXIT_OK if report.ok else EXIT_FAILURE


def cmd_reindex(args: argparse.Namespace) -> int:
    from dicomd.archive.reindex import ReindexStats, reindex
    from dicomd.config import ConfigError, load_config

    try:
        loaded = load_config(args.config)
    except ConfigError as exc:
        for finding in exc.findings:
            print(finding, file=sys.stderr)
        return EXIT_FAILURE
    archive = loaded.config.archive
    if not archive.root.is_dir():
        print(f"reindex: archive root {archive.root} does not exist", file=sys.stderr)
        return EXIT_FAILURE

    def progress(stats: ReindexStats, total: int, final: bool) -> None:
        print(
            f"reindex: {stats.scanned}/{total} files, {stats.indexed} indexed, "
            f"{stats.unchanged} unchanged, {stats.duplicates} duplicate(s), "
            f"{stats.unreadable} unreadable"
            + (f", {stats.removed_rows} stale row(s) removed" if final else ""),
            file=sys.stderr,
            flush=True,
        )

    stats = reindex(
        archive.root,
        archive.index_url,
        rebuild=args.rebuild,
        progress=None if args.quiet else progress,
        durable=archive.durability == "full",
    )
    print(
        f"reindexed {archive.root}: {stats.indexed} indexed, {stats.unchanged} unchanged, "
        f"{stats.duplicates} duplicate(s), {stats.unreadable} unreadable, "
        f"{stats.removed_rows} stale row(s) removed"
    )
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicomd", description="DICOM daemon suite: storage, query/retrieve, worklist."
    )
    parser.add_argument("--version", action="version", version=f"dicomd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon in the foreground")
    _add_config_option(run)
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None)
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check-config", help="validate the configuration and exit")
    _add_config_option(check)
    # Accepted and ignored, so one $DICOMD_OPTS serves both ExecStartPre and ExecStart.
    check.add_argument("--log-level", default=None, help=argparse.SUPPRESS)
    check.set_defaults(func=cmd_check_config)

    echo = sub.add_parser("echo", help="C-ECHO a DICOM peer and print round-trip times")
    echo.add_argument("host")
    echo.add_argument("port", type=int)
    echo.add_argument("--aet", default="DICOMD_ECHO", help="our (calling) AE title")
    echo.add_argument("--aec", default="ANY-SCP", help="the peer's (called) AE title")
    echo.add_argument("--count", "-n", type=int, default=1, help="C-ECHOs in one association")
    echo.add_argument("--max-pdu", type=int, default=65536, help="our maximum receive PDU")
    echo.add_argument("--timeout", type=float, default=10.0, help="seconds per step")
    echo.set_defaults(func=cmd_echo)

    store = sub.add_parser(
        "store", help="send DICOM files with C-STORE, data sets exactly as stored"
    )
    store.add_argument("host")
    store.add_argument("port", type=int)
    store.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="files or directories")
    store.add_argument("--aet", default="DICOMD_STORE", help="our (calling) AE title")
    store.add_argument("--aec", default="ANY-SCP", help="the peer's (called) AE title")
    store.add_argument("--jobs", "-j", type=int, default=1, help="associations in parallel")
    store.add_argument("--max-pdu", type=int, default=65536, help="our maximum receive PDU")
    store.add_argument("--timeout", type=float, default=60.0, help="seconds per step")
    store.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    store.set_defaults(func=cmd_store)

    reindex = sub.add_parser(
        "reindex", help="index the archive's files (resumable; run with the daemon stopped)"
    )
    _add_config_option(reindex)
    reindex.add_argument(
        "--rebuild", action="store_true", help="empty the index first, then index every file"
    )
    reindex.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    reindex.set_defaults(func=cmd_reindex)

    from dicomd.worklist.cli import add_worklist_commands

    add_worklist_commands(sub, _add_config_option)

    from dicomd.qr.cli import add_qr_commands

    add_qr_commands(sub)

    from dicomd.access_cli import add_access_commands

    add_access_commands(sub, _add_config_option)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
