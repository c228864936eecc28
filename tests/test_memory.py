"""The C allocator's thresholds (dicomd/system/memory.py): freed data-set memory is kept for
the next data set instead of being faulted in again, in process and in the running daemon."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import Dicomd, free_port, require_program
from storage_helpers import make_dataset, storage_config

# A pattern like a CT C-STORE's: two fragments and a joined copy, then all freed. With
# glibc's defaults the freed top of the heap (more than its dynamic trim threshold) goes
# back to the kernel, and the next round faults the same pages in again.
CHURN = """
import resource, sys
from dicomd.system.memory import tune_malloc
tuned = tune_malloc() if sys.argv[1] == "tune" else False
def churn(n):
    for _ in range(n):
        a = bytes(1 << 20); b = bytes(1 << 20); c = bytes(600 << 10)
        del a, b, c
churn(5)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn(200)
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _churn(mode: str, env: dict[str, str] | None = None) -> tuple[bool, int]:
    out = subprocess.run(
        [sys.executable, "-c", CHURN, mode],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout.split()
    return out[0] == "True", int(out[1])


def test_tuned_allocator_keeps_freed_memory() -> None:
    tuned, tuned_faults = _churn("tune")
    untuned, default_faults = _churn("default")
    assert tuned and not untuned
    # Measured on Debian 12 (glibc 2.36): ~14,000 faults by default, 0 tuned.
    assert default_faults > 2000, "the default allocator no longer churns: the test proves nothing"
    assert tuned_faults < default_faults // 20


def test_administrator_tunables_win() -> None:
    import os

    env = {**os.environ, "GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}
    tuned, _ = _churn("tune", env)
    assert not tuned


def _minor_faults(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[7])


def _ct_sized_files(directory: Path, run: int, n: int) -> list[Path]:
    """``n`` Part-10 files with CT-sized pixel data (512x512x16 bit), explicit VR LE."""
    from pydicom import dcmread
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO

    directory.mkdir()
    paths = []
    for i in range(n):
        uid = f"1.2.826.0.1.3680043.9.7777.9.{run}.{i}"
        ds = dcmread(DicomBytesIO(make_dataset(uid, pixel_bytes=512 * 512 * 2)), force=True)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        path = directory / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _storescu(exe: str, port: int, files: list[Path], env: dict[str, str]) -> None:
    result = subprocess.run(
        [exe, "-aec", "DICOMD", "-xe", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-2000:]


def _faults_per_instance(
    tmp_path: Path, name: str, run: int, env: dict[str, str] | None, dcmtk_env: dict[str, str]
) -> float:
    exe = require_program("storescu")
    port = free_port()
    run_dir = tmp_path / name
    run_dir.mkdir()
    warm = _ct_sized_files(run_dir / "warm", run, 20)
    files = _ct_sized_files(run_dir / "files", run + 1, 60)
    dicomd = Dicomd(run_dir)
    try:
        dicomd.start(storage_config(run_dir, port, durability="none"), env=env)
        assert dicomd.proc is not None
        tuned = env is None
        dicomd.wait_for_log("started", malloc_tuned=tuned)
        _storescu(exe, port, warm, dcmtk_env)  # warm-up: heap, caches, index pages
        before = _minor_faults(dicomd.proc.pid)
        _storescu(exe, port, files, dcmtk_env)
        faults = _minor_faults(dicomd.proc.pid) - before
    finally:
        assert dicomd.stop() == 0
    return faults / 60


def test_daemon_keeps_data_set_memory_between_instances(
    tmp_path: Path, dcmtk_env: dict[str, str]
) -> None:
    """dicomd receiving CT-sized instances from DCMTK storescu: the page faults it takes per
    instance, tuned (its default) against glibc's own thresholds (an administrator's
    GLIBC_TUNABLES that only restates a default turns the tuning off)."""
    untuned = _faults_per_instance(
        tmp_path, "untuned", 1, {"GLIBC_TUNABLES": "glibc.malloc.perturb=0"}, dcmtk_env
    )
    tuned = _faults_per_instance(tmp_path, "tuned", 3, None, dcmtk_env)
    # Measured: ~30-45 faults per CT instance untuned, ~7 tuned (the index's cache growing).
    assert untuned > 15, f"untuned {untuned:.1f} faults per instance: the test proves nothing"
    assert tuned < untuned / 2, f"tuned {tuned:.1f} vs untuned {untuned:.1f} faults per instance"
