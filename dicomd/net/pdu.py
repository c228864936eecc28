"""DICOM upper layer PDUs: framing of the byte stream and the codecs (PS3.8 9.3).

Sans-IO: nothing here reads a socket. ``PduFramer`` cuts a byte stream into PDUs;
the functions below decode and encode them.

Division of labour, following DESIGN.md:

* P-DATA-TF (the hot path) is framed and split into PDVs by hand, zero-copy: a PDV's
  ``data`` is a ``memoryview`` into the received ``bytes`` chunk.
* A-RELEASE-RQ/RP and A-ABORT are fixed 10-byte PDUs, done by hand.
* A-ASSOCIATE, both sides (decode the RQ, encode the AC or RJ; encode the RQ, decode the
  AC) is done by hand in ``acse_codec``: it is most of the CPU an association costs
  otherwise, and a malformed PDU comes out as a ``PduError`` (an A-ABORT), never a crash.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterable

from dicomd.net.acse_codec import (
    AssociateRJ,
    PduError,
    ProtocolVersionNotSupported,
    decode_ac,
    decode_rj,
    decode_rq,
)
from dicomd.net.events import (
    ABORT_REASON_UNRECOGNIZED_PDU,
    ABORT_SOURCE_USER,
    Pdv,
)
from dicomd.net.negotiation import AssociateAC, AssociationRequest

__all__ = [
    "A_ABORT",
    "A_ASSOCIATE_AC_PDU",
    "A_ASSOCIATE_RJ_PDU",
    "A_ASSOCIATE_RQ_PDU",
    "A_RELEASE_RP",
    "A_RELEASE_RQ",
    "PDATA_LENGTH_ALLOWANCE",
    "PDU_HEADER_LENGTH",
    "PDU_NAMES",
    "P_DATA_TF",
    "PduError",
    "PduFramer",
    "ProtocolVersionNotSupported",
    "decode_abort",
    "decode_associate_ac",
    "decode_associate_rj",
    "decode_associate_rq",
    "decode_pdata",
    "encode_abort",
    "encode_associate",
    "encode_pdata",
    "encode_release_rp",
    "encode_release_rq",
    "make_associate_rj",
    "pdata_header",
]

# PDU types (PS3.8 9.3.1, table 9-11 ff.). Type 0x00 and 0x08..0xFF are not defined.
A_ASSOCIATE_RQ_PDU = 0x01
A_ASSOCIATE_AC_PDU = 0x02
A_ASSOCIATE_RJ_PDU = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07

PDU_NAMES = {
    A_ASSOCIATE_RQ_PDU: "A-ASSOCIATE-RQ",
    A_ASSOCIATE_AC_PDU: "A-ASSOCIATE-AC",
    A_ASSOCIATE_RJ_PDU: "A-ASSOCIATE-RJ",
    P_DATA_TF: "P-DATA-TF",
    A_RELEASE_RQ: "A-RELEASE-RQ",
    A_RELEASE_RP: "A-RELEASE-RP",
    A_ABORT: "A-ABORT",
}

# Every PDU starts with type (1), reserved (1), PDU-length (4, big endian) (PS3.8 9.3.1).
PDU_HEADER_LENGTH = 6

# The negotiated maximum length (PS3.8 D.1, Maximum Length Sub-Item) bounds the
# *variable field* of a P-DATA-TF, i.e. the PDV items, which is exactly what the
# PDU-length field counts. A conforming peer therefore never exceeds it. Some peers
# apply the limit to the PDV value alone and overshoot by the 6-byte PDV item header
# (length + context id + message control header), per PDV; this slack tolerates that
# for a handful of PDVs without letting a peer push us into unbounded buffering.
PDATA_LENGTH_ALLOWANCE = 64

# Result/source/reason of the A-ASSOCIATE-RJ the provider sends itself when it cannot
# take the request at all (PS3.8 9.3.4, table 9-21): rejected-permanent, "DICOM UL
# service-provider (ACSE related function)", "protocol-version-not-supported".
RJ_RESULT_PERMANENT = 1
RJ_SOURCE_PROVIDER_ACSE = 2
RJ_REASON_PROTOCOL_VERSION = 2

_HEADER = struct.Struct(">BxI")
# Single-PDV P-DATA-TF prefix: PDU type, reserved, PDU-length, PDV item-length,
# presentation context ID, message control header (PS3.8 9.3.5, E.2).
_PDATA_PREFIX = struct.Struct(">BxIIBB")
_PDV_PREFIX = struct.Struct(">IBB")

# Fixed-length PDUs: their PDU-length is always 4 (PS3.8 9.3.4, 9.3.6, 9.3.7, 9.3.8).
_FIXED_LENGTH = 4
_RELEASE_RQ_BYTES = bytes((A_RELEASE_RQ, 0, 0, 0, 0, 4, 0, 0, 0, 0))
_RELEASE_RP_BYTES = bytes((A_RELEASE_RP, 0, 0, 0, 0, 4, 0, 0, 0, 0))

# Fixed part of A-ASSOCIATE-RQ/AC after the header: protocol version (2), reserved (2),
# called AE (16), calling AE (16), reserved (32) = 68 bytes (PS3.8 tables 9-11, 9-17).
_ASSOC_FIXED = 68


def _pdu_name(pdu_type: int) -> str:
    return PDU_NAMES.get(pdu_type, f"PDU type 0x{pdu_type:02X}")


class PduFramer:
    """Cut a byte stream into whole PDUs, checking type and length as headers arrive.

    Received chunks are kept as a queue of ``memoryview``s over the (immutable) ``bytes``
    they came in. A PDU that lies within one chunk is returned as a slice of it, without
    copying; a PDU that spans chunks is joined once. Every byte is therefore copied at most
    once whatever the chunking, and nothing ever shifts a growing buffer. The returned views
    stay valid for as long as the caller keeps them (they pin their chunk, not the framer).

    After a ``PduError`` the stream cannot be resynchronised (PDU boundaries are only known
    from lengths), so every later ``next_pdu()`` raises the same error again.
    """

    __slots__ = (
        "_avail",
        "_chunks",
        "_error",
        "_pdu_len",
        "_pdu_type",
        "max_association_pdu_length",
        "max_pdu_length",
    )

    def __init__(self, max_pdu_length: int, max_association_pdu_length: int = 1 << 20) -> None:
        if max_pdu_length < 0 or max_association_pdu_length < _ASSOC_FIXED:
            raise ValueError("invalid PDU length limits")
        # 0 = no limit, as in the Maximum Length Sub-Item (PS3.8 D.1).
        self.max_pdu_length = max_pdu_length
        self.max_association_pdu_length = max_association_pdu_length
        self._chunks: deque[memoryview] = deque()
        self._avail = 0
        self._pdu_len = 0  # total length of the PDU whose header was read, 0: none yet
        self._pdu_type = 0
        self._error: PduError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as part of a PDU."""
        return self._avail

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if type(data) is not bytes:
            # A bytearray (or a view of one) may be reused by the caller: keep a copy,
            # since the PDUs we hand out are views into what we keep.
            data = bytes(data)
        self._chunks.append(memoryview(data))
        self._avail += len(data)

    def next_pdu(self) -> tuple[int, memoryview] | None:
        """Return ``(pdu_type, whole PDU including its header)``, or None for more data."""
        if self._error is not None:
            raise self._error
        total = self._pdu_len
        if not total:
            if self._avail < PDU_HEADER_LENGTH:
                return None
            first = self._chunks[0]
            pdu_type, length = _HEADER.unpack_from(
                first if len(first) >= PDU_HEADER_LENGTH else self._join_header()
            )
            limit = self.max_pdu_length
            if pdu_type != P_DATA_TF or (limit and length > limit + PDATA_LENGTH_ALLOWANCE):
                # Not the hot path: all the checks, PduError sticks.
                try:
                    self._check_header(pdu_type, length)
                except PduError as exc:
                    self._error = exc
                    raise
            total = self._pdu_len = PDU_HEADER_LENGTH + length
            self._pdu_type = pdu_type
        if self._avail < total:
            return None
        self._pdu_len = 0
        return self._pdu_type, self._take(total)

    def _join_header(self) -> bytes:
        """The 6 header bytes when they straddle received chunks."""
        parts = []
        need = PDU_HEADER_LENGTH
        for chunk in self._chunks:
            parts.append(chunk[:need])
            need -= len(parts[-1])
            if not need:
                break
        return b"".join(parts)

    def _check_header(self, pdu_type: int, length: int) -> None:
        if pdu_type == P_DATA_TF:
            limit = self.max_pdu_length
            if limit and length > limit + PDATA_LENGTH_ALLOWANCE:
                raise PduError(
                    f"P-DATA-TF variable field of {length} bytes exceeds the maximum "
                    f"length of {limit} we negotiated (PS3.8 D.1)"
                )
        elif pdu_type in (A_ASSOCIATE_RQ_PDU, A_ASSOCIATE_AC_PDU):
            if length > self.max_association_pdu_length:
                raise PduError(
                    f"{_pdu_name(pdu_type)} of {length} bytes exceeds the limit of "
                    f"{self.max_association_pdu_length}"
                )
        elif A_ASSOCIATE_RJ_PDU <= pdu_type <= A_ABORT:
            if length != _FIXED_LENGTH:
                raise PduError(
                    f"{_pdu_name(pdu_type)} has PDU-length {length}, PS3.8 fixes it at 4"
                )
        else:
            raise PduError(f"unrecognized PDU type 0x{pdu_type:02X}", ABORT_REASON_UNRECOGNIZED_PDU)

    def _take(self, n: int) -> memoryview:
        chunks = self._chunks
        self._avail -= n
        first = chunks[0]
        size = len(first)
        if size >= n:
            if size == n:
                chunks.popleft()
                return first
            chunks[0] = first[n:]
            return first[:n]
        parts = []
        while n:
            chunk = chunks[0]
            size = len(chunk)
            if size <= n:
                parts.append(chunk)
                chunks.popleft()
                n -= size
            else:
                parts.append(chunk[:n])
                chunks[0] = chunk[n:]
                n = 0
        return memoryview(b"".join(parts))


# --- P-DATA-TF (PS3.8 9.3.5, annex E) --------------------------------------------------


def decode_pdata(pdu: memoryview | bytes) -> tuple[Pdv, ...]:
    """Split a whole P-DATA-TF PDU into its PDVs; each ``data`` is a view into ``pdu``.

    Checked (PS3.8 9.3.5.1, E.2): at least one PDV; each item-length >= 2 (context ID and
    message control header; an empty fragment is tolerated); the items tile the PDU
    exactly; the presentation context ID is odd (1..255). Bits 2-7 of the message control
    header "shall be 0" but are ignored, as PS3.8 does for reserved fields elsewhere.
    Whether the context ID was negotiated is for the association layer to check.
    """
    if type(pdu) is not memoryview:
        pdu = memoryview(pdu)
    end = len(pdu)
    if end < PDU_HEADER_LENGTH or _HEADER.unpack_from(pdu)[1] != end - PDU_HEADER_LENGTH:
        raise PduError("P-DATA-TF PDU-length does not match the PDU")
    off = PDU_HEADER_LENGTH
    unpack = _PDV_PREFIX.unpack_from
    if end >= 12:
        # Fast path: the usual P-DATA-TF holds exactly one PDV (PS3.7 fragments a
        # message into one PDV per PDU in practice).
        item_length, context_id, mch = unpack(pdu, off)
        if item_length + 10 == end and item_length >= 2 and context_id & 1:
            return (Pdv(context_id, bool(mch & 1), bool(mch & 2), pdu[12:]),)
    pdvs = []
    while off < end:
        if end - off < 6:
            raise PduError(f"P-DATA-TF: {end - off} trailing bytes cannot hold a PDV item")
        item_length, context_id, mch = unpack(pdu, off)
        if item_length < 2:
            raise PduError(f"P-DATA-TF: PDV item-length {item_length} < 2")
        stop = off + 4 + item_length
        if stop > end:
            raise PduError(
                f"P-DATA-TF: PDV item of {item_length} bytes overruns the PDU by {stop - end}"
            )
        if not context_id & 1:
            raise PduError(f"P-DATA-TF: presentation context ID {context_id} is not odd")
        pdvs.append(Pdv(context_id, bool(mch & 1), bool(mch & 2), pdu[off + 6 : stop]))
        off = stop
    if not pdvs:
        raise PduError("P-DATA-TF without any PDV item")
    return tuple(pdvs)


def pdata_header(context_id: int, is_command: bool, is_last: bool, payload_length: int) -> bytes:
    """The 12 bytes that precede ``payload`` in a single-PDV P-DATA-TF PDU.

    For ``writelines([pdata_header(...), payload_view])`` without copying the payload.
    """
    return _PDATA_PREFIX.pack(
        P_DATA_TF,
        payload_length + 6,
        payload_length + 2,
        context_id,
        (1 if is_command else 0) | (2 if is_last else 0),
    )


def encode_pdata(pdvs: Iterable[Pdv]) -> bytes:
    """Encode one P-DATA-TF PDU holding ``pdvs`` in order."""
    parts: list[bytes | memoryview] = [b""]
    total = 0
    for pdv in pdvs:
        if not 1 <= pdv.context_id <= 255 or not pdv.context_id & 1:
            raise ValueError(f"presentation context ID {pdv.context_id} is not odd 1..255")
        size = len(pdv.data)
        parts.append(
            _PDV_PREFIX.pack(
                size + 2,
                pdv.context_id,
                (1 if pdv.is_command else 0) | (2 if pdv.is_last else 0),
            )
        )
        parts.append(pdv.data)
        total += size + 6
    if total == 0:
        raise ValueError("a P-DATA-TF needs at least one PDV")
    parts[0] = _HEADER.pack(P_DATA_TF, total)
    return b"".join(parts)


# --- A-RELEASE, A-ABORT (PS3.8 9.3.6 - 9.3.8) ------------------------------------------


def encode_release_rq() -> bytes:
    return _RELEASE_RQ_BYTES


def encode_release_rp() -> bytes:
    return _RELEASE_RP_BYTES


def encode_abort(source: int, reason: int) -> bytes:
    """A-ABORT PDU. With the service-user source the reason "shall be sent as 00H"
    (PS3.8 9.3.8), so it is forced to 0 there."""
    if source == ABORT_SOURCE_USER:
        reason = 0
    return bytes((A_ABORT, 0, 0, 0, 0, 4, 0, 0, source & 0xFF, reason & 0xFF))


def decode_abort(pdu: memoryview | bytes) -> tuple[int, int]:
    """Return ``(source, reason)``. Values are not checked: an A-ABORT ends the association
    whatever it says, and answering a slightly odd one with an abort of our own would only
    delay the close."""
    if len(pdu) != PDU_HEADER_LENGTH + _FIXED_LENGTH:
        raise PduError("A-ABORT PDU must be 10 bytes")
    return pdu[8], pdu[9]


# --- A-ASSOCIATE-RQ/AC/RJ (PS3.8 9.3.2 - 9.3.4) ---------------------------------------------


def decode_associate_rq(pdu: memoryview | bytes) -> AssociationRequest:
    """Decode an A-ASSOCIATE-RQ (``acse_codec.decode_rq``); raises
    ``ProtocolVersionNotSupported`` or ``PduError``."""
    key = pdu if type(pdu) is bytes else bytes(pdu)
    cached = _rq_cache.get(key)
    if cached is not None:
        return cached
    decoded = decode_rq(key)
    if len(_rq_cache) >= _RQ_CACHE_SIZE:
        del _rq_cache[next(iter(_rq_cache))]  # the oldest: a site's busy devices stay
    _rq_cache[key] = decoded
    return decoded


# A modality sends the same A-ASSOCIATE-RQ bytes association after association: identical
# bytes share one decoded request (it is only read, never changed), which also lets the
# acceptor remember its answer per request object (acceptor.Generation.accept_cache).
# Sized for the devices of a site (each has one or a few requests); the oldest entry goes
# first, so a busy site beyond that size still keeps most of what it sends. Not larger:
# when every request is new, entries that outlive many associations end up in the GC's
# older generations and cost more than the decode they would save (~6 µs).
_RQ_CACHE_SIZE = 256
_rq_cache: dict[bytes, AssociationRequest] = {}


def decode_associate_ac(pdu: memoryview | bytes) -> AssociateAC:
    """Decode an A-ASSOCIATE-AC (requestor side, ``acse_codec.decode_ac``); raises
    ``PduError``."""
    return decode_ac(pdu)


def decode_associate_rj(pdu: memoryview | bytes) -> AssociateRJ:
    """Decode an A-ASSOCIATE-RJ. Result/source/reason are not range-checked: a rejection
    is final whatever its diagnostic says."""
    return decode_rj(pdu)


def make_associate_rj(result: int, source: int, reason: int) -> AssociateRJ:
    """An A-ASSOCIATE-RJ PDU (PS3.8 9.3.4, table 9-21)."""
    return AssociateRJ(result, source, reason)


def encode_associate(pdu: bytes | AssociateRJ | object) -> bytes:
    """The bytes of an association PDU: already encoded ``bytes`` (the acceptor's
    A-ASSOCIATE-AC, ``acse_codec.encode_ac``, and the requestor's A-ASSOCIATE-RQ,
    ``acse_codec.encode_rq``) as they are, else ``pdu.encode()`` (an ``AssociateRJ``; the
    tests also hand in pynetdicom's PDU objects). Errors are the
    caller's (``ValueError``), not the peer's, so they are not ``PduError``."""
    if type(pdu) is bytes:
        return pdu
    try:
        data = pdu.encode()  # type: ignore[union-attr]
    except Exception as exc:
        raise ValueError(f"cannot encode {type(pdu).__name__}: {exc!r}") from exc
    if len(data) < PDU_HEADER_LENGTH or _HEADER.unpack_from(data)[1] != len(data) - 6:
        raise ValueError(f"{type(pdu).__name__} encoded with an inconsistent PDU-length")
    return data
