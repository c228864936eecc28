"""Reading entries from the files people have (dump text, DICOM JSON, Part-10) and writing
wlmscpfs-compatible ``.wl`` files."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicomd.query.charset import answer_charset, charset_terms, encode_dataset
from dicomd.worklist.dump import parse_dump

MWL_FIND = "1.2.840.10008.5.1.4.31"
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1138.1"  # dicomd
IMPLEMENTATION_VERSION = "DICOMD"


class InputError(ValueError):
    """A file that cannot be read as a worklist entry; the message names the file."""


def read_input(path: Path, warnings: list[str] | None = None) -> Dataset:
    """One entry from a file: DICOM JSON (``.json``), Part-10 (``DICM`` preamble or ``.wl``/
    ``.dcm``), else DCMTK dump text."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    name = str(path)
    if path.suffix.lower() == ".json" or data.lstrip()[:1] in (b"{", b"["):
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise InputError(f"{name}: not valid JSON: {exc}") from None
        if isinstance(obj, list):
            if len(obj) != 1:
                raise InputError(f"{name}: a JSON file holds one entry (found {len(obj)})")
            obj = obj[0]
        try:
            return Dataset.from_json(obj)
        except Exception as exc:
            raise InputError(f"{name}: not a DICOM JSON data set: {exc}") from None
    if data[128:132] == b"DICM" or path.suffix.lower() in (".wl", ".dcm"):
        try:
            return pydicom.dcmread(path, force=True)
        except Exception as exc:
            raise InputError(f"{name}: not a readable DICOM file: {exc}") from None
    return parse_dump(data, name, warnings)  # DumpError is a ValueError naming file:line


def storable(ds: Dataset) -> Dataset:
    """A decoded entry made ready to encode: (0008,0005) says what the values need (its own
    character set when every value fits, else ISO_IR 192; none when all is ASCII)."""
    terms = answer_charset(ds, charset_terms(ds))
    if terms is None:
        if 0x00080005 in ds:
            del ds[0x00080005]
    else:
        ds.SpecificCharacterSet = terms if len(terms) > 1 else terms[0]
    return ds


def encode_entry(ds: Dataset) -> bytes:
    """Explicit VR Little Endian bytes of a decoded entry (no file meta)."""
    return encode_dataset(storable(ds), ExplicitVRLittleEndian)


def write_wl(ds: Dataset, path: Path) -> None:
    """Write a Part-10 ``.wl`` file atomically (temp file, fsync, rename)."""
    body = encode_entry(ds)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MWL_FIND
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    fp.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(fp, meta)
    fp.write(body)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(fp.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def ensure_area(directory: Path) -> None:
    """Create an AE directory with its (empty) ``lockfile``, as wlmscpfs expects."""
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / "lockfile"
    if not lock.exists():
        lock.touch()
