"""C-MOVE / C-GET sub-operations: send stored instances with C-STORE, count, report.

Stored data set bytes are sent as they are when a presentation context with the stored
transfer syntax was accepted; otherwise, when an uncompressed little endian context was
accepted, the instance is re-encoded (decompressed with pydicom and its decoder plug-ins:
NumPy, pylibjpeg with libjpeg, openjpeg and rle); else, or when the pixel data cannot be
decoded, it counts as failed with a ``qr_reencode_failed`` log line saying why. A pending
response with the counts follows the first sub-operation, then at most one every
``PENDING_INTERVAL`` seconds; the final response carries the Failed
SOP Instance UID List (0008,0058) when any failed.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset

from dicomd.logging import get_logger
from dicomd.net import dimse
from dicomd.qr.sql import StoredInstance
from dicomd.query.charset import encode_dataset

if TYPE_CHECKING:
    from dicomd.association import Association, Request
    from dicomd.config import Peer
    from dicomd.services.base import ServiceContext

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
FALLBACK = (EXPLICIT_LE, IMPLICIT_LE)
UNCOMPRESSED = frozenset({EXPLICIT_LE, IMPLICIT_LE, "1.2.840.10008.1.2.2"})

STATUS_SUCCESS = 0x0000
STATUS_PENDING = 0xFF00
STATUS_CANCEL = 0xFE00
STATUS_WARNING_SUBOPS = 0xB000
STATUS_SUBOPS_FAILED = 0xA702
WARNING_STATUSES = frozenset({0xB000, 0xB006, 0xB007})

log = get_logger("dicomd.qr")


def proposed_contexts(instances: Sequence[StoredInstance]) -> list[tuple[str, list[str]]]:
    """The contexts of a C-MOVE sub-association: per SOP class, one context offering both
    uncompressed little endian syntaxes (the stored one first when it is one of them), and
    one per other (compressed) stored transfer syntax."""
    out: list[tuple[str, list[str]]] = []
    seen: set[tuple[str, str]] = set()
    fallback: set[str] = set()
    for inst in instances:
        sop_class, stored = inst.sop_class_uid, inst.transfer_syntax_uid
        if (sop_class, stored) in seen:
            continue
        seen.add((sop_class, stored))
        if stored not in FALLBACK:
            out.append((sop_class, [stored]))
        if sop_class not in fallback:
            fallback.add(sop_class)
            first = [stored] if stored in FALLBACK else []
            out.append((sop_class, first + [ts for ts in FALLBACK if ts not in first]))
    return out[:128]


def dataset_bytes(root: Path, path: str) -> bytes:
    """The data set bytes of a stored Part-10 file (everything after its file meta)."""
    from dicomd.archive.part10 import read_file_meta

    with open(root / path, "rb") as fp:
        meta = read_file_meta(fp)
        fp.seek(meta.dataset_offset)
        return fp.read()


# Spare bytes in front of a data set read by ``read_image``, for the C-STORE-RQ command PDU
# (about 200 bytes with the longest UIDs and a Move Originator).
HEAD_ROOM = 512
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


def read_image(
    root: Path, path: str, context_id: int, max_pdu_length: int
) -> tuple[bytearray, int]:
    """The data set of a stored Part-10 file read straight into its P-DATA-TF PDUs
    (``dimse.pdata_image``: ``HEAD_ROOM`` spare bytes, then headers and fragments), with
    one ``preadv`` per ``IOV_MAX`` fragments: no bytes object to copy again on the way
    out, and one system call instead of a read per fragment."""
    from dicomd.archive.part10 import read_file_meta

    with open(root / path, "rb") as fp:
        meta = read_file_meta(fp)
        offset = meta.dataset_offset
        fd = fp.fileno()
        length = max(0, os.fstat(fd).st_size - offset)
        image, slots = dimse.pdata_image(context_id, length, max_pdu_length, HEAD_ROOM)
        slots = [s for s in slots if len(s)]
        while slots:
            batch = slots[:_IOV_MAX]
            got = os.preadv(fd, batch, offset)
            if got <= 0:
                raise OSError(f"{path}: file shrank while read")
            offset += got
            # Drop the filled slots; a short read leaves one partly filled: its rest.
            done = 0
            while done < len(slots) and got >= len(slots[done]):
                got -= len(slots[done])
                done += 1
            slots = slots[done:]
            if got:
                slots[0] = slots[0][got:]
    return image, HEAD_ROOM


Prepared = bytes | tuple[bytearray, int]


class ReadAhead:
    """Reads the stored data set bytes of the next instance of a C-MOVE / C-GET in a worker
    thread while the current one is on the wire (one instance ahead; the first one while
    the C-MOVE sub-association is negotiated, when ``contexts`` is still None).

    Once the contexts and the peer's maximum PDU length are known, data sets sent as
    stored are read straight into their P-DATA-TF PDUs (``read_image``)."""

    def __init__(
        self,
        root: Path,
        contexts: dict[tuple[str, str], int] | None,
        max_pdu_length: int | None = None,
    ) -> None:
        self.root = root
        self.contexts = contexts
        self.max_pdu_length = max_pdu_length
        self.pending: dict[str, asyncio.Future[Prepared]] = {}

    def start(self, inst: StoredInstance) -> None:
        if inst.path in self.pending:
            return
        loop = asyncio.get_running_loop()
        if self.contexts is not None:
            chosen = choose(self.contexts, inst)
            if chosen is None or chosen[1] != inst.transfer_syntax_uid:
                return  # not sent as stored
            if self.max_pdu_length is not None:
                self.pending[inst.path] = loop.run_in_executor(
                    None, read_image, self.root, inst.path, chosen[0], self.max_pdu_length
                )
                return
        self.pending[inst.path] = loop.run_in_executor(None, dataset_bytes, self.root, inst.path)

    async def read(self, path: str) -> Prepared:
        future = self.pending.pop(path, None)
        if future is None:
            return await asyncio.to_thread(dataset_bytes, self.root, path)
        return await future

    def cancel(self) -> None:
        """Drop reads not taken (a failed one's exception is taken here, not logged)."""
        for future in self.pending.values():
            if future.done() and not future.cancelled():
                future.exception()
            future.cancel()
        self.pending.clear()


# Transfer syntaxes whose compression loses information, with their (0028,2114) Lossy
# Image Compression Method; JPEG 2000 / HTJ2K lossy-capable syntaxes are lossy when the
# codestream uses the irreversible 9-7 wavelet.
LOSSY_METHODS = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",  # JPEG Extended
    "1.2.840.10008.1.2.4.81": "ISO_14495_1",  # JPEG-LS Near-Lossless
}
J2K_METHODS = {
    "1.2.840.10008.1.2.4.91": "ISO_15444_1",  # JPEG 2000
    "1.2.840.10008.1.2.4.203": "ISO_15444_15",  # HTJ2K
}


class ReencodeError(Exception):
    """The instance cannot be sent in an uncompressed transfer syntax (the reason)."""


def j2k_irreversible(codestream: bytes) -> bool | None:
    """Whether a JPEG 2000 codestream uses the irreversible (lossy) 9-7 wavelet, from the
    COD marker of its main header; None when there is no readable COD marker."""
    pos = codestream.find(b"\xff\x4f\xff\x51")  # SOC, SIZ
    if pos < 0:
        return None
    pos += 2
    while pos + 4 <= len(codestream):
        marker = codestream[pos : pos + 2]
        if marker in (b"\xff\x90", b"\xff\x93"):  # SOT, SOD: end of the main header
            return None
        length = int.from_bytes(codestream[pos + 2 : pos + 4], "big")
        if marker == b"\xff\x52":  # COD: Lcod Scod SGcod(4) levels cbw cbh cbstyle transform
            return codestream[pos + 13] == 0 if pos + 13 < len(codestream) else None
        if length < 2:
            return None
        pos += 2 + length
    return None


def lossy_method(ds: Dataset, transfer_syntax: str) -> str | None:
    """The Lossy Image Compression Method of ``transfer_syntax`` when the (still compressed)
    data set's pixel data went through lossy compression, else None."""
    method = LOSSY_METHODS.get(transfer_syntax)
    if method is not None:
        return method
    method = J2K_METHODS.get(transfer_syntax)
    if method is None:
        return None
    from pydicom.encaps import get_frame

    try:
        frames = int(ds.get("NumberOfFrames") or 1)
        first = get_frame(ds.PixelData, 0, number_of_frames=frames)
    except Exception:
        return method  # cannot tell: a syntax that allows lossy compression counts as lossy
    return None if j2k_irreversible(first) is False else method


def decompressed(ds: Dataset, transfer_syntax: str) -> Dataset:
    """``ds`` (read from a file in compressed ``transfer_syntax``) with native pixel data,
    in place; raises ReencodeError with the reason when pydicom cannot decode it.

    The SOP Instance UID is kept (the pixel values are those of the stored instance);
    YCbCr data is converted to RGB (pydicom sets Photometric Interpretation and Planar
    Configuration to match); after lossy compression, (0028,2110) Lossy Image Compression
    is set to "01", with the method and ratio when the data set had none."""
    from pydicom.uid import UID

    if "PixelData" not in ds:
        raise ReencodeError(f"no Pixel Data in a {UID(transfer_syntax).name} data set")
    method = lossy_method(ds, transfer_syntax)
    compressed_length = len(ds.PixelData)
    try:
        ds.decompress(generate_instance_uid=False, as_rgb=True)
    except Exception as exc:
        text = str(exc).strip().replace("\n", " ") or type(exc).__name__
        raise ReencodeError(f"cannot decode {UID(transfer_syntax).name}: {text}") from exc
    for tag in (0x7FE00001, 0x7FE00002):  # Extended Offset Table (Lengths): encapsulated only
        if tag in ds:
            del ds[tag]
    if method is not None and str(ds.get("LossyImageCompression", "")).strip() != "01":
        ds.LossyImageCompression = "01"
        if "LossyImageCompressionMethod" not in ds and "LossyImageCompressionRatio" not in ds:
            ds.LossyImageCompressionMethod = method
            if compressed_length:
                ratio = len(ds.PixelData) / compressed_length
                ds.LossyImageCompressionRatio = f"{ratio:.2f}"[:16]
    return ds


def reencode(root: Path, inst: StoredInstance, target: str) -> bytes | None:
    """The data set in ``target`` (uncompressed little endian), decompressed with pydicom
    when stored compressed; None when it cannot be (logged with the reason)."""
    import pydicom

    try:
        ds = pydicom.dcmread(root / inst.path)
        syntax = ds.file_meta.TransferSyntaxUID
        if syntax.is_encapsulated and "PixelData" in ds:
            decompressed(ds, str(syntax))
        return encode_dataset(ds, target)
    except ReencodeError as exc:
        reason = str(exc)
    except Exception as exc:  # a damaged file or a pydicom failure
        reason = f"{type(exc).__name__}: {exc}"
    log.warning(
        "qr_reencode_failed",
        sop_instance_uid=inst.sop_instance_uid,
        transfer_syntax=inst.transfer_syntax_uid,
        target=target,
        reason=reason[:500],
    )
    return None


def choose(contexts: dict[tuple[str, str], int], inst: StoredInstance) -> tuple[int, str] | None:
    """(context id, transfer syntax) to send ``inst`` on, stored syntax first."""
    cid = contexts.get((inst.sop_class_uid, inst.transfer_syntax_uid))
    if cid is not None:
        return cid, inst.transfer_syntax_uid
    for ts in FALLBACK:
        cid = contexts.get((inst.sop_class_uid, ts))
        if cid is not None:
            return cid, ts
    return None


async def store_on(
    sender: Association,
    contexts: dict[tuple[str, str], int],
    inst: StoredInstance,
    root: Path,
    *,
    originator: tuple[str, int] | None = None,
    reader: ReadAhead | None = None,
) -> int | None:
    """C-STORE one instance on ``sender``; its status, None when it could not be sent."""
    chosen = choose(contexts, inst)
    if chosen is None:
        log.warning(
            "qr_no_context",
            sop_class_uid=inst.sop_class_uid,
            transfer_syntax=inst.transfer_syntax_uid,
        )
        return None
    cid, ts = chosen
    data: Prepared | None
    try:
        if ts == inst.transfer_syntax_uid:
            if reader is not None:
                data = await reader.read(inst.path)
            else:
                data = await asyncio.to_thread(dataset_bytes, root, inst.path)
        else:
            data = await asyncio.to_thread(reencode, root, inst, ts)
    except OSError as exc:
        log.error("qr_read_failed", path=inst.path, error=str(exc))
        return None
    if data is None:
        return None
    fields = dimse.c_store_rq(
        sender.next_message_id(),
        inst.sop_class_uid,
        inst.sop_instance_uid,
        move_originator_ae=originator[0] if originator else None,
        move_originator_message_id=originator[1] if originator else None,
    )
    status = None
    if isinstance(data, tuple):
        responses = sender.request(cid, fields, image=data)
    else:
        responses = sender.request(cid, fields, data)
    async for response in responses:
        status = response.status
    return status


# Pending responses are optional (PS3.4 C.4.2.3.1, C.4.3.3.1): after the first sub-operation,
# at most one per this many seconds. One per instance cost the sender a write and the
# requestor a wake-up per instance, on the path of every sub-operation; progress shown
# ten times a second is still progress.
PENDING_INTERVAL = 0.1


class Counts:
    def __init__(self, total: int) -> None:
        self.remaining = total
        self.completed = 0
        self.failed = 0
        self.warning = 0
        self.failed_uids: list[str] = []

    def fields(self, final: bool = False) -> dict[str, Any]:
        out = {
            "number_of_completed_suboperations": self.completed,
            "number_of_failed_suboperations": self.failed,
            "number_of_warning_suboperations": self.warning,
        }
        if not final:
            out["number_of_remaining_suboperations"] = self.remaining
        return out


async def run_suboperations(
    association: Association,
    request: Request,
    instances: Sequence[StoredInstance],
    store: Callable[[StoredInstance], Awaitable[int | None]],
    *,
    what: str,
    extra_log: dict[str, Any] | None = None,
    reader: ReadAhead | None = None,
) -> None:
    """Send each instance with ``store``, pending responses with counts, then the final one;
    ``reader`` reads the next instance while one is sent."""
    counts = Counts(len(instances))
    cancelled = False
    loop = asyncio.get_running_loop()
    next_pending = 0.0  # the first sub-operation is reported at once
    for index, inst in enumerate(instances):
        if request.cancelled.is_set():
            cancelled = True
            break
        if reader is not None:
            reader.start(inst)
            if index + 1 < len(instances):
                reader.start(instances[index + 1])
        status = await store(inst)
        counts.remaining -= 1
        if status == STATUS_SUCCESS:
            counts.completed += 1
        elif status is not None and status in WARNING_STATUSES:
            counts.warning += 1
        else:
            counts.failed += 1
            counts.failed_uids.append(inst.sop_instance_uid)
        if counts.remaining:
            now = loop.time()
            if now >= next_pending:
                next_pending = now + PENDING_INTERVAL
                await association.respond(request, STATUS_PENDING, **counts.fields())
    if reader is not None:
        reader.cancel()
    await finish(association, request, counts, cancelled, what=what, extra_log=extra_log)


async def finish(
    association: Association,
    request: Request,
    counts: Counts,
    cancelled: bool,
    *,
    what: str,
    comment: str | None = None,
    extra_log: dict[str, Any] | None = None,
) -> None:
    if cancelled:
        status = STATUS_CANCEL
    elif counts.failed and not counts.completed and not counts.warning:
        status = STATUS_SUBOPS_FAILED
    elif counts.failed or counts.warning:
        status = STATUS_WARNING_SUBOPS
    else:
        status = STATUS_SUCCESS
    body = None
    if counts.failed_uids or (cancelled and counts.remaining):
        ds = Dataset()
        ds.FailedSOPInstanceUIDList = counts.failed_uids or ""
        body = encode_dataset(ds, request.context.transfer_syntax)
    extra: dict[str, Any] = counts.fields(final=not cancelled)
    if comment:
        extra["error_comment"] = comment
    await association.respond(request, status, body, **extra)
    log.info(
        f"qr_{what}",
        calling_ae=association.calling_ae,
        status=hex(status),
        completed=counts.completed,
        failed=counts.failed,
        warning=counts.warning,
        remaining=counts.remaining,
        **(extra_log or {}),
    )


async def send_to_peer(
    association: Association,
    request: Request,
    instances: Sequence[StoredInstance],
    peer: Peer,
    root: Path,
    context: ServiceContext,
    ae_title: str,
) -> None:
    """C-MOVE: one sub-association to ``peer`` for every instance."""
    from dicomd.association import AssociationError, associate
    from dicomd.tls import PEER_SSL_CONTEXTS, peer_connection

    extra_log = {"move_destination": peer.ae_title, "peer": peer.name}
    if not instances:
        await finish(association, request, Counts(0), False, what="move", extra_log=extra_log)
        return
    reader = ReadAhead(root, None)
    reader.start(instances[0])
    try:
        tls = peer_connection(peer, context.shared.get(PEER_SSL_CONTEXTS, {}))
        sub = await associate(
            peer.host,
            peer.port,
            calling_ae=ae_title,
            called_ae=peer.ae_title,
            contexts=proposed_contexts(instances),
            **tls,  # type: ignore[arg-type]
        )
    except (OSError, AssociationError, KeyError) as exc:
        reader.cancel()
        log.error(
            "qr_move_subassociation_failed",
            move_destination=peer.ae_title,
            address=f"{peer.host}:{peer.port}",
            error=str(exc) or repr(exc),
        )
        counts = Counts(len(instances))
        counts.failed = len(instances)
        counts.remaining = 0
        counts.failed_uids = [i.sop_instance_uid for i in instances]
        await finish(
            association,
            request,
            counts,
            False,
            what="move",
            comment=f"cannot reach {peer.ae_title}: {exc}"[:64],
            extra_log=extra_log,
        )
        return
    contexts = {(cx.abstract_syntax, cx.transfer_syntax): cid for cid, cx in sub.contexts.items()}
    originator = (association.calling_ae, int(request.command.message_id or 0))
    reader.contexts = contexts
    reader.max_pdu_length = sub.peer_max_pdu_length
    try:

        async def store(inst: StoredInstance) -> int | None:
            try:
                return await store_on(
                    sub, contexts, inst, root, originator=originator, reader=reader
                )
            except AssociationError as exc:
                log.warning(
                    "qr_store_failed", sop_instance_uid=inst.sop_instance_uid, error=str(exc)
                )
                return None

        await run_suboperations(
            association, request, instances, store, what="move", extra_log=extra_log, reader=reader
        )
    finally:
        try:
            await sub.release()
        except (AssociationError, TimeoutError, OSError):
            sub.abort()
