"""Native journald protocol sender, pure Python (no libsystemd, no python3-systemd).

The protocol (systemd.journal-fields(7), "Native Journal Protocol" in systemd's docs):
one AF_UNIX datagram per entry to ``/run/systemd/journal/socket``; each field is either
``KEY=value\\n`` or, when the value holds a newline (or is binary),
``KEY\\n`` + 64-bit little-endian length + value + ``\\n``. An entry too large for one
datagram is written to a sealed memfd whose descriptor is passed with SCM_RIGHTS.

Logging must never take the daemon down, so :meth:`JournalSender.send` never raises: it
returns False and the caller (dicomd.logging) falls back to stderr lines.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import re
import socket
import struct
from collections.abc import Iterable, Mapping

__all__ = [
    "DEFAULT_JOURNAL_SOCKET",
    "JournalSender",
    "journal_stream_matches",
    "sanitize_field_name",
    "serialize_entry",
]

DEFAULT_JOURNAL_SOCKET = "/run/systemd/journal/socket"

# journald rejects field names longer than this (journal_field_valid() in systemd).
_MAX_FIELD_NAME = 64
_INVALID_NAME_CHARS = re.compile(r"[^A-Z0-9_]")


def journal_stream_matches(environ: Mapping[str, str] = os.environ, fd: int = 2) -> bool:
    """True if *fd* is the stream systemd connected to the journal for this service.

    systemd sets ``$JOURNAL_STREAM=<st_dev>:<st_ino>`` for the stdout/stderr socket it
    hands to a service. Comparing with fstat(fd) tells a real journal connection apart
    from a variable merely inherited by a child whose stderr was redirected elsewhere
    (sd_journal_stream_fd(3), "JOURNAL_STREAM" in systemd.exec(5)).
    """
    value = environ.get("JOURNAL_STREAM")
    if not value:
        return False
    dev_text, sep, ino_text = value.partition(":")
    if not sep:
        return False
    try:
        dev, ino = int(dev_text), int(ino_text)
        st = os.fstat(fd)
    except (ValueError, OSError):
        return False
    return st.st_dev == dev and st.st_ino == ino


def sanitize_field_name(name: str) -> str:
    """Map any key to a valid journal field name, or "" if nothing usable is left.

    Valid names are ``[A-Z0-9_]``, do not start with ``_`` (reserved for trusted fields
    journald adds itself) nor with a digit, and are at most 64 characters.
    """
    cleaned = _INVALID_NAME_CHARS.sub("_", name.upper()).lstrip("_")
    if cleaned[:1].isdigit():
        cleaned = "F" + cleaned
    return cleaned[:_MAX_FIELD_NAME]


def _as_bytes(value: object) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return str(value).encode("utf-8", "backslashreplace")


def serialize_entry(fields: Mapping[str, object] | Iterable[tuple[str, object]]) -> bytes:
    """Serialize one entry in the native protocol; fields with no valid name are dropped.

    Accepts a mapping or (name, value) pairs, since the journal allows a field to repeat.
    """
    items = fields.items() if isinstance(fields, Mapping) else fields
    parts: list[bytes] = []
    for raw_name, value in items:
        name = sanitize_field_name(raw_name)
        if not name:
            continue
        key = name.encode("ascii")
        data = _as_bytes(value)
        if b"\n" in data:
            # Binary form: the simple form cannot carry a newline inside the value.
            parts.append(key + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(key + b"=" + data + b"\n")
    return b"".join(parts)


class JournalSender:
    """Sends entries to journald over its native socket; one datagram per entry.

    The socket is opened lazily (constructing a sender costs nothing and works where no
    journal exists) and is non-blocking: when journald is not reading fast enough we would
    rather have the caller write the line to stderr than stall the event loop.
    """

    def __init__(self, path: str = DEFAULT_JOURNAL_SOCKET) -> None:
        self.path = path
        self._sock: socket.socket | None = None

    def _socket(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)
            self._sock = sock
        return self._sock

    def send(self, fields: Mapping[str, object] | Iterable[tuple[str, object]]) -> bool:
        """Send one entry; True if journald accepted it. Never raises."""
        try:
            payload = serialize_entry(fields)
            if not payload:
                return False
            sock = self._socket()
            try:
                sock.sendto(payload, self.path)
            except OSError as exc:
                if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                    raise
                self._send_via_memfd(sock, payload)
            return True
        except Exception:
            # Peer gone, socket missing, buffer full, memfd refused...: the caller has a
            # fallback, and logging must not be the reason the daemon fails.
            return False

    def _send_via_memfd(self, sock: socket.socket, payload: bytes) -> None:
        """Pass an entry too large for a datagram as a sealed memfd (as sd_journal_send)."""
        fd = os.memfd_create("journal-data", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(payload)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            # journald only trusts the content of a memfd nobody can change any more.
            fcntl.fcntl(
                fd,
                fcntl.F_ADD_SEALS,
                fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL,
            )
            # sendmsg, not socket.send_fds: the latter ignores its address argument.
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
            sock.sendmsg([], ancillary, 0, self.path)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __repr__(self) -> str:
        return f"JournalSender(path={self.path!r})"
