"""``dicomd worklist import | add | list | remove | export``: manage worklist entries.

Every command works on a configured worklist source (``--source``, default ``default``):
a *folder* source gets ``.wl`` files in ``ROOT/<AE>/`` (with its ``lockfile``, held
exclusively while writing, as the wlmscpfs convention says), an *sql* source rows in the
index database. Entries are validated as wlmscpfs ``--enable-file-reject`` would; an
incomplete entry is refused (``--force`` stores it anyway).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from dicomd.config import Config

EXIT_OK = 0
EXIT_FAILURE = 1

# Keywords `worklist add --set` puts in the Scheduled Procedure Step item.
SPS_KEYWORDS = frozenset(
    {
        "ScheduledStationAETitle",
        "ScheduledProcedureStepStartDate",
        "ScheduledProcedureStepStartTime",
        "ScheduledProcedureStepEndDate",
        "ScheduledProcedureStepEndTime",
        "Modality",
        "ScheduledPerformingPhysicianName",
        "ScheduledProcedureStepDescription",
        "ScheduledProcedureStepID",
        "ScheduledStationName",
        "ScheduledProcedureStepLocation",
        "ScheduledProcedureStepStatus",
        "PreMedication",
        "RequestedContrastAgent",
        "CommentsOnTheScheduledProcedureStep",
    }
)


class CliError(Exception):
    pass


def _config(args: argparse.Namespace) -> Config:
    from dicomd.config import ConfigError, load_config

    try:
        return load_config(args.config).config
    except ConfigError as exc:
        raise CliError("the configuration has errors:\n" + str(exc)) from None


def _source_spec(config: Config, name: str) -> Any:
    spec = next((s for s in config.worklist_sources if s.name == name), None)
    if spec is None:
        known = ", ".join(s.name for s in config.worklist_sources) or "none"
        raise CliError(f"unknown worklist source {name!r} (known: {known})")
    return spec


def _ae(config: Config, args: argparse.Namespace) -> str:
    if args.ae:
        from dicomd.config import _check_ae_title

        try:
            return _check_ae_title(args.ae)
        except ValueError as exc:
            raise CliError(str(exc)) from None
    return config.local_aes[0].ae_title


def _file_stem(name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "entry"
    return stem


class _AreaLock:
    """Exclusive flock on ``DIR/lockfile`` while entry files are written."""

    def __init__(self, directory: Path) -> None:
        from dicomd.worklist.files import ensure_area

        ensure_area(directory)
        self.fd = os.open(directory / "lockfile", os.O_RDONLY | os.O_CLOEXEC)

    def __enter__(self) -> _AreaLock:
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def _store(config: Config, datasets: list[tuple[str, Dataset]], spec: Any, ae: str) -> list[str]:
    """Store entries; returns a description per entry."""
    from dicomd.worklist.files import write_wl

    if spec.kind == "sql":
        from dicomd.worklist.sql import WorklistStore

        store = WorklistStore(config.archive.index_url)
        try:
            ids = store.add(ae, [ds for _, ds in datasets])
        finally:
            store.close()
        return [
            f"{name}: added as entry {i} for {ae}"
            for (name, _), i in zip(datasets, ids, strict=True)
        ]
    directory = Path(spec.path) / ae
    out = []
    with _AreaLock(directory):
        for name, ds in datasets:
            target = directory / f"{_file_stem(name)}.wl"
            existed = target.exists()
            write_wl(ds, target)
            out.append(f"{name}: {'replaced' if existed else 'written'} {target}")
    return out


def _load_inputs(files: list[Path], force: bool) -> tuple[list[tuple[str, Dataset]], int]:
    from dicomd.worklist.dump import DumpError
    from dicomd.worklist.entry import decoded, validate
    from dicomd.worklist.files import InputError, read_input

    good: list[tuple[str, Dataset]] = []
    failures = 0
    for path in files:
        warnings: list[str] = []
        try:
            ds = decoded(read_input(path, warnings))
        except (InputError, DumpError) as exc:
            print(str(exc), file=sys.stderr)
            failures += 1
            continue
        finally:
            for warning in warnings:
                print(warning, file=sys.stderr)
        problems = validate(ds)
        for problem in problems:
            print(f"{path}: {'warning' if force else 'error'}: {problem}", file=sys.stderr)
        if problems and not force:
            failures += 1
            continue
        good.append((path.stem, ds))
    return good, failures


def cmd_import(args: argparse.Namespace) -> int:
    config = _config(args)
    spec = _source_spec(config, args.source)
    ae = _ae(config, args)
    datasets, failures = _load_inputs(args.files, args.force)
    if args.check:
        for name, _ in datasets:
            print(f"{name}: OK")
        return EXIT_FAILURE if failures else EXIT_OK
    if datasets:
        for line in _store(config, datasets, spec, ae):
            print(line)
    if failures:
        print(f"{failures} file(s) not imported", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _set_values(assignments: list[str]) -> Dataset:
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataset import Dataset

    ds = Dataset()
    item = Dataset()
    for assignment in assignments:
        keyword, sep, value = assignment.partition("=")
        keyword = keyword.strip()
        if not sep or tag_for_keyword(keyword) is None:
            raise CliError(f"--set {assignment!r}: expected KEYWORD=VALUE with a DICOM keyword")
        if dictionary_VR(keyword) == "SQ":
            raise CliError(f"--set {keyword}: sequences cannot be set this way; import a file")
        target = item if keyword in SPS_KEYWORDS else ds
        values = value.split("\\")
        setattr(target, keyword, values if len(values) > 1 else value)
    if len(item):
        ds.ScheduledProcedureStepSequence = [item]
    return ds


def cmd_add(args: argparse.Namespace) -> int:
    from pydicom.uid import generate_uid

    config = _config(args)
    spec = _source_spec(config, args.source)
    ae = _ae(config, args)
    ds = _set_values(args.set or [])
    if "StudyInstanceUID" not in ds:
        ds.StudyInstanceUID = generate_uid()
    from dicomd.worklist.entry import validate

    problems = validate(ds)
    for problem in problems:
        print(f"{'warning' if args.force else 'error'}: {problem}", file=sys.stderr)
    if problems and not args.force:
        print("entry not added (--force adds it anyway)", file=sys.stderr)
        return EXIT_FAILURE
    name = args.name or f"{ds.get('PatientID', 'entry')}-{ds.StudyInstanceUID}"
    for line in _store(config, [(name, ds)], spec, ae):
        print(line)
    return EXIT_OK


def _entries(config: Config, spec: Any, ae: str | None) -> list[dict[str, Any]]:
    if spec.kind == "sql":
        from dicomd.worklist.sql import WorklistStore

        store = WorklistStore(config.archive.index_url)
        try:
            rows = store.rows(ae)
        finally:
            store.close()
        return [
            {
                "id": str(r.id),
                "ae_title": r.ae_title,
                "patient_id": r.patient_id,
                "patient_name": r.patient_name,
                "accession_number": r.accession_number,
                "modality": r.modality,
                "station_ae": r.station_ae,
                "start": " ".join(x for x in (r.start_date, r.start_time) if x),
            }
            for r in rows
        ]
    from dicomd.worklist.folder import read_entry_file

    root = Path(spec.path)
    areas = (
        [ae]
        if ae
        else sorted(p.name for p in root.iterdir() if p.is_dir())
        if root.is_dir()
        else []
    )
    out = []
    for area in areas:
        directory = root / area
        for path in sorted(directory.glob("*.wl")) if directory.is_dir() else []:
            try:
                entry = read_entry_file(path, path.name)
            except Exception as exc:
                out.append({"id": path.name, "ae_title": area, "error": str(exc)})
                continue
            flat = entry.flat
            sps = (flat.get(0x00400100) or [{}])[0]

            def first(f: dict[int, Any], tag: int) -> str | None:
                v = f.get(tag)
                return "\\".join(v) if v else None

            out.append(
                {
                    "id": path.name,
                    "ae_title": area,
                    "patient_id": first(flat, 0x00100020),
                    "patient_name": first(flat, 0x00100010),
                    "accession_number": first(flat, 0x00080050),
                    "modality": first(sps, 0x00080060),
                    "station_ae": first(sps, 0x00400001),
                    "start": " ".join(
                        x for x in (first(sps, 0x00400002), first(sps, 0x00400003)) if x
                    ),
                    **({"problems": list(entry.problems)} if entry.problems else {}),
                }
            )
    return out


def cmd_list(args: argparse.Namespace) -> int:
    config = _config(args)
    spec = _source_spec(config, args.source)
    entries = _entries(config, spec, args.ae)
    if args.json:
        print(json.dumps(entries, ensure_ascii=False, indent=1))
        return EXIT_OK
    columns = [
        "id",
        "ae_title",
        "patient_id",
        "patient_name",
        "accession_number",
        "modality",
        "station_ae",
        "start",
    ]
    rows = [[str(e.get(c) or "") for c in columns] for e in entries]
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row, entry in zip(rows, entries, strict=True):
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
        for problem in entry.get("problems", ()):
            print(f"    incomplete: {problem}")
        if "error" in entry:
            print(f"    unreadable: {entry['error']}")
    print(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}")
    return EXIT_OK


def cmd_remove(args: argparse.Namespace) -> int:
    config = _config(args)
    spec = _source_spec(config, args.source)
    if spec.kind == "sql":
        from dicomd.worklist.sql import WorklistStore

        try:
            ids = [int(i) for i in args.ids]
        except ValueError:
            raise CliError("entry ids are numbers (see `dicomd worklist list`)") from None
        store = WorklistStore(config.archive.index_url)
        try:
            removed = store.remove(ids)
        finally:
            store.close()
        print(f"removed {removed} entr{'y' if removed == 1 else 'ies'}")
        return EXIT_OK if removed == len(set(ids)) else EXIT_FAILURE
    ae = _ae(config, args)
    directory = Path(spec.path) / ae
    missing = 0
    with _AreaLock(directory):
        for name in args.ids:
            target = directory / (name if name.endswith(".wl") else f"{name}.wl")
            if target.parent != directory:
                raise CliError(f"{name!r} is not an entry file name")
            try:
                target.unlink()
                print(f"removed {target}")
            except FileNotFoundError:
                print(f"no entry {target}", file=sys.stderr)
                missing += 1
    return EXIT_FAILURE if missing else EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from dicomd.worklist.files import ensure_area, write_wl

    config = _config(args)
    spec = _source_spec(config, args.source)
    ae = _ae(config, args)
    target = args.directory / ae
    ensure_area(target)
    count = 0
    if spec.kind == "sql":
        from dicomd.worklist.sql import WorklistStore, load_entry

        store = WorklistStore(config.archive.index_url)
        try:
            rows = store.rows(ae)
            bodies = store.datasets([r.id for r in rows])
        finally:
            store.close()
        for entry_id, body in sorted(bodies.items()):
            write_wl(load_entry(entry_id, body).dataset, target / f"entry{entry_id:06d}.wl")
            count += 1
    else:
        from dicomd.worklist.folder import read_entry_file

        for path in sorted((Path(spec.path) / ae).glob("*.wl")):
            try:
                entry = read_entry_file(path, path.name)
            except Exception as exc:
                print(f"{path}: skipped: {exc}", file=sys.stderr)
                continue
            write_wl(entry.dataset, target / path.name)
            count += 1
    print(
        f"exported {count} entr{'y' if count == 1 else 'ies'} to {target} "
        f"(serve it with: wlmscpfs -dfp {args.directory} PORT)"
    )
    return EXIT_OK


def _guarded(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except CliError as exc:
            print(f"dicomd worklist: {exc}", file=sys.stderr)
            return EXIT_FAILURE

    return run


def add_worklist_commands(
    sub: Any, add_config_option: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Register ``dicomd worklist ...`` on the top-level sub-parsers."""
    worklist = sub.add_parser("worklist", help="manage modality worklist entries")
    commands = worklist.add_subparsers(dest="worklist_command", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser, ae_help: str) -> None:
        add_config_option(p)
        p.add_argument(
            "--source", default="default", help="worklist source name (default: default)"
        )
        p.add_argument("--ae", default=None, help=ae_help)

    p = commands.add_parser(
        "import", help="import entries from dump text (dcmdump/dump2dcm), DICOM JSON or .wl files"
    )
    common(p, "the called AE title whose worklist gets the entries (default: the first local AE)")
    p.add_argument("--check", action="store_true", help="only read and validate the files")
    p.add_argument("--force", action="store_true", help="store incomplete entries too")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.set_defaults(func=_guarded(cmd_import))

    p = commands.add_parser("add", help="add one entry given as KEYWORD=VALUE pairs")
    common(p, "the called AE title whose worklist gets the entry (default: the first local AE)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEYWORD=VALUE",
        help="an attribute, e.g. PatientName=DOE^JOHN; Scheduled Procedure Step attributes "
        "(Modality, ScheduledStationAETitle, ...) go in its sequence item",
    )
    p.add_argument("--name", default=None, help="file name for a folder source")
    p.add_argument("--force", action="store_true", help="add an incomplete entry too")
    p.set_defaults(func=_guarded(cmd_add))

    p = commands.add_parser("list", help="list entries")
    common(p, "only this called AE title's entries")
    p.add_argument("--json", action="store_true", help="JSON output")
    p.set_defaults(func=_guarded(cmd_list))

    p = commands.add_parser("remove", help="remove entries (ids from `list`)")
    common(p, "the called AE title (folder sources)")
    p.add_argument("ids", nargs="+", metavar="ID")
    p.set_defaults(func=_guarded(cmd_remove))

    p = commands.add_parser("export", help="write an AE's entries as a wlmscpfs folder")
    common(p, "the called AE title to export (default: the first local AE)")
    p.add_argument("directory", type=Path, metavar="DIR", help="written as DIR/<AE>/*.wl")
    p.set_defaults(func=_guarded(cmd_export))
