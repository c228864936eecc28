"""Query/Retrieve beyond the basics, against real peers: SOP Class Extended Negotiation
(relational queries and retrieval, combined date-time matching, fuzzy person names) with
pynetdicom as SCU; compressed instances moved to destinations that accept only uncompressed
syntaxes (DCMTK storescp with an Explicit-VR-Little-Endian-only configuration, a pynetdicom
SCP that takes only Implicit VR Little Endian) and fetched with C-GET; cancelling a C-GET;
Cyrillic (ISO_IR 144) and UTF-8 (ISO_IR 192) names found by findscu and pynetdicom queries.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pydicom.data
import pytest
from conftest import Dicomd, base_config, free_port, require_program, wait_for_port
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from qr_helpers import (
    BULK,
    CT_IMAGE,
    MR_IMAGE,
    SECONDARY_CAPTURE,
    Inst,
    make_archive_files,
    store,
)

PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
STORAGE_CLASSES = (SECONDARY_CAPTURE, MR_IMAGE, CT_IMAGE, US_IMAGE, US_MULTIFRAME)
ROOT = "1.2.826.0.1.3680043.10.1234.77."

CYR_144 = "Иванов^Пётр"  # stored in ISO_IR 144
CYR_UTF8 = "Сидорова^Анна"  # stored in ISO_IR 192, fits ISO_IR 144
CJK_UTF8 = "Wang^XiaoDong=王^小东"  # stored in ISO_IR 192, fits no single-byte set

LAYOUT: list[dict[str, object]] = [
    dict(pid="RU1", name=CYR_144, cs="ISO_IR 144", date="20240110", acc="R1",
         series=[("CT", CT_IMAGE, 2)]),
    dict(pid="RU2", name=CYR_UTF8, cs="ISO_IR 192", date="20240210", acc="R2",
         series=[("MR", MR_IMAGE, 1)]),
    dict(pid="CN1", name=CJK_UTF8, cs="ISO_IR 192", date="20240310", acc="C1",
         series=[("OT", SECONDARY_CAPTURE, 1)]),
    dict(pid="REL", name="RELATIONAL^ROSE", cs=None, date="20230505", acc="REL1",
         series=[("CT", CT_IMAGE, 3), ("MR", MR_IMAGE, 2)]),
    dict(pid="BULKGET", name="BULK^GET", cs=None, date="20200101", acc="B1",
         series=[("CT", CT_IMAGE, BULK)]),
]  # fmt: skip

# pydicom's compressed examples, each stored as its own series of one study (fresh UIDs:
# several examples share theirs). name -> (file, what to strip before storing)
COMPRESSED: dict[str, tuple[str, tuple[str, ...]]] = {
    "jpeg-baseline-ybr": ("SC_rgb_jpeg_dcmtk.dcm", ()),
    "jpeg-baseline-unflagged": (
        "SC_rgb_jpeg_dcmtk.dcm",
        ("LossyImageCompression", "LossyImageCompressionMethod", "LossyImageCompressionRatio"),
    ),
    "jpeg-baseline-422-multiframe": ("examples_ybr_color.dcm", ()),
    "jpeg-extended-12bit": ("JPGExtended.dcm", ()),
    "jpeg-lossless": ("SC_rgb_jpeg_gdcm.dcm", ()),
    "jpeg-ls-lossless": ("MR_small_jpeg_ls_lossless.dcm", ()),
    "jpeg-ls-near-lossless": ("JPEGLSNearLossless_08.dcm", ()),
    "j2k-lossless-rct": ("examples_jpeg2k.dcm", ()),
    "j2k-lossless": ("MR_small_jp2klossless.dcm", ()),
    "j2k-lossy": ("JPEG2000.dcm", ()),
    "rle": ("MR_small_RLE.dcm", ()),
    # A damaged JPEG stream no decoder reads (pydicom's own tests expect the failure).
    "undecodable": ("JPEG-lossy.dcm", ()),
}
# What cannot be decoded with the bundled decoders, and the reason the log line must give.
NOT_DECODABLE = {
    "undecodable": "cannot decode JPEG Extended",
}
LOSSY = {
    "jpeg-extended-12bit",
    "jpeg-baseline-ybr",
    "jpeg-baseline-unflagged",
    "jpeg-baseline-422-multiframe",
    "jpeg-ls-near-lossless",
    "j2k-lossy",
}


@dataclass(frozen=True)
class Compressed:
    name: str
    path: Path
    sop_class: str
    sop_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str


def make_compressed(directory: Path) -> list[Compressed]:
    directory.mkdir(parents=True, exist_ok=True)
    study_uid = f"{ROOT}9"
    out = []
    for n, (name, (filename, strip)) in enumerate(COMPRESSED.items(), start=1):
        ds = pydicom.dcmread(pydicom.data.get_testdata_file(filename))
        for keyword in strip:
            delattr(ds, keyword)
        sop_uid = generate_uid(ROOT)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = f"{study_uid}.{n}"
        ds.PatientID = "COMPRESSED"
        ds.PatientName = "COMPRESSED^IMAGES"
        path = directory / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(
            Compressed(
                name, path, str(ds.SOPClassUID), sop_uid, study_uid, ds.SeriesInstanceUID,
                str(ds.file_meta.TransferSyntaxUID),
            )
        )  # fmt: skip
    return out


def reference(item: Compressed) -> Dataset:
    """pydicom's decompression of what was stored: what a destination must receive."""
    ds = pydicom.dcmread(item.path)
    ds.decompress(generate_instance_uid=False)
    return ds


XE_CONFIG = """\
[[TransferSyntaxes]]
[ExplicitLittleOnly]
TransferSyntax1 = 1.2.840.10008.1.2.1

[[PresentationContexts]]
[Storage]
{contexts}

[[Profiles]]
[ExplicitOnly]
PresentationContexts = Storage
"""


@dataclass
class PySCP:
    """A pynetdicom storage SCP that accepts only Implicit VR Little Endian."""

    port: int
    received: dict[str, tuple[str, Dataset]] = field(default_factory=dict)
    server: Any = None

    def start(self) -> None:
        from pynetdicom import AE, evt

        ae = AE(ae_title="PYSCP")
        for uid in STORAGE_CLASSES:
            ae.add_supported_context(uid, [ImplicitVRLittleEndian])

        def on_store(event: Any) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta
            self.received[str(ds.SOPInstanceUID)] = (str(event.context.transfer_syntax), ds)
            return 0x0000

        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
        )

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


@dataclass
class Server:
    dicomd: Dicomd
    port: int
    instances: list[Inst]
    compressed: list[Compressed]
    xe_port: int
    pyscp: PySCP
    tmp: Path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    require_program("findscu")
    tmp = tmp_path_factory.mktemp("qrmore")
    port, xe_port, py_port = free_port(), free_port(), free_port()
    config = base_config(
        tmp,
        port,
        local_aes=[
            {
                "ae_title": "DICOMD",
                "services": {"verification": None, "storage": None, "query_retrieve": None},
            },
            {
                "ae_title": "FUZZY",
                "services": {"query_retrieve": {"case_insensitive_names": True}},
            },
        ],
        peers=[
            {"name": "xe", "ae_title": "XE", "host": "127.0.0.1", "port": xe_port,
             "move_destination": True},
            {"name": "pyscp", "ae_title": "PYSCP", "host": "127.0.0.1", "port": py_port,
             "move_destination": True},
        ],
    )  # fmt: skip
    d = Dicomd(tmp)
    d.start(config)
    pyscp = PySCP(py_port)
    pyscp.start()
    try:
        instances = make_archive_files(tmp / "source", LAYOUT, ROOT)
        compressed = make_compressed(tmp / "compressed")
        store(port, [i.path for i in instances] + [c.path for c in compressed])
        yield Server(d, port, instances, compressed, xe_port, pyscp, tmp)
    finally:
        pyscp.stop()
        d.stop()


def ext_neg(*items: tuple[str, bytes]) -> list[Any]:
    from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation

    out = []
    for uid, info in items:
        item = SOPClassExtendedNegotiation()
        item.sop_class_uid = uid
        item.service_class_application_information = info
        out.append(item)
    return out


def associate(
    server: Server,
    contexts: list[str],
    *,
    negotiate: Sequence[tuple[str, bytes]] = (),
    aec: str = "DICOMD",
) -> Any:
    from pynetdicom import AE

    ae = AE(ae_title="QRMORE")
    for uid in contexts:
        ae.add_requested_context(uid)
    assoc = ae.associate("127.0.0.1", server.port, ae_title=aec, ext_neg=ext_neg(*negotiate))
    assert assoc.is_established
    return assoc


def replies(assoc: Any) -> dict[str, bytes]:
    """The SOP Class Extended Negotiation items of the A-ASSOCIATE-AC."""
    from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation

    return {
        str(item.sop_class_uid): bytes(item.service_class_application_information)
        for item in assoc.acceptor.extended_negotiation
        if isinstance(item, SOPClassExtendedNegotiation)
    }


def find(assoc: Any, query: Dataset, model: str) -> tuple[int, list[Dataset], Any]:
    """(final status, answers, final status dataset) of a C-FIND."""
    answers: list[Dataset] = []
    final: Any = None
    for status, identifier in assoc.send_c_find(query, model):
        if status.Status in (0xFF00, 0xFF01):
            answers.append(identifier)
        else:
            final = status
    assert final is not None
    return int(final.Status), answers, final


def q(level: str, **keys: Any) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


# --- SOP Class Extended Negotiation -----------------------------------------------------------


def test_extended_negotiation_reply(server: Server) -> None:
    """The AC grants what dicomd does, byte for byte, for each proposed SOP class."""
    assoc = associate(
        server,
        [STUDY_ROOT_FIND, PATIENT_ROOT_MOVE, STUDY_ROOT_GET],
        negotiate=[
            (STUDY_ROOT_FIND, b"\x01\x01\x01\x01\x01"),
            (PATIENT_ROOT_MOVE, b"\x01\x01"),
            (STUDY_ROOT_GET, b"\x01"),
            (PATIENT_ROOT_FIND, b"\x01\x01"),  # no presentation context proposed: no reply
        ],
    )
    try:
        # relational yes, combined date-time yes, fuzzy no (standard matching on this AE),
        # timezone adjustment no, enhanced multi-frame conversion no.
        assert replies(assoc) == {
            STUDY_ROOT_FIND: b"\x01\x01\x00\x00\x00",
            PATIENT_ROOT_MOVE: b"\x01\x00",
            STUDY_ROOT_GET: b"\x01",
        }
    finally:
        assoc.release()
    # The AE with case- and accent-insensitive names grants fuzzy matching; options not
    # proposed stay 0.
    assoc = associate(
        server,
        [STUDY_ROOT_FIND],
        negotiate=[(STUDY_ROOT_FIND, b"\x00\x00\x01\x00")],
        aec="FUZZY",
    )
    try:
        assert replies(assoc) == {STUDY_ROOT_FIND: b"\x00\x00\x01\x00"}
    finally:
        assoc.release()
    # Nothing proposed, nothing answered.
    assoc = associate(server, [STUDY_ROOT_FIND])
    try:
        assert replies(assoc) == {}
    finally:
        assoc.release()


def test_relational_find_only_when_negotiated(server: Server) -> None:
    rel = [i for i in server.instances if i.patient_id == "REL"]
    # Hierarchical: a SERIES-level query needs the Study Instance UID.
    assoc = associate(server, [STUDY_ROOT_FIND])
    try:
        status, answers, final = find(
            assoc, q("SERIES", PatientName="RELATIONAL*", Modality="CT", SeriesInstanceUID=""),
            STUDY_ROOT_FIND,
        )  # fmt: skip
        assert status == 0xA900 and answers == []
        assert "StudyInstanceUID" in final.ErrorComment
    finally:
        assoc.release()
    server.dicomd.wait_for_log("qr_bad_identifier")

    assoc = associate(
        server,
        [STUDY_ROOT_FIND, PATIENT_ROOT_FIND],
        negotiate=[(STUDY_ROOT_FIND, b"\x01"), (PATIENT_ROOT_FIND, b"\x01")],
    )
    try:
        # SERIES level by patient name and modality, no study key.
        status, answers, _ = find(
            assoc,
            q("SERIES", PatientName="RELATIONAL*", Modality="CT", SeriesInstanceUID="",
              StudyInstanceUID="", NumberOfSeriesRelatedInstances=""),
            STUDY_ROOT_FIND,
        )  # fmt: skip
        assert status == 0x0000
        ct = {i.series_uid for i in rel if i.modality == "CT"}
        assert {a.SeriesInstanceUID for a in answers} == ct
        assert {a.StudyInstanceUID for a in answers} == {rel[0].study_uid}
        assert [int(a.NumberOfSeriesRelatedInstances) for a in answers] == [3]
        # IMAGE level with SOP Instance UIDs only: the upper keys come back as stored.
        wanted = [rel[0], rel[-1]]
        status, answers, _ = find(
            assoc,
            q("IMAGE", SOPInstanceUID=[i.sop_uid for i in wanted], StudyInstanceUID="",
              SeriesInstanceUID="", PatientID="", InstanceNumber="", Modality=""),
            STUDY_ROOT_FIND,
        )  # fmt: skip
        assert status == 0x0000
        got = {a.SOPInstanceUID: a for a in answers}
        assert set(got) == {i.sop_uid for i in wanted}
        for inst in wanted:
            a = got[inst.sop_uid]
            assert (a.StudyInstanceUID, a.SeriesInstanceUID) == (inst.study_uid, inst.series_uid)
            assert a.PatientID == "REL" and int(a.InstanceNumber) == inst.number
            assert a.Modality == inst.modality
        # Patient Root, STUDY level without the Patient ID.
        status, answers, _ = find(
            assoc,
            q("STUDY", StudyDate="20230101-20231231", StudyInstanceUID="", PatientID=""),
            PATIENT_ROOT_FIND,
        )
        assert status == 0x0000
        expected = {(i.study_uid, i.patient_id) for i in server.instances
                    if i.study_date.startswith("2023")}  # fmt: skip
        assert {(a.StudyInstanceUID, a.PatientID) for a in answers} == expected
    finally:
        assoc.release()
    server.dicomd.wait_for_log("qr_find", relational=True, query_level="IMAGE")


@pytest.mark.parametrize(
    ("info", "expected"),
    [
        (None, set()),  # not negotiated: date and time matched each on its own
        (b"\x00\x00", set()),  # proposed and declined by the SCU itself
        (b"\x00\x01", {"RU2"}),  # combined: 2024-01-10 12:00 .. 2024-02-10 23:59:59
    ],
)
def test_combined_date_time_matching(server: Server, info: bytes | None, expected: set) -> None:
    """Studies are at 10:15 on 2024-01-10 (RU1) and 2024-02-10 (RU2)."""
    negotiate = [(STUDY_ROOT_FIND, info)] if info is not None else []
    assoc = associate(server, [STUDY_ROOT_FIND], negotiate=negotiate)
    try:
        status, answers, _ = find(
            assoc,
            q("STUDY", StudyDate="20240110-20240210", StudyTime="120000-", PatientID=""),
            STUDY_ROOT_FIND,
        )
        assert status == 0x0000
        assert {a.PatientID for a in answers} == expected
    finally:
        assoc.release()


def test_fuzzy_names_on_the_case_insensitive_ae(server: Server) -> None:
    query = q("PATIENT", PatientName="иванов*", PatientID="")
    query.SpecificCharacterSet = "ISO_IR 192"
    for aec, expected in (("DICOMD", set()), ("FUZZY", {"RU1"})):
        assoc = associate(
            server, [PATIENT_ROOT_FIND], negotiate=[(PATIENT_ROOT_FIND, b"\x00\x00\x01")], aec=aec
        )
        try:
            assert replies(assoc)[PATIENT_ROOT_FIND] == (b"\x00\x00\x01" if expected else b"\0\0\0")
            status, answers, _ = find(assoc, query, PATIENT_ROOT_FIND)
            assert status == 0x0000
            assert {a.PatientID for a in answers} == expected
            for a in answers:
                assert str(a.PatientName) == CYR_144
        finally:
            assoc.release()


def move(
    server: Server, query: Dataset, dest: str, model: str = STUDY_ROOT_MOVE, **kw: Any
) -> tuple[Any, Dataset | None]:
    assoc = associate(server, [model], **kw)
    try:
        responses = list(assoc.send_c_move(query, dest, model))
    finally:
        assoc.release()
    return responses[-1]


def test_relational_move_only_when_negotiated(server: Server) -> None:
    rel = [i for i in server.instances if i.patient_id == "REL"]
    wanted = [rel[0], rel[-1]]  # two series
    query = q("IMAGE", SOPInstanceUID=[i.sop_uid for i in wanted])
    before = set(server.pyscp.received)
    status, _ = move(server, query, "PYSCP")
    assert status.Status == 0xA900
    assert "StudyInstanceUID" in status.ErrorComment
    assert set(server.pyscp.received) == before
    status, _identifier = move(server, query, "PYSCP", negotiate=[(STUDY_ROOT_MOVE, b"\x01")])
    assert status.Status == 0x0000, status
    assert status.NumberOfCompletedSuboperations == 2
    for inst in wanted:
        ts, ds = server.pyscp.received[inst.sop_uid]
        assert ts == ImplicitVRLittleEndian
        assert ds.PixelData == pydicom.dcmread(inst.path).PixelData
    # Patient Root, SERIES level with only the Series Instance UID.
    series = rel[-1].series_uid
    status, _ = move(
        server, q("SERIES", SeriesInstanceUID=series), "PYSCP", PATIENT_ROOT_MOVE,
        negotiate=[(PATIENT_ROOT_MOVE, b"\x01")],
    )  # fmt: skip
    assert status.Status == 0x0000
    assert status.NumberOfCompletedSuboperations == sum(1 for i in rel if i.series_uid == series)


class GetSCU:
    """A pynetdicom C-GET requestor whose storage contexts take only ``transfer_syntax``."""

    def __init__(self, server: Server, transfer_syntax: str = ExplicitVRLittleEndian) -> None:
        self.server = server
        self.transfer_syntax = transfer_syntax
        self.received: dict[str, tuple[str, Dataset]] = {}
        self.on_store_hook: Any = None

    def get(
        self, query: Dataset, *, negotiate: Sequence[tuple[str, bytes]] = (), cancel_after: int = 0
    ) -> tuple[Any, Dataset | None, int]:
        """(final status, final identifier, pending responses seen)."""
        from pynetdicom import AE, build_role, evt

        ae = AE(ae_title="GETTER")
        ae.add_requested_context(STUDY_ROOT_GET)
        for uid in STORAGE_CLASSES:
            ae.add_requested_context(uid, [self.transfer_syntax])
        roles = [build_role(uid, scp_role=True) for uid in STORAGE_CLASSES]

        def on_store(event: Any) -> int:
            ds = event.dataset
            self.received[str(ds.SOPInstanceUID)] = (str(event.context.transfer_syntax), ds)
            return 0x0000

        assoc = ae.associate(
            "127.0.0.1", self.server.port, ae_title="DICOMD",
            ext_neg=roles + ext_neg(*negotiate), evt_handlers=[(evt.EVT_C_STORE, on_store)],
        )  # fmt: skip
        assert assoc.is_established
        pending = 0
        last: Any = None
        try:
            for status, identifier in assoc.send_c_get(query, STUDY_ROOT_GET, msg_id=11):
                last = (status, identifier)
                if status.Status == 0xFF00:
                    pending += 1
                    if cancel_after and pending == cancel_after:
                        assoc.send_c_cancel(11, query_model=STUDY_ROOT_GET)
        finally:
            assoc.release()
        assert last is not None
        return last[0], last[1], pending


def test_cancel_get(server: Server) -> None:
    """C-CANCEL while the sub-operations run: final 0xFE00 with the counts, the remaining
    instances are not sent."""
    bulk = [i for i in server.instances if i.patient_id == "BULKGET"]
    scu = GetSCU(server)
    status, _identifier, _pending = scu.get(
        q("SERIES", StudyInstanceUID=bulk[0].study_uid, SeriesInstanceUID=bulk[0].series_uid),
        cancel_after=1,
    )
    assert status.Status == 0xFE00
    remaining = int(status.NumberOfRemainingSuboperations)
    completed = int(status.NumberOfCompletedSuboperations)
    assert 0 < remaining < len(bulk)
    assert status.NumberOfFailedSuboperations == 0 and status.NumberOfWarningSuboperations == 0
    assert completed + remaining == len(bulk)
    # Exactly the completed ones arrived, and nothing more comes.
    assert len(scu.received) == completed
    assert set(scu.received) <= {i.sop_uid for i in bulk}
    entry = server.dicomd.wait_for_log("qr_get", status="0xfe00")
    assert entry["completed"] == completed and entry["remaining"] == remaining


def test_get_decompresses_for_an_uncompressed_only_requestor(server: Server) -> None:
    wanted = [c for c in server.compressed if c.name in ("rle", "j2k-lossy", "jpeg-lossless")]
    scu = GetSCU(server, ExplicitVRLittleEndian)
    status, _, _ = scu.get(
        q("IMAGE", SOPInstanceUID=[c.sop_uid for c in wanted]),
        negotiate=[(STUDY_ROOT_GET, b"\x01")],
    )
    assert status.Status == 0x0000, status
    assert set(scu.received) == {c.sop_uid for c in wanted}
    for c in wanted:
        ts, ds = scu.received[c.sop_uid]
        assert ts == ExplicitVRLittleEndian
        assert ds.PixelData == reference(c).PixelData


# --- Decompression on C-MOVE ------------------------------------------------------------------


@pytest.fixture
def xe_storescp(server: Server, tmp_path: Path) -> Iterator[Path]:
    """DCMTK storescp that accepts only Explicit VR Little Endian (an -xf configuration)."""
    program = require_program("storescp")
    contexts = "\n".join(
        f"PresentationContext{n} = {uid}\\ExplicitLittleOnly"
        for n, uid in enumerate(STORAGE_CLASSES, start=1)
    )
    cfg = tmp_path / "xe.cfg"
    cfg.write_text(XE_CONFIG.format(contexts=contexts))
    out = tmp_path / "received"
    out.mkdir()
    proc = subprocess.Popen(
        [program, "-aet", "XE", "-xf", str(cfg), "ExplicitOnly", "-od", str(out),
         str(server.xe_port)],
        env={"TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(server.xe_port, proc=proc)
        yield out
    finally:
        proc.terminate()
        proc.wait(10)


def check_decompressed(item: Compressed, ds: Dataset, transfer_syntax: str) -> None:
    ref = reference(item)
    original = pydicom.dcmread(item.path, stop_before_pixels=True)
    assert transfer_syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    assert ds.SOPInstanceUID == item.sop_uid, "the SOP Instance UID is kept"
    assert ds.PixelData == ref.PixelData, item.name
    assert ds.PhotometricInterpretation == ref.PhotometricInterpretation
    if str(original.PhotometricInterpretation).startswith("YBR"):
        assert ds.PhotometricInterpretation == "RGB", item.name
        assert ds.PlanarConfiguration == 0
    assert int(ds.get("NumberOfFrames") or 1) == int(original.get("NumberOfFrames") or 1)
    if item.name in LOSSY:
        assert ds.LossyImageCompression == "01", item.name
    else:
        assert ds.get("LossyImageCompression") == original.get("LossyImageCompression")
    if item.name in ("jpeg-baseline-unflagged", "jpeg-ls-near-lossless"):
        method = "ISO_10918_1" if item.name.startswith("jpeg-baseline") else "ISO_14495_1"
        assert ds.LossyImageCompressionMethod == method
        assert float(ds.LossyImageCompressionRatio) > 1
    assert "ExtendedOffsetTable" not in ds


def test_move_compressed_to_explicit_only_storescp(server: Server, xe_storescp: Path) -> None:
    items = {c.sop_uid: c for c in server.compressed}
    bad = {c.sop_uid: c for c in server.compressed if c.name in NOT_DECODABLE}
    assert len(bad) == len(NOT_DECODABLE)
    status, identifier = move(
        server, q("STUDY", StudyInstanceUID=server.compressed[0].study_uid), "XE"
    )
    # Every decodable instance arrived; the undecodable ones are counted failed and listed.
    assert status.Status == 0xB000, status
    assert status.NumberOfCompletedSuboperations == len(items) - len(bad)
    assert status.NumberOfFailedSuboperations == len(bad)
    assert identifier is not None
    failed = identifier.FailedSOPInstanceUIDList
    assert set([failed] if isinstance(failed, str) else failed) == set(bad)
    received = {}
    for path in xe_storescp.iterdir():
        ds = pydicom.dcmread(path)
        received[ds.SOPInstanceUID] = ds
    assert set(received) == set(items) - set(bad)
    for uid, ds in received.items():
        check_decompressed(items[uid], ds, str(ds.file_meta.TransferSyntaxUID))
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    for uid, item in bad.items():
        entry = server.dicomd.wait_for_log("qr_reencode_failed", sop_instance_uid=uid)
        assert NOT_DECODABLE[item.name] in entry["reason"], entry
        assert entry["transfer_syntax"] == item.transfer_syntax


def test_move_compressed_to_implicit_only_pynetdicom(server: Server) -> None:
    wanted = [c for c in server.compressed if c.name not in NOT_DECODABLE]
    status, _identifier = move(
        server, q("IMAGE", SOPInstanceUID=[c.sop_uid for c in wanted]), "PYSCP",
        negotiate=[(STUDY_ROOT_MOVE, b"\x01")],
    )  # fmt: skip
    assert status.Status == 0x0000, status
    assert status.NumberOfCompletedSuboperations == len(wanted)
    for c in wanted:
        ts, ds = server.pyscp.received[c.sop_uid]
        assert ts == ImplicitVRLittleEndian
        check_decompressed(c, ds, ts)


# --- Character sets: Cyrillic and UTF-8 ---------------------------------------------------


def findscu(server: Server, tmp: Path, *keys: str | bytes) -> list[Dataset]:
    """findscu -S with raw key bytes (a value in the query's own character set)."""
    out = tmp / f"find{time.monotonic_ns()}"
    out.mkdir()
    args: list[str | bytes] = [
        require_program("findscu"), "-S", "-aec", "DICOMD", "-X", "-od", str(out),
    ]  # fmt: skip
    for k in keys:
        args += ["-k", k]
    args += ["127.0.0.1", str(server.port)]
    result = subprocess.run(
        args, capture_output=True, timeout=60, env={**os.environ, "TCP_NODELAY": "1"}
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def charset(ds: Dataset) -> list[str]:
    value = ds.get("SpecificCharacterSet")
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def stored_name(server: Server, pid: str) -> str:
    return next(i.patient_name for i in server.instances if i.patient_id == pid)


@pytest.mark.parametrize(
    ("query_charset", "codec", "pattern", "pid", "answer_charset"),
    [
        # Cyrillic query in ISO_IR 144 finds names stored in ISO_IR 144 and in UTF-8; the
        # answers come back in ISO_IR 144, where they fit.
        ("ISO_IR 144", "iso8859_5", "Иванов*", "RU1", ["ISO_IR 144"]),
        ("ISO_IR 144", "iso8859_5", "Сидор*", "RU2", ["ISO_IR 144"]),
        # The same in UTF-8.
        ("ISO_IR 192", "utf-8", "Иванов^П?тр", "RU1", ["ISO_IR 192"]),
        ("ISO_IR 192", "utf-8", "Сидорова^Анна", "RU2", ["ISO_IR 192"]),
        ("ISO_IR 192", "utf-8", "Wang^XiaoDong=王*", "CN1", ["ISO_IR 192"]),
    ],
)
def test_findscu_cyrillic_and_utf8(
    server: Server, tmp_path: Path, query_charset: str, codec: str, pattern: str, pid: str,
    answer_charset: list[str],
) -> None:  # fmt: skip
    answers = findscu(
        server, tmp_path, "QueryRetrieveLevel=STUDY", f"SpecificCharacterSet={query_charset}",
        b"PatientName=" + pattern.encode(codec), "PatientID", "StudyInstanceUID",
    )  # fmt: skip
    assert [a.PatientID for a in answers] == [pid]
    assert str(answers[0].PatientName) == stored_name(server, pid)
    assert charset(answers[0]) == answer_charset
    assert answers[0].StudyInstanceUID == next(
        i.study_uid for i in server.instances if i.patient_id == pid
    )


def test_findscu_iso_ir_144_answer_that_does_not_fit(server: Server, tmp_path: Path) -> None:
    """A Chinese name answering an ISO_IR 144 query goes out in ISO_IR 192."""
    answers = findscu(
        server, tmp_path, "QueryRetrieveLevel=STUDY", "SpecificCharacterSet=ISO_IR 144",
        "PatientID=CN1", "PatientName",
    )  # fmt: skip
    assert len(answers) == 1
    assert str(answers[0].PatientName) == CJK_UTF8
    assert charset(answers[0]) == ["ISO_IR 192"]


@pytest.mark.parametrize("query_charset", ["ISO_IR 144", "ISO_IR 192"])
def test_pynetdicom_cyrillic_queries(server: Server, query_charset: str) -> None:
    """pydicom encodes the query in its character set; every Cyrillic patient is found and
    decoded back to the stored name."""
    assoc = associate(server, [PATIENT_ROOT_FIND])
    try:
        query = q("PATIENT", PatientName="*ов*", PatientID="", PatientBirthDate="")
        query.SpecificCharacterSet = query_charset
        status, answers, _ = find(assoc, query, PATIENT_ROOT_FIND)
        assert status == 0x0000
        got = {a.PatientID: a for a in answers}
        assert set(got) == {"RU1", "RU2"}  # Иванов, Сидорова
        for pid, a in got.items():
            assert str(a.PatientName) == stored_name(server, pid)
            assert charset(a) == [query_charset]
        # A wildcard on one Cyrillic character (two bytes in UTF-8, one in ISO_IR 144).
        query = q("PATIENT", PatientName="Сидоров?^Анна", PatientID="")
        query.SpecificCharacterSet = query_charset
        status, answers, _ = find(assoc, query, PATIENT_ROOT_FIND)
        assert [a.PatientID for a in answers] == ["RU2"]
    finally:
        assoc.release()


# --- dicomd find | move | get --relational ----------------------------------------------------


def dicomd_cli(*args: str) -> subprocess.CompletedProcess[str]:
    import sys

    return subprocess.run(
        [sys.executable, "-m", "dicomd", *args], capture_output=True, text=True, timeout=60
    )


def test_cli_relational_find_move_get(server: Server, tmp_path: Path) -> None:
    """IMAGE level with only the Patient ID (find) or the SOP Instance UIDs (move, get):
    hierarchical Q/R refuses it with 0xA900, --relational negotiates it and it works."""
    rel = [i for i in server.instances if i.patient_id == "REL"]
    port = str(server.port)
    find = ("find", "127.0.0.1", port, "--aec", "DICOMD", "--level", "IMAGE", "--json",
            "-k", "PatientID=REL", "-k", "SOPInstanceUID", "-k", "SeriesInstanceUID")  # fmt: skip
    result = dicomd_cli(*find)
    assert result.returncode == 1 and "0xA900" in result.stderr, result
    result = dicomd_cli(*find, "--relational")
    assert result.returncode == 0, result.stderr
    import json

    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert {r["SOPInstanceUID"] for r in rows} == {i.sop_uid for i in rel}
    assert {r["SeriesInstanceUID"] for r in rows} == {i.series_uid for i in rel}

    wanted = [rel[0], rel[-1]]  # two series
    key = "SOPInstanceUID=" + "\\".join(i.sop_uid for i in wanted)
    move = ("move", "127.0.0.1", port, "--aec", "DICOMD", "--dest", "PYSCP", "--level",
            "IMAGE", "-k", key)  # fmt: skip
    before = set(server.pyscp.received)
    result = dicomd_cli(*move)
    assert result.returncode == 1 and "0xA900" in result.stderr, result
    assert set(server.pyscp.received) == before
    for inst in wanted:
        server.pyscp.received.pop(inst.sop_uid, None)
    result = dicomd_cli(*move, "--relational")
    assert result.returncode == 0, result.stderr
    assert "completed=2" in result.stderr
    assert {i.sop_uid for i in wanted} <= set(server.pyscp.received)

    out = tmp_path / "got"
    get = ("get", "127.0.0.1", port, "--aec", "DICOMD", "-o", str(out), "--level", "IMAGE",
           "-k", key)  # fmt: skip
    result = dicomd_cli(*get)
    assert result.returncode == 1 and "0xA900" in result.stdout + result.stderr, result
    result = dicomd_cli(*get, "--relational")
    assert result.returncode == 0, result.stderr
    got = {pydicom.dcmread(p).SOPInstanceUID for p in out.iterdir()}
    assert got == {i.sop_uid for i in wanted}
    server.dicomd.wait_for_log("qr_find", relational=True, query_level="IMAGE")


DCMQRSCP_CONFIG = """\
NetworkTCPPort  = {port}
MaxPDUSize      = 16384
MaxAssociations = 16

HostTable BEGIN
HostTable END

VendorTable BEGIN
VendorTable END

AETable BEGIN
DCMQRSCP   {storage}   RW (10, 1024mb)   ANY
AETable END
"""


@pytest.fixture
def dcmqrscp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """DCMTK's dcmqrscp (which does not do relational Q/R): (port, its log). Forking mode:
    dcmqrscp 3.6.7 crashes after an association in --single-process mode."""
    program = require_program("dcmqrscp")
    port = free_port()
    storage = tmp_path / "dcmqrscp-db"
    storage.mkdir()
    config = tmp_path / "dcmqrscp.cfg"
    config.write_text(DCMQRSCP_CONFIG.format(port=port, storage=storage))
    log = tmp_path / "dcmqrscp.log"
    with log.open("w") as out:
        proc = subprocess.Popen([program, "-v", "-c", str(config)], stdout=out, stderr=out)
    try:
        wait_for_port(port, proc=proc)
        yield port, log
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_cli_relational_refused_by_dcmqrscp(dcmqrscp: tuple[int, Path], tmp_path: Path) -> None:
    """dcmqrscp does not answer the extended negotiation: --relational stops with exit
    status 2 and a clear message before any request is sent."""
    port, log = dcmqrscp
    common = ("127.0.0.1", str(port), "--aec", "DCMQRSCP", "--level", "IMAGE")
    for command, extra, what in (
        ("find", ("-k", "PatientID=REL"), "relational queries"),
        ("move", ("--dest", "ELSEWHERE", "-k", "SOPInstanceUID=1.2.3"), "relational retrieval"),
        (
            "get",
            ("-o", str(tmp_path / "got"), "-k", "SOPInstanceUID=1.2.3"),
            "relational retrieval",
        ),
    ):
        result = dicomd_cli(command, *common, *extra, "--relational")
        assert result.returncode == 2, result
        assert f"does not support {what}" in result.stderr
        assert "nothing was sent" in result.stderr
    # The peer works: the same find without --relational reaches it (dcmqrscp answers it
    # hierarchically), and it is the only C-FIND dcmqrscp ever received.
    result = dicomd_cli("find", *common, "-k", "PatientID=REL")
    assert result.returncode in (0, 1), result
    deadline = time.monotonic() + 10
    while "Received Find SCP" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    text = log.read_text()
    assert text.count("Received Find SCP") == 1, text
    assert "Received Move SCP" not in text and "Received Get SCP" not in text


def test_cli_relational_declined_by_pynetdicom() -> None:
    """A pynetdicom SCP that answers the extended negotiation with 0 (declined): exit
    status 2, and its C-FIND handler never runs."""
    from pynetdicom import AE, evt

    calls: list[object] = []

    def on_extended(event: Any) -> dict[str, bytes]:
        return {uid: b"\x00" for uid in event.app_info}

    def on_find(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        calls.append(event)
        yield 0x0000, None

    ae = AE(ae_title="PYQR")
    ae.add_supported_context(STUDY_ROOT_FIND, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    port = free_port()
    scp = ae.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[(evt.EVT_SOP_EXTENDED, on_extended), (evt.EVT_C_FIND, on_find)],
    )
    try:
        common = ("find", "127.0.0.1", str(port), "--aec", "PYQR", "-k", "PatientID=REL")
        result = dicomd_cli(*common, "--relational")
        assert result.returncode == 2, result
        assert "does not support relational queries" in result.stderr
        assert "reply 00" in result.stderr
        assert calls == []
        result = dicomd_cli(*common)
        assert result.returncode == 0, result
        assert len(calls) == 1
    finally:
        scp.shutdown()
