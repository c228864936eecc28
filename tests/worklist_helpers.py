"""Worklist test data: entries written as DCMTK dump text, turned into .wl files by dump2dcm,
and a small C-FIND client on dicomd's own requestor."""

from __future__ import annotations

import asyncio
import subprocess
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from conftest import require_program
from pydicom.charset import convert_encodings, encode_string
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.valuerep import PersonName

from dicomd.association import associate
from dicomd.net import dimse
from dicomd.query.charset import encode_dataset

MWL_FIND = "1.2.840.10008.5.1.4.31"
EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"


@dataclass(frozen=True)
class Spec:
    file: str
    charset: str  # "" for none
    name: str
    pid: str | None
    acc: str
    modality: str
    station: str
    date: str
    time: str
    physician: str = "SMITH^ANNA"


ENTRIES = [
    Spec("e1", "", "DOE^JOHN", "P001", "A001", "CT", "CT1", "20240115", "083000"),
    Spec("e2", "", "DOE^JANE", "P002", "A002", "MR", "MR1", "20240115", "140000", "JONES^BOB"),
    Spec("e3", "", "SMITH^ROBERT", "P003", "A003", "CT", "CT2\\CT3", "20240116", "090000"),
    Spec("e4", "ISO_IR 100", "MÜLLER^JÜRGEN", "P004", "A004", "CT", "CT1", "20240117", "101500"),
    Spec(
        "e5",
        "\\ISO 2022 IR 87",
        "Yamada^Tarou=山田^太郎=やまだ^たろう",
        "P005",
        "A005",
        "MR",
        "MR1",
        "20240118",
        "110000",
    ),
    Spec("e6", "ISO_IR 192", "Иванов^Иван", "P006", "A006", "US", "US1", "20240119", "120000"),
    Spec("e7", "ISO_IR 144", "Петров^Пётр", "P007", "A007", "CT", "CT1", "20240120", "233000"),
    Spec("e8", "", "INCOMPLETE^ENTRY", None, "A008", "CT", "CT1", "20240115", "100000"),
]
VALID_PIDS = {s.pid for s in ENTRIES if s.pid}


def encode_text(text: str, charset: str) -> bytes:
    terms = charset.split("\\") if charset else [""]
    encodings = convert_encodings(terms)
    if "=" in text or "^" in text:
        return PersonName(text).encode(encodings)
    return encode_string(text, encodings)


def dump_bytes(spec: Spec, index: int) -> bytes:
    def line(tag: str, vr: str, value: str) -> bytes:
        return f"({tag}) {vr} [".encode() + encode_text(value, spec.charset) + b"]\n"

    out = b"# worklist entry written by the dicomd tests\n"
    if spec.charset:
        out += line("0008,0005", "CS", spec.charset)
    out += line("0008,0050", "SH", spec.acc)
    out += line("0008,0090", "PN", "REFERRER^ONE")
    out += line("0010,0010", "PN", spec.name)
    if spec.pid:
        out += line("0010,0020", "LO", spec.pid)
    out += line("0010,0030", "DA", "19700101")
    out += line("0010,0040", "CS", "O")
    out += line("0020,000d", "UI", f"1.2.826.0.1.3680043.10.1138.9.{index}")
    out += line("0032,1060", "LO", f"EXAM {spec.modality}")
    out += b"(0040,0100) SQ (Sequence with undefined length #=1)\n"
    out += b"  (fffe,e000) na (Item with undefined length #=7)\n"
    out += b"    " + line("0008,0060", "CS", spec.modality)
    out += b"    " + line("0040,0001", "AE", spec.station)
    out += b"    " + line("0040,0002", "DA", spec.date)
    out += b"    " + line("0040,0003", "TM", spec.time)
    out += b"    " + line("0040,0006", "PN", spec.physician)
    out += b"    " + line("0040,0007", "LO", "STEP")
    out += b"    " + line("0040,0009", "SH", f"SPS{index}")
    out += b"  (fffe,e00d) na (ItemDelimitationItem)\n"
    out += b"(fffe,e0dd) na (SequenceDelimitationItem)\n"
    out += line("0040,1001", "SH", f"RP{index}")
    return out


def write_entries(directory: Path, dumps: Path | None = None) -> list[Path]:
    """Dump files (in ``dumps``) and their .wl files made by dump2dcm (in ``directory``)."""
    dump2dcm = require_program("dump2dcm")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "lockfile").touch()
    dumps = dumps or directory.parent / "dumps"
    dumps.mkdir(parents=True, exist_ok=True)
    made = []
    for i, spec in enumerate(ENTRIES, 1):
        dump = dumps / f"{spec.file}.dump"
        dump.write_bytes(dump_bytes(spec, i))
        subprocess.run(
            [dump2dcm, "-q", str(dump), str(directory / f"{spec.file}.wl")],
            check=True,
            capture_output=True,
        )
        made.append(dump)
    return made


def query(
    keys: dict[str, object] | None = None, charset: str | None = None, **sps: object
) -> Dataset:
    """A worklist Identifier: the usual return keys, ``keys`` and SPS keys set on top."""
    ds = Dataset()
    if charset is not None:
        ds.SpecificCharacterSet = charset.split("\\") if "\\" in charset else charset
    for keyword in ("AccessionNumber", "PatientName", "PatientID", "StudyInstanceUID"):
        setattr(ds, keyword, "")
    item = Dataset()
    for keyword in (
        "Modality",
        "ScheduledStationAETitle",
        "ScheduledProcedureStepStartDate",
        "ScheduledProcedureStepStartTime",
        "ScheduledPerformingPhysicianName",
        "ScheduledProcedureStepID",
    ):
        setattr(item, keyword, "")
    for keyword, value in sps.items():
        setattr(item, keyword, value)
    ds.ScheduledProcedureStepSequence = [item]
    ds.RequestedProcedureID = ""
    for keyword, value in (keys or {}).items():
        setattr(ds, keyword, value)
    return ds


@dataclass
class FindResult:
    status: int
    answers: list[Dataset]
    raw: list[bytes]
    error_comment: str | None = None

    @property
    def pids(self) -> set[str]:
        return {str(a.get("PatientID", "")) for a in self.answers}


async def afind(
    port: int,
    identifier: Dataset | bytes,
    *,
    called_ae: str = "DICOMD",
    ts: str = EXPLICIT,
    cancel: bool = False,
) -> FindResult:
    assoc = await associate(
        "127.0.0.1", port, calling_ae="TESTSCU", called_ae=called_ae, contexts=[(MWL_FIND, [ts])]
    )
    try:
        cx = assoc.context_for(MWL_FIND)
        body = identifier if isinstance(identifier, bytes) else encode_dataset(identifier, ts)
        message_id = assoc.next_message_id()
        fields = dimse.c_find_rq(message_id, MWL_FIND)
        answers, raw = [], []
        status, comment = -1, None
        responses = aiter(assoc.request(cx, fields, body, timeout=30))
        first = asyncio.ensure_future(anext(responses))
        await asyncio.sleep(0)  # the request is on its way
        if cancel:
            await assoc.send_message(cx, dimse.c_cancel_rq(message_id))

        async def rest():  # type: ignore[no-untyped-def]
            yield await first
            async for r in responses:
                yield r

        async for response in rest():
            status = response.status
            comment = response.command.error_comment
            if response.is_pending and response.dataset is not None:
                raw.append(response.dataset)
                implicit = ts == IMPLICIT
                answers.append(read_dataset(BytesIO(response.dataset), implicit, True))
        await assoc.release()
    except BaseException:
        assoc.abort()
        raise
    return FindResult(status, answers, raw, comment)


def find(port: int, identifier: Dataset | bytes, **kw: object) -> FindResult:
    return asyncio.run(afind(port, identifier, **kw))  # type: ignore[arg-type]
