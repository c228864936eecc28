"""PDU framing and codecs (dicomd.net.pdu), PS3.8 9.3."""

from __future__ import annotations

import itertools
import struct

import pdu_fixtures as fixtures
import pytest
from acse_reference import reference_decode_ac, reference_decode_rq
from hypothesis import given, settings
from hypothesis import strategies as st
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ

from dicomd.net import pdu as P
from dicomd.net.events import (
    ABORT_REASON_INVALID_PDU_PARAMETER,
    ABORT_REASON_UNEXPECTED_PDU,
    ABORT_REASON_UNRECOGNIZED_PDU,
    ABORT_REASON_UNRECOGNIZED_PDU_PARAMETER,
    ABORT_SOURCE_PROVIDER,
    ABORT_SOURCE_USER,
    Pdv,
)
from dicomd.net.negotiation import ProposedContext


def make_rq() -> A_ASSOCIATE_RQ:
    return fixtures.make_rq(
        "STORESCU", transfer_syntaxes=(fixtures.IMPLICIT, "1.2.840.10008.1.2.1")
    )


def make_ac() -> A_ASSOCIATE_AC:
    return fixtures.make_ac(
        "STORESCU", transfer_syntaxes=(fixtures.IMPLICIT, "1.2.840.10008.1.2.1")
    )


def pdata(*pdvs: tuple[int, int, bytes]) -> bytes:
    """A P-DATA-TF built by hand (independently of the code under test)."""
    body = b"".join(struct.pack(">IBB", len(d) + 2, cid, mch) + d for cid, mch, d in pdvs)
    return struct.pack(">BxI", 4, len(body)) + body


def frame_all(framer: P.PduFramer) -> list[tuple[int, bytes]]:
    out = []
    while (item := framer.next_pdu()) is not None:
        out.append((item[0], bytes(item[1])))
    return out


STREAM_PDUS = [
    make_rq().encode(),
    pdata((1, 3, b"\x00" * 10), (1, 0, b"abc")),
    pdata((3, 2, b"x" * 300)),
    P.encode_release_rq(),
    P.encode_release_rp(),
    P.encode_abort(2, 6),
    make_ac().encode(),
    bytes.fromhex("03000000000400010202"),
]
STREAM = b"".join(STREAM_PDUS)


# --- framing -------------------------------------------------------------------------


def test_framing_whole_stream() -> None:
    f = P.PduFramer(16384)
    f.feed(STREAM)
    assert [p for _, p in frame_all(f)] == STREAM_PDUS
    assert f.buffered == 0


def test_framing_one_byte_at_a_time() -> None:
    f = P.PduFramer(16384)
    got = []
    for i in range(len(STREAM)):
        f.feed(STREAM[i : i + 1])
        got += frame_all(f)
    assert [p for _, p in got] == STREAM_PDUS
    assert [t for t, _ in got] == [p[0] for p in STREAM_PDUS]


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=20))
@settings(max_examples=200, deadline=None)
def test_framing_arbitrary_boundaries(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(STREAM)]
    f = P.PduFramer(16384)
    got = []
    for a, b in itertools.pairwise(bounds):
        f.feed(STREAM[a:b])  # empty pieces included
        got += frame_all(f)
    assert [p for _, p in got] == STREAM_PDUS


def test_views_stay_valid_and_do_not_block_feeding() -> None:
    f = P.PduFramer(16384)
    buf = bytearray(pdata((1, 2, b"hello")) + pdata((1, 2, b"wor")))
    f.feed(buf)
    buf[:] = b"\xff" * len(buf)  # the caller reuses its buffer: we must have copied
    first = f.next_pdu()
    assert first is not None
    f.feed(pdata((1, 2, b"more")))  # would raise BufferError on a resized bytearray export
    assert P.decode_pdata(first[1])[0].data == b"hello"
    assert [bytes(p.data) for _, v in frame_all(f) for p in P.decode_pdata(v)] == [b"wor", b"more"]


def test_partial_header_returns_none() -> None:
    f = P.PduFramer(16384)
    f.feed(b"\x04\x00\x00")
    assert f.next_pdu() is None
    f.feed(b"\x00\x00\x08")
    assert f.next_pdu() is None  # header read, body pending
    f.feed(struct.pack(">IBB", 4, 1, 3) + b"ab")
    item = f.next_pdu()
    assert item is not None and item[0] == P.P_DATA_TF


# --- limits ----------------------------------------------------------------------------


@pytest.mark.parametrize("pdu_type", [0x00, 0x08, 0x10, 0xFF])
def test_unknown_pdu_type(pdu_type: int) -> None:
    f = P.PduFramer(16384)
    f.feed(bytes((pdu_type, 0, 0, 0, 0, 4, 0, 0, 0, 0)))
    with pytest.raises(P.PduError) as exc:
        f.next_pdu()
    assert exc.value.reason == ABORT_REASON_UNRECOGNIZED_PDU
    with pytest.raises(P.PduError):  # sticky: the stream cannot be resynchronised
        f.next_pdu()


def test_too_big_pdata_rejected_from_header_alone() -> None:
    f = P.PduFramer(16384)
    # Only the header: the framer must not wait for (or buffer) a bogus 1 GB body.
    f.feed(struct.pack(">BxI", 4, 1 << 30))
    with pytest.raises(P.PduError) as exc:
        f.next_pdu()
    assert exc.value.reason == ABORT_REASON_INVALID_PDU_PARAMETER


def test_pdata_limit_is_variable_field_plus_allowance() -> None:
    limit = 1000
    ok = struct.pack(">BxI", 4, limit + P.PDATA_LENGTH_ALLOWANCE)
    f = P.PduFramer(limit)
    f.feed(ok)
    assert f.next_pdu() is None  # header accepted, waiting for the body
    f = P.PduFramer(limit)
    f.feed(struct.pack(">BxI", 4, limit + P.PDATA_LENGTH_ALLOWANCE + 1))
    with pytest.raises(P.PduError):
        f.next_pdu()


def test_pdata_limit_zero_means_unlimited() -> None:
    f = P.PduFramer(0)
    big = pdata((1, 2, b"z" * 200_000))
    f.feed(big)
    assert frame_all(f) == [(4, big)]


def test_association_pdu_limit() -> None:
    f = P.PduFramer(16384, max_association_pdu_length=4096)
    f.feed(struct.pack(">BxI", 1, 4097))
    with pytest.raises(P.PduError):
        f.next_pdu()
    f = P.PduFramer(16384, max_association_pdu_length=4096)
    f.feed(struct.pack(">BxI", 2, 4096))
    assert f.next_pdu() is None


@pytest.mark.parametrize("pdu_type", [3, 5, 6, 7])
@pytest.mark.parametrize("length", [0, 3, 5, 1000])
def test_fixed_length_pdus_must_say_4(pdu_type: int, length: int) -> None:
    f = P.PduFramer(16384)
    f.feed(struct.pack(">BxI", pdu_type, length) + bytes(length))
    with pytest.raises(P.PduError) as exc:
        f.next_pdu()
    assert exc.value.reason == ABORT_REASON_INVALID_PDU_PARAMETER


# --- P-DATA-TF -------------------------------------------------------------------------


def test_pdv_decode() -> None:
    raw = pdata((1, 3, b"cmd"), (3, 0, b"fragment"), (255, 2, b""))
    pdvs = P.decode_pdata(memoryview(raw))
    assert [(p.context_id, p.is_command, p.is_last, bytes(p.data)) for p in pdvs] == [
        (1, True, True, b"cmd"),
        (3, False, False, b"fragment"),
        (255, False, True, b""),
    ]
    assert isinstance(pdvs[0].data, memoryview)  # zero-copy


def test_pdv_round_trip() -> None:
    pdvs = (Pdv(1, True, True, b"\x01\x02"), Pdv(7, False, False, b"x" * 1000))
    raw = P.encode_pdata(pdvs)
    assert raw == pdata((1, 3, b"\x01\x02"), (7, 0, b"x" * 1000))
    back = P.decode_pdata(raw)
    assert [(p.context_id, p.is_command, p.is_last, bytes(p.data)) for p in back] == [
        (p.context_id, p.is_command, p.is_last, bytes(p.data)) for p in pdvs
    ]


@given(
    st.lists(
        st.tuples(
            st.integers(0, 127).map(lambda i: 2 * i + 1),
            st.booleans(),
            st.booleans(),
            st.binary(max_size=64),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_pdv_round_trip_property(items: list[tuple[int, bool, bool, bytes]]) -> None:
    pdvs = [Pdv(*i) for i in items]
    back = P.decode_pdata(P.encode_pdata(pdvs))
    assert [(p.context_id, p.is_command, p.is_last, bytes(p.data)) for p in back] == items


@pytest.mark.parametrize(
    ("cid", "cmd", "last", "payload"),
    [(1, True, True, b"abc"), (3, False, False, b""), (255, False, True, b"x" * 70000)],
)
def test_pdata_header_matches_single_pdv_encoding(
    cid: int, cmd: bool, last: bool, payload: bytes
) -> None:
    header = P.pdata_header(cid, cmd, last, len(payload))
    assert len(header) == 12
    assert header + payload == P.encode_pdata([Pdv(cid, cmd, last, payload)])


def test_reserved_message_control_bits_are_ignored() -> None:
    (pdv,) = P.decode_pdata(pdata((1, 0xFC | 2, b"d")))
    assert (pdv.is_command, pdv.is_last) == (False, True)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(struct.pack(">BxI", 4, 0), id="no-pdv"),
        pytest.param(struct.pack(">BxIIBB", 4, 6, 0, 1, 0), id="zero-length-pdv"),
        pytest.param(struct.pack(">BxIIBB", 4, 6, 1, 1, 0), id="pdv-length-1"),
        pytest.param(struct.pack(">BxIIBB", 4, 8, 100, 1, 0) + b"ab", id="pdv-overruns-pdu"),
        pytest.param(pdata((1, 0, b"ab")) + b"\x00\x00", id="pdu-length-lies"),
        pytest.param(pdata((2, 0, b"ab")), id="even-context-id"),
        pytest.param(pdata((0, 0, b"ab")), id="context-id-0"),
        pytest.param(pdata((1, 0, b"ab"))[:-2] + b"\x00\x00\x00\x00\x00", id="trailing-garbage"),
    ],
)
def test_bad_pdata(raw: bytes) -> None:
    with pytest.raises(P.PduError) as exc:
        P.decode_pdata(raw)
    assert exc.value.reason == ABORT_REASON_INVALID_PDU_PARAMETER


def test_pdata_lying_length_through_framer() -> None:
    """PDU-length claims 8 bytes, the PDV item inside claims 100: overrun, not a crash."""
    raw = struct.pack(">BxIIBB", 4, 8, 100, 1, 0) + b"ab"
    f = P.PduFramer(16384)
    f.feed(raw + P.encode_release_rq())
    item = f.next_pdu()
    assert item is not None
    with pytest.raises(P.PduError):
        P.decode_pdata(item[1])


def test_encode_pdata_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        P.encode_pdata([])
    with pytest.raises(ValueError):
        P.encode_pdata([Pdv(2, False, False, b"")])


# --- release, abort --------------------------------------------------------------------


def test_release_and_abort_bytes() -> None:
    assert P.encode_release_rq() == bytes.fromhex("05000000000400000000")
    assert P.encode_release_rp() == bytes.fromhex("06000000000400000000")
    assert P.encode_abort(ABORT_SOURCE_PROVIDER, ABORT_REASON_UNEXPECTED_PDU) == bytes.fromhex(
        "07000000000400000202"
    )
    # Service-user source: the reason "shall be sent as 00H" (PS3.8 9.3.8).
    assert P.encode_abort(ABORT_SOURCE_USER, 5) == bytes.fromhex("07000000000400000000")
    assert P.decode_abort(memoryview(bytes.fromhex("07000000000400000206"))) == (2, 6)
    # Reserved bytes are not tested on receipt.
    assert P.decode_abort(bytes.fromhex("07ff00000004abcd0000")) == (0, 0)


def test_pynetdicom_agrees_on_fixed_pdus() -> None:
    from pynetdicom.pdu import A_ABORT_RQ, A_RELEASE_RP, A_RELEASE_RQ

    assert A_RELEASE_RQ().encode() == P.encode_release_rq()
    assert A_RELEASE_RP().encode() == P.encode_release_rp()
    ab = A_ABORT_RQ()
    ab.decode(P.encode_abort(2, 4))
    assert (ab.source, ab.reason_diagnostic) == (2, 4)


# --- association PDUs --------------------------------------------------------------------


def test_associate_rq_decodes_like_pynetdicom() -> None:
    raw = P.encode_associate(make_rq())
    back = P.decode_associate_rq(memoryview(raw))
    assert back == reference_decode_rq(raw)
    assert back.calling_ae == "STORESCU" and back.called_ae == "DICOMD"
    assert back.contexts == (
        ProposedContext(1, fixtures.VERIFICATION, (fixtures.IMPLICIT, "1.2.840.10008.1.2.1")),
    )
    assert back.max_pdu_length == 16384
    assert P.decode_associate_rq(raw) is back  # identical bytes share one decoded request


def test_associate_ac_rj_round_trip() -> None:
    raw_ac = P.encode_associate(make_ac())
    ac = P.decode_associate_ac(raw_ac)
    assert ac == reference_decode_ac(raw_ac)
    assert ac.max_pdu_length == 16384 and ac.contexts[0].transfer_syntax == fixtures.IMPLICIT
    rj = P.make_associate_rj(1, 1, 7)
    raw = P.encode_associate(rj)
    assert raw == bytes.fromhex("03000000000400010107")
    assert raw == pynetdicom_rj(1, 1, 7).encode()
    back = P.decode_associate_rj(raw)
    assert back == rj
    assert (back.result, back.source, back.reason_diagnostic) == (1, 1, 7)
    assert P.decode_associate_rj(pynetdicom_rj(2, 3, 2).encode()) == P.make_associate_rj(2, 3, 2)


def pynetdicom_rj(result: int, source: int, reason: int) -> A_ASSOCIATE_RJ:
    rj = A_ASSOCIATE_RJ()
    rj.result, rj.source, rj.reason_diagnostic = result, source, reason
    return rj


def test_protocol_version_not_supported_is_a_distinct_signal() -> None:
    raw = bytearray(make_rq().encode())
    raw[6:8] = b"\x00\x02"  # version 2 only, bit 0 clear
    with pytest.raises(P.ProtocolVersionNotSupported) as exc:
        P.decode_associate_rq(bytes(raw))
    assert exc.value.protocol_version == 2
    assert isinstance(exc.value, P.PduError)
    # PS3.8 9.3.2: only bit 0 is tested; extra bits are fine.
    raw[6:8] = b"\x00\x03"
    assert P.decode_associate_rq(bytes(raw)).calling_ae == "STORESCU"


def _replace_user_info(raw: bytes, extra_sub_items: bytes) -> bytes:
    """Append sub-items to the user information item of an encoded RQ, fixing lengths."""
    data = bytearray(raw)
    off = 74
    while data[off] != 0x50:
        off += 4 + struct.unpack_from(">H", data, off + 2)[0]
    length = struct.unpack_from(">H", data, off + 2)[0]
    stop = off + 4 + length
    data[stop:stop] = extra_sub_items
    struct.pack_into(">H", data, off + 2, length + len(extra_sub_items))
    struct.pack_into(">I", data, 2, len(data) - 6)
    return bytes(data)


def test_unknown_user_information_sub_items_are_ignored() -> None:
    rq = make_rq()
    raw = _replace_user_info(rq.encode(), b"\x7f\x00\x00\x03abc")
    back = P.decode_associate_rq(raw)
    assert back == P.decode_associate_rq(rq.encode())  # PS3.8 D.2 note 2: ignored


def test_unknown_top_level_item_is_unrecognized_parameter() -> None:
    raw = bytearray(make_rq().encode() + b"\x99\x00\x00\x00")
    struct.pack_into(">I", raw, 2, len(raw) - 6)
    with pytest.raises(P.PduError) as exc:
        P.decode_associate_rq(bytes(raw))
    assert exc.value.reason == ABORT_REASON_UNRECOGNIZED_PDU_PARAMETER


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda b: b[:40], id="truncated-fixed-part"),
        pytest.param(lambda b: b[:-3], id="truncated-item"),
        pytest.param(lambda b: b[:74] + b"\x10\x00\xff\xff" + b[78:], id="item-overrun"),
        pytest.param(lambda b: b[:10] + b" " * 16 + b[26:], id="blank-called-ae"),
        pytest.param(lambda b: b[:10] + b"\xff" * 16 + b[26:], id="non-ascii-ae"),
    ],
)
def test_malformed_associate_rq(mutate: object) -> None:
    raw = bytearray(mutate(make_rq().encode()))  # type: ignore[operator]
    struct.pack_into(">I", raw, 2, len(raw) - 6)
    with pytest.raises(P.PduError):
        P.decode_associate_rq(bytes(raw))


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_association_decoders_never_crash(garbage: bytes) -> None:
    for pdu_type, decode in (
        (1, P.decode_associate_rq),
        (2, P.decode_associate_ac),
        (3, P.decode_associate_rj),
    ):
        raw = struct.pack(">BxI", pdu_type, len(garbage)) + garbage
        try:
            decode(raw)
        except P.PduError:
            pass


@given(st.binary(min_size=74, max_size=400))
@settings(max_examples=300, deadline=None)
def test_associate_rq_with_garbage_items_never_crashes(tail: bytes) -> None:
    raw = bytearray(make_rq().encode()[:74] + tail[74:])
    struct.pack_into(">I", raw, 2, len(raw) - 6)
    try:
        P.decode_associate_rq(bytes(raw))
    except P.PduError:
        pass


def test_encode_associate_wraps_errors() -> None:
    rj = A_ASSOCIATE_RJ()  # result/source/reason None: cannot be packed
    with pytest.raises(ValueError):
        P.encode_associate(rj)
    with pytest.raises(ValueError):
        P.encode_associate(P.make_associate_rj(1, 1, 256))
    assert P.encode_associate(b"already encoded") == b"already encoded"


# --- throughput sanity ---------------------------------------------------------------------


def test_frames_100_mb() -> None:
    """100 MB of 16 KiB P-DATA PDUs in 64 KiB reads (no timing assert: it must simply
    finish, which a quadratic buffer would not do in reasonable time)."""
    payload = bytes(16384 - 12)
    one = P.pdata_header(1, False, False, len(payload)) + payload
    count = (100 << 20) // len(one)
    stream = one * count
    f = P.PduFramer(16384)
    seen = 0
    total = 0
    mv = memoryview(stream)
    for i in range(0, len(stream), 65536):
        f.feed(bytes(mv[i : i + 65536]))
        while (item := f.next_pdu()) is not None:
            seen += 1
            total += len(P.decode_pdata(item[1])[0].data)
    assert seen == count
    assert total == count * len(payload)
    assert f.buffered == 0


def test_associate_rq_cache_drops_its_oldest_entry_first() -> None:
    """Identical A-ASSOCIATE-RQ bytes share one decoded request; a site with more devices
    than the cache holds loses its oldest entries, not all of them at once."""
    from dicomd.net import pdu as pdu_module
    from dicomd.net.acse_codec import encode_rq

    def rq(n: int) -> bytes:
        return encode_rq(
            calling_ae=f"DEV{n}",
            called_ae="DICOMD",
            contexts=[ProposedContext(1, "1.2.840.10008.1.1", ("1.2.840.10008.1.2",))],
            max_pdu_length=16384,
        )

    pdu_module._rq_cache.clear()
    size = pdu_module._RQ_CACHE_SIZE
    first = [pdu_module.decode_associate_rq(rq(n)) for n in range(size + 10)]
    assert len(pdu_module._rq_cache) == size
    # The 10 oldest were dropped (decoded anew: equal, not the same object) ...
    assert pdu_module.decode_associate_rq(rq(0)) is not first[0]
    assert pdu_module.decode_associate_rq(rq(0)) == first[0]
    # ... the rest are still there.
    assert pdu_module.decode_associate_rq(rq(size + 5)) is first[size + 5]
    assert pdu_module.decode_associate_rq(rq(50)) is first[50]
