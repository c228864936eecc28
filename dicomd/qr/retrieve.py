"""C-MOVE / C-GET sub-operations: send stored instances with C-STORE, count, report.

Stored data set bytes are sent as they are when a presentation context with the stored
transfer syntax was accepted; otherwise, when an uncompressed little endian context was
accepted, the instance is re-encoded (decompressed with pydicom if needed); else it counts
as failed. A pending response with the counts follows each sub-operation; the final
response carries the Failed SOP Instance UID List (0008,0058) when any failed.
"""

from __future__ import annotations

import asyncio
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
    """One context per (SOP class, stored transfer syntax) and, for SOP classes stored in
    another syntax, one with the uncompressed little endian fallbacks."""
    out: list[tuple[str, list[str]]] = []
    seen: set[tuple[str, str]] = set()
    fallback: set[str] = set()
    for inst in instances:
        key = (inst.sop_class_uid, inst.transfer_syntax_uid)
        if key not in seen:
            seen.add(key)
            out.append((inst.sop_class_uid, [inst.transfer_syntax_uid]))
        if inst.transfer_syntax_uid not in FALLBACK and inst.sop_class_uid not in fallback:
            fallback.add(inst.sop_class_uid)
            out.append((inst.sop_class_uid, list(FALLBACK)))
    return out[:128]


def dataset_bytes(root: Path, path: str) -> bytes:
    """The data set bytes of a stored Part-10 file (everything after its file meta)."""
    from dicomd.archive.part10 import read_file_meta

    with open(root / path, "rb") as fp:
        meta = read_file_meta(fp)
        fp.seek(meta.dataset_offset)
        return fp.read()


def reencode(root: Path, inst: StoredInstance, target: str) -> bytes | None:
    """The data set in ``target`` (uncompressed), decompressed with pydicom if needed;
    None when pydicom cannot (no codec for it)."""
    import pydicom

    try:
        ds = pydicom.dcmread(root / inst.path)
        if inst.transfer_syntax_uid not in UNCOMPRESSED:
            ds.decompress()
        plain = Dataset()
        for elem in ds:
            if elem.tag.group != 0x0002:
                plain.add(elem)
        return encode_dataset(plain, target)
    except Exception as exc:  # any codec failure: the instance counts as failed
        log.warning("qr_reencode_failed", sop_instance_uid=inst.sop_instance_uid, error=repr(exc))
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
    try:
        if ts == inst.transfer_syntax_uid:
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
    async for response in sender.request(cid, fields, data):
        status = response.status
    return status


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
) -> None:
    """Send each instance with ``store``, pending responses with counts, then the final one."""
    counts = Counts(len(instances))
    cancelled = False
    for inst in instances:
        if request.cancelled.is_set():
            cancelled = True
            break
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
            await association.respond(request, STATUS_PENDING, **counts.fields())
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
    try:

        async def store(inst: StoredInstance) -> int | None:
            try:
                return await store_on(sub, contexts, inst, root, originator=originator)
            except AssociationError as exc:
                log.warning(
                    "qr_store_failed", sop_instance_uid=inst.sop_instance_uid, error=str(exc)
                )
                return None

        await run_suboperations(
            association, request, instances, store, what="move", extra_log=extra_log
        )
    finally:
        try:
            await sub.release()
        except (AssociationError, TimeoutError, OSError):
            sub.abort()
