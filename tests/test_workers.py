"""``workers: N``: several worker processes behind one supervisor process, with real peers
(DCMTK storescu, dicomd's requestor): every instance indexed once, duplicates decided by
the index across processes, association limits over all workers, sd_notify / reload /
stop, socket activation, a worker killed with kill -9."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import Dicomd, base_config, free_port, require_program
from storage_helpers import (
    check_archive_consistent,
    dataset_of,
    index_rows,
    instance_row,
    make_dataset,
    storage_config,
)
from test_supervisor import NotifySocket

from dicomd.association import AssociationRejected, associate
from dicomd.net import dimse

EXPLICIT = "1.2.840.10008.1.2.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
VERIFICATION = "1.2.840.10008.1.1"
UID_ROOT = "1.2.826.0.1.3680043.9.7777.40"


def worker_pids(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return sorted(out)


def wait_workers(dicomd: Dicomd, n: int, timeout: float = 30.0) -> list[int]:
    assert dicomd.proc is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        started = [e for e in dicomd.log_events() if e.get("event") == "worker_started"]
        pids = worker_pids(dicomd.proc.pid)
        if len({e["worker"] for e in started}) >= n and len(pids) == n:
            return pids
        time.sleep(0.05)
    raise AssertionError(f"{n} workers did not start:\n{dicomd.log_text()}")


def write_files(directory: Path, prefix: str, n: int, pixel_bytes: int = 3000) -> list[Path]:
    """Part-10 files of secondary capture instances (explicit VR little endian)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        uid = f"{prefix}.{i}"
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
        meta.MediaStorageSOPInstanceUID = uid
        meta.TransferSyntaxUID = EXPLICIT
        data = make_dataset(uid, study_uid=f"{UID_ROOT}.1", series_uid=f"{prefix}.0")
        ds = pydicom.dcmread(DicomBytesIO(data), force=True)
        ds.file_meta = meta
        path = directory / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_workers_several_storescu_every_instance_indexed_once(
    dicomd: Dicomd, tmp_path: Path, dcmtk_env: dict[str, str]
) -> None:
    exe = require_program("storescu")
    port = free_port()
    config = storage_config(tmp_path, port)
    config["workers"] = 2
    dicomd.start(config)
    wait_workers(dicomd, 2)
    sets = [write_files(tmp_path / f"in{k}", f"{UID_ROOT}.2.{k}", 40) for k in range(3)]
    # A fourth sender repeats the first set at the same time: duplicates across processes.
    sends = [*sets, sets[0]]
    procs = [
        subprocess.Popen(
            [exe, "-aec", "DICOMD", "127.0.0.1", str(port), *map(str, files)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dcmtk_env,
        )
        for files in sends
    ]
    for p in procs:
        out = p.communicate(timeout=120)[0]
        assert p.returncode == 0, out.decode(errors="replace")[-2000:]
    db, root = tmp_path / "index.sqlite", tmp_path / "archive"
    rows = index_rows(db, "SELECT sop_instance_uid FROM instance")
    uids = [r["sop_instance_uid"] for r in rows]
    assert len(uids) == len(set(uids)) == 120
    assert check_archive_consistent(root, db) == 120
    study = index_rows(db, "SELECT * FROM study")[0]
    assert study["number_of_study_related_instances"] == 120
    assert study["number_of_study_related_series"] == 3
    # Both workers served (the supervisor hands connections out in turn).
    served = {e.get("pid") for e in dicomd.log_events() if e.get("event") == "worker_forked"}
    assert len(served) == 2
    assert dicomd.stop() == 0


async def _store_all(port: int, items: list[tuple[str, bytes]]) -> list[int]:
    assoc = await associate(
        "127.0.0.1",
        port,
        calling_ae="DUPSCU",
        called_ae="DICOMD",
        contexts=[(SECONDARY_CAPTURE, [EXPLICIT])],
    )
    out = []
    try:
        cx = assoc.context_for(SECONDARY_CAPTURE)
        for uid, data in items:
            fields = dimse.c_store_rq(assoc.next_message_id(), SECONDARY_CAPTURE, uid)
            async for rsp in assoc.request(cx, fields, data, timeout=30):
                out.append(rsp.status)
    finally:
        await assoc.release()
    return out


@pytest.mark.parametrize("durability", ["full", "none"])
def test_workers_reject_duplicates_across_processes(
    dicomd: Dicomd, tmp_path: Path, durability: str
) -> None:
    """Two senders on two workers store the same instances at the same moment under
    ``duplicates: reject``: the index decides, so each instance is stored once and
    exactly one of the two is told 0000, the other 0111."""
    port = free_port()
    aes = [
        {
            "ae_title": "DICOMD",
            "services": {"storage": {"min_free_space": 0, "duplicates": "reject"}},
        }
    ]
    config = storage_config(tmp_path, port, aes=aes, durability=durability)
    config["workers"] = 2
    dicomd.start(config)
    wait_workers(dicomd, 2)
    items = [
        (f"{UID_ROOT}.3.{i}", make_dataset(f"{UID_ROOT}.3.{i}", pixel_bytes=2000))
        for i in range(40)
    ]
    results: list[list[int]] = [[], []]

    def sender(k: int) -> None:
        results[k] = asyncio.run(_store_all(port, items))

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i in range(len(items)):
        assert sorted((results[0][i], results[1][i])) == [0, 0x0111], (i, results)
    db, root = tmp_path / "index.sqlite", tmp_path / "archive"
    for uid, data in items:
        row = instance_row(db, uid)
        assert row is not None
        assert dataset_of(root / row["path"])[0] == data
    assert check_archive_consistent(root, db) == 40


def test_workers_limits_count_every_process(dicomd: Dicomd, tmp_path: Path) -> None:
    """limits.max_associations and a local AE's max_associations over all workers: with
    2 workers and a limit of 2, the third association is refused wherever it lands."""
    port = free_port()
    config = base_config(tmp_path, port)
    config["workers"] = 2
    config["limits"] = {"max_associations": 3}
    config["local_aes"] = [
        {"ae_title": "DICOMD", "services": {"verification": None}},
        {"ae_title": "LIMITED", "max_associations": 1, "services": {"verification": None}},
    ]
    dicomd.start(config)
    wait_workers(dicomd, 2)

    async def scenario() -> None:
        def open_(called: str):  # type: ignore[no-untyped-def]
            return associate(
                "127.0.0.1",
                port,
                calling_ae="LIMITSCU",
                called_ae=called,
                contexts=[(VERIFICATION, [EXPLICIT])],
            )

        held = [await open_("LIMITED")]
        # The next one lands on the other worker: still one LIMITED association too many.
        with pytest.raises(AssociationRejected):
            await open_("LIMITED")
        held += [await open_("DICOMD"), await open_("DICOMD")]
        for _ in range(2):  # on either worker: 3 are open already
            with pytest.raises(AssociationRejected):
                await open_("DICOMD")
        await held.pop().release()
        await asyncio.sleep(0.2)
        held.append(await open_("DICOMD"))
        for assoc in held:
            await assoc.release()

    asyncio.run(scenario())
    dicomd.wait_for_log("association_rejected", rule="limits.max_associations")
    dicomd.wait_for_log("association_rejected", rule="local_aes (LIMITED).max_associations")


def test_workers_notify_reload_watchdog_stop(dicomd: Dicomd, tmp_path: Path) -> None:
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    try:
        config = base_config(tmp_path, free_port())
        config["workers"] = 2
        dicomd.start(config, env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "400000"})
        ready = notify.collect("READY=1")
        assert any("STATUS=serving with 2 workers" in m for m in ready), ready
        notify.messages.clear()
        time.sleep(1.2)
        notify.sock.settimeout(0.2)
        try:
            while True:
                notify.messages.append(notify.sock.recv(4096).decode())
        except TimeoutError:
            pass
        pings = [m for m in notify.messages if m == "WATCHDOG=1"]
        assert 2 <= len(pings) <= 14, notify.messages
        notify.messages.clear()
        dicomd.signal(signal.SIGHUP)
        notify.collect("READY=1")
        assert any("RELOADING=1" in m for m in notify.messages)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if sum(e.get("event") == "reloaded" for e in dicomd.log_events()) >= 2:
                break
            time.sleep(0.05)
        assert sum(e.get("event") == "reloaded" for e in dicomd.log_events()) == 2
        notify.messages.clear()
        dicomd.signal(signal.SIGTERM)
        notify.collect("STOPPING=1")
        assert dicomd.proc is not None
        assert dicomd.proc.wait(30) == 0
        # Only the supervisor talked to systemd: nothing after STOPPING from the workers.
        assert all("READY=1" not in m for m in notify.messages)
    finally:
        notify.close()


def test_workers_socket_activation(dicomd: Dicomd, tmp_path: Path) -> None:
    port = free_port()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(16)
    config = base_config(tmp_path, free_port())
    config["workers"] = 2
    dicomd.write_config(config)
    fd = listener.fileno()

    def to_fd3() -> None:
        os.dup2(fd, 3)
        os.set_inheritable(3, True)

    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    env.update({"LISTEN_FDS": "1", "LISTEN_FDNAMES": "dicom"})
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
    listener.close()
    try:
        dicomd.wait_for_log("listening", socket_activation=True)
        dicomd.proc = proc  # type: ignore[assignment]
        wait_workers(dicomd, 2)
        for _ in range(4):  # both workers, in turn
            r = subprocess.run(
                [sys.executable, "-m", "dicomd", "echo", "127.0.0.1", str(port), "--aec", "DICOMD"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert r.returncode == 0, r.stdout + r.stderr + dicomd.log_text()
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
        dicomd.proc = None
    assert proc.returncode == 0


def test_workers_kill_9_of_a_worker(dicomd: Dicomd, tmp_path: Path) -> None:
    """A worker killed in the middle of an ingest is started again (its journal replayed
    first); what it answered 0000 is on disk and indexed; the other worker goes on."""
    port = free_port()
    config = storage_config(tmp_path, port)
    config["workers"] = 2
    dicomd.start(config)
    pids = wait_workers(dicomd, 2)
    sent: dict[str, bytes] = {}
    acked: set[str] = set()
    stop = threading.Event()

    async def client(k: int) -> None:
        try:
            assoc = await associate(
                "127.0.0.1",
                port,
                calling_ae="CRASHSCU",
                called_ae="DICOMD",
                contexts=[(SECONDARY_CAPTURE, [EXPLICIT])],
            )
            cx = assoc.context_for(SECONDARY_CAPTURE)
            n = 0
            while not stop.is_set():
                uid = f"{UID_ROOT}.5.{k}.{n}"
                data = make_dataset(uid, series_uid=f"{UID_ROOT}.5.{k}", pixel_bytes=20_000)
                sent[uid] = data
                fields = dimse.c_store_rq(assoc.next_message_id(), SECONDARY_CAPTURE, uid)
                async for rsp in assoc.request(cx, fields, data, timeout=10):
                    if rsp.status == 0:
                        acked.add(uid)
                n += 1
            await assoc.release()
        except Exception:
            return  # its worker died under it

    def run_clients() -> None:
        async def both() -> None:
            await asyncio.gather(client(0), client(1))

        asyncio.run(both())

    thread = threading.Thread(target=run_clients)
    thread.start()
    time.sleep(1.0)
    os.kill(pids[0], signal.SIGKILL)
    time.sleep(0.5)
    stop.set()
    thread.join(60)
    dicomd.wait_for_log("worker_exited", worker=0)
    assert dicomd.proc is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = worker_pids(dicomd.proc.pid)
        if len(now) == 2 and pids[0] not in now:
            break
        time.sleep(0.1)
    assert len(worker_pids(dicomd.proc.pid)) == 2
    r = subprocess.run(
        [sys.executable, "-m", "dicomd", "echo", "127.0.0.1", str(port), "--aec", "DICOMD"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert dicomd.stop() == 0
    db, root = tmp_path / "index.sqlite", tmp_path / "archive"
    assert len(acked) > 10
    for uid in acked:
        row = instance_row(db, uid)
        assert row is not None, uid
        assert dataset_of(root / row["path"])[0] == sent[uid]
    check_archive_consistent(root, db)
