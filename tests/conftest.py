"""Shared test helpers: free ports, real peers, and dicomd started as a real subprocess."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

IN_CI = os.environ.get("CI") == "true"
ROOT = Path(__file__).resolve().parent.parent


def missing(what: str) -> None:
    """A test needs something absent: a failure in CI, a skip on a developer machine."""
    if IN_CI:
        pytest.fail(f"{what} is required in CI (CI=true) but missing")
    pytest.skip(f"{what} is not available")


def require_program(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing(f"program {name!r} (Debian package dcmtk?)")
    return path  # type: ignore[return-value]


def require_root() -> None:
    if os.geteuid() != 0:
        missing("root privileges")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(
    port: int, host: str = "127.0.0.1", timeout: float = 15.0, proc: subprocess.Popen | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"dicomd exited early with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5) as sock:
                # A connect to a free ephemeral port on loopback can succeed by connecting
                # to itself (TCP simultaneous open): that is not a listener.
                if sock.getsockname() != sock.getpeername():
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s")


def recv_pdu(sock: socket.socket, timeout: float = 10.0) -> tuple[int, bytes]:
    """Read one whole PDU from a raw socket: (PDU type, body after the 6-byte header)."""
    import struct

    sock.settimeout(timeout)
    header = b""
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        if not chunk:
            raise ConnectionError(f"closed after {header!r}")
        header += chunk
    kind, _, length = struct.unpack(">BBI", header)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            raise ConnectionError("closed mid-PDU")
        body += chunk
    return kind, body


def base_config(tmp_path: Path, port: int, **overrides: Any) -> dict[str, Any]:
    """A complete configuration for one test instance, everything under tmp_path."""
    config: dict[str, Any] = {
        "run_as": {"allow_root": True},
        "shutdown_timeout": 5,
        "logging": {"level": "info", "format": "json"},
        "listeners": [{"name": "dicom", "address": "127.0.0.1", "port": port}],
        "local_aes": [{"ae_title": "DICOMD", "services": {"verification": None}}],
        "archive": {
            "root": str(tmp_path / "archive"),
            "index_url": f"sqlite:///{tmp_path / 'index.sqlite'}",
        },
        "access": {"default": "allow"},
    }
    for key, value in overrides.items():
        config[key] = value
    return config


class Dicomd:
    """A dicomd subprocess; stopped (SIGTERM, then SIGKILL) by the fixture."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.config_path = tmp_path / "dicomd.yaml"
        self.log_path = tmp_path / "dicomd.log"

    def write_config(self, config: dict[str, Any]) -> Path:
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        return self.config_path

    def start(
        self,
        config: dict[str, Any] | None = None,
        *,
        env: dict[str, str] | None = None,
        wait: bool = True,
        args: list[str] | None = None,
        **popen: Any,
    ) -> Dicomd:
        if config is None:
            self.port = free_port()
            config = base_config(self.tmp_path, self.port)
        else:
            self.port = int(config["listeners"][0]["port"])
        self.write_config(config)
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
        full_env.pop("JOURNAL_STREAM", None)
        full_env.update(env or {})
        cmd = [sys.executable, "-m", "dicomd", "run", "--config", str(self.config_path)]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd + (args or []),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=self.tmp_path,
            **popen,
        )
        if wait:
            wait_for_port(self.port, proc=self.proc)
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_events(self) -> list[dict[str, Any]]:
        import json

        events = []
        for line in self.log_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events

    def wait_for_log(self, event: str, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for entry in self.log_events():
                if entry.get("event") == event and all(
                    entry.get(k) == v for k, v in fields.items()
                ):
                    return entry
            time.sleep(0.05)
        raise AssertionError(f"no log event {event!r} {fields} in:\n{self.log_text()}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return int(self.proc.returncode)


@pytest.fixture
def dicomd(tmp_path: Path) -> Iterator[Dicomd]:
    instance = Dicomd(tmp_path)
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture
def dcmtk_env() -> dict[str, str]:
    """Environment for DCMTK clients: TCP_NODELAY=1, else every message waits ~40 ms."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env
