"""Helpers for the query/retrieve tests: a small archive of synthetic instances."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pydicom.data
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ROOT_UID = "1.2.826.0.1.3680043.10.1234."
BULK = 300  # instances in one series, for C-CANCEL tests


@dataclass(frozen=True)
class Inst:
    patient_id: str
    patient_name: str
    charset: str | list[str] | None
    study_uid: str
    study_date: str
    accession: str
    series_uid: str
    modality: str
    sop_class: str
    sop_uid: str
    number: int
    path: Path


def _charset_name(filename: str) -> tuple[str, str | list[str]]:
    ds = pydicom.dcmread(pydicom.data.get_charset_files(filename)[0])
    return str(ds.PatientName), ds.SpecificCharacterSet


def plan() -> list[dict[str, object]]:
    """(patient, study, series, image count) layout of the test archive."""
    jp_name, jp_cs = _charset_name("chrH31.dcm")
    fr_name, fr_cs = _charset_name("chrFren.dcm")
    return [
        dict(pid="PID1", name="DOE^JOHN", cs=None, date="20240115", acc="ACC1",
             series=[("CT", CT_IMAGE, 3), ("MR", MR_IMAGE, 2)]),
        dict(pid="PID1", name="DOE^JOHN", cs=None, date="20231201", acc="ACC2",
             series=[("CT", CT_IMAGE, 1)]),
        dict(pid="PID2", name="DOE^JANE", cs=None, date="20240601", acc="ACC3",
             series=[("MR", MR_IMAGE, 2)]),
        dict(pid="PID3", name="SMITH^ANNA", cs=None, date="20220101", acc="ACC_4%",
             series=[("CT", CT_IMAGE, 1)]),
        dict(pid="PIDJP", name=jp_name, cs=jp_cs, date="20240301", acc="ACC5",
             series=[("OT", SECONDARY_CAPTURE, 1)]),
        dict(pid="PIDFR", name=fr_name, cs=fr_cs, date="20240302", acc="ACC6",
             series=[("OT", SECONDARY_CAPTURE, 1)]),
        dict(pid="BULK", name="BULK^PATIENT", cs=None, date="20200101", acc="ACC7",
             series=[("CT", CT_IMAGE, BULK)]),
    ]  # fmt: skip


def make_archive_files(
    directory: Path, layout: list[dict[str, object]] | None = None, root_uid: str = ROOT_UID
) -> list[Inst]:
    """Part-10 files of ``layout`` (default :func:`plan`), UIDs under ``root_uid``."""
    directory.mkdir(parents=True, exist_ok=True)
    out: list[Inst] = []
    n = 0
    for s_index, study in enumerate(plan() if layout is None else layout):
        study_uid = f"{root_uid}{s_index + 1}"
        for se_index, (modality, sop_class, count) in enumerate(study["series"]):  # type: ignore[arg-type]
            series_uid = f"{study_uid}.{se_index + 1}"
            for i in range(count):
                n += 1
                sop_uid = f"{series_uid}.{i + 1}"
                ds = Dataset()
                if study["cs"]:
                    ds.SpecificCharacterSet = study["cs"]
                ds.SOPClassUID = sop_class
                ds.SOPInstanceUID = sop_uid
                ds.StudyDate = study["date"]
                ds.StudyTime = "101500"
                ds.AccessionNumber = study["acc"]
                ds.Modality = modality
                ds.StudyDescription = f"Study {s_index + 1}"
                ds.SeriesDescription = f"Series {modality} {se_index + 1}"
                ds.PatientName = study["name"]
                ds.PatientID = study["pid"]
                ds.PatientBirthDate = "19700101"
                ds.PatientSex = "O"
                ds.BodyPartExamined = "HEAD"
                ds.StudyInstanceUID = study_uid
                ds.SeriesInstanceUID = series_uid
                ds.StudyID = str(s_index + 1)
                ds.SeriesNumber = se_index + 1
                ds.InstanceNumber = i + 1
                ds.ImageComments = f"image {n}"  # not indexed: returned from the header
                ds.Rows = ds.Columns = 4
                ds.BitsAllocated = ds.BitsStored = 8
                ds.HighBit = 7
                ds.PixelRepresentation = 0
                ds.SamplesPerPixel = 1
                ds.PhotometricInterpretation = "MONOCHROME2"
                ds.PixelData = bytes(range(16))
                meta = FileMetaDataset()
                meta.MediaStorageSOPClassUID = sop_class
                meta.MediaStorageSOPInstanceUID = sop_uid
                meta.TransferSyntaxUID = ExplicitVRLittleEndian
                meta.ImplementationClassUID = generate_uid(ROOT_UID)
                ds.file_meta = meta
                path = directory / f"{n:03d}.dcm"
                ds.save_as(path, enforce_file_format=True)
                out.append(
                    Inst(
                        str(study["pid"]), str(study["name"]), study["cs"],  # type: ignore[arg-type]
                        study_uid, str(study["date"]), str(study["acc"]), series_uid,
                        modality, sop_class, sop_uid, i + 1, path,
                    )
                )  # fmt: skip
    return out


def store(port: int, paths: list[Path], aec: str = "DICOMD") -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dicomd", "store", "127.0.0.1", str(port), "--aec", aec, "-q"]
        + [str(p) for p in paths],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
