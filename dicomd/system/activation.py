"""systemd socket activation (sd_listen_fds(3)) in pure Python.

systemd passes listening sockets as file descriptors 3, 4, ... and describes them with
``LISTEN_FDS`` (how many), ``LISTEN_PID`` (which process they are for) and
``LISTEN_FDNAMES`` (colon-separated ``FileDescriptorName=`` values from the .socket unit).
The sockets are then served with ``loop.create_server(..., sock=s)``.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import MutableMapping

__all__ = ["SD_LISTEN_FDS_START", "ActivationError", "inherited_sockets"]

SD_LISTEN_FDS_START = 3
_ENV_KEYS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class ActivationError(RuntimeError):
    """The service manager passed sockets we cannot serve (or described them wrongly)."""


def _parse_int(environ: MutableMapping[str, str], key: str) -> int:
    value = environ[key]
    try:
        number = int(value)
    except ValueError:
        raise ActivationError(f"${key}={value!r} is not an integer") from None
    if number < 0:
        raise ActivationError(f"${key}={value!r} is negative")
    return number


def _wrap(fd: int, name: str) -> socket.socket:
    """Adopt *fd* as a socket object after checking it is a listening stream socket."""
    where = f"inherited fd {fd} (name {name!r})"
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError as exc:
        raise ActivationError(f"{where} is not open: {exc.strerror}") from None
    # Like sd_listen_fds: our children (e.g. helper programs) must not inherit listeners.
    fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ActivationError(f"{where} is not a socket: {exc.strerror}") from None
    try:
        if sock.type != socket.SOCK_STREAM:
            raise ActivationError(
                f"{where} is a {sock.type.name} socket; dicomd needs a stream socket "
                "(ListenStream= in the .socket unit)"
            )
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ActivationError(
                f"{where} is not listening (Accept=yes in the .socket unit passes a "
                "connection, dicomd needs Accept=no)"
            )
    except BaseException:
        # Leave the descriptor as we found it: it is the caller's to report or close.
        sock.detach()
        raise
    return sock


def inherited_sockets(
    environ: MutableMapping[str, str] = os.environ,
    pid: int | None = None,
    unset: bool = True,
) -> dict[str, list[socket.socket]]:
    """Sockets passed by systemd, grouped by ``FileDescriptorName=`` (in fd order).

    Returns {} when nothing was passed to *this* process: no ``LISTEN_FDS``, or
    ``LISTEN_PID`` naming another process (the variables leaked from a parent).
    Sockets without a name (no ``LISTEN_FDNAMES``, or an empty entry) are under
    ``"unknown"``, as sd_listen_fds_with_names(3) reports them.

    Raises ActivationError for malformed variables, a name count that differs from the fd
    count, or a descriptor that is not a listening stream socket.

    With *unset* (the default) the LISTEN_* variables are removed from *environ* whatever
    the outcome, so child processes do not believe the sockets are theirs.
    """
    try:
        if "LISTEN_PID" not in environ or "LISTEN_FDS" not in environ:
            return {}
        listen_pid = _parse_int(environ, "LISTEN_PID")
        if listen_pid != (os.getpid() if pid is None else pid):
            return {}
        count = _parse_int(environ, "LISTEN_FDS")
        names_value = environ.get("LISTEN_FDNAMES")
        if names_value is None:
            names = ["unknown"] * count
        else:
            names = [name or "unknown" for name in names_value.split(":")] if count else []
            if len(names) != count:
                raise ActivationError(
                    f"$LISTEN_FDNAMES={names_value!r} names {len(names)} socket(s) "
                    f"but $LISTEN_FDS={count}"
                )
        result: dict[str, list[socket.socket]] = {}
        try:
            for offset, name in enumerate(names):
                sock = _wrap(SD_LISTEN_FDS_START + offset, name)
                result.setdefault(name, []).append(sock)
        except BaseException:
            # Do not let garbage collection close the descriptors already adopted: on
            # error none of them is ours, the caller decides (usually: exit with the message).
            for socks in result.values():
                for sock in socks:
                    sock.detach()
            raise
        return result
    finally:
        if unset:
            for key in _ENV_KEYS:
                environ.pop(key, None)
