"""Service plug-ins through real entry points: a crashing one is restarted with backoff
while the others keep serving; one that cannot be imported is a configuration error."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import Dicomd, base_config, free_port

PLUGIN = '''
"""A test plug-in: its background work fails on the first two runs, then keeps running."""
from pathlib import Path
from typing import ClassVar

from dicomd.services.base import Offer, Service, ServiceOptions


class CrashyOptions(ServiceOptions):
    marker_dir: str


class CrashyService(Service):
    name: ClassVar[str] = "crashy"
    Options = CrashyOptions
    permissions: ClassVar[tuple[str, ...]] = ("echo",)

    def offers(self) -> list[Offer]:
        return []

    async def handle(self, association, request) -> None:
        raise NotImplementedError

    async def run(self) -> None:
        marker_dir = Path(self.options.marker_dir)
        runs = len(list(marker_dir.glob("run-*")))
        (marker_dir / f"run-{runs}").touch()
        if runs < 2:
            raise RuntimeError(f"crash number {runs + 1}")
        await super().run()
'''


def install_plugin(root: Path, module: str, body: str, entry: str) -> dict[str, str]:
    """A minimal installed distribution: module + dist-info with entry_points.txt."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(body)
    dist = root / f"{module}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[dicomd.services]\n{entry}\n")
    return {"PYTHONPATH": str(root)}


def test_crashing_service_is_restarted_and_others_keep_serving(
    dicomd: Dicomd, tmp_path: Path
) -> None:
    env = install_plugin(
        tmp_path / "plugins", "crashy_plugin", PLUGIN, "crashy = crashy_plugin:CrashyService"
    )
    markers = tmp_path / "markers"
    markers.mkdir()
    port = free_port()
    config = base_config(tmp_path, port)
    config["local_aes"][0]["services"]["crashy"] = {"marker_dir": str(markers)}
    dicomd.start(config, env=env)
    first = dicomd.wait_for_log("service_crashed", restart_in_s=1.0)
    assert first["service"] == "DICOMD/crashy"
    assert "crash number 1" in first["error"]
    second = dicomd.wait_for_log("service_crashed", restart_in_s=2.0, timeout=15)
    assert "crash number 2" in second["error"]
    # Third run stays up; the verification service on the same AE answered throughout.
    deadline_marker = markers / "run-2"
    for _ in range(100):
        if deadline_marker.exists():
            break
        subprocess.run(["sleep", "0.1"])
    assert deadline_marker.exists()
    r = subprocess.run(
        [sys.executable, "-m", "dicomd", "echo", "127.0.0.1", str(port), "--aec", "DICOMD"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    assert dicomd.proc is not None and dicomd.proc.poll() is None


def test_plugin_that_cannot_load_is_a_config_error(tmp_path: Path) -> None:
    broken = textwrap.dedent(
        """
        raise ImportError("libfoo.so.1: cannot open shared object file")
        """
    )
    env = install_plugin(tmp_path / "plugins", "broken_plugin", broken, "broken = broken_plugin:X")
    port = free_port()
    config = base_config(tmp_path, port)
    config["local_aes"][0]["services"]["broken"] = None
    import os

    import yaml

    path = tmp_path / "dicomd.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    full_env = dict(os.environ, **env)
    r = subprocess.run(
        [sys.executable, "-m", "dicomd", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        env=full_env,
    )
    assert r.returncode == 1
    out = r.stdout + r.stderr
    assert "unknown service 'broken'" in out, out
    assert "libfoo.so.1" in out, out  # the reason the plug-in is unavailable is shown too
    r = subprocess.run(
        [sys.executable, "-m", "dicomd", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        env=full_env,
    )
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
