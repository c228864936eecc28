"""1,000 associations held open at once against one dicomd process, then all echo and
release. Not a timing test: it checks that one process holds them and serves them all."""

from __future__ import annotations

import asyncio
import resource
from pathlib import Path

from conftest import Dicomd, base_config, free_port

from dicomd.association import associate
from dicomd.net.dimse import VERIFICATION as VERIFICATION_SOP_CLASS

COUNT = 1000


def thread_count(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


def test_thousand_associations_open_at_once(dicomd: Dicomd, tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    assert hard >= COUNT + 100, f"file limit {hard} too low for {COUNT} sockets"
    port = free_port()
    config = base_config(
        tmp_path,
        port,
        limits={"max_associations": COUNT + 10},
        listeners=[{"name": "dicom", "address": "127.0.0.1", "port": port, "backlog": 2048}],
    )
    config["logging"]["level"] = "warning"
    dicomd.start(config)
    assert dicomd.proc is not None

    async def main() -> None:
        sem = asyncio.Semaphore(100)  # connect in waves so the listen backlog never overflows

        async def open_one(i: int):  # type: ignore[no-untyped-def]
            async with sem:
                return await associate(
                    "127.0.0.1",
                    port,
                    calling_ae=f"SCU{i:05d}",
                    called_ae="DICOMD",
                    contexts=[(VERIFICATION_SOP_CLASS, ["1.2.840.10008.1.2"])],
                    acse_timeout=60,
                    connect_timeout=60,
                )

        assocs = await asyncio.gather(*(open_one(i) for i in range(COUNT)))
        assert all(a.link.upper.is_established for a in assocs)
        # All open at once, and the server is still one process with a handful of threads.
        assert thread_count(dicomd.proc.pid) < 10
        statuses = await asyncio.gather(*(a.echo(timeout=60) for a in assocs))
        assert statuses == [0] * COUNT
        await asyncio.gather(*(a.release(timeout=60) for a in assocs))

    asyncio.run(main())
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
