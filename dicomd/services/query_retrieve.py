"""Query/Retrieve SCP: Patient Root and Study Root C-FIND, C-MOVE, C-GET (PS3.4 Annex C).

SOP Class Extended Negotiation (PS3.4 C.5.1.1.1 for C-FIND, C.5.2/C.5.3 for C-MOVE/C-GET):
the A-ASSOCIATE-AC answers each proposed option with what dicomd does: relational queries
and relational retrieval yes; combined date-time matching yes; fuzzy semantic matching of
person names only when ``case_insensitive_names`` is on; timezone query adjustment and
enhanced multi-frame image conversion no. What was agreed applies to the requests on that
association.

C-FIND (levels PATIENT, STUDY, SERIES, IMAGE):
- hierarchical (the default): the unique keys of the levels above the query level must be
  in the Identifier with a single value (PS3.4 C.4.1.2.2.1); else 0xA900 with an Error
  Comment naming the key. Relational (when negotiated, C.3.4): keys of any level at
  or above the query level, without the unique keys above;
- a DA key and its TM partner (Study Date and Study Time...) are matched as one date-time
  range when combined date-time matching was negotiated, else each on its own (C.2.2.2.5);
- matching is PS3.4 C.2.2.2 (``dicomd.query.matching``): SQL selects candidates on indexed
  keys, the stored header of a representative instance (plus the index's computed keys:
  NumberOf..., ModalitiesInStudy, SOPClassesInStudy) is matched exactly. Any attribute in
  the stored header can be returned as an optional key, so 0xFF01 is never used;
- answers stream as 0xFF00 pending responses while candidates are read page by page;
  C-CANCEL ends with 0xFE00;
- ``max_results`` (per local AE): after that many answers, if one more entity matches, the
  query ends with 0xA700 (Refused: Out of Resources) with an Error Comment and a warning
  log line; the answers already sent stand. Narrow the query (e.g. a date range) to get all;
- ``case_insensitive_names``: PN matched case- and accent-insensitively (Orthanc's
  behaviour; the standard's default is literal);
- answers are encoded in the query's character set when every value fits, else ISO_IR 192.

C-MOVE and C-GET name instances by the unique keys down to the retrieve level (a list of
UIDs allowed at that level); hierarchical: the unique keys of the levels above must be
there with a single value, else 0xA900; relational retrieval (when negotiated): the level's
unique key alone is enough (an IMAGE-level retrieve with only SOP Instance UIDs).

C-MOVE: the destination is looked up among configured peers (``access.move_destination``);
unknown → 0xA801 with a log line naming the asked AE title and the known ones. One
sub-association (TLS when the peer has ``tls:``) offers each SOP class with the stored
transfer syntaxes plus explicit/implicit VR little endian; stored data set bytes are sent
as they are when their syntax is accepted, else decompressed with pydicom when possible
(``dicomd.qr.retrieve.reencode``), else the instance counts as failed. Pending responses
carry the counts; the final one has the Failed SOP Instance UID List when any failed;
C-CANCEL ends with 0xFE00.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

from pydantic import Field
from pydicom.dataset import Dataset

from dicomd.logging import get_logger
from dicomd.net import dimse
from dicomd.qr import sql as qsql
from dicomd.query.charset import charset_terms, decode_identifier
from dicomd.query.matching import MatchOptions, QueryError, compile_query
from dicomd.services.base import Offer, Service, ServiceContext, ServiceOptions
from dicomd.services.storage import (
    default_transfer_syntaxes,
    shared_archive,
    storage_sop_classes,
)
from dicomd.services.verification import UNCOMPRESSED_TRANSFER_SYNTAXES

if TYPE_CHECKING:
    from dicomd.association import Association, Request

PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
PATIENT_ROOT = frozenset({PATIENT_ROOT_FIND, PATIENT_ROOT_MOVE, PATIENT_ROOT_GET})
VERBS = {
    PATIENT_ROOT_FIND: "find",
    STUDY_ROOT_FIND: "find",
    PATIENT_ROOT_MOVE: "move",
    STUDY_ROOT_MOVE: "move",
    PATIENT_ROOT_GET: "get",
    STUDY_ROOT_GET: "get",
}

STATUS_SUCCESS = 0x0000
STATUS_PENDING = 0xFF00
STATUS_CANCEL = 0xFE00
STATUS_WARNING_SUBOPS = 0xB000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_OUT_OF_RESOURCES_SUBOPS = 0xA702
STATUS_MOVE_DESTINATION_UNKNOWN = 0xA801
STATUS_IDENTIFIER_DOES_NOT_MATCH = 0xA900
STATUS_UNABLE_TO_PROCESS = 0xC000

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
UNCOMPRESSED = frozenset({EXPLICIT_LE, IMPLICIT_LE, "1.2.840.10008.1.2.2"})

# Bytes of the SOP Class Extended Negotiation service-class application information.
# C-FIND (PS3.4 C.5.1.1.1): relational-queries, combined date-time matching, fuzzy
# semantic matching of person names, timezone query adjustment, enhanced multi-frame image
# conversion. C-MOVE/C-GET: relational-retrieval, enhanced multi-frame image conversion.
EXT_RELATIONAL = 0
EXT_DATETIME = 1
EXT_FUZZY = 2

# Pending C-FIND responses written together; a C-CANCEL is honoured between batches.
RESPONSE_BATCH = 16

log = get_logger("dicomd.qr")


class QueryRetrieveOptions(ServiceOptions):
    case_insensitive_names: bool = Field(
        default=False, description="match Person Names case- and accent-insensitively"
    )
    max_results: Annotated[int, Field(ge=1)] | None = Field(
        default=None,
        description="answers per C-FIND; one more match ends the query with 0xA700",
    )


def _comment(text: str) -> str:
    text = text.replace("\\", "/")
    return text if len(text) <= 64 else text[:61] + "..."


# Unique key of each level, and the levels each root allows.
UNIQUE = {
    "PATIENT": qsql.PATIENT_ID,
    "STUDY": qsql.STUDY_UID,
    "SERIES": qsql.SERIES_UID,
    "IMAGE": qsql.SOP_UID,
}


def query_level(query: Dataset, sop_class: str) -> str:
    """The Query/Retrieve Level, checked against the information model; raises QueryError."""
    elem = query.get(qsql.QUERY_LEVEL)
    level = str(elem.value or "").strip().upper() if elem is not None else ""
    allowed = qsql.LEVELS if sop_class in PATIENT_ROOT else qsql.LEVELS[1:]
    if level not in allowed:
        raise QueryError(
            f"QueryRetrieveLevel {level!r} not one of {'/'.join(allowed)}",
            offending=(qsql.QUERY_LEVEL,),
        )
    return level


def extended_reply(sop_class: str, proposed: bytes, fuzzy_names: bool) -> bytes | None:
    """The SOP Class Extended Negotiation reply for a Query/Retrieve SOP class: each option
    proposed (a byte set to 1) is granted (1) when dicomd supports it, else 0, unknown ones
    included; as many bytes as were proposed. None (no reply item) when nothing was."""
    verb = VERBS.get(sop_class)
    if verb is None or not proposed:
        return None
    if verb == "find":
        # relational, combined date-time, fuzzy person names, timezone adjustment
        supported: tuple[bool, ...] = (True, True, fuzzy_names, False)
    else:
        supported = (True,)  # relational retrieval
    return bytes(
        1 if value == 1 and index < len(supported) and supported[index] else 0
        for index, value in enumerate(proposed)
    )


def _flag(agreed: bytes, index: int) -> bool:
    return len(agreed) > index and agreed[index] == 1


def _tag_name(tag: int, elem: Any = None) -> str:
    if elem is not None and elem.keyword:
        return str(elem.keyword)
    from pydicom.datadict import keyword_for_tag

    return keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _single(elem: Any) -> bool:
    value = "" if elem is None or elem.value is None else elem.value
    return not (
        elem is None or value == "" or elem.VM != 1 or "*" in str(value) or "?" in str(value)
    )


def check_hierarchy(query: Dataset, level: str, sop_class: str) -> None:
    """PS3.4 C.4.1.2.2.1: unique keys of the levels above, single-valued."""
    first = 0 if sop_class in PATIENT_ROOT else 1
    for above in qsql.LEVELS[first : qsql.LEVELS.index(level)]:
        tag = UNIQUE[above]
        elem = query.get(tag)
        if not _single(elem):
            raise QueryError(
                f"hierarchical query at {level} level needs one {_tag_name(tag, elem)}",
                offending=(tag,),
            )


def unique_keys(
    query: Dataset, level: str, sop_class: str, *, relational: bool = False
) -> dict[int, tuple[str, ...]]:
    """C-MOVE/C-GET: the unique keys down to the level (a list of UIDs at the level).

    Hierarchical (PS3.4 C.4.2.2.1): each level above needs its unique key, single-valued;
    relational (negotiated): those above may be absent (present ones still filter)."""
    first = 0 if sop_class in PATIENT_ROOT else 1
    out: dict[int, tuple[str, ...]] = {}
    for lvl in qsql.LEVELS[first : qsql.LEVELS.index(level) + 1]:
        tag = UNIQUE[lvl]
        elem = query.get(tag)
        if elem is None or elem.value in (None, ""):
            if lvl == level:
                raise QueryError(
                    f"retrieve at {level} level needs {_tag_name(tag, elem)}", offending=(tag,)
                )
            if not relational:
                raise QueryError(
                    f"hierarchical retrieve at {level} level needs one {_tag_name(tag, elem)}",
                    offending=(tag,),
                )
            continue
        if lvl != level and not relational and not _single(elem):
            raise QueryError(
                f"hierarchical retrieve at {level} level needs one {_tag_name(tag, elem)}",
                offending=(tag,),
            )
        value = elem.value
        values = [value] if isinstance(value, str) else list(value)
        out[tag] = tuple(str(v).strip() for v in values if str(v).strip())
    return out


class QueryRetrieveService(Service):
    name: ClassVar[str] = "query_retrieve"
    Options: ClassVar[type[ServiceOptions]] = QueryRetrieveOptions
    permissions: ClassVar[tuple[str, ...]] = ("find", "move", "get")

    def __init__(self, options: ServiceOptions, context: ServiceContext) -> None:
        super().__init__(options, context)
        assert isinstance(options, QueryRetrieveOptions)
        self.opts = options
        self.archive = shared_archive(context)
        # Combined date-time matching applies only where it was negotiated.
        self.match_options = {
            combined: MatchOptions(
                fuzzy_names=options.case_insensitive_names, combined_datetime=combined
            )
            for combined in (False, True)
        }
        self.ae_title = context.local_ae.ae_title

    def extended_negotiation(self, abstract_syntax: str, proposed: bytes) -> bytes | None:
        return extended_reply(abstract_syntax, proposed, self.opts.case_insensitive_names)

    def agreed(self, association: Association, sop_class: str) -> bytes:
        """The SOP Class Extended Negotiation options agreed for ``sop_class`` on this
        association (b"" when none was proposed)."""
        negotiation = getattr(association, "negotiation", None)
        if negotiation is None:
            return b""
        proposed = negotiation.extended_negotiation.get(sop_class)
        if not proposed:
            return b""
        return self.extended_negotiation(sop_class, proposed) or b""

    def offers(self) -> list[Offer]:
        ts = UNCOMPRESSED_TRANSFER_SYNTAXES
        storage_ts = default_transfer_syntaxes()
        return [
            Offer(PATIENT_ROOT_FIND, ts, permission="find"),
            Offer(STUDY_ROOT_FIND, ts, permission="find"),
            Offer(PATIENT_ROOT_MOVE, ts, permission="move"),
            Offer(STUDY_ROOT_MOVE, ts, permission="move"),
            Offer(PATIENT_ROOT_GET, ts, permission="get"),
            Offer(STUDY_ROOT_GET, ts, permission="get"),
            # C-GET sub-operations: the requestor acts as storage SCP (role selection).
            *(
                Offer(uid, storage_ts, scu_role=False, scp_role=True, permission="get")
                for uid in storage_sop_classes()
            ),
        ]

    def permission_for(self, request: Request) -> str:
        return VERBS.get(request.context.abstract_syntax, "find")

    async def handle(self, association: Association, request: Request) -> None:
        cf = request.command.command_field
        if cf == dimse.C_FIND_RQ:
            await self._find(association, request)
        elif cf == dimse.C_MOVE_RQ:
            await self._move(association, request)
        elif cf == dimse.C_GET_RQ:
            await self._get(association, request)
        else:
            if request.dataset is not None:
                await request.dataset.read_all()
            await association.respond(request, 0x0211)  # Unrecognized operation

    async def _identifier(
        self, association: Association, request: Request
    ) -> tuple[Dataset, str] | None:
        raw = await request.dataset.read_all() if request.dataset is not None else b""
        try:
            query = decode_identifier(raw, request.context.transfer_syntax)
            level = query_level(query, request.context.abstract_syntax)
        except QueryError as exc:
            await self._refuse(association, request, exc)
            return None
        return query, level

    async def _refuse(self, association: Association, request: Request, exc: QueryError) -> None:
        log.warning(
            "qr_bad_identifier",
            reason=str(exc),
            calling_ae=association.calling_ae,
            status=hex(exc.status),
        )
        extra: dict[str, Any] = {"offending_element": list(exc.offending)} if exc.offending else {}
        await association.respond(request, exc.status, error_comment=_comment(str(exc)), **extra)

    # -- C-FIND --------------------------------------------------------------------------

    async def _find(self, association: Association, request: Request) -> None:
        started = time.perf_counter()
        got = await self._identifier(association, request)
        if got is None:
            return
        query, level = got
        sop_class = request.context.abstract_syntax
        agreed = self.agreed(association, sop_class)
        relational = _flag(agreed, EXT_RELATIONAL)
        try:
            if not relational:
                check_hierarchy(query, level, sop_class)
            match_query = Dataset()
            for elem in query:
                if elem.tag != qsql.QUERY_LEVEL:
                    match_query.add(elem)
            compiled = compile_query(match_query, self.match_options[_flag(agreed, EXT_DATETIME)])
        except QueryError as exc:
            await self._refuse(association, request, exc)
            return
        conditions = qsql.build_conditions(
            level, query, compiled, fuzzy_names=self.opts.case_insensitive_names
        )
        find = qsql.FindRequest(
            level, query, compiled, conditions, charset_terms(query),
            request.context.transfer_syntax, self.ae_title, self.archive.root,
        )  # fmt: skip
        engine = self.archive.engine

        def page(after: int) -> tuple[int | None, list[bytes]]:
            with engine.connect() as conn:
                return qsql.find_page(conn, find, after)

        sent = 0
        limit = self.opts.max_results
        status = STATUS_SUCCESS
        comment: str | None = None
        after: int | None = 0
        while after is not None and status == STATUS_SUCCESS:
            if request.cancelled.is_set():
                status = STATUS_CANCEL
                break
            after, answers = await asyncio.to_thread(page, after)
            if limit is not None and sent + len(answers) > limit:
                answers = answers[: limit - sent]
                status = STATUS_OUT_OF_RESOURCES
                comment = f"more than {limit} matches; narrow the query"
                log.warning(
                    "qr_too_many_matches",
                    max_results=limit,
                    query_level=level,
                    calling_ae=association.calling_ae,
                )
            # Pending responses in batches, one write each; a C-CANCEL is read between them.
            for start in range(0, len(answers), RESPONSE_BATCH):
                if request.cancelled.is_set():
                    status, comment = STATUS_CANCEL, None
                    break
                batch = answers[start : start + RESPONSE_BATCH]
                await association.respond_pending(request, batch, STATUS_PENDING)
                sent += len(batch)
                await asyncio.sleep(0)
        if comment is not None:
            await association.respond(request, status, error_comment=comment)
        else:
            await association.respond(request, status)
        log.info(
            "qr_find",
            calling_ae=association.calling_ae,
            query_level=level,
            model="patient" if sop_class in PATIENT_ROOT else "study",
            relational=relational,
            answers=sent,
            status=hex(status),
            ms=round((time.perf_counter() - started) * 1000, 3),
        )

    # -- C-MOVE --------------------------------------------------------------------------

    async def _instances_to_retrieve(
        self, association: Association, request: Request, query: Any, level: str
    ) -> list[qsql.StoredInstance] | None:
        """The stored instances a C-MOVE/C-GET names, or None once it has been refused."""
        sop_class = request.context.abstract_syntax
        relational = _flag(self.agreed(association, sop_class), EXT_RELATIONAL)
        try:
            uids = unique_keys(query, level, sop_class, relational=relational)
        except QueryError as exc:
            await self._refuse(association, request, exc)
            return None
        engine = self.archive.engine

        def load() -> list[qsql.StoredInstance]:
            with engine.connect() as conn:
                return qsql.instances_for(conn, level, uids)

        return await asyncio.to_thread(load)

    async def _move(self, association: Association, request: Request) -> None:
        from dicomd import access

        got = await self._identifier(association, request)
        if got is None:
            return
        query, level = got
        destination = str(request.command.move_destination or "").strip()
        decision = getattr(association, "decision", None)
        peer = (
            access.move_destination(
                self.context.config, decision, destination, association.calling_ae
            )
            if decision is not None
            else None
        )
        if peer is None:
            known = sorted(p.ae_title for p in self.context.config.peers if p.move_destination)
            log.warning(
                "qr_move_destination_unknown",
                move_destination=destination,
                known_destinations=known,
                calling_ae=association.calling_ae,
            )
            await association.respond(
                request,
                STATUS_MOVE_DESTINATION_UNKNOWN,
                error_comment=_comment(
                    f"unknown destination {destination!r}; known: {', '.join(known) or 'none'}"
                ),
            )
            return
        instances = await self._instances_to_retrieve(association, request, query, level)
        if instances is None:
            return
        from dicomd.qr.retrieve import send_to_peer

        await send_to_peer(
            association, request, instances, peer, self.archive.root, self.context, self.ae_title
        )

    # -- C-GET ---------------------------------------------------------------------------

    async def _get(self, association: Association, request: Request) -> None:
        from dicomd.association import AssociationError
        from dicomd.qr.retrieve import ReadAhead, run_suboperations, store_on

        got = await self._identifier(association, request)
        if got is None:
            return
        query, level = got
        instances = await self._instances_to_retrieve(association, request, query, level)
        if instances is None:
            return
        # Contexts on which the requestor accepted the storage SCP role.
        contexts = {
            (cx.abstract_syntax, cx.transfer_syntax): cid
            for cid, cx in association.contexts.items()
            if cx.scp_role
        }
        root = self.archive.root
        reader = ReadAhead(root, contexts, association.peer_max_pdu_length)

        async def store(inst: qsql.StoredInstance) -> int | None:
            try:
                return await store_on(association, contexts, inst, root, reader=reader)
            except AssociationError:
                raise
            except Exception as exc:
                log.warning(
                    "qr_get_store_failed", sop_instance_uid=inst.sop_instance_uid, error=repr(exc)
                )
                return None

        await run_suboperations(association, request, instances, store, what="get", reader=reader)
