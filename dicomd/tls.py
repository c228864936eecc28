"""TLS contexts for listeners and peers (DICOM TLS, PS3.15 B.1 / BCP 195)."""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dicomd.config import ListenerTLS, PeerTLS

_MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}

# BCP 195 (RFC 9325) recommended TLS 1.2 suites: AEAD with forward secrecy only.
_BCP195_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384"
)


def server_context(tls: ListenerTLS) -> ssl.SSLContext:
    """A server SSLContext for a listener; raises OSError/ssl.SSLError on unreadable files."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _MIN_VERSIONS[tls.min_version]
    if tls.profile in ("bcp195", "bcp195-ex"):
        ctx.set_ciphers(_BCP195_CIPHERS)
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
    if tls.profile in ("bcp195", "bcp195-ex"):
        ctx.set_ciphers(_BCP195_CIPHERS)
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
