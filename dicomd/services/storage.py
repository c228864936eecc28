"""Storage service (C-STORE SCP, PS3.4 Annex B): streamed, durable, indexed ingest.

Every storage SOP class pynetdicom knows is offered (optionally any unknown one too), with
every transfer syntax pydicom knows; the data set is stored as received, bit for bit, behind
a file meta written by dicomd (see ``dicomd.archive.store`` for the durability walk).

Statuses (PS3.4 B.2.3 and PS3.7 C):

- ``0000`` Success: under ``durability: full`` the instance is in a synced journal record
  (it survives kill -9 and power loss), its file is in place and its index row committed
  (or, for a duplicate under ``keep`` / ``replace-if-different`` with identical content,
  the stored copy is). Under ``durability: none``: the file is written, nothing synced,
  and under ``keep`` the index row follows the answer (``dicomd.archive.store``).
- ``0111`` Duplicate SOP Instance (failure), under ``duplicates: reject``.
- ``A700`` Refused, Out of Resources: below the ``min_free_space`` watermark, or any write,
  sync or index error; nothing of the instance stays in the archive.
- ``A900`` Error, Data Set does not match SOP Class: the data set's SOP Instance UID or SOP
  Class UID differs from the command's (Offending Element names which); nothing stored.
- ``C000`` Error, Cannot understand: the data set cannot be parsed; nothing stored.

Duplicates (a SOP Instance UID already in the index), per local AE with ``duplicates``:
``keep`` (default: the stored copy stays, the sender is told success, so a re-send after a
lost response is harmless and nothing is ever destroyed), ``reject`` (0111), ``replace``
(the new copy replaces the old one, which is deleted once the new one is committed),
``replace-if-different`` (replace only if the data set digest differs). Each is logged.
"""

from __future__ import annotations

import os
import re
from functools import cache
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import ByteSize, Field, field_validator
from pydicom.uid import UID, AllTransferSyntaxes

from dicomd.archive.store import (
    STATUS_OUT_OF_RESOURCES,
    Archive,
    StoreFailed,
)
from dicomd.net import dimse
from dicomd.services.base import Offer, Service, ServiceOptions

if TYPE_CHECKING:
    from dicomd.association import Association, Request
    from dicomd.services.base import ServiceContext

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
UNCOMPRESSED = (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN)
# Set in worker processes (dicomd.workers): the worker's number.
WORKER_ENV = "DICOMD_WORKER"
# ServiceContext.shared key: callables the supervisor runs once every association is done.
ON_SHUTDOWN = "on_shutdown"
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_TS_BY_KEYWORD = {UID(ts).keyword: str(ts) for ts in AllTransferSyntaxes}


def default_transfer_syntaxes() -> tuple[str, ...]:
    """Every transfer syntax pydicom knows. Whatever the requestor proposes is accepted as
    is (compressed or deflated data is stored in its own encoding, never transcoded); among
    the uncompressed ones explicit VR little endian is preferred."""
    others = tuple(str(ts) for ts in AllTransferSyntaxes if str(ts) not in UNCOMPRESSED)
    return (*others, *UNCOMPRESSED)


@cache
def storage_sop_classes() -> tuple[str, ...]:
    """Every storage SOP class pynetdicom knows (computed once)."""
    from pynetdicom import AllStoragePresentationContexts

    return tuple(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)


def is_known_sop_class(uid: str) -> bool:
    from pynetdicom.service_class import ServiceClass
    from pynetdicom.sop_class import uid_to_service_class

    return uid_to_service_class(uid) is not ServiceClass


class StorageOptions(ServiceOptions):
    accept_unknown_sop_classes: bool = Field(
        default=False,
        description="also accept storage of SOP classes pynetdicom does not know "
        "(private or newer than this dicomd)",
    )
    transfer_syntaxes: list[str] | None = Field(
        default=None,
        description="accepted transfer syntaxes (UIDs or pydicom keywords) in preference "
        "order; default: every one pydicom knows, as proposed, explicit VR little endian "
        "first among the uncompressed ones",
    )
    duplicates: Literal["reject", "keep", "replace", "replace-if-different"] = "keep"
    min_free_space: ByteSize = Field(
        default=ByteSize(1 << 30),
        description="refuse new instances (A700) while the archive's file system has less "
        "free space than this (bytes, or e.g. '1GiB', '500MB')",
    )

    @field_validator("transfer_syntaxes")
    @classmethod
    def _syntaxes(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        out: list[str] = []
        for item in value:
            uid = _TS_BY_KEYWORD.get(item, item)
            if not _UID_RE.match(uid) or len(uid) > 64:
                known = ", ".join(sorted(_TS_BY_KEYWORD))
                raise ValueError(f"{item!r} is neither a transfer syntax UID nor one of {known}")
            if uid not in out:
                out.append(uid)
        if not out:
            raise ValueError("at least one transfer syntax is needed")
        return out


def shared_archive(context: ServiceContext) -> Archive:
    """The process-wide archive for this configuration (opened on first use)."""
    cfg = context.config.archive
    key = f"archive:{cfg.root}|{cfg.layout}|{cfg.index_url}|{cfg.durability}"
    archive = context.shared.get(key)
    if archive is None:
        # In a worker process (dicomd.workers): its own journal, the index shared.
        worker = os.environ.get(WORKER_ENV)
        archive = Archive(
            cfg.root,
            cfg.layout,
            cfg.index_url,
            cfg.durability,
            worker=int(worker or 0),
            shared_index=worker is not None,
        )
        archive.open(recover="all" if worker is None else "mine")
        context.shared[key] = archive
        # Closed (queue committed, journal checkpointed) when the supervisor stops.
        context.shared.setdefault(ON_SHUTDOWN, []).append(archive.close)
    assert isinstance(archive, Archive)
    return archive


class StorageService(Service):
    name: ClassVar[str] = "storage"
    Options: ClassVar[type[ServiceOptions]] = StorageOptions
    permissions: ClassVar[tuple[str, ...]] = ("store",)

    def __init__(self, options: ServiceOptions, context: ServiceContext) -> None:
        super().__init__(options, context)
        assert isinstance(options, StorageOptions)
        self.opts = options
        self.syntaxes = tuple(options.transfer_syntaxes or default_transfer_syntaxes())
        self.archive = shared_archive(context)

    def offers(self) -> list[Offer]:
        return [Offer(uid, self.syntaxes) for uid in storage_sop_classes()]

    def offer_for(self, abstract_syntax: str) -> Offer | None:
        if not self.opts.accept_unknown_sop_classes:
            return None
        if not _UID_RE.match(abstract_syntax) or len(abstract_syntax) > 64:
            return None
        if is_known_sop_class(abstract_syntax):
            return None  # a known non-storage class (C-FIND, ...) is not ours to accept
        return Offer(abstract_syntax, self.syntaxes)

    async def handle(self, association: Association, request: Request) -> None:
        command = request.command
        if command.command_field != dimse.C_STORE_RQ or request.dataset is None:
            if request.dataset is not None:
                async for _ in request.dataset:
                    pass
            await association.respond(request, status=0x0211)
            return
        sop_class = command.affected_sop_class_uid or ""
        sop_instance = command.affected_sop_instance_uid or ""
        # The instance's UIDs go into the lines that are written; binding a logger for
        # every instance was a measurable share of a small C-STORE's time on the loop.
        log = association.log
        uids = {"sop_instance_uid": sop_instance, "sop_class_uid": sop_class}
        ingest = self.archive.ingest(
            sop_class_uid=sop_class,
            sop_instance_uid=sop_instance,
            transfer_syntax_uid=request.context.transfer_syntax,
            calling_ae=association.calling_ae,
            called_ae=association.called_ae,
            policy=self.opts.duplicates,
            min_free_space=int(self.opts.min_free_space),
            loop=association.link.loop,
        )
        failure: StoreFailed | None = None
        try:
            async for fragment in request.dataset:
                if failure is not None:
                    continue  # drain the rest of a data set we will not store
                if ingest.add(fragment):
                    try:
                        await ingest.flush()
                    except StoreFailed as exc:
                        failure = exc
                    except OSError as exc:
                        failure = StoreFailed(
                            STATUS_OUT_OF_RESOURCES, f"cannot write: {exc.strerror or exc}"
                        )
            if failure is None:
                outcome = await ingest.finish()
        except StoreFailed as exc:
            failure = exc
        except BaseException:  # the association is gone (or we are cancelled): clean up
            await ingest.discard()
            raise
        if failure is not None:
            await ingest.discard()
            log.warning(
                "store_failed",
                status=f"0x{failure.status:04X}",
                reason=failure.comment,
                calling_ae=association.calling_ae,
                **uids,
            )
            extra: dict[str, Any] = {"error_comment": failure.comment}
            if failure.offending:
                extra["offending_element"] = failure.offending
            await association.respond(request, status=failure.status, **extra)
            return
        if outcome.duplicate is not None:
            (log.warning if outcome.status else log.info)(
                "store_duplicate",
                policy=self.opts.duplicates,
                action=outcome.duplicate,
                status=f"0x{outcome.status:04X}",
                path=outcome.path,
                **uids,
            )
        elif outcome.status != 0:
            log.warning(
                "store_failed", status=f"0x{outcome.status:04X}", reason=outcome.comment, **uids
            )
        else:
            log.debug("stored", path=outcome.path, size=ingest.size, **uids)
        if outcome.status != 0:
            extra = {"error_comment": outcome.comment}
            if outcome.offending:
                extra["offending_element"] = outcome.offending
            await association.respond(request, status=outcome.status, **extra)
            return
        await association.respond(request, status=0x0000)
