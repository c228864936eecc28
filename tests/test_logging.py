"""Logging: structlog pipeline, per-logger levels, JSON lines, and the native journal sink."""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import io
import ipaddress
import json
import logging as stdlib_logging
import os
import socket
import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from dicomd.logging import configure_logging, get_logger, reset_logging
from dicomd.system.journald import (
    JournalSender,
    journal_stream_matches,
    sanitize_field_name,
    serialize_entry,
)

_SUN_PATH_MAX = 107


@pytest.fixture(autouse=True)
def _clean_logging() -> Iterator[None]:
    reset_logging()
    yield
    reset_logging()


# ------------------------------------------------------------------ fake journald


def parse_entry(data: bytes) -> list[tuple[str, str]]:
    """Parse one native-protocol entry (both the simple and the binary field form)."""
    fields: list[tuple[str, str]] = []
    pos = 0
    while pos < len(data):
        newline = data.index(b"\n", pos)
        line = data[pos:newline]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields.append((key.decode(), value.decode()))
            pos = newline + 1
        else:
            (size,) = struct.unpack_from("<Q", data, newline + 1)
            start = newline + 1 + 8
            fields.append((line.decode(), data[start : start + size].decode()))
            assert data[start + size : start + size + 1] == b"\n"
            pos = start + size + 1
    return fields


class FakeJournal:
    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(2)

    def receive_raw(self) -> tuple[bytes, list[int]]:
        data, fds, _flags, _addr = socket.recv_fds(self.sock, 1 << 20, 4)
        return data, fds

    def receive(self) -> dict[str, str]:
        data, fds = self.receive_raw()
        assert not fds
        return dict(parse_entry(data))

    def pending(self) -> int:
        count = 0
        self.sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                self.sock.recv(1 << 20)
                count += 1
        self.sock.settimeout(2)
        return count


@pytest.fixture
def sender(journal: FakeJournal) -> Iterator[JournalSender]:
    journal_sender = JournalSender(journal.path)
    yield journal_sender
    journal_sender.close()


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[FakeJournal]:
    directory = tmp_path
    cleanup = None
    if len(str(tmp_path / "journal.sock")) > _SUN_PATH_MAX:
        cleanup = tempfile.TemporaryDirectory(prefix="dicomd-")
        directory = Path(cleanup.name)
    fake = FakeJournal(str(directory / "journal.sock"))
    yield fake
    fake.sock.close()
    if cleanup is not None:
        cleanup.cleanup()


# ------------------------------------------------------------------ journald.py


def test_field_name_sanitizing() -> None:
    assert sanitize_field_name("dicom_calling_ae") == "DICOM_CALLING_AE"
    assert sanitize_field_name("__private") == "PRIVATE"
    assert sanitize_field_name("peer.addr-v6") == "PEER_ADDR_V6"
    assert sanitize_field_name("2nd") == "F2ND"
    assert sanitize_field_name("___") == ""
    assert len(sanitize_field_name("x" * 100)) == 64


def test_serialize_simple_and_binary_forms() -> None:
    data = serialize_entry({"MESSAGE": "two\nlines", "priority": 6, "_bad": "x", "": "dropped"})
    assert data == (
        b"MESSAGE\n" + struct.pack("<Q", 9) + b"two\nlines\n" + b"PRIORITY=6\n" + b"BAD=x\n"
    )
    assert parse_entry(data) == [("MESSAGE", "two\nlines"), ("PRIORITY", "6"), ("BAD", "x")]


def test_sender_one_datagram_per_entry(journal: FakeJournal, sender: JournalSender) -> None:
    assert sender.send({"MESSAGE": "hello", "PRIORITY": 6, "DICOM_CALLING_AE": "MOD1"})
    assert sender.send([("MESSAGE", "multi\nline"), ("TAG", "a"), ("TAG", "b")])
    assert journal.receive() == {"MESSAGE": "hello", "PRIORITY": "6", "DICOM_CALLING_AE": "MOD1"}
    data, _ = journal.receive_raw()
    assert b"MESSAGE\n" in data  # binary form on the wire
    assert parse_entry(data) == [("MESSAGE", "multi\nline"), ("TAG", "a"), ("TAG", "b")]


def test_sender_large_entry_goes_through_a_sealed_memfd(
    journal: FakeJournal, sender: JournalSender
) -> None:
    big = "x" * (2 << 20)  # far beyond a datagram with the default SO_SNDBUF
    assert sender.send({"MESSAGE": big, "PRIORITY": 6})
    data, fds = journal.receive_raw()
    assert data == b""
    assert len(fds) == 1
    fd = fds[0]
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SHRINK
        size = os.fstat(fd).st_size
        content = os.pread(fd, size, 0)
    finally:
        os.close(fd)
    assert dict(parse_entry(content)) == {"MESSAGE": big, "PRIORITY": "6"}


def test_sender_never_raises(tmp_path: Path) -> None:
    sender = JournalSender(str(tmp_path / "missing.sock"))
    assert sender.send({"MESSAGE": "lost"}) is False
    assert sender.send({}) is False
    sender.close()


def test_journal_stream_matches(tmp_path: Path) -> None:
    with open(tmp_path / "stream", "w") as f:
        st = os.fstat(f.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert journal_stream_matches(env, fd=f.fileno())
        assert not journal_stream_matches(
            {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, f.fileno()
        )
        assert not journal_stream_matches({}, fd=f.fileno())
        assert not journal_stream_matches({"JOURNAL_STREAM": "garbage"}, fd=f.fileno())
        assert not journal_stream_matches(env, fd=9999)  # not open


# ------------------------------------------------------------------ structlog fields


def test_bound_fields_are_captured() -> None:
    log = get_logger("dicomd.net").bind(dicom_calling_ae="MOD1", dicom_assoc_id=7)
    with capture_logs() as logs:
        log.info("association.accepted", dicom_peer="10.0.0.5:40000", contexts=3)
        log.debug("pdu.received", length=12)
    assert logs == [
        {
            "event": "association.accepted",
            "log_level": "info",
            "logger": "dicomd.net",
            "dicom_calling_ae": "MOD1",
            "dicom_assoc_id": 7,
            "dicom_peer": "10.0.0.5:40000",
            "contexts": 3,
        },
        {
            "event": "pdu.received",
            "log_level": "debug",
            "logger": "dicomd.net",
            "dicom_calling_ae": "MOD1",
            "dicom_assoc_id": 7,
            "length": 12,
        },
    ]


def test_bind_unbind_and_positional_interpolation() -> None:
    log = get_logger("dicomd.x", a=1).bind(b=2).unbind("a").try_unbind("missing")
    assert log.context == {"logger": "dicomd.x", "b": 2}
    with capture_logs() as logs:
        log.warning("%d files", 3)
        log.log("error", "via log()")
    assert [(e["event"], e["log_level"]) for e in logs] == [
        ("3 files", "warning"),
        ("via log()", "error"),
    ]


def test_per_logger_level_override() -> None:
    configure_logging(
        "info",
        "json",
        {"dicomd.net": "debug", "dicomd.archive": "error"},
        stream=io.StringIO(),
    )
    net, pdu = get_logger("dicomd.net"), get_logger("dicomd.net.pdu")
    archive, netx, other = (
        get_logger("dicomd.archive"),
        get_logger("dicomd.network"),
        get_logger("dicomd.qr"),
    )
    with capture_logs() as logs:
        net.debug("net.debug")
        pdu.debug("pdu.debug")  # child of an overridden prefix
        netx.debug("network.debug")  # "dicomd.network" is not under "dicomd.net"
        archive.warning("archive.warning")
        archive.error("archive.error")
        other.debug("qr.debug")
        other.info("qr.info")
    assert [e["event"] for e in logs] == ["net.debug", "pdu.debug", "archive.error", "qr.info"]
    assert net.is_enabled_for("debug") and not other.is_enabled_for("debug")


def test_longest_prefix_wins() -> None:
    configure_logging(
        "warning", "json", {"dicomd": "info", "dicomd.net.pdu": "debug"}, stream=io.StringIO()
    )
    with capture_logs() as logs:
        get_logger("dicomd.net").debug("no")
        get_logger("dicomd.net").info("yes1")
        get_logger("dicomd.net.pdu").debug("yes2")
        get_logger("pynetdicom").info("no")
    assert [e["event"] for e in logs] == ["yes1", "yes2"]


def test_plain_structlog_loggers_are_filtered_by_name() -> None:
    out = io.StringIO()
    configure_logging("info", "json", {"dicomd.net": "debug"}, stream=out)
    structlog.get_logger().bind(logger="dicomd.archive").debug("dropped")
    structlog.get_logger().bind(logger="dicomd.net").debug("kept")
    assert [json.loads(line)["event"] for line in out.getvalue().splitlines()] == ["kept"]


def test_reconfiguration_reaches_existing_loggers() -> None:
    log = get_logger("dicomd.reload")  # created once, as at module level
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    log.debug("before")
    configure_logging("debug", "json", stream=out)  # SIGHUP with a new level
    log.debug("after")
    assert [json.loads(line)["event"] for line in out.getvalue().splitlines()] == ["after"]


def test_filtered_debug_is_cheap() -> None:
    configure_logging("info", "json", stream=io.StringIO())
    calls = 0

    def counter(logger: object, method: str, event_dict: dict) -> dict:
        nonlocal calls
        calls += 1
        return event_dict

    log = get_logger("dicomd.net").bind(dicom_assoc_id=1)
    with capture_logs(processors=[counter]) as logs:
        start = time.perf_counter()
        for _ in range(100_000):
            log.debug("pdu.received", length=16384)
        elapsed = time.perf_counter() - start
    assert logs == [] and calls == 0  # structlog never saw the event
    # A loose sanity bound (≈ 0.05 s expected): a regression would build event dicts.
    assert elapsed < 1.0


def test_bad_level_or_format_is_named() -> None:
    with pytest.raises(ValueError, match="'verbose'"):
        configure_logging("verbose", stream=io.StringIO())
    with pytest.raises(ValueError, match=r"'dicomd\.net'"):
        configure_logging("info", levels={"dicomd.net": "loud"}, stream=io.StringIO())
    with pytest.raises(ValueError, match="'xml'"):
        configure_logging("info", "xml", stream=io.StringIO())


# ------------------------------------------------------------------ JSON lines


def test_json_lines() -> None:
    out = io.StringIO()
    assert configure_logging("debug", "json", stream=out) == "json"
    log = get_logger("dicomd.storage").bind(dicom_calling_ae="MOD1")
    log.info("stored", sop_instance_uid="1.2.3", size=1024, peer=ipaddress.ip_address("::1"))
    log.warning("odd\nvalue", raw=b"\x00\x01")
    try:
        raise RuntimeError("disk full")
    except RuntimeError:
        log.exception("write.failed")
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    records = [json.loads(line) for line in lines]
    first = records[0]
    assert list(first)[:4] == ["timestamp", "level", "logger", "event"]
    assert first["level"] == "info" and first["logger"] == "dicomd.storage"
    assert first["event"] == "stored" and first["dicom_calling_ae"] == "MOD1"
    assert first["size"] == 1024 and first["peer"] == "::1"
    stamp = dt.datetime.fromisoformat(first["timestamp"].replace("Z", "+00:00"))
    assert stamp.utcoffset() == dt.timedelta(0)
    assert abs((dt.datetime.now(dt.UTC) - stamp).total_seconds()) < 60
    assert records[1]["event"] == "odd\nvalue"
    assert records[2]["level"] == "error"
    assert "RuntimeError: disk full" in records[2]["exception"]


def test_stdlib_logging_is_bridged() -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    stdlib_logging.getLogger("pynetdicom.acse").debug("filtered")
    stdlib_logging.getLogger("pynetdicom.acse").warning("from %s", "stdlib")
    stdlib_logging.getLogger("custom").log(25, "custom level")
    first, second = [json.loads(line) for line in out.getvalue().splitlines()]
    assert first["logger"] == "pynetdicom.acse"
    assert first["level"] == "warning" and first["event"] == "from stdlib"
    assert second["level"] == "info" and second["event"] == "custom level"


def test_console_format() -> None:
    out = io.StringIO()
    assert configure_logging("info", "console", stream=out) == "console"
    get_logger("dicomd.cli").info("hello", dicom_called_ae="ARCHIVE")
    text = out.getvalue()
    assert "hello" in text and "ARCHIVE" in text and "\x1b[" not in text  # no colour: not a tty


def test_auto_format(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, journal: FakeJournal, sender: JournalSender
) -> None:
    with open(tmp_path / "err", "w") as stream:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
        assert configure_logging(stream=stream) == "json"
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert configure_logging(stream=stream, journal=sender) == "journal"
        get_logger("dicomd").info("via journal")
        assert journal.receive()["MESSAGE"] == "via journal"
    primary, secondary = os.openpty()
    try:
        with open(secondary, "w", closefd=False) as tty:
            assert configure_logging(stream=tty) == "console"
    finally:
        os.close(primary)
        os.close(secondary)
    assert configure_logging(stream=io.StringIO()) == "json"  # no fileno at all


# ------------------------------------------------------------------ journal format


def test_journal_entries(journal: FakeJournal, sender: JournalSender) -> None:
    out = io.StringIO()
    configure_logging("debug", "journal", stream=out, journal=sender)
    log = get_logger("dicomd.net").bind(
        dicom_calling_ae="MOD1", dicom_called_ae="ARCHIVE", dicom_peer="10.0.0.5:40000"
    )
    log.info("association.accepted", dicom_assoc_id=42, contexts=3, reason="ok fine")
    entry = journal.receive()
    assert entry == {
        "MESSAGE": 'association.accepted contexts=3 reason="ok fine"',
        "PRIORITY": "6",
        "SYSLOG_IDENTIFIER": "dicomd",
        "LOGGER": "dicomd.net",
        "DICOM_CALLING_AE": "MOD1",
        "DICOM_CALLED_AE": "ARCHIVE",
        "DICOM_PEER": "10.0.0.5:40000",
        "DICOM_ASSOC_ID": "42",
        "DICOMD_CONTEXTS": "3",
        "DICOMD_REASON": "ok fine",
    }
    assert out.getvalue() == ""


@pytest.mark.parametrize(
    ("method", "priority"),
    [("debug", 7), ("info", 6), ("warning", 4), ("error", 3), ("critical", 2), ("exception", 3)],
)
def test_journal_priorities(
    journal: FakeJournal, sender: JournalSender, method: str, priority: int
) -> None:
    configure_logging("debug", "journal", journal=sender)
    getattr(get_logger("dicomd.test"), method)("event")
    assert journal.receive()["PRIORITY"] == str(priority)


def test_journal_levels_filter(journal: FakeJournal, sender: JournalSender) -> None:
    configure_logging("warning", "journal", {"dicomd.net": "debug"}, journal=sender)
    get_logger("dicomd.qr").info("dropped")
    get_logger("dicomd.net").debug("kept")
    assert journal.receive()["MESSAGE"] == "kept"
    assert journal.pending() == 0


def test_journal_traceback_uses_binary_form(journal: FakeJournal, sender: JournalSender) -> None:
    configure_logging("info", "journal", journal=sender)
    try:
        raise OSError(28, "No space left on device")
    except OSError:
        get_logger("dicomd.archive").exception("write.failed", path="/srv/x")
    data, _ = journal.receive_raw()
    assert b"MESSAGE\n" in data
    message = dict(parse_entry(data))["MESSAGE"]
    first, _, rest = message.partition("\n")
    assert first == "write.failed path=/srv/x"
    assert "Traceback" in rest and "No space left on device" in rest


def test_journal_unreachable_falls_back_to_prefixed_lines(tmp_path: Path) -> None:
    out = io.StringIO()
    sender = JournalSender(str(tmp_path / "no-journal.sock"))
    configure_logging("debug", "journal", stream=out, journal=sender)
    log = get_logger("dicomd.net").bind(dicom_calling_ae="MOD1")
    log.warning("peer.slow", seconds=3)
    log.error("two\nlines")
    assert out.getvalue().splitlines() == ["<4>peer.slow seconds=3", "<3>two", "<3>lines"]
    sender.close()


def test_association_lifecycle_lines_carry_the_dicom_fields() -> None:
    """An association's logger is built lazily (Association.log): the lines of a real
    association (ours as the requestor, over loopback) still carry every DICOM_* field
    known at the time, the AE titles from the A-ASSOCIATE-RQ on."""
    import asyncio

    from dicomd.acceptor import AcceptorAssociation, Counters, Generation
    from dicomd.association import associate
    from dicomd.config import parse_config
    from dicomd.services.base import ServiceContext
    from dicomd.services.registry import Registry
    from dicomd.services.verification import VerificationService
    from dicomd.transport import Link

    registry = Registry({"verification": VerificationService})
    config = parse_config(
        {
            "listeners": [{"name": "dicom", "address": "127.0.0.1", "port": 11112}],
            "local_aes": [{"ae_title": "LOGGED", "services": {"verification": None}}],
            "access": {"default": "allow"},
        },
        registry=registry,
    )
    ae = config.local_aes[0]
    services = {
        "LOGGED": {
            "verification": VerificationService(
                VerificationService.Options(), ServiceContext(config, ae)
            )
        }
    }

    async def main() -> tuple[int, int, int]:
        generation = Generation(config, services, Counters())
        links: list[Link] = []

        def factory() -> Link:
            link = Link(
                AcceptorAssociation(generation, "dicom"),
                requestor=False,
                max_pdu_length=16384,
                artim_timeout=5,
            )
            links.append(link)
            return link

        server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            for calling in ("FIRST", "SECOND"):
                assoc = await associate(
                    "127.0.0.1",
                    port,
                    calling_ae=calling,
                    called_ae="LOGGED",
                    contexts=[("1.2.840.10008.1.1", ["1.2.840.10008.1.2"])],
                )
                assert await assoc.echo() == 0
                await assoc.release()
            with contextlib.suppress(Exception):  # a wrong called AE title: rejected
                await associate(
                    "127.0.0.1",
                    port,
                    calling_ae="THIRD",
                    called_ae="NOBODY",
                    contexts=[("1.2.840.10008.1.1", ["1.2.840.10008.1.2"])],
                )
            for link in links:
                await link.closed
            return port, links[0].peer[1], links[1].peer[1]
        finally:
            server.close()
            await server.wait_closed()

    reset_logging()
    with capture_logs() as logs:
        server_port, *ports = asyncio.run(main())
    # The acceptor's lines (the requestor logs under the same name, with the server as peer).
    served = [
        e
        for e in logs
        if e.get("logger") == "dicomd.association"
        and e.get("dicom_peer") != f"127.0.0.1:{server_port}"
    ]
    by_event = {(e["event"], e.get("dicom_calling_ae")): e for e in served}
    for n, calling in enumerate(("FIRST", "SECOND")):
        for event in ("association_accepted", "association_closed"):
            entry = by_event[(event, calling)]
            assert entry["dicom_called_ae"] == "LOGGED"
            assert entry["dicom_listener"] == "dicom"
            assert entry["dicom_peer"] == f"127.0.0.1:{ports[n]}"
            assert isinstance(entry["dicom_assoc_id"], int)
    assert (
        by_event[("association_accepted", "FIRST")]["dicom_assoc_id"]
        != by_event[("association_accepted", "SECOND")]["dicom_assoc_id"]
    )
    rejected = by_event[("association_rejected", "THIRD")]
    assert rejected["dicom_called_ae"] == "NOBODY" and rejected["dicom_listener"] == "dicom"
