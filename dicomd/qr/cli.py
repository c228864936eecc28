"""``dicomd find | move | get``: Query/Retrieve on our own requestor.

Keys are given as ``-k Keyword=value`` (a matching key) or ``-k Keyword`` (a return key),
e.g. ``-k PatientName=DOE*``, ``-k StudyDate=20240101-20241231``. ``--model`` is ``study``
(Study Root, the default) or ``patient``; ``--level`` PATIENT / STUDY / SERIES / IMAGE.
``--relational`` proposes relational queries (find) or relational retrieval (move, get)
by SOP Class Extended Negotiation (PS3.4 C.5.1.1.1, C.5.2.1.1, C.5.3.1.1), so that the
keys of the levels above ``--level`` may be left out.
Exit status 0 when the final response is Success, 1 otherwise (its status is printed),
2 when ``--relational`` was asked for and the SCP did not agree to it (nothing is sent).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from dicomd.association import Request, RequestorAssociation

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_NOT_NEGOTIATED = 2
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
SOP_CLASSES = {
    ("patient", "find"): "1.2.840.10008.5.1.4.1.2.1.1",
    ("patient", "move"): "1.2.840.10008.5.1.4.1.2.1.2",
    ("patient", "get"): "1.2.840.10008.5.1.4.1.2.1.3",
    ("study", "find"): "1.2.840.10008.5.1.4.1.2.2.1",
    ("study", "move"): "1.2.840.10008.5.1.4.1.2.2.2",
    ("study", "get"): "1.2.840.10008.5.1.4.1.2.2.3",
}
DEFAULT_KEYS = {
    "PATIENT": ("PatientName", "PatientID", "PatientBirthDate", "NumberOfPatientRelatedStudies"),
    "STUDY": (
        "PatientName",
        "PatientID",
        "StudyDate",
        "AccessionNumber",
        "ModalitiesInStudy",
        "StudyDescription",
        "StudyInstanceUID",
        "NumberOfStudyRelatedInstances",
    ),
    "SERIES": (
        "Modality",
        "SeriesNumber",
        "SeriesDescription",
        "SeriesInstanceUID",
        "NumberOfSeriesRelatedInstances",
    ),
    "IMAGE": ("InstanceNumber", "SOPClassUID", "SOPInstanceUID"),
}


class CliError(Exception):
    pass


# SOP Class Extended Negotiation for the Q/R SOP classes: byte 0 is relational-queries
# (C-FIND, PS3.4 table C.5-1) or relational-retrieval (C-MOVE/C-GET, tables C.5-2/C.5-3);
# 1 = supported. The other C-FIND bytes (combined date-time, fuzzy names, timezone
# adjustment) may be left out; we propose relational only.
RELATIONAL = b"\x01"


class NotNegotiated(Exception):
    """The SCP did not agree to an option the user asked for (exit status 2)."""


def _check_relational(
    args: argparse.Namespace, assoc: RequestorAssociation, sop_class: str
) -> None:
    """With ``--relational``: did the A-ASSOCIATE-AC grant it for ``sop_class``? No reply
    item, or byte 0 not 1, means no (PS3.7 D.3.3.5: without a reply the SCP does not
    support the option). Checked before any request is sent."""
    if not args.relational:
        return
    accept = assoc.accept
    reply = accept.extended_negotiation.get(sop_class) if accept is not None else None
    if reply is None or reply[:1] != RELATIONAL:
        what = "relational queries" if args.command == "find" else "relational retrieval"
        answer = "no reply" if reply is None else f"reply {reply.hex() or 'empty'}"
        raise NotNegotiated(
            f"the SCP ({args.aec} at {args.host}:{args.port}) does not support {what} "
            f"for {sop_class} ({answer} to the SOP Class Extended Negotiation); "
            "nothing was sent. Without --relational, give the unique keys of the levels "
            "above the query level."
        )


def build_identifier(level: str, keys: list[str], *, defaults: bool) -> Dataset:
    """The Identifier from ``Keyword=value`` / ``Keyword`` strings."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.QueryRetrieveLevel = level
    wanted = list(keys) or (list(DEFAULT_KEYS[level]) if defaults else [])
    non_ascii = False
    for item in wanted:
        keyword, has_value, value = item.partition("=")
        keyword = keyword.strip()
        tag = tag_for_keyword(keyword)
        if tag is None:
            raise CliError(f"unknown attribute keyword {keyword!r}")
        vr = dictionary_VR(tag)
        if vr == "SQ":
            ds.add_new(tag, vr, [])
            continue
        text = value if has_value else ""
        non_ascii = non_ascii or not text.isascii()
        if "\\" in text:
            ds.add_new(tag, vr, text.split("\\"))
        else:
            ds.add_new(tag, vr, text)
    if non_ascii and "SpecificCharacterSet" not in ds:
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


def _printable(ds: Dataset) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for elem in ds:
        if elem.tag.group in (0x0000, 0x0002) or elem.keyword in ("SpecificCharacterSet",):
            continue
        name = elem.keyword or str(elem.tag)
        value = elem.value
        if elem.VR == "SQ":
            out[name] = [_printable(item) for item in value or ()]
        elif value is None:
            out[name] = ""
        elif isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
            out[name] = [str(v) for v in value]
        elif isinstance(value, bytes):
            out[name] = value.hex()
        else:
            out[name] = str(value)
    return out


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no matches)"
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)

    def cell(value: Any) -> str:
        return "\\".join(value) if isinstance(value, list) else str(value)

    widths = {c: max(len(c), *(len(cell(r.get(c, ""))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines.append("  ".join("-" * widths[c] for c in columns))
    for row in rows:
        lines.append("  ".join(cell(row.get(c, "")).ljust(widths[c]) for c in columns))
    return "\n".join(lines)


def _status_text(status: int) -> str:
    from dicomd.store_client import status_name

    names = {0xFE00: "Cancel", 0xA801: "Move Destination unknown", 0xA702: "Sub-operations failed"}
    return f"0x{status:04X} {names.get(status) or status_name(status)}"


async def _open(
    args: argparse.Namespace,
    contexts: list[tuple[str, list[str]]],
    roles: dict[str, tuple[bool, bool]] | None = None,
) -> RequestorAssociation:
    """Open the association; the Q/R SOP class is the first context. With
    ``--relational`` propose it and make sure it was granted (else release and raise
    ``NotNegotiated``)."""
    from dicomd.association import associate

    sop_class = contexts[0][0]
    assoc = await associate(
        args.host,
        args.port,
        calling_ae=args.aet,
        called_ae=args.aec,
        contexts=contexts,
        roles=roles,
        extended_negotiation={sop_class: RELATIONAL} if args.relational else None,
        connect_timeout=args.timeout,
        acse_timeout=args.timeout,
    )
    try:
        _check_relational(args, assoc, sop_class)
    except NotNegotiated:
        try:
            await assoc.release(timeout=args.timeout)
        except Exception:
            assoc.abort()
        raise
    return assoc


def _encode(assoc: RequestorAssociation, cid: int, ds: Dataset) -> bytes:
    from dicomd.query.charset import encode_dataset

    return encode_dataset(ds, assoc.contexts[cid].transfer_syntax)


def cmd_find(args: argparse.Namespace) -> int:
    from dicomd.association import AssociationError
    from dicomd.net import dimse
    from dicomd.query.charset import decode_identifier

    async def main() -> int:
        sop_class = SOP_CLASSES[(args.model, "find")]
        identifier = build_identifier(args.level, args.key, defaults=True)
        assoc = await _open(args, [(sop_class, [EXPLICIT_LE, IMPLICIT_LE])])
        rows: list[dict[str, Any]] = []
        final = -1
        try:
            cid = assoc.context_for(sop_class)
            fields = dimse.c_find_rq(assoc.next_message_id(), sop_class)
            body = _encode(assoc, cid, identifier)
            async for rsp in assoc.request(cid, fields, body, timeout=args.timeout):
                if rsp.is_pending and rsp.dataset:
                    ds = decode_identifier(rsp.dataset, assoc.contexts[cid].transfer_syntax)
                    row = _printable(ds)
                    row.pop("QueryRetrieveLevel", None)
                    if args.json:
                        print(json.dumps(row, ensure_ascii=False), flush=True)
                    rows.append(row)
                elif not rsp.is_pending:
                    final = rsp.status
                    comment = rsp.command.error_comment
                    if final != 0:
                        print(
                            f"find: {_status_text(final)}" + (f": {comment}" if comment else ""),
                            file=sys.stderr,
                        )
            await assoc.release(timeout=args.timeout)
        except (AssociationError, OSError, TimeoutError) as exc:
            assoc.abort()
            raise CliError(str(exc) or type(exc).__name__) from exc
        if not args.json:
            print(_table(rows))
        print(f"{len(rows)} match(es)", file=sys.stderr)
        return EXIT_OK if final == 0 else EXIT_FAILURE

    return _run(main, "find")


def _run(main: Callable[[], Any], what: str) -> int:
    from dicomd.association import AssociationError
    from dicomd.logging import configure_logging

    # Results go to stdout; only warnings go to stderr as log lines (as `dicomd echo`).
    configure_logging(level="warning", fmt="console" if sys.stderr.isatty() else "json")

    try:
        return int(asyncio.run(main()))
    except NotNegotiated as exc:
        print(f"{what}: {exc}", file=sys.stderr)
        return EXIT_NOT_NEGOTIATED
    except CliError as exc:
        print(f"{what}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except (AssociationError, OSError, TimeoutError) as exc:
        print(f"{what}: {exc or type(exc).__name__}", file=sys.stderr)
        return EXIT_FAILURE


def _progress(what: str, rsp: Any, quiet: bool) -> None:
    """One progress line (overwritten while pending) with the sub-operation counts."""
    if quiet:
        return
    fields = rsp.command.fields
    counts = {
        "remaining": fields.get(0x1020),
        "completed": fields.get(0x1021),
        "failed": fields.get(0x1022),
        "warning": fields.get(0x1023),
    }
    text = " ".join(f"{k}={v}" for k, v in counts.items() if v is not None)
    end = "\r" if rsp.is_pending else "\n"
    print(f"{what}: {text}", end=end, file=sys.stderr, flush=True)


def _failed_list(rsp: Any, ts: str) -> list[str]:
    from dicomd.query.charset import decode_identifier

    if not rsp.dataset:
        return []
    try:
        ds = decode_identifier(rsp.dataset, ts)
    except Exception:
        return []
    value = ds.get("FailedSOPInstanceUIDList")
    if value is None or not value.value:
        return []
    v = value.value
    return [str(v)] if isinstance(v, str) else [str(x) for x in v]


def cmd_move(args: argparse.Namespace) -> int:
    from dicomd.net import dimse

    async def main() -> int:
        sop_class = SOP_CLASSES[(args.model, "move")]
        identifier = build_identifier(args.level, args.key, defaults=False)
        assoc = await _open(args, [(sop_class, [EXPLICIT_LE, IMPLICIT_LE])])
        final = -1
        try:
            cid = assoc.context_for(sop_class)
            ts = assoc.contexts[cid].transfer_syntax
            fields = dimse.c_move_rq(assoc.next_message_id(), sop_class, args.dest)
            async for rsp in assoc.request(cid, fields, _encode(assoc, cid, identifier)):
                _progress("move", rsp, args.quiet)
                if not rsp.is_pending:
                    final = rsp.status
                    for uid in _failed_list(rsp, ts):
                        print(f"move: failed {uid}", file=sys.stderr)
                    comment = rsp.command.error_comment
                    print(
                        f"move to {args.dest}: {_status_text(final)}"
                        + (f": {comment}" if comment else ""),
                        file=sys.stderr if final else sys.stdout,
                    )
            await assoc.release(timeout=args.timeout)
        except BaseException:
            assoc.abort()
            raise
        return EXIT_OK if final == 0 else EXIT_FAILURE

    return _run(main, "move")


def cmd_get(args: argparse.Namespace) -> int:
    from dicomd.archive.part10 import encode_file_meta
    from dicomd.net import dimse
    from dicomd.services.storage import storage_sop_classes

    out_dir: Path = args.output
    out_dir.mkdir(parents=True, exist_ok=True)

    async def main() -> int:
        sop_class = SOP_CLASSES[(args.model, "get")]
        identifier = build_identifier(args.level, args.key, defaults=False)
        storage = list(args.sop_class or storage_sop_classes()[:120])
        contexts = [(sop_class, [EXPLICIT_LE, IMPLICIT_LE])]
        contexts += [(uid, [EXPLICIT_LE, IMPLICIT_LE]) for uid in storage]
        roles = {uid: (False, True) for uid in storage}
        assoc = await _open(args, contexts, roles)
        received = 0

        async def on_store(request: Request) -> None:
            nonlocal received
            command = request.command
            data = await request.dataset.read_all() if request.dataset is not None else b""
            sop_uid = str(command.affected_sop_instance_uid or "")
            meta = encode_file_meta(
                str(command.affected_sop_class_uid or ""),
                sop_uid,
                request.context.transfer_syntax,
                assoc.called_ae,
            )
            path = out_dir / f"{sop_uid or received}.dcm"
            try:
                await asyncio.to_thread(path.write_bytes, meta + data)
            except OSError as exc:
                print(f"get: cannot write {path}: {exc}", file=sys.stderr)
                await assoc.respond(request, 0xA700, error_comment="cannot write file")
                return
            received += 1
            await assoc.respond(request, 0x0000)

        assoc.store_handler = on_store
        final = -1
        try:
            cid = assoc.context_for(sop_class)
            ts = assoc.contexts[cid].transfer_syntax
            fields = dimse.c_get_rq(assoc.next_message_id(), sop_class)
            async for rsp in assoc.request(cid, fields, _encode(assoc, cid, identifier)):
                _progress("get", rsp, args.quiet)
                if not rsp.is_pending:
                    final = rsp.status
                    for uid in _failed_list(rsp, ts):
                        print(f"get: failed {uid}", file=sys.stderr)
            await assoc.release(timeout=args.timeout)
        except BaseException:
            assoc.abort()
            raise
        print(f"get: {received} file(s) in {out_dir}: {_status_text(final)}")
        return EXIT_OK if final == 0 else EXIT_FAILURE

    return _run(main, "get")


def add_qr_commands(sub: Any) -> None:
    """Register ``dicomd find | move | get`` on the top-level sub-parsers."""

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("host")
        p.add_argument("port", type=int)
        p.add_argument("--aet", default="DICOMD_QR", help="our (calling) AE title")
        p.add_argument("--aec", default="ANY-SCP", help="the peer's (called) AE title")
        p.add_argument(
            "--model", choices=("study", "patient"), default="study", help="information model"
        )
        p.add_argument(
            "--level",
            type=str.upper,
            choices=("PATIENT", "STUDY", "SERIES", "IMAGE"),
            default="STUDY",
        )
        p.add_argument(
            "-k",
            "--key",
            action="append",
            default=[],
            metavar="KEYWORD[=VALUE]",
            help="a matching key (Keyword=value) or return key (Keyword); repeatable",
        )
        p.add_argument("--timeout", type=float, default=60.0, help="seconds per step")
        p.add_argument(
            "--relational",
            action="store_true",
            help="propose relational queries/retrieval (SOP Class Extended Negotiation): "
            "the keys of the levels above --level may be left out; exit status 2, "
            "nothing sent, if the SCP does not agree",
        )

    find = sub.add_parser("find", help="C-FIND: query a Query/Retrieve SCP")
    common(find)
    find.add_argument("--json", action="store_true", help="one JSON object per match")
    find.set_defaults(func=cmd_find)

    move = sub.add_parser("move", help="C-MOVE: have the SCP send instances to a destination")
    common(move)
    move.add_argument("--dest", required=True, help="the Move Destination AE title")
    move.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    move.set_defaults(func=cmd_move)

    get = sub.add_parser("get", help="C-GET: retrieve instances into a directory")
    common(get)
    get.add_argument("--output", "-o", type=Path, required=True, help="directory for files")
    get.add_argument(
        "--sop-class",
        action="append",
        help="storage SOP class to accept (repeatable; default: the common ones)",
    )
    get.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    get.set_defaults(func=cmd_get)
