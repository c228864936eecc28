"""TLS contexts for listeners and peers (DICOM TLS, PS3.15 B.1 / BCP 195)."""

from __future__ import annotations

import asyncio
import ssl
from asyncio import sslproto
from collections.abc import Callable
from typing import TYPE_CHECKING

from dicomd.logging import get_logger

if TYPE_CHECKING:
    from dicomd.config import ListenerTLS, Peer, PeerTLS

log = get_logger("dicomd.tls")

# ServiceContext.shared key: peer name → client ssl.SSLContext of each TLS peer, loaded by
# the supervisor before the privilege drop and again on reload (see peer_connection()).
PEER_SSL_CONTEXTS = "peer_ssl_contexts"

_MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}

# BCP 195 (RFC 9325) recommended TLS 1.2 suites: AEAD with forward secrecy only.
_BCP195_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384"
)
# The non-downgrading and extended profiles (PS3.15 B.10, B.11): AES-GCM with forward
# secrecy only, the suites DCMTK's +py / +pz offer.
_BCP195_STRICT_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384"
)


def _apply_profile(ctx: ssl.SSLContext, profile: str) -> None:
    # TLS 1.3 suites are all AEAD with forward secrecy; set_ciphers governs TLS 1.2.
    ctx.set_ciphers(_BCP195_CIPHERS if profile == "bcp195" else _BCP195_STRICT_CIPHERS)


def server_context(tls: ListenerTLS) -> ssl.SSLContext:
    """A server SSLContext for a listener; raises OSError/ssl.SSLError on unreadable files."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _MIN_VERSIONS[tls.min_version]
    _apply_profile(ctx, tls.profile)
    ctx.load_cert_chain(str(tls.certificate), str(tls.private_key))
    if tls.ca_file is not None or tls.ca_directory is not None:
        ctx.load_verify_locations(
            cafile=str(tls.ca_file) if tls.ca_file else None,
            capath=str(tls.ca_directory) if tls.ca_directory else None,
        )
    if tls.crl_file is not None:
        ctx.load_verify_locations(cafile=str(tls.crl_file))
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    ctx.verify_mode = {
        "require": ssl.CERT_REQUIRED,
        "verify": ssl.CERT_OPTIONAL,
        "ignore": ssl.CERT_NONE,
    }[tls.peer_certificate]
    return ctx


def client_context(tls: PeerTLS) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = _MIN_VERSIONS[tls.min_version]
    _apply_profile(ctx, tls.profile)
    if tls.ca_file is not None or tls.ca_directory is not None:
        ctx.load_verify_locations(
            cafile=str(tls.ca_file) if tls.ca_file else None,
            capath=str(tls.ca_directory) if tls.ca_directory else None,
        )
    else:
        ctx.load_default_certs()
    if tls.certificate is not None:
        ctx.load_cert_chain(str(tls.certificate), str(tls.private_key) if tls.private_key else None)
    # DICOM peers are often addressed by IP with certificates naming a host; the hostname
    # check applies only when a server_name is configured.
    ctx.check_hostname = tls.server_name is not None
    return ctx


def peer_contexts(peers: list[Peer]) -> dict[str, ssl.SSLContext]:
    """Client contexts of the TLS peers, by peer name; raises OSError/ssl.SSLError naming
    the peer. Loaded at start-up before the privilege drop, and again on reload."""
    contexts: dict[str, ssl.SSLContext] = {}
    for peer in peers:
        if peer.tls is None:
            continue
        try:
            contexts[peer.name] = client_context(peer.tls)
        except (OSError, ssl.SSLError) as exc:
            raise type(exc)(f"peer {peer.name!r}: cannot load TLS material: {exc}") from exc
    return contexts


def peer_connection(peer: Peer, contexts: dict[str, ssl.SSLContext]) -> dict[str, object]:
    """Keyword arguments for ``dicomd.association.associate()`` to reach ``peer``: with TLS
    when the peer has ``tls:`` (C-MOVE sub-associations to a TLS destination use it)."""
    if peer.tls is None:
        return {}
    return {"ssl": contexts[peer.name], "server_hostname": peer.tls.server_name}


# --------------------------------------------------------------------------------------------
# Accepting TLS connections


def describe_handshake_failure(exc: BaseException, timeout: float) -> tuple[str, str]:
    """(reason, hint) for a failed server-side handshake, for one log line."""
    if isinstance(exc, TimeoutError) or (
        isinstance(exc, ConnectionAbortedError) and "longer than" in str(exc)
    ):
        return (
            f"no TLS handshake within {timeout:g} s",
            "a slow or silent peer; dropped so it holds nothing up",
        )
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or exc.__class__.__name__).upper()
        text = f"{exc.reason or exc}" if exc.reason else str(exc)
        if reason in (
            "WRONG_VERSION_NUMBER",
            "HTTP_REQUEST",
            "UNKNOWN_PROTOCOL",
            "RECORD_LAYER_FAILURE",
        ):
            return text, "the peer does not speak TLS (a plain DICOM client on a TLS port?)"
        if reason in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "CERTIFICATE_REQUIRED"):
            return text, "the listener requires a client certificate (peer_certificate: require)"
        if reason in (
            "CERTIFICATE_VERIFY_FAILED",
            "TLSV1_ALERT_UNKNOWN_CA",
            "SSLV3_ALERT_BAD_CERTIFICATE",
        ):
            return text, "the certificates are not trusted by the other side (check ca_file)"
        if reason in ("NO_SHARED_CIPHER", "UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION"):
            return text, "no common TLS version or cipher suite (check min_version and profile)"
        return text, ""
    if isinstance(exc, ConnectionError | EOFError):
        return (
            "peer closed the connection during the TLS handshake",
            "it may not trust our certificate, or have no client certificate to send "
            "(peer_certificate: require)",
        )
    return f"{type(exc).__name__}: {exc}", ""


class TlsAcceptor(asyncio.Protocol):
    """How a connection to a TLS listener starts: the address check, then the handshake with
    the listener's *current* context (so certificates reloaded on SIGHUP serve the next
    connection), bounded by ``handshake_timeout`` (a slow or silent peer costs a timer, never
    another peer's time), then the DICOM ``Link`` takes over the TLS transport.

    ``admit(address)`` returns False to drop the connection before the handshake (it logs
    why); ``make_link(elapsed)`` returns the protocol for the association, told how much of
    the ARTIM budget the handshake used. A failed handshake is logged once, without a
    traceback, with a hint (a plain client on the TLS port, a missing client certificate…).

    The TLS layer is asyncio's own ``SSLProtocol`` (what ``create_server(ssl=...)`` and
    ``start_tls()`` use), installed on the accepted transport by hand: uvloop 0.23's
    ``start_tls()`` on the server side stalls until its handshake timeout when a client
    certificate fails verification, and ``create_server(ssl=...)`` neither lets the address
    be checked first nor reports failed handshakes.
    """

    def __init__(
        self,
        *,
        listener: str,
        get_context: Callable[[], ssl.SSLContext],
        admit: Callable[[str], bool],
        make_link: Callable[[float], asyncio.Protocol],
        handshake_timeout: float,
    ) -> None:
        self.listener = listener
        self._get_context = get_context
        self._admit = admit
        self._make_link = make_link
        self._timeout = handshake_timeout
        self._loop = asyncio.get_running_loop()
        self._peer = ("", 0)
        self._started = 0.0
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tls: sslproto.SSLProtocol | None = None
        self._handed_over = False

    # Until the first byte: this object is the transport's protocol.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._started = self._loop.time()
        self._transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self._peer = (str(peer[0]), int(peer[1]))
        if not self._admit(self._peer[0]):
            transport.abort()  # type: ignore[attr-defined]
            return
        self._timer = self._loop.call_later(self._timeout, self._silent)

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        if self._tls is not None:  # pragma: no cover - the TLS layer owns the transport
            return
        self._cancel_timer()
        if data[:1] != b"\x16":  # not a TLS handshake record
            what = "an A-ASSOCIATE-RQ" if data[:1] == b"\x01" else f"byte 0x{data[0]:02x}"
            self._failed(
                f"not TLS: the peer sent {what}",
                "a plain DICOM client on a TLS port (use TLS, or the plain listener)",
            )
            self._transport.abort()
            return
        remaining = max(self._timeout - (self._loop.time() - self._started), 0.001)
        waiter: asyncio.Future[None] = self._loop.create_future()
        tls = sslproto.SSLProtocol(
            self._loop,
            _Handover(self),
            self._get_context(),
            waiter,
            server_side=True,
            ssl_handshake_timeout=remaining,
        )
        self._tls = tls
        waiter.add_done_callback(self._handshake_done)
        self._transport.set_protocol(tls)
        tls.connection_made(self._transport)
        view = memoryview(data)
        while view:
            buffer = tls.get_buffer(len(view))
            n = min(len(buffer), len(view))
            buffer[:n] = view[:n]
            tls.buffer_updated(n)
            view = view[n:]

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._tls is None and self._timer is not None:
            # Connected and went away without a byte (a port probe): not worth a warning.
            self._cancel_timer()
            log.info(
                "connection_closed",
                peer=f"{self._peer[0]}:{self._peer[1]}",
                listener=self.listener,
                reason="closed before the TLS handshake",
            )

    def _silent(self) -> None:
        self._timer = None
        self._failed(
            f"no TLS handshake within {self._timeout:g} s",
            "a slow or silent peer; dropped so it holds nothing up",
        )
        if self._transport is not None:
            self._transport.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # After the first byte: asyncio's TLS layer owns the transport.

    def _hand_over(self, tls_transport: asyncio.BaseTransport) -> None:
        self._handed_over = True
        link = self._make_link(self._loop.time() - self._started)
        tls_transport.set_protocol(link)
        link.connection_made(tls_transport)

    def _handshake_done(self, waiter: asyncio.Future[None]) -> None:
        if waiter.cancelled():
            return
        exc = waiter.exception()
        if exc is None and self._handed_over:
            return
        reason, hint = describe_handshake_failure(
            exc or ConnectionResetError("closed during the handshake"), self._timeout
        )
        self._failed(reason, hint)

    def _failed(self, reason: str, hint: str) -> None:
        log.warning(
            "tls_handshake_failed",
            peer=f"{self._peer[0]}:{self._peer[1]}",
            address=self._peer[0],
            listener=self.listener,
            reason=reason,
            hint=hint or None,
        )


class _Handover(asyncio.Protocol):
    """The TLS layer's application protocol until the handshake is done."""

    def __init__(self, acceptor: TlsAcceptor) -> None:
        self.acceptor = acceptor

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.acceptor._hand_over(transport)
