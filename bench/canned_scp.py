"""The floor for a Python + uvloop DICOM server: canned replies, no DICOM logic at all.

Not a DICOM server. It frames PDUs by their 6-byte header and answers any A-ASSOCIATE-RQ
with one pre-encoded A-ASSOCIATE-AC (built once by dicomd's own negotiation code for the
benchmark's request), any P-DATA-TF with one pre-encoded C-ECHO-RSP, any A-RELEASE-RQ with
an A-RELEASE-RP. bench_echo.py runs it as a reference column: what one Python process
on uvloop costs per association when the per-association Python work is close to zero.

    python bench/canned_scp.py PORT CALLED_AE
"""

from __future__ import annotations

import asyncio
import socket
import sys

import uvloop

from dicomd.net import acse_codec, dimse, negotiation, pdu

VERIFICATION = "1.2.840.10008.1.1"
TRANSFER_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")


def canned_replies(called_ae: str) -> dict[int, bytes]:
    rq = acse_codec.encode_rq(
        calling_ae="BENCHSCU",
        called_ae=called_ae,
        contexts=[negotiation.ProposedContext(1, VERIFICATION, TRANSFER_SYNTAXES)],
        max_pdu_length=16384,
    )
    request = pdu.decode_associate_rq(rq)
    offers = [negotiation.ContextOffer(VERIFICATION, TRANSFER_SYNTAXES, True, False)]
    accepted = acse_codec.encode_ac(
        request, negotiation.negotiate_contexts(request, offers), max_pdu_length=65536
    )
    echo_rq = dimse.decode_command(dimse.encode_command(dimse.c_echo_rq(1)))
    rsp = dimse.encode_command(dimse.response_for(echo_rq, 0x0000))
    return {
        0x01: pdu.encode_associate(accepted),
        0x04: b"".join(bytes(c) for c in dimse.fragment_message(1, rsp, None, 16384)),
        0x05: pdu.encode_release_rp(),
    }


class Canned(asyncio.Protocol):
    replies: dict[int, bytes] = {}

    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while len(buf) >= 6:
            end = 6 + int.from_bytes(buf[2:6], "big")
            if len(buf) < end:
                return
            reply = self.replies.get(buf[0])
            del buf[:end]
            if reply is not None and self.transport is not None:
                self.transport.write(reply)


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Canned, "127.0.0.1", port, backlog=2048)
    async with server:
        await server.serve_forever()


def main() -> None:
    port, called_ae = int(sys.argv[1]), sys.argv[2]
    Canned.replies = canned_replies(called_ae)
    uvloop.run(serve(port))


if __name__ == "__main__":
    main()
