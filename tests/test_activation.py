"""Socket activation: real descriptors passed at fd 3+ to a child, as systemd does."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Sequence

import pytest

from dicomd.system.activation import ActivationError, inherited_sockets

# LISTEN_PID must be the pid of the process that reads it; "$$" of a shell that then
# execs Python is exactly that, as when systemd sets it between fork and exec.
_WRAPPER = 'LISTEN_PID=$$ exec "$0" -c "$1"'


def run_activated(
    script: str,
    fds: Sequence[int],
    *,
    names: str | None = None,
    listen_fds: int | None = None,
    timeout: float = 20,
) -> subprocess.Popen[str]:
    """Start *script* with *fds* at 3, 4, ... and the LISTEN_* variables set."""
    # Move the sources out of the 3..N range first, so one dup2 cannot clobber the next.
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in fds]
    targets = tuple(range(3, 3 + len(fds)))

    def place_fds() -> None:
        for source, target in zip(high, targets, strict=True):
            os.dup2(source, target)  # dup2 clears FD_CLOEXEC on the target

    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    env["LISTEN_FDS"] = str(len(fds) if listen_fds is None else listen_fds)
    if names is not None:
        env["LISTEN_FDNAMES"] = names
    try:
        return subprocess.Popen(
            ["sh", "-c", _WRAPPER, sys.executable, textwrap.dedent(script)],
            env=env,
            # Without pass_fds, close_fds (run after preexec_fn) would close fd 3 again.
            pass_fds=targets,
            preexec_fn=place_fds,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        for fd in high:
            os.close(fd)


def listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return sock


def test_child_serves_the_inherited_socket() -> None:
    parent = listening_socket()
    port = parent.getsockname()[1]
    child = run_activated(
        """
        import fcntl, json, os
        from dicomd.system.activation import inherited_sockets

        socks = inherited_sockets()
        (sock,) = socks["dicom"]
        print(json.dumps({
            "names": sorted(socks),
            "fd": sock.fileno(),
            "family": sock.family.name,
            "cloexec": bool(fcntl.fcntl(sock.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC),
            "env_left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
        }), flush=True)
        conn, _ = sock.accept()
        data = conn.recv(100)
        conn.sendall(b"pid %d got " % os.getpid() + data)
        conn.close()
        """,
        [parent.fileno()],
        names="dicom",
    )
    # Only the child holds the listener now: an answer proves it accepted the connection.
    parent.close()
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line, child.stderr.read() if child.stderr else ""
        info = json.loads(line)
        assert info == {
            "names": ["dicom"],
            "fd": 3,
            "family": "AF_INET",
            "cloexec": True,
            "env_left": [],
        }
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"hello")
            reply = client.recv(100)
        assert reply == b"pid %d got hello" % child.pid
        assert child.wait(timeout=20) == 0
    finally:
        child.kill()
        child.communicate()  # reaps it and closes the pipes


def test_child_serves_it_with_asyncio_create_server() -> None:
    """The intended use: loop.create_server(..., sock=s) on uvloop."""
    parent = listening_socket()
    port = parent.getsockname()[1]
    child = run_activated(
        """
        import asyncio, uvloop
        from dicomd.system.activation import inherited_sockets

        class Echo(asyncio.Protocol):
            def connection_made(self, transport):
                self.transport = transport
            def data_received(self, data):
                self.transport.write(b"echo " + data)
                self.transport.close()
                done.set()

        async def main():
            global done
            done = asyncio.Event()
            (sock,) = inherited_sockets()["dicom"]
            server = await asyncio.get_running_loop().create_server(Echo, sock=sock)
            print("ready", flush=True)
            await done.wait()
            server.close()

        uvloop.run(main())
        """,
        [parent.fileno()],
        names="dicom",
    )
    parent.close()
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"ping")
            assert client.recv(100) == b"echo ping"
        assert child.wait(timeout=20) == 0
    finally:
        child.kill()
        child.communicate()  # reaps it and closes the pipes


def test_several_sockets_grouped_by_name() -> None:
    socks = [listening_socket() for _ in range(3)]
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(f"\0dicomd-test-activation-{os.getpid()}")
    unix.listen(1)
    child = run_activated(
        """
        import json
        from dicomd.system.activation import inherited_sockets
        socks = inherited_sockets()
        print(json.dumps({
            name: [[s.fileno(), s.family.name] for s in group] for name, group in socks.items()
        }))
        """,
        [s.fileno() for s in [*socks, unix]],
        names="dicom:dicom-tls:dicom:",
    )
    out, err = child.communicate(timeout=20)
    for s in [*socks, unix]:
        s.close()
    assert child.returncode == 0, err
    assert json.loads(out) == {
        "dicom": [[3, "AF_INET"], [5, "AF_INET"]],
        "dicom-tls": [[4, "AF_INET"]],
        "unknown": [[6, "AF_UNIX"]],
    }


def test_missing_fdnames_are_unknown() -> None:
    parent = listening_socket()
    child = run_activated(
        """
        from dicomd.system.activation import inherited_sockets
        print(sorted((k, len(v)) for k, v in inherited_sockets().items()))
        """,
        [parent.fileno()],
    )
    out, err = child.communicate(timeout=20)
    parent.close()
    assert child.returncode == 0, err
    assert out.strip() == "[('unknown', 1)]"


_EXPECT_ERROR = """
    import os
    from dicomd.system.activation import ActivationError, inherited_sockets
    try:
        inherited_sockets()
    except ActivationError as exc:
        print("ActivationError:", exc)
        # The descriptor is left open for the caller: not closed behind its back.
        os.fstat(3)
    else:
        print("no error")
"""


def _expect_activation_error(fds: Sequence[int], **kw: object) -> str:
    child = run_activated(_EXPECT_ERROR, fds, **kw)  # type: ignore[arg-type]
    out, err = child.communicate(timeout=20)
    assert child.returncode == 0, err
    assert out.startswith("ActivationError: "), out
    return out


def test_non_listening_socket_is_refused() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    out = _expect_activation_error([sock.fileno()], names="dicom")
    sock.close()
    assert "fd 3" in out and "'dicom'" in out and "not listening" in out


def test_datagram_socket_is_refused() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    out = _expect_activation_error([sock.fileno()], names="dicom")
    sock.close()
    assert "SOCK_DGRAM" in out and "stream" in out


def test_non_socket_is_refused() -> None:
    read_end, write_end = os.pipe()
    out = _expect_activation_error([read_end], names="dicom")
    os.close(read_end)
    os.close(write_end)
    assert "not a socket" in out


def test_more_fds_announced_than_passed() -> None:
    parent = listening_socket()
    out = _expect_activation_error([parent.fileno()], listen_fds=2, names="a:b")
    parent.close()
    assert "fd 4" in out and "not open" in out


# ------------------------------------------------------------------ environment checks


def test_wrong_pid_is_ignored_and_variables_unset() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "dicom"}
    assert inherited_sockets(env) == {}
    assert env == {}


def test_wrong_pid_kept_when_unset_is_false() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}
    assert inherited_sockets(env, unset=False) == {}
    assert env == {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}


def test_nothing_passed() -> None:
    assert inherited_sockets({}) == {}
    assert inherited_sockets({"LISTEN_FDS": "1"}) == {}  # no LISTEN_PID: not for us
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}
    assert inherited_sockets(env) == {}


def test_names_count_mismatch() -> None:
    env = {"LISTEN_PID": "4242", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "dicom:dicom-tls"}
    with pytest.raises(ActivationError, match=r"names 2 socket\(s\) but \$LISTEN_FDS=1"):
        inherited_sockets(env, pid=4242)
    assert env == {}  # unset even on error, like sd_listen_fds


@pytest.mark.parametrize(
    ("key", "value"), [("LISTEN_FDS", "two"), ("LISTEN_FDS", "-1"), ("LISTEN_PID", "x")]
)
def test_malformed_variables(key: str, value: str) -> None:
    env = {"LISTEN_PID": "4242", "LISTEN_FDS": "1", key: value}
    with pytest.raises(ActivationError, match=key):
        inherited_sockets(env, pid=4242)


def test_unsets_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", "1")  # pid 1 is never us
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "dicom")
    assert inherited_sockets() == {}
    assert not [k for k in os.environ if k.startswith("LISTEN_")]
