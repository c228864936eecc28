"""Helpers for the storage tests: test instances, index look-ups, archive checks."""

from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pydicom
import pydicom.data

from dicomd.archive.part10 import NotPart10Error, read_file_meta


@dataclass(frozen=True)
class TestInstance:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    dataset_offset: int
    meta_sop_instance_uid: str  # some bundled files disagree with their data set here

    def dataset_bytes(self) -> bytes:
        return self.path.read_bytes()[self.dataset_offset :]


@cache
def bundled_instances() -> tuple[tuple[TestInstance, ...], tuple[tuple[str, str], ...]]:
    """Every Part-10 storage instance bundled with pydicom (no downloads), and the files
    left out with the reason (not Part-10, no SOP UIDs in the data set, a DICOMDIR...)."""
    from pynetdicom import AllStoragePresentationContexts

    storage = {str(cx.abstract_syntax) for cx in AllStoragePresentationContexts}
    files = sorted(
        {Path(f) for f in pydicom.data.get_testdata_files() + pydicom.data.get_charset_files()}
    )
    good: list[TestInstance] = []
    skipped: list[tuple[str, str]] = []
    for path in files:
        if not path.is_file():
            continue
        try:
            with open(path, "rb") as fp:
                meta = read_file_meta(fp)
                fp.seek(0)
                ds = pydicom.dcmread(
                    fp, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"]
                )
        except NotPart10Error as exc:
            skipped.append((path.name, f"not Part-10: {exc}"))
            continue
        except Exception as exc:
            skipped.append((path.name, f"unreadable: {exc}"))
            continue
        sop_class = str(ds.get("SOPClassUID", "") or "")
        sop_instance = str(ds.get("SOPInstanceUID", "") or "")
        if not sop_class or not sop_instance:
            skipped.append((path.name, "no SOP Class/Instance UID in the data set"))
            continue
        if sop_class not in storage:
            skipped.append((path.name, f"not a storage SOP class: {sop_class}"))
            continue
        good.append(
            TestInstance(
                path,
                sop_class,
                sop_instance,
                meta.transfer_syntax_uid,
                meta.dataset_offset,
                meta.sop_instance_uid,
            )
        )
    return tuple(good), tuple(skipped)


def index_rows(db: Path, sql: str, *params: Any) -> list[sqlite3.Row]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return list(conn.execute(sql, params))
    finally:
        conn.close()


def instance_row(db: Path, sop_instance_uid: str) -> sqlite3.Row | None:
    rows = index_rows(
        db,
        "SELECT i.*, s.series_instance_uid, s.modality, s.series_number, "
        "st.study_instance_uid, st.study_date, st.study_time, st.accession_number, "
        "st.study_id, st.referring_physician_name, st.study_description, "
        "st.modalities_in_study, st.sop_classes_in_study, "
        "st.number_of_study_related_instances, st.number_of_study_related_series, "
        "p.patient_name, p.patient_id, p.patient_birth_date, p.patient_sex, "
        "p.number_of_patient_related_instances "
        "FROM instance i JOIN series s ON i.series_pk = s.id "
        "JOIN study st ON s.study_pk = st.id JOIN patient p ON st.patient_pk = p.id "
        "WHERE i.sop_instance_uid = ?",
        sop_instance_uid,
    )
    return rows[0] if rows else None


def stored_header(row: sqlite3.Row, stored_file: Path | None = None) -> pydicom.Dataset:
    """The header an index row keeps (its data set bytes up to the pixel data), decoded;
    for rows without one (deflated data sets, headers over HEADER_MAX such as a waveform's),
    the stored file's header, as the index's reader does."""
    from dicomd.archive.extract import HEADER_MAX, decode_header, read_header

    if row["header"] is None:
        assert stored_file is not None
        deflated = row["transfer_syntax_uid"] in (
            "1.2.840.10008.1.2.1.99",
            "1.2.840.10008.1.2.4.95",
        )
        assert deflated or row["size"] > HEADER_MAX, "a small header must be in the index"
        return read_header(stored_file)
    return decode_header(bytes(row["header"]), row["transfer_syntax_uid"])


def dataset_of(path: Path) -> tuple[bytes, str]:
    """The data set bytes of a Part-10 file and its transfer syntax."""
    with open(path, "rb") as fp:
        meta = read_file_meta(fp)
        return fp.read(), meta.transfer_syntax_uid


def check_archive_consistent(root: Path, db: Path) -> int:
    """Every instance file has a row, every row a complete file with the right digest,
    and nothing is left in .incoming. Returns the number of instances."""
    files = {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and not p.relative_to(root).parts[0].startswith(".")
    }
    rows = index_rows(db, "SELECT path, size, sha256, sop_instance_uid FROM instance")
    indexed = {r["path"]: r for r in rows}
    assert files == set(indexed), (sorted(files - set(indexed)), sorted(set(indexed) - files))
    for rel, row in indexed.items():
        full = root / rel
        assert full.stat().st_size == row["size"], rel
        data, _ = dataset_of(full)
        assert hashlib.sha256(data).hexdigest() == row["sha256"], rel
        ds = pydicom.dcmread(full, stop_before_pixels=True)
        assert ds.SOPInstanceUID == row["sop_instance_uid"]
    leftovers = list((root / ".incoming").iterdir()) if (root / ".incoming").exists() else []
    assert leftovers == [], leftovers
    return len(rows)


def storage_config(
    tmp_path: Path, port: int, aes: list[dict[str, Any]] | None = None, **archive: Any
) -> dict[str, Any]:
    from conftest import base_config

    config = base_config(tmp_path, port)
    config["local_aes"] = aes or [
        {
            "ae_title": "DICOMD",
            "services": {"verification": None, "storage": {"min_free_space": 0}},
        }
    ]
    config["archive"].update(archive)
    return config


def make_dataset(
    sop_instance_uid: str,
    *,
    sop_class_uid: str = "1.2.840.10008.5.1.4.1.1.7",
    patient_name: str = "Test^Patient",
    study_uid: str = "1.2.826.0.1.3680043.9.7777.1",
    series_uid: str = "1.2.826.0.1.3680043.9.7777.1.1",
    pixel_bytes: int = 64,
    extra: dict[str, Any] | None = None,
) -> bytes:
    """An explicit VR little endian data set (bytes, no file meta) for a secondary capture."""
    from pydicom.dataset import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    ds.PatientName = patient_name
    ds.PatientID = "PID-1"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "OT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    for key, value in (extra or {}).items():
        setattr(ds, key, value)
    ds.PixelData = b"\x00" * pixel_bytes
    ds["PixelData"].VR = "OB"
    buf = DicomBytesIO()
    buf.is_little_endian = True
    buf.is_implicit_VR = False
    write_dataset(buf, ds)
    return buf.getvalue()
