"""sd_notify(3) in pure Python: readiness, status, reload, stop and watchdog messages.

The protocol is one AF_UNIX datagram of ``KEY=value`` lines to ``$NOTIFY_SOCKET``; a leading
``@`` in the address means the Linux abstract namespace. Without ``$NOTIFY_SOCKET`` (not
started by systemd, or ``Type=simple``) every call is a no-op, so callers never check.

Debian 12 ships systemd 252, which lacks ``Type=notify-reload``; the unit uses
``Type=notify`` with ``ExecReload=kill -HUP``, and the daemon still reports
``RELOADING=1`` + ``MONOTONIC_USEC=`` then ``READY=1`` so ``systemctl reload`` waits for the
reload to finish on newer systemd and the status line is right on every version.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Mapping

from dicomd.logging import get_logger

__all__ = ["Notifier", "watchdog_interval", "watchdog_loop"]

_log = get_logger("dicomd.system.sd_notify")


class Notifier:
    """One datagram socket to the service manager, reused for every message.

    Failures (systemd gone, socket full) are logged once per run of failures and never
    raised: a lost status update must not stop the daemon serving images.
    """

    def __init__(self, address: str | None) -> None:
        self.address: str | None = None
        self._sock: socket.socket | None = None
        self._failing = False
        if not address:
            return
        if address.startswith("@"):
            address = "\0" + address[1:]
        elif not address.startswith("/"):
            # vsock:/… addresses (systemd ≥ 253, for VMs) are out of scope on Debian 12.
            _log.warning("sd_notify.unsupported_address", notify_socket=address)
            return
        self.address = address
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # Non-blocking: a wedged service manager must not wedge the event loop with it.
        sock.setblocking(False)
        self._sock = sock

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str] | None = None, *, unset: bool = False
    ) -> Notifier:
        """Build from ``$NOTIFY_SOCKET``; *unset* removes it so children do not inherit it."""
        env = os.environ if environ is None else environ
        notifier = cls(env.get("NOTIFY_SOCKET"))
        if unset and env is os.environ:
            os.environ.pop("NOTIFY_SOCKET", None)
        return notifier

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify_raw(self, message: str | bytes) -> bool:
        """Send *message* as one datagram; True if sent, False if disabled or failed."""
        if self._sock is None or self.address is None:
            return False
        data = message.encode("utf-8") if isinstance(message, str) else message
        try:
            self._sock.sendto(data, self.address)
        except OSError as exc:
            if not self._failing:
                self._failing = True
                _log.warning(
                    "sd_notify.send_failed",
                    notify_socket=self.address.replace("\0", "@", 1),
                    error=str(exc),
                )
            return False
        if self._failing:
            self._failing = False
            _log.info("sd_notify.send_recovered")
        return True

    def notify(self, **fields: object) -> bool:
        """Send ``KEY=value`` lines in argument order, in one datagram.

        Keys are upper-cased (``notify(ready=1)`` is ``READY=1``); newlines in values are
        flattened since the protocol is line-based.
        """
        lines = [
            f"{key.upper()}={str(value).replace(chr(10), ' ')}" for key, value in fields.items()
        ]
        return self.notify_raw("\n".join(lines))

    def ready(self, status: str | None = None) -> bool:
        if status is None:
            return self.notify(READY=1)
        return self.notify(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)

    def reloading(self, status: str | None = None) -> bool:
        """``RELOADING=1`` with the CLOCK_MONOTONIC timestamp in the same datagram.

        systemd ≥ 253 requires MONOTONIC_USEC with RELOADING=1 to match the reload to
        the request; sending both in one datagram avoids a race between them.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        if status is None:
            return self.notify(RELOADING=1, MONOTONIC_USEC=usec)
        return self.notify(RELOADING=1, MONOTONIC_USEC=usec, STATUS=status)

    def stopping(self, status: str | None = None) -> bool:
        if status is None:
            return self.notify(STOPPING=1)
        return self.notify(STOPPING=1, STATUS=status)

    def watchdog(self) -> bool:
        return self.notify_raw("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more start/stop time (e.g. a long index migration before READY=1)."""
        return self.notify(EXTEND_TIMEOUT_USEC=int(seconds * 1_000_000))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __repr__(self) -> str:
        shown = None if self.address is None else self.address.replace("\0", "@", 1)
        return f"Notifier(address={shown!r})"


def watchdog_interval(
    environ: Mapping[str, str] | None = None, pid: int | None = None
) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of ``$WATCHDOG_USEC``, or None if disabled.

    ``$WATCHDOG_PID``, when set, names the process the watchdog is for; a child that
    inherited the variable must not ping on its parent's behalf (sd_watchdog_enabled(3)).
    Half the period leaves a whole interval of slack for one late tick.
    """
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    watchdog_pid = env.get("WATCHDOG_PID")
    if watchdog_pid:
        try:
            if int(watchdog_pid) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return usec / 1_000_000 / 2


async def watchdog_loop(notifier: Notifier, interval: float) -> None:
    """Ping the watchdog every *interval* seconds until cancelled.

    The ping comes from the event loop itself on purpose: if the loop is blocked (a
    synchronous disk call, a deadlock), pings stop and systemd restarts the service.
    """
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)
