"""sd_notify against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicomd.system.sd_notify import Notifier, watchdog_interval, watchdog_loop

# sun_path holds 108 bytes; pytest's tmp_path can be longer than that for long test names.
_SUN_PATH_MAX = 107


class FakeManager:
    """The service manager's end: a bound datagram socket we read messages from."""

    def __init__(self, address: str) -> None:
        self.address = address  # as it appears in $NOTIFY_SOCKET
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        bind_to = "\0" + address[1:] if address.startswith("@") else address
        self.sock.bind(bind_to)
        self.sock.settimeout(2)

    def receive(self) -> str:
        return self.sock.recv(4096).decode()

    def drain(self) -> list[str]:
        messages = []
        self.sock.setblocking(False)
        try:
            while True:
                messages.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            pass
        finally:
            self.sock.settimeout(2)
        return messages

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def _short_dir(tmp_path: Path) -> Iterator[Path]:
    if len(str(tmp_path / "notify.sock")) <= _SUN_PATH_MAX:
        yield tmp_path
    else:
        with tempfile.TemporaryDirectory(prefix="dicomd-") as short:
            yield Path(short)


@pytest.fixture(params=["path", "abstract"])
def manager(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FakeManager]:
    if request.param == "path":
        with _short_dir(tmp_path) as directory:
            fake = FakeManager(str(directory / "notify.sock"))
            yield fake
            fake.close()
    else:
        fake = FakeManager(f"@dicomd-test-{secrets.token_hex(8)}")
        yield fake
        fake.close()


@pytest.fixture
def notifier(manager: FakeManager) -> Iterator[Notifier]:
    n = Notifier.from_environment({"NOTIFY_SOCKET": manager.address})
    assert n.enabled
    yield n
    n.close()


def test_ready_with_status(manager: FakeManager, notifier: Notifier) -> None:
    assert notifier.ready("serving 2 AEs")
    assert manager.receive() == "READY=1\nSTATUS=serving 2 AEs"
    assert notifier.ready()
    assert manager.receive() == "READY=1"


def test_status(manager: FakeManager, notifier: Notifier) -> None:
    notifier.status("3 associations")
    assert manager.receive() == "STATUS=3 associations"


def test_status_newline_is_flattened(manager: FakeManager, notifier: Notifier) -> None:
    notifier.status("line one\nline two")
    assert manager.receive() == "STATUS=line one line two"


def test_reloading_sends_monotonic_usec_in_the_same_datagram(
    manager: FakeManager, notifier: Notifier
) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = manager.receive().split("\n")
    assert lines[0] == "RELOADING=1"
    assert len(lines) == 2
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_stopping_and_watchdog(manager: FakeManager, notifier: Notifier) -> None:
    notifier.stopping()
    assert manager.receive() == "STOPPING=1"
    notifier.stopping("draining 4 associations")
    assert manager.receive() == "STOPPING=1\nSTATUS=draining 4 associations"
    notifier.watchdog()
    assert manager.receive() == "WATCHDOG=1"


def test_notify_raw_and_fields(manager: FakeManager, notifier: Notifier) -> None:
    notifier.notify_raw("READY=1\nSTATUS=raw")
    assert manager.receive() == "READY=1\nSTATUS=raw"
    notifier.notify(status="lower-case key", errno=5)
    assert manager.receive() == "STATUS=lower-case key\nERRNO=5"


def test_extend_timeout(manager: FakeManager, notifier: Notifier) -> None:
    notifier.extend_timeout(90)
    assert manager.receive() == "EXTEND_TIMEOUT_USEC=90000000"


def test_from_real_environment(monkeypatch: pytest.MonkeyPatch, manager: FakeManager) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", manager.address)
    n = Notifier.from_environment(unset=True)
    assert "NOTIFY_SOCKET" not in os.environ
    n.ready()
    assert manager.receive() == "READY=1"
    n.close()


def test_unset_notify_socket_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier.from_environment()
    assert not n.enabled
    assert n.ready("x") is False
    assert n.reloading() is False
    assert n.watchdog() is False
    n.close()


def test_unsupported_address_is_disabled() -> None:
    n = Notifier.from_environment({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not n.enabled
    assert n.ready() is False


def test_peer_gone_is_logged_once_and_never_raised(tmp_path: Path) -> None:
    from structlog.testing import capture_logs

    from dicomd.logging import reset_logging

    reset_logging()  # unfiltered, whatever an earlier test configured
    with _short_dir(tmp_path) as directory:
        fake = FakeManager(str(directory / "gone.sock"))
        n = Notifier(fake.address)
        fake.close()
        os.unlink(fake.address)
        with capture_logs() as logs:
            assert n.ready() is False
            assert n.watchdog() is False
            assert n.status("x") is False
        failures = [e for e in logs if e["event"] == "sd_notify.send_failed"]
        assert len(failures) == 1
        assert failures[0]["log_level"] == "warning"
        # The manager comes back: messages flow again and the recovery is noted.
        fake = FakeManager(fake.address)
        with capture_logs() as logs:
            assert n.ready() is True
        assert fake.receive() == "READY=1"
        assert [e["event"] for e in logs] == ["sd_notify.send_recovered"]
        fake.close()
        n.close()


# ----------------------------------------------------------------------------- watchdog


def test_watchdog_interval_is_half_the_period() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "200000"}) == pytest.approx(0.1)
    pid = os.getpid()
    env = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(pid)}
    assert watchdog_interval(env) == pytest.approx(15.0)


def test_watchdog_pid_mismatch_disables_it() -> None:
    env = {"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert watchdog_interval(env) is None
    assert watchdog_interval(env, pid=os.getpid() + 1) == pytest.approx(0.1)


@pytest.mark.parametrize("value", [None, "", "0", "-5", "abc"])
def test_watchdog_disabled_without_a_valid_period(value: str | None) -> None:
    env = {} if value is None else {"WATCHDOG_USEC": value}
    assert watchdog_interval(env) is None


def test_watchdog_interval_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == pytest.approx(0.5)
    monkeypatch.delenv("WATCHDOG_USEC")
    assert watchdog_interval() is None


async def test_watchdog_loop_cadence(manager: FakeManager, notifier: Notifier) -> None:
    interval = watchdog_interval({"WATCHDOG_USEC": "200000"})
    assert interval is not None
    task = asyncio.create_task(watchdog_loop(notifier, interval))
    await asyncio.sleep(0.5)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    pings = manager.drain()
    assert set(pings) == {"WATCHDOG=1"}
    # Tolerant bound (about 5 or 6 expected): this checks the cadence, not the timer precision.
    assert 3 <= len(pings) <= 8


async def test_stuck_loop_stops_the_pings(manager: FakeManager, notifier: Notifier) -> None:
    task = asyncio.create_task(watchdog_loop(notifier, 0.05))
    await asyncio.sleep(0.01)
    manager.drain()
    time.sleep(0.3)  # a blocking call on the loop: exactly what the watchdog must catch
    assert manager.drain() == []
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
