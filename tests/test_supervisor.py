"""The daemon's lifecycle, with dicomd as a real subprocess: sd_notify, reload, drain,
socket activation, privilege drop, embedded defaults."""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from acse_reference import reference_encode_rq
from conftest import Dicomd, base_config, free_port, recv_pdu, require_root, wait_for_port

from dicomd.net.negotiation import ProposedContext


class NotifySocket:
    """A real AF_UNIX datagram socket standing in for systemd's notify socket."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        bind_path = "\0" + path[1:] if path.startswith("@") else path
        self.sock.bind(bind_path)
        self.path = path
        self.messages: list[str] = []

    def collect(self, until: str, timeout: float = 15.0) -> list[str]:
        """Read datagrams until one contains ``until``; returns everything read so far."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(until in m for m in self.messages):
                return self.messages
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                break
        raise AssertionError(f"no {until!r} among {self.messages}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NotifySocket]:
    if request.param == "path":
        ns = NotifySocket(str(tmp_path / "notify.sock"))
    else:
        ns = NotifySocket(f"@dicomd-test-{uuid.uuid4().hex}")
    yield ns
    ns.close()


def test_notify_ready_watchdog_reload_stopping(
    dicomd: Dicomd, tmp_path: Path, notify_socket: NotifySocket
) -> None:
    env = {"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "400000"}
    dicomd.start(env=env)
    messages = notify_socket.collect("READY=1")
    ready = next(m for m in messages if "READY=1" in m)
    assert "STATUS=serving DICOMD on port" in ready
    # Watchdog pings at half of WATCHDOG_USEC: about 5 per second.
    notify_socket.messages.clear()
    time.sleep(1.2)
    notify_socket.sock.settimeout(0.2)
    try:
        while True:
            notify_socket.messages.append(notify_socket.sock.recv(4096).decode())
    except TimeoutError:
        pass
    pings = [m for m in notify_socket.messages if m == "WATCHDOG=1"]
    assert 3 <= len(pings) <= 14, notify_socket.messages  # ~7 expected; tolerant

    # SIGHUP with a good config: RELOADING=1 + MONOTONIC_USEC in one datagram, then READY=1.
    notify_socket.messages.clear()
    dicomd.signal(signal.SIGHUP)
    notify_socket.collect("READY=1")
    reloading = next(m for m in notify_socket.messages if "RELOADING=1" in m)
    usec = int(reloading.split("MONOTONIC_USEC=")[1].split("\n")[0])
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert 0 <= now - usec < 30_000_000
    dicomd.wait_for_log("reloaded")

    notify_socket.messages.clear()
    dicomd.signal(signal.SIGTERM)
    notify_socket.collect("STOPPING=1")
    assert dicomd.proc is not None
    assert dicomd.proc.wait(15) == 0


def test_reload_with_broken_config_keeps_the_old_one(dicomd: Dicomd, tmp_path: Path) -> None:
    dicomd.start()
    config_path = dicomd.config_path
    good = config_path.read_text()
    config_path.write_text(good.replace("ae_title: DICOMD", "ae_title: FAR_TOO_LONG_AE_TITLE_X"))
    dicomd.signal(signal.SIGHUP)
    entry = dicomd.wait_for_log("reload_config_error")
    assert "is longer than 16 characters" in entry["finding"]
    assert f"{config_path}:" in entry["finding"]
    dicomd.wait_for_log("reload_failed")
    # Still serving with the old AE title.
    r = subprocess.run(
        [sys.executable, "-m", "dicomd", "echo", "127.0.0.1", str(dicomd.port), "--aec", "DICOMD"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr


def test_reload_swaps_config_for_new_associations(dicomd: Dicomd, tmp_path: Path) -> None:
    dicomd.start()
    text = dicomd.config_path.read_text().replace("ae_title: DICOMD", "ae_title: RENAMED")
    dicomd.config_path.write_text(text)
    dicomd.signal(signal.SIGHUP)
    dicomd.wait_for_log("reloaded")

    def echo(aec: str) -> int:
        return subprocess.run(
            [sys.executable, "-m", "dicomd", "echo", "127.0.0.1", str(dicomd.port), "--aec", aec],
            capture_output=True,
            text=True,
            timeout=30,
        ).returncode

    assert echo("RENAMED") == 0
    assert echo("DICOMD") == 1


def _associate_raw(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    rq = reference_encode_rq(
        calling_ae="HOLDER",
        called_ae="DICOMD",
        contexts=[ProposedContext(1, "1.2.840.10008.1.1", ("1.2.840.10008.1.2",))],
        max_pdu_length=16384,
    )
    sock.sendall(rq)
    assert recv_pdu(sock)[0] == 0x02
    return sock


def test_sigterm_drains_then_aborts_open_associations(dicomd: Dicomd, tmp_path: Path) -> None:
    port = free_port()
    config = base_config(tmp_path, port, shutdown_timeout=1.5)
    dicomd.start(config)
    sock = _associate_raw(port)
    try:
        t0 = time.monotonic()
        dicomd.signal(signal.SIGTERM)
        dicomd.wait_for_log("stopping", open_associations=1)
        # New connections are refused while draining.
        time.sleep(0.3)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        assert dicomd.proc is not None
        assert dicomd.proc.wait(15) == 0
        elapsed = time.monotonic() - t0
        assert elapsed >= 1.4  # it waited for the open association ...
        sock.settimeout(5)
        assert recv_pdu(sock)[0] == 0x07  # ... then aborted it
    finally:
        sock.close()
    dicomd.wait_for_log("aborting_associations", count=1)


def test_sigterm_waits_for_release(dicomd: Dicomd, tmp_path: Path) -> None:
    port = free_port()
    dicomd.start(base_config(tmp_path, port, shutdown_timeout=20))
    sock = _associate_raw(port)
    dicomd.signal(signal.SIGTERM)
    dicomd.wait_for_log("stopping")
    time.sleep(0.5)
    assert dicomd.proc is not None and dicomd.proc.poll() is None  # still draining
    sock.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # A-RELEASE-RQ
    assert recv_pdu(sock)[0] == 0x06  # A-RELEASE-RP
    sock.close()
    assert dicomd.proc.wait(15) == 0
    events = [e["event"] for e in dicomd.log_events()]
    assert "aborting_associations" not in events


def test_socket_activation_with_inherited_fd3(dicomd: Dicomd, tmp_path: Path) -> None:
    port = free_port()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(16)
    # The config names another port: the inherited socket must win over binding.
    config = base_config(tmp_path, free_port())
    config["listeners"][0]["name"] = "dicom"
    dicomd.write_config(config)
    fd = listener.fileno()

    def to_fd3() -> None:
        os.dup2(fd, 3)
        os.set_inheritable(3, True)

    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    env.update({"LISTEN_FDS": "1", "LISTEN_FDNAMES": "dicom"})
    # LISTEN_PID must be the daemon's own pid: set it in a shell that then execs python.
    cmd = f'LISTEN_PID=$$ exec "{sys.executable}" -m dicomd run --config "{dicomd.config_path}"'
    log = open(dicomd.log_path, "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        ["/bin/sh", "-c", cmd],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=to_fd3,
        pass_fds=(3,),
        cwd=tmp_path,
    )
    listener.close()  # only the child holds it now
    try:
        dicomd.wait_for_log(
            "listening", socket_activation=True, port=config["listeners"][0]["port"]
        )
        r = subprocess.run(
            [sys.executable, "-m", "dicomd", "echo", "127.0.0.1", str(port), "--aec", "DICOMD"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 0, r.stdout + r.stderr + dicomd.log_text()
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()
    assert proc.returncode == 0


def _status_fields(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def test_privilege_drop_when_started_as_root(dicomd: Dicomd, tmp_path: Path) -> None:
    require_root()
    user = f"dcmdt{uuid.uuid4().hex[:8]}"
    subprocess.run(
        [
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            user,
        ],
        check=True,
    )
    try:
        entry = pwd.getpwnam(user)
        port = free_port()
        config = base_config(tmp_path, port, run_as={"user": user, "group": user})
        os.chmod(tmp_path, 0o755)
        dicomd.start(config)
        assert dicomd.proc is not None
        dicomd.wait_for_log("privileges_dropped", user=user)
        status = _status_fields(dicomd.proc.pid)
        assert status["Uid"].split() == [str(entry.pw_uid)] * 4
        assert status["Gid"].split() == [str(entry.pw_gid)] * 4
        assert status["CapEff"] == "0000000000000000"
        assert status["NoNewPrivs"] == "1"
        r = subprocess.run(
            [sys.executable, "-m", "dicomd", "echo", "127.0.0.1", str(port), "--aec", "DICOMD"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert dicomd.stop() == 0
    finally:
        subprocess.run(["userdel", user], check=False)


def test_refuses_root_without_run_as_user(dicomd: Dicomd, tmp_path: Path) -> None:
    require_root()
    port = free_port()
    config = base_config(tmp_path, port, run_as={"user": "no-such-user-dicomd", "group": None})
    dicomd.start(config, wait=False)
    assert dicomd.proc is not None
    assert dicomd.proc.wait(15) == 1
    assert "cannot drop privileges" in dicomd.log_text()
    assert "no-such-user-dicomd" in dicomd.log_text()


def test_embedded_defaults_first_log_line(tmp_path: Path) -> None:
    """With no config file, dicomd runs on defaults and says so in its first line."""
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    # The defaults listen on 11112; skip the run part if that port is taken here.
    probe = socket.socket()
    try:
        probe.bind(("0.0.0.0", 11112))
    except OSError:
        probe.close()
        pytest.skip("port 11112 is in use on this machine")
    probe.close()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dicomd", "run"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        first = proc.stdout.readline().decode()  # type: ignore[union-attr]
        assert "running_on_defaults" in first, first
        assert str(tmp_path / "var") in first
        wait_for_port(11112, proc=proc)
        r = subprocess.run(
            [sys.executable, "-m", "dicomd", "echo", "127.0.0.1", "11112", "--aec", "DICOMD"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "var" / "archive").is_dir()
    finally:
        proc.terminate()
        proc.wait(15)


def test_bad_config_exits_1_with_location(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("listeners:\n  - name: dicom\n    port: 70000\nlocal_aes: []\n")
    r = subprocess.run(
        [sys.executable, "-m", "dicomd", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 1
    assert f"{path}:3:11: listeners[0].port:" in r.stderr


def test_check_config_cli(tmp_path: Path) -> None:
    good = Path(__file__).resolve().parent.parent / "etc" / "dicomd" / "dicomd.yaml"
    r = subprocess.run(
        [sys.executable, "-m", "dicomd", "check-config", "--config", str(good)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("listners: []\n")
    r = subprocess.run(
        [sys.executable, "-m", "dicomd", "check-config", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 1
    assert f"{bad}:1:1: unknown key 'listners' (did you mean 'listeners'?" in r.stderr
