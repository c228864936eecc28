"""DICOM Part-10 file meta information (PS3.10 7.1), hand-written on the storage path.

``encode_file_meta`` writes what precedes the received data set in a stored file: the
128-byte preamble, ``DICM`` and group 0002 in explicit VR little endian. pydicom's writer
costs more than the network on this path (DESIGN.md), so this is a few ``struct`` calls.
``read_file_meta`` is the inverse: it finds where the data set starts in a Part-10 file so
the data set can be sent or hashed exactly as stored.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

from dicomd import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

PREAMBLE = b"\x00" * 128
MAGIC = b"DICM"
META_START = len(PREAMBLE) + len(MAGIC)

# VRs with a 2-byte reserved field and a 4-byte length in explicit VR (PS3.5 7.1.2).
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_SHORT = struct.Struct("<HH2sH")
_LONG = struct.Struct("<HH2s2xI")


class NotPart10Error(ValueError):
    """The file is not a DICOM Part-10 file (no preamble and DICM, or a broken meta)."""


def _pad(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) & 1 else value


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    if vr in _LONG_VRS:
        return _LONG.pack(0x0002, element, vr, len(value)) + value
    return _SHORT.pack(0x0002, element, vr, len(value)) + value


def encode_file_meta(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    source_ae: str | None = None,
) -> bytes:
    """Preamble, DICM and the file meta group for a data set stored as received."""
    body = b"".join(
        (
            _element(0x0001, b"OB", b"\x00\x01"),
            _element(0x0002, b"UI", _pad(sop_class_uid.encode("ascii"), b"\x00")),
            _element(0x0003, b"UI", _pad(sop_instance_uid.encode("ascii"), b"\x00")),
            _element(0x0010, b"UI", _pad(transfer_syntax_uid.encode("ascii"), b"\x00")),
            _element(0x0012, b"UI", _pad(IMPLEMENTATION_CLASS_UID.encode("ascii"), b"\x00")),
            _element(0x0013, b"SH", _pad(IMPLEMENTATION_VERSION_NAME.encode("ascii"), b" ")),
            _element(0x0016, b"AE", _pad(source_ae.encode("ascii", "replace"), b" "))
            if source_ae
            else b"",
        )
    )
    group_length = _SHORT.pack(0x0002, 0x0000, b"UL", 4) + struct.pack("<I", len(body))
    return PREAMBLE + MAGIC + group_length + body


@dataclass(frozen=True)
class FileMeta:
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    source_ae: str
    dataset_offset: int  # where the data set starts in the file


def _text(value: bytes) -> str:
    return value.rstrip(b"\x00 ").decode("ascii", "replace")


def read_file_meta(fp: BinaryIO) -> FileMeta:
    """Parse the preamble and group 0002 of an open Part-10 file (positioned anywhere)."""
    fp.seek(0)
    head = fp.read(META_START)
    if len(head) < META_START or head[128:132] != MAGIC:
        raise NotPart10Error("no DICM prefix after a 128-byte preamble")
    values: dict[int, bytes] = {}
    offset = META_START
    while True:
        raw = fp.read(8)
        if len(raw) < 8:
            break  # a file of file meta only: the data set is empty
        group, element, vr, short_length = _SHORT.unpack(raw)
        if group != 0x0002:
            break
        if vr in _LONG_VRS:
            extra = fp.read(4)
            if len(extra) < 4:
                raise NotPart10Error("truncated file meta")
            length = struct.unpack("<I", extra)[0]
            header = 12
        elif vr.isalpha() and vr.isupper():
            length, header = short_length, 8
        else:
            raise NotPart10Error(f"file meta element (0002,{element:04X}) is not explicit VR")
        if length > 1 << 20:
            raise NotPart10Error(f"file meta element (0002,{element:04X}) is too long")
        value = fp.read(length)
        if len(value) < length:
            raise NotPart10Error("truncated file meta")
        values[element] = value
        offset += header + length
    ts = _text(values.get(0x0010, b""))
    if not ts:
        raise NotPart10Error("file meta has no Transfer Syntax UID")
    fp.seek(offset)
    return FileMeta(
        sop_class_uid=_text(values.get(0x0002, b"")),
        sop_instance_uid=_text(values.get(0x0003, b"")),
        transfer_syntax_uid=ts,
        source_ae=_text(values.get(0x0016, b"")),
        dataset_offset=offset,
    )
