"""Reading stored instances straight into their P-DATA-TF PDUs (qr.retrieve.read_image)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicomd.archive.part10 import NotPart10Error
from dicomd.net.dimse import c_store_rq, encode_command, fragment_message
from dicomd.qr.retrieve import _IOV_MAX, HEAD_ROOM, dataset_bytes, read_image

CT = "1.2.840.10008.5.1.4.1.1.2"


def write_instance(path: Path, pixel_bytes: int) -> None:
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = "READ^IMAGE"
    ds.BitsAllocated = 16
    ds.PixelData = bytes(i * 13 % 251 for i in range(pixel_bytes))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CT
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize(
    ("pixel_bytes", "max_pdu"),
    [
        (0, 16384),
        (2, 16384),
        (512 * 512 * 2, 16384),
        (512 * 512 * 2, 0),
        # More fragments than one preadv() takes: read in several batches.
        (512 * 512 * 2, 256),
    ],
)
def test_read_image_matches_fragment_message(
    tmp_path: Path, pixel_bytes: int, max_pdu: int
) -> None:
    write_instance(tmp_path / "x.dcm", pixel_bytes)
    data = dataset_bytes(tmp_path, "x.dcm")
    image, head_room = read_image(tmp_path, "x.dcm", 5, max_pdu)
    assert head_room == HEAD_ROOM
    command = encode_command(c_store_rq(1, CT, "1.2.3"))
    expected = fragment_message(5, command, data, max_pdu)[1:]
    assert bytes(image[head_room:]) == b"".join(bytes(c) for c in expected)
    if max_pdu == 256:
        assert len(expected) // 2 > _IOV_MAX


def test_read_image_of_a_file_that_is_not_part10_fails(tmp_path: Path) -> None:
    """As dataset_bytes does: the caller counts the instance as failed."""
    (tmp_path / "y.dcm").write_bytes(b"not a DICOM file")
    with pytest.raises(NotPart10Error):
        read_image(tmp_path, "y.dcm", 1, 16384)
