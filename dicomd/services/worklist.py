"""Modality Worklist SCP (Basic Worklist Management, PS3.4 Annex K).

Serves Modality Worklist Information Model - FIND from a worklist source (a wlmscpfs folder
or the SQL table), for the called AE title (the local AE this service runs on).

Statuses (PS3.4 K.4.1.1.4):
- 0xFF00 Pending for each match. dicomd matches and returns any attribute present in the
  entries, so an optional key is never "unsupported" and 0xFF01 is not used (wlmscpfs sends
  0xFF01 for keys outside its fixed list);
- 0x0000 after the last match; 0xFE00 after a C-CANCEL;
- 0xA900 Identifier does not match SOP Class (a key that cannot be matched as sent: a
  sequence key with several items, a malformed date, time or range), 0xC000 Unable to
  process (an Identifier that cannot be decoded), each with an Error Comment (and the
  Offending Element when there is one);
- 0xA700 Refused: Out of Resources when the source cannot answer (no ``lockfile`` in the AE
  directory, as wlmscpfs; a database error), or when more than ``max_results`` entries match.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Annotated, ClassVar

from pydantic import Field

from dicomd.config import WorklistSourceRef
from dicomd.logging import get_logger
from dicomd.query.charset import charset_terms, decode_identifier, encode_answer
from dicomd.query.matching import MatchOptions, QueryError, compile_query
from dicomd.query.response import build_answer
from dicomd.services.base import Offer, Service, ServiceContext, ServiceOptions
from dicomd.services.verification import UNCOMPRESSED_TRANSFER_SYNTAXES
from dicomd.worklist.source import SourceUnavailable
from dicomd.worklist.sources import open_source

if TYPE_CHECKING:
    from dicomd.association import Association, Request

MODALITY_WORKLIST_FIND = "1.2.840.10008.5.1.4.31"

STATUS_SUCCESS = 0x0000
STATUS_PENDING = 0xFF00
STATUS_CANCEL = 0xFE00
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_IDENTIFIER_DOES_NOT_MATCH = 0xA900
STATUS_UNABLE_TO_PROCESS = 0xC000

# Above this many entries to match one by one, matching runs in a worker thread.
THREAD_THRESHOLD = 4000
# Pending responses written together; a C-CANCEL is honoured between batches.
RESPONSE_BATCH = 16
# Encoded answers kept per entry (one per query shape: keys, character set, transfer syntax).
ANSWER_CACHE_PER_ENTRY = 4

log = get_logger("dicomd.worklist")


class WorklistOptions(ServiceOptions):
    source: WorklistSourceRef = "default"
    case_insensitive_names: bool = False
    max_results: Annotated[int, Field(ge=1)] | None = None
    reject_invalid_entries: bool = True


def _comment(text: str) -> str:
    """An Error Comment: LO, at most 64 characters, no backslash."""
    text = text.replace("\\", "/")
    return text if len(text) <= 64 else text[:61] + "..."


class WorklistService(Service):
    name: ClassVar[str] = "worklist"
    Options: ClassVar[type[ServiceOptions]] = WorklistOptions
    permissions: ClassVar[tuple[str, ...]] = ("worklist",)

    def __init__(self, options: ServiceOptions, context: ServiceContext) -> None:
        super().__init__(options, context)
        assert isinstance(options, WorklistOptions)
        self.opts = options
        self.source = open_source(context.config, options.source, context.shared)
        self.match_options = MatchOptions(
            fuzzy_names=options.case_insensitive_names, combined_datetime=True
        )
        self.ae_title = context.local_ae.ae_title

    def offers(self) -> list[Offer]:
        return [Offer(MODALITY_WORKLIST_FIND, UNCOMPRESSED_TRANSFER_SYNTAXES)]

    async def run(self) -> None:
        # Load the worklist now rather than on the first query.
        try:
            index = await self.source.snapshot(self.ae_title)
            log.info(
                "worklist_loaded",
                ae_title=self.ae_title,
                source=self.source.name,
                entries=len(index),
            )
        except SourceUnavailable as exc:
            log.warning("worklist_unavailable", ae_title=self.ae_title, reason=str(exc))
        await asyncio.Event().wait()

    async def handle(self, association: Association, request: Request) -> None:
        started = time.perf_counter()
        raw = await request.dataset.read_all() if request.dataset is not None else b""
        ts = request.context.transfer_syntax
        try:
            query = decode_identifier(raw, ts)
            compiled = compile_query(query, self.match_options)
        except QueryError as exc:
            log.warning("worklist_bad_query", reason=str(exc), calling_ae=association.calling_ae)
            extra = {"offending_element": list(exc.offending)} if exc.offending else {}
            await association.respond(
                request, exc.status, error_comment=_comment(str(exc)), **extra
            )
            return
        try:
            index = await self.source.snapshot(self.ae_title)
        except SourceUnavailable as exc:
            log.error("worklist_unavailable", ae_title=self.ae_title, reason=str(exc))
            await association.respond(
                request, STATUS_OUT_OF_RESOURCES, error_comment=_comment(str(exc))
            )
            return
        include_invalid = not self.opts.reject_invalid_entries
        if len(index) > THREAD_THRESHOLD and index.candidates(compiled) is None:
            matches = await asyncio.to_thread(
                index.match, compiled, include_invalid=include_invalid
            )
        else:
            matches = index.match(compiled, include_invalid=include_invalid)
        limit = self.opts.max_results
        if limit is not None and len(matches) > limit:
            log.warning(
                "worklist_too_many_matches",
                matches=len(matches),
                max_results=limit,
                calling_ae=association.calling_ae,
            )
            await association.respond(
                request,
                STATUS_OUT_OF_RESOURCES,
                error_comment=_comment(f"{len(matches)} matches exceed the limit of {limit}"),
            )
            return
        terms = charset_terms(query)
        shape = (compiled.shape, tuple(terms), ts)
        sent = 0
        await asyncio.sleep(0)  # a C-CANCEL sent right after the request is read now
        for start in range(0, len(matches), RESPONSE_BATCH):
            if request.cancelled.is_set():
                break
            batch = []
            for entry in matches[start : start + RESPONSE_BATCH]:
                body = entry.answers.get(shape)
                if body is None:
                    body = encode_answer(build_answer(query, entry.dataset), terms, ts)
                    if len(entry.answers) >= ANSWER_CACHE_PER_ENTRY:
                        entry.answers.pop(next(iter(entry.answers)))
                    entry.answers[shape] = body
                batch.append(body)
            await association.respond_pending(request, batch, STATUS_PENDING)
            sent += len(batch)
            await asyncio.sleep(0)  # let a C-CANCEL be read between batches
        cancelled = request.cancelled.is_set() and sent < len(matches)
        await association.respond(request, STATUS_CANCEL if cancelled else STATUS_SUCCESS)
        log.info(
            "worklist_query",
            calling_ae=association.calling_ae,
            matches=len(matches),
            sent=sent,
            cancelled=cancelled,
            entries=len(index),
            ms=round((time.perf_counter() - started) * 1000, 3),
        )
