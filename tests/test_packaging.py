"""The Debian package and its systemd units (issue 8), end to end.

1. ``dpkg-buildpackage -us -uc -b`` on a copy of the working tree (the repository is left
   alone), with Debian's PATH so that Debian's python3 builds the private venv;
2. lintian: no error and no warning. A deliberate warning is overridden, with its reason,
   in debian/dicomd.lintian-overrides (today: the venv's console script has the venv's
   python as interpreter; pynetdicom's example modules keep "#!/usr/bin/env python").
   What remains is info level: the bundled wheels' extension modules are not built with
   Debian's hardening flags, there is no SysV init script (the service needs systemd's
   notify/watchdog), licence files inside the venv's *.dist-info;
3. the units offline: ``systemd-analyze verify`` prints nothing, ``systemd-analyze
   security`` rates dicomd.service at most 2.0;
4. ``dpkg -i`` on this machine (no systemd as PID 1 here): user, conffiles, units, the
   /etc/default switch (the unit's ExecCondition command), the installed dicomd started as
   root drops to user dicomd and answers echoscu, then purge;
5. a real systemd: Debian 12 booted in systemd-nspawn (rootfs made by debootstrap once and
   cached in /var/cache/dicomd-test), the package installed inside: skipped while
   disabled, started (Type=notify), echo on port 104 as user dicomd, journal fields,
   reload, socket activation, a watchdog restart, stop, purge.

Everything needs Debian tools (debhelper, lintian, debootstrap, systemd-container) and
parts need root: missing ones skip the tests, or fail them under CI=true.
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, free_port, missing, require_program, require_root, wait_for_port

pytestmark = pytest.mark.timeout(900)  # the first run also debootstraps a rootfs (~1 min)

# Debian's own tools only: a python3 from pyenv or a venv must not build the package.
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
SYSTEM_ENV = {"PATH": SYSTEM_PATH, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
CACHE = Path("/var/cache/dicomd-test")
MAX_EXPOSURE = 2.0
UNITS = ("dicomd.service", "dicomd.socket", "dicomd-tls.socket")
# A packaged dicomd runs as: python from the venv, running the /usr/bin/dicomd script.
DAEMON_MARKERS = ("/usr/bin/dicomd", "/usr/lib/dicomd/")


def run(
    argv: list[str], *, check: bool = True, timeout: float = 120, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    kwargs.setdefault("env", SYSTEM_ENV)
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kwargs,  # type: ignore[arg-type]
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{shlex.join(argv)} exited {result.returncode}\n"
            f"--- stdout:\n{result.stdout}\n--- stderr:\n{result.stderr}"
        )
    return result


def require_tool(name: str, package: str) -> str:
    path = shutil.which(name, path=SYSTEM_PATH)
    if path is None:
        missing(f"program {name!r} (Debian package {package})")
    return path  # type: ignore[return-value]


def wait_until(what: str, predicate: Callable[[], object], timeout: float = 60.0) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


# -- the build ---------------------------------------------------------------------------

_SKIP_ANYWHERE = {"__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis", ".mypy_cache"}
_SKIP_TOP = {".git", ".venv", "var", "build", "dist"}
# What an earlier in-tree dpkg-buildpackage may have left in debian/.
_SKIP_DEBIAN = {".build", ".debhelper", "dicomd", "tmp", "files", "debhelper-build-stamp"}


def _ignore(directory: str, names: list[str]) -> set[str]:
    here = Path(directory)
    skip = {n for n in names if n in _SKIP_ANYWHERE or n.endswith(".egg-info")}
    if here == ROOT:
        skip |= _SKIP_TOP & set(names)
    elif here == ROOT / "debian":
        skip |= {
            n
            for n in names
            if n in _SKIP_DEBIAN or n.endswith((".substvars", ".debhelper.log", ".debhelper"))
        }
    return skip


@dataclass
class Package:
    deb: Path
    changes: Path
    version: str
    depends: list[str]  # the first alternative of each Depends entry, without versions


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Package:
    require_tool("dpkg-buildpackage", "dpkg-dev")
    require_tool("dh", "debhelper")
    if run(["/usr/bin/python3", "-c", "import ensurepip"], check=False).returncode != 0:
        missing("Debian's python3 venv module (Debian package python3-venv)")
    workdir = tmp_path_factory.mktemp("deb")
    source = workdir / "dicomd"
    # The working tree, not just the commits: tracked and untracked files alike.
    shutil.copytree(ROOT, source, symlinks=True, ignore=_ignore)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "MAKEFLAGS", "MFLAGS")
    }
    env.update(SYSTEM_ENV)
    started = time.monotonic()
    result = run(
        ["dpkg-buildpackage", "-us", "-uc", "-b"],
        cwd=source,
        env=env,
        check=False,
        timeout=600,
    )
    (workdir / "build.log").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, (
        f"dpkg-buildpackage failed ({result.returncode}); the end of its log:\n"
        + "\n".join((result.stdout + result.stderr).splitlines()[-60:])
    )
    print(f"package built in {time.monotonic() - started:.1f} s")
    debs = sorted(workdir.glob("dicomd_*.deb"))
    changes = sorted(workdir.glob("dicomd_*.changes"))
    assert len(debs) == 1, debs
    assert len(changes) == 1, changes
    fields = run(["dpkg-deb", "-f", str(debs[0]), "Version", "Depends"]).stdout
    version = re.search(r"^Version: (.+)$", fields, re.M).group(1)  # type: ignore[union-attr]
    depends_text = re.search(r"^Depends: (.+)$", fields, re.M).group(1)  # type: ignore[union-attr]
    depends = [
        re.split(r"[\s(:]", entry.split("|")[0].strip())[0] for entry in depends_text.split(",")
    ]
    return Package(debs[0], changes[0], version, depends)


def test_package_contents(package: Package) -> None:
    listing = run(["dpkg-deb", "-c", str(package.deb)]).stdout
    for path in (
        "./usr/bin/dicomd -> ../lib/dicomd/venv/bin/dicomd",
        "./etc/dicomd/dicomd.yaml",
        "./etc/dicomd/conf.d/README",
        "./etc/default/dicomd",
        "./lib/systemd/system/dicomd.service",
        "./lib/systemd/system/dicomd.socket",
        "./lib/systemd/system/dicomd-tls.socket",
        "./usr/lib/sysusers.d/dicomd.conf",
        "./usr/lib/tmpfiles.d/dicomd.conf",
        "./usr/share/man/man8/dicomd.8.gz",
        "./usr/share/doc/dicomd/bundled-python-packages.txt",
    ):
        assert path in listing, f"{path} is not in the package"
    # Bytecode is compiled by postinst, never shipped (lintian:
    # package-installs-python-pycache-dir).
    assert "__pycache__" not in listing
    # Every runtime need of a minimal Debian is declared (the nspawn test installs into one).
    for dependency in ("python3.11", "procps"):
        assert dependency in package.depends, package.depends
    control = f"dpkg-deb --ctrl-tarfile {shlex.quote(str(package.deb))} | tar -xO ./conffiles"
    conffiles = run(["sh", "-c", control]).stdout.split()
    assert sorted(conffiles) == [
        "/etc/default/dicomd",
        "/etc/dicomd/conf.d/README",
        "/etc/dicomd/dicomd.yaml",
    ]


def test_lintian(package: Package) -> None:
    require_tool("lintian", "lintian")
    result = run(
        ["lintian", "--allow-root", "--fail-on", "error,warning", str(package.changes)],
        check=False,
        timeout=300,
    )
    tags = [line for line in result.stdout.splitlines() if re.match(r"^[EW]: ", line)]
    assert result.returncode == 0 and not tags, (
        "lintian reports errors or warnings: fix them, or override a deliberate one in "
        "debian/dicomd.lintian-overrides with the reason in a comment\n"
        + result.stdout
        + result.stderr
    )


# -- the units, offline ------------------------------------------------------------------


@pytest.fixture(scope="module")
def unit_root(package: Package, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root directory for systemd-analyze: the package's files (units and the real
    /usr/bin/dicomd), the host's own units (for the targets they refer to) and stubs of
    /bin/sh and /bin/kill (the unit's ExecCondition and ExecReload)."""
    require_tool("systemd-analyze", "systemd")
    root = tmp_path_factory.mktemp("unit-root")
    for units in ("/lib/systemd/system", "/usr/lib/systemd/system"):
        if Path(units).is_dir() and not Path(units).is_symlink():
            shutil.copytree(units, root / units.lstrip("/"), symlinks=True, dirs_exist_ok=True)
    for unit in UNITS:  # a dicomd installed on the host must not stand in for ours
        for units in ("lib/systemd/system", "usr/lib/systemd/system"):
            (root / units / unit).unlink(missing_ok=True)
    run(["dpkg-deb", "-x", str(package.deb), str(root)])
    (root / "bin").mkdir(exist_ok=True)
    for stub in ("sh", "kill"):
        (root / "bin" / stub).write_text("#!/bin/sh\n")
        (root / "bin" / stub).chmod(0o755)
    for unit in UNITS:
        shipped = (ROOT / "systemd" / unit).read_text()
        assert (root / "lib/systemd/system" / unit).read_text() == shipped, unit
    return root


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_analyze_verify(unit_root: Path, unit: str) -> None:
    # verify exits 0 even on unknown keys or missing binaries: any output is a finding.
    result = run(
        ["systemd-analyze", "verify", "--man=no", f"--root={unit_root}", unit], check=False
    )
    assert result.returncode == 0 and result.stdout == "" and result.stderr == "", (
        f"systemd-analyze verify {unit}:\n{result.stdout}{result.stderr}"
    )


def test_systemd_analyze_security(unit_root: Path) -> None:
    result = run(
        [
            "systemd-analyze",
            "security",
            "--offline=yes",
            f"--root={unit_root}",
            f"--threshold={int(MAX_EXPOSURE * 10)}",
            "--no-pager",
            "dicomd.service",
        ],
        check=False,
    )
    match = re.search(r"Overall exposure level for dicomd\.service: ([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    exposure = float(match.group(1))
    print(f"systemd-analyze security dicomd.service: exposure {exposure}")
    assert exposure <= MAX_EXPOSURE and result.returncode == 0, result.stdout + result.stderr


# -- dpkg -i on this machine -------------------------------------------------------------


def unit_values(unit_text: str, key: str) -> list[str]:
    return [
        line.split("=", 1)[1]
        for line in unit_text.splitlines()
        if line.startswith(f"{key}=") and not line.startswith("#")
    ]


def environment_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";")) and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip().strip("\"'")
    return values


def daemon_processes() -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if any(marker in cmdline for marker in DAEMON_MARKERS):
            found.append(f"{entry.name}: {cmdline}")
    return found


def proc_ids(pid: int) -> dict[str, list[str]]:
    status = Path(f"/proc/{pid}/status").read_text()
    return {
        key: value.split()
        for key, _, value in (line.partition(":") for line in status.splitlines())
        if key in ("Uid", "Gid", "CapEff", "NoNewPrivs")
    }


def dpkg_status(name: str) -> str:
    return run(["dpkg-query", "-W", "-f=${Status}", name], check=False).stdout


def account_exists(name: str) -> tuple[bool, bool]:
    try:
        pwd.getpwnam(name)
        user = True
    except KeyError:
        user = False
    try:
        grp.getgrnam(name)
        group = True
    except KeyError:
        group = False
    return user, group


@pytest.fixture
def installed_here(package: Package) -> Iterator[Package]:
    """dpkg -i here, and afterwards leave the machine as it was (purge, and remove the
    user, group and /var/lib/dicomd if they were not there before)."""
    require_root()
    require_tool("dpkg", "dpkg")
    if "installed" in dpkg_status("dicomd"):
        pytest.fail(
            "dicomd is already installed on this machine; this test installs and "
            "purges it: remove it first (dpkg --purge dicomd)"
        )
    had_user, had_group = account_exists("dicomd")
    had_state = Path("/var/lib/dicomd").exists()
    try:
        yield package
    finally:
        if dpkg_status("dicomd").strip():
            run(["dpkg", "--purge", "dicomd"], check=False)
        if not had_state:
            shutil.rmtree("/var/lib/dicomd", ignore_errors=True)
        if account_exists("dicomd")[0] and not had_user:
            run(["userdel", "dicomd"], check=False)
        if account_exists("dicomd")[1] and not had_group:
            run(["groupdel", "dicomd"], check=False)


def test_install_start_as_root_and_purge_here(installed_here: Package, tmp_path: Path) -> None:
    echoscu = require_program("echoscu")
    run(["dpkg", "-i", str(installed_here.deb)], timeout=300)

    # The system account, as sysusers.d made it.
    user = pwd.getpwnam("dicomd")
    group = grp.getgrnam("dicomd")
    assert user.pw_gid == group.gr_gid
    assert user.pw_dir == "/var/lib/dicomd"
    assert user.pw_shell == "/usr/sbin/nologin"
    assert 0 < user.pw_uid < 1000, "a system uid"
    state = Path("/var/lib/dicomd")
    assert state.stat().st_uid == user.pw_uid and state.stat().st_mode & 0o777 == 0o750
    assert (state / "archive").is_dir() and Path("/var/log/dicomd").is_dir()

    # Configuration and units in place, as shipped.
    for shipped, installed in (
        ("etc/dicomd/dicomd.yaml", "/etc/dicomd/dicomd.yaml"),
        ("etc/dicomd/conf.d/README", "/etc/dicomd/conf.d/README"),
        ("etc/default/dicomd", "/etc/default/dicomd"),
        ("systemd/dicomd.service", "/lib/systemd/system/dicomd.service"),
        ("systemd/dicomd.socket", "/lib/systemd/system/dicomd.socket"),
        ("systemd/dicomd-tls.socket", "/lib/systemd/system/dicomd-tls.socket"),
    ):
        assert Path(installed).read_text() == (ROOT / shipped).read_text(), installed
    conffiles = run(["dpkg-query", "-W", "-f=${Conffiles}", "dicomd"]).stdout
    for conffile in ("/etc/dicomd/dicomd.yaml", "/etc/dicomd/conf.d/README", "/etc/default/dicomd"):
        assert conffile in conffiles
    # The service is enabled (the /etc/default switch decides), socket activation is not.
    assert Path("/etc/systemd/system/multi-user.target.wants/dicomd.service").is_symlink()
    assert not Path("/etc/systemd/system/sockets.target.wants/dicomd.socket").exists()
    assert not Path("/etc/systemd/system/sockets.target.wants/dicomd-tls.socket").exists()

    # Not started by the installation.
    assert daemon_processes() == []

    # The /etc/default switch: the unit's ExecCondition command skips the start (exit
    # 1..254 means "skipped", 255 or a signal would be a failure) until DICOMD_ENABLE=yes.
    unit = Path("/lib/systemd/system/dicomd.service").read_text()
    (condition,) = unit_values(unit, "ExecCondition")
    argv = shlex.split(condition.replace("$$", "$"))  # systemd hands "$$" on as "$"
    defaults = environment_file(Path("/etc/default/dicomd"))
    assert defaults["DICOMD_ENABLE"] == "no"

    def condition_exit(enable: str | None) -> int:
        env = dict(SYSTEM_ENV)
        if enable is not None:
            env["DICOMD_ENABLE"] = enable
        return run(argv, env=env, check=False).returncode

    assert 1 <= condition_exit(defaults["DICOMD_ENABLE"]) <= 254
    assert 1 <= condition_exit(None) <= 254
    assert 1 <= condition_exit("") <= 254
    assert condition_exit("yes") == 0
    assert condition_exit("Yes") == 0

    run(["/usr/bin/dicomd", "check-config"])

    # The installed dicomd started as root on the packaged configuration (on a free
    # loopback port): it binds, drops to user dicomd, answers C-ECHO, exits 0 on SIGTERM.
    config = yaml.safe_load(Path("/etc/dicomd/dicomd.yaml").read_text())
    port = free_port()
    config["listeners"][0].update(address="127.0.0.1", port=port)
    config_path = tmp_path / "dicomd.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    log_path = tmp_path / "dicomd.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["/usr/bin/dicomd", "run", "--config", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=SYSTEM_ENV,
            cwd="/",
        )
    try:
        wait_for_port(port, proc=proc)
        # The listener is bound (and accepts into its backlog) before the privilege drop:
        # wait for the drop, bounded, then check all of it at once.
        deadline = time.monotonic() + 10
        ids = proc_ids(proc.pid)
        while ids["Uid"][0] == "0" and time.monotonic() < deadline:
            time.sleep(0.05)
            ids = proc_ids(proc.pid)
        assert ids["Uid"] == [str(user.pw_uid)] * 4, ids
        assert ids["Gid"] == [str(group.gr_gid)] * 4, ids
        assert ids["NoNewPrivs"] == ["1"] and int(ids["CapEff"][0], 16) == 0, ids
        echo = run(
            [echoscu, "-aec", "DICOMD", "127.0.0.1", str(port)],
            env={**SYSTEM_ENV, "TCP_NODELAY": "1"},
            check=False,
        )
        assert echo.returncode == 0, echo.stdout + echo.stderr
        run(["/usr/bin/dicomd", "echo", "127.0.0.1", str(port), "--aec", "DICOMD"])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    log_text = log_path.read_text()
    assert '"privileges_dropped"' in log_text and '"ECHOSCU"' in log_text, log_text

    # An upgrade (the same version again) runs prerm/postinst around the bytecode.
    run(["dpkg", "-i", str(installed_here.deb)], timeout=300)
    assert list(Path("/usr/lib/dicomd/venv/lib").rglob("__pycache__"))

    # Purge: configuration, units, venv and logs go; stored data and the account stay.
    stored = state / "archive" / "1.2.3" / "instance.dcm"
    stored.parent.mkdir()
    stored.write_bytes(b"DICM")
    purge = run(["dpkg", "--purge", "dicomd"], timeout=300)
    assert dpkg_status("dicomd") == ""
    for gone in (
        "/etc/dicomd",
        "/etc/default/dicomd",
        "/lib/systemd/system/dicomd.service",
        "/etc/systemd/system/multi-user.target.wants/dicomd.service",
        "/usr/lib/dicomd",  # postinst's bytecode too
        "/usr/bin/dicomd",
        "/var/log/dicomd",
    ):
        assert not Path(gone).exists() and not Path(gone).is_symlink(), f"{gone} left behind"
    assert stored.read_bytes() == b"DICM", "purge must not delete the archive"
    assert "kept" in purge.stderr, purge.stderr
    # The account stays (Debian's practice for system users): files it owns must not pass
    # to a later account that gets the same uid.
    assert pwd.getpwnam("dicomd").pw_uid == user.pw_uid


# -- under a real systemd: Debian 12 in systemd-nspawn -----------------------------------


def debian_mirror() -> str:
    """The Debian mirror apt uses here (deb822 .sources or one-line .list files)."""
    sources_d = Path("/etc/apt/sources.list.d")
    files = [Path("/etc/apt/sources.list")]
    if sources_d.is_dir():
        files += sorted(sources_d.glob("*.list")) + sorted(sources_d.glob("*.sources"))
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or line[:1].isspace() or ":" not in line:
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
                if (
                    "deb" in fields.get("types", "").split()
                    and "bookworm" in fields.get("suites", "").split()
                    and fields.get("enabled", "yes").lower() != "no"
                    and fields.get("uris")
                ):
                    return fields["uris"].split()[0]
        else:
            for line in text.splitlines():
                match = re.match(r"\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+bookworm\s", line)
                if match:
                    return match.group(1)
    return "http://deb.debian.org/debian"


def bookworm_rootfs(packages: list[str]) -> Path:
    """A minimal Debian 12 that boots systemd, plus *packages*; made once per package set
    and cached (the test boots it with --volatile=overlay, so it stays pristine)."""
    include = sorted({"systemd", "systemd-sysv", "dbus", *packages})
    key = hashlib.sha256(" ".join(include).encode()).hexdigest()[:12]
    rootfs = CACHE / f"bookworm-minbase-{key}"
    if (rootfs / "usr/bin/systemctl").exists():
        return rootfs
    require_tool("debootstrap", "debootstrap")
    CACHE.mkdir(parents=True, exist_ok=True)
    for stale in CACHE.glob("bookworm-minbase-*"):
        # A rootfs for another package set, or what an interrupted run left (an hour old:
        # a fresh one may be another run's debootstrap in progress).
        if ".partial-" not in stale.name or time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    partial = CACHE / f"bookworm-minbase-{key}.partial-{os.getpid()}"
    mirror = debian_mirror()
    started = time.monotonic()
    result = run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(include)}",
            "bookworm",
            str(partial),
            mirror,
        ],
        check=False,
        timeout=900,
    )
    if result.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise AssertionError(
            f"debootstrap from {mirror} failed ({result.returncode}):\n"
            + "\n".join((result.stdout + result.stderr).splitlines()[-30:])
        )
    partial.rename(rootfs)
    print(f"debootstrap of {rootfs} took {time.monotonic() - started:.0f} s")
    return rootfs


def cgroup_roots() -> list[Path]:
    base = Path("/sys/fs/cgroup")
    if (base / "cgroup.controllers").exists():  # the unified hierarchy only
        return [base]
    return [
        base / name for name in ("systemd", "unified") if (base / name / "cgroup.procs").exists()
    ]


def kill_and_remove_cgroup(path: Path) -> None:
    for _ in range(50):
        pids = [
            int(pid) for procs in path.rglob("cgroup.procs") for pid in procs.read_text().split()
        ]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    for directory in sorted((p for p in path.rglob("*") if p.is_dir()), reverse=True):
        with contextlib.suppress(OSError):
            directory.rmdir()
    with contextlib.suppress(OSError):
        path.rmdir()


class Container:
    """A booted container; commands run inside with nsenter (there is no machined here)."""

    def __init__(self, pid1: int) -> None:
        self.pid1 = pid1

    def run(
        self, *argv: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        env = {**SYSTEM_ENV, "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
        return run(
            ["nsenter", "-t", str(self.pid1), "-a", *argv], check=check, timeout=timeout, env=env
        )

    def sh(self, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("/bin/sh", "-c", script, check=check)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        argv = ["systemctl", "show", unit]
        for prop in properties:
            argv += ["-p", prop]
        out = self.run(*argv).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *args: str) -> str:
        return self.run("journalctl", "--no-pager", "-u", "dicomd", *args).stdout

    def wait_journal(self, text: str, *args: str, timeout: float = 30.0) -> str:
        """journald may store an entry a moment after the command that caused it."""

        def lookup() -> str:
            out = self.journal(*args)
            return out if text in out else ""

        return str(wait_until(f"{text!r} in the journal of dicomd", lookup, timeout))


def _container_pid1(nspawn: subprocess.Popen[bytes], console: Path) -> int:
    def child() -> int:
        if nspawn.poll() is not None:
            raise AssertionError(
                f"systemd-nspawn exited {nspawn.returncode}:\n{console.read_text(errors='replace')}"
            )
        children = Path(f"/proc/{nspawn.pid}/task/{nspawn.pid}/children")
        for pid in children.read_text().split():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return int(pid)
        return 0

    return int(wait_until("the container's systemd", child, 30))  # type: ignore[arg-type]


@contextlib.contextmanager
def booted(rootfs: Path, share: Path, workdir: Path) -> Iterator[Container]:
    """Boot *rootfs* as a container with its own network namespace (only its loopback)
    and *share* at /srv/share; stop it and everything it ran afterwards."""
    name = f"dicomd-test-{os.getpid()}-{secrets.token_hex(3)}"
    cgroups = [root / name for root in cgroup_roots()]
    for cgroup in cgroups:
        cgroup.mkdir()

    def enter_cgroups() -> None:
        # nspawn makes its cgroups below the one it starts in, so give it one of its own.
        for cgroup in cgroups:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    console = workdir / "console.log"
    with open(console, "wb") as out:
        nspawn = subprocess.Popen(
            [
                "systemd-nspawn",
                "--quiet",
                f"--directory={rootfs}",
                "--volatile=overlay",
                "--boot",
                "--register=no",
                "--keep-unit",
                "--console=pipe",
                "--private-network",
                f"--bind-ro={share}:/srv/share",
                f"--machine={name[:64]}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=SYSTEM_ENV,
            preexec_fn=enter_cgroups,  # the test runs no other threads
        )
    try:
        container = Container(_container_pid1(nspawn, console))

        def booted_state() -> str:
            result = container.run("systemctl", "is-system-running", "--wait", check=False)
            state = result.stdout.strip()
            return state if state in ("running", "degraded") else ""

        wait_until("the container to finish booting", booted_state, 60)
        yield container
    finally:
        if nspawn.poll() is None:
            nspawn.terminate()  # nspawn asks the container's systemd to power off
            try:
                nspawn.wait(30)
            except subprocess.TimeoutExpired:
                nspawn.kill()
                nspawn.wait(10)
        for cgroup in cgroups:
            kill_and_remove_cgroup(cgroup)


def test_service_under_systemd(package: Package, tmp_path: Path) -> None:
    require_root()
    require_tool("systemd-nspawn", "systemd-container")
    require_tool("nsenter", "util-linux")
    echoscu = require_program("echoscu")
    if not cgroup_roots():
        missing("a cgroup hierarchy to run systemd-nspawn in")
    started = time.monotonic()
    rootfs = bookworm_rootfs(package.depends)
    share = tmp_path / "share"
    share.mkdir()
    shutil.copy(package.deb, share / "dicomd.deb")
    with booted(rootfs, share, tmp_path) as container:
        try:
            _exercise_service(container, echoscu)
        except AssertionError as exc:
            journal = container.run(
                "journalctl", "--no-pager", "-n", "80", "-o", "short-precise", check=False
            ).stdout
            raise AssertionError(f"{exc}\n--- the container's journal (end):\n{journal}") from None
    print(f"nspawn test took {time.monotonic() - started:.1f} s")


def _exercise_service(c: Container, echoscu: str) -> None:
    # Installation: dpkg -i needs nothing the rootfs (minbase + declared Depends) lacks.
    c.run("dpkg", "-i", "/srv/share/dicomd.deb", timeout=300)
    uid = c.run("id", "-u", "dicomd").stdout.strip()

    # Disabled in /etc/default/dicomd: the start (postinst's, and ours) is skipped.
    c.run("systemctl", "start", "dicomd")
    state = c.show("dicomd", "ActiveState", "Result", "UnitFileState")
    assert state == {
        "ActiveState": "inactive",
        "Result": "exec-condition",
        "UnitFileState": "enabled",
    }, state
    c.wait_journal("set DICOMD_ENABLE=yes")

    # Enabled: Type=notify, so `systemctl start` returns once dicomd said READY=1.
    c.run("sed", "-i", "s/^DICOMD_ENABLE=.*/DICOMD_ENABLE=yes/", "/etc/default/dicomd")
    c.run("systemctl", "start", "dicomd")
    state = c.show("dicomd", "ActiveState", "SubState", "Type", "StatusText", "MainPID")
    assert state["ActiveState"] == "active" and state["SubState"] == "running", state
    assert state["Type"] == "notify"
    assert state["StatusText"].startswith("serving DICOMD on port 104"), state
    main_pid = state["MainPID"]

    # As user dicomd, with CAP_NET_BIND_SERVICE only (port 104), no new privileges, seccomp.
    status = c.run("cat", f"/proc/{main_pid}/status").stdout
    fields = {k: v.split() for k, _, v in (line.partition(":") for line in status.splitlines())}
    assert fields["Uid"] == [uid] * 4, fields["Uid"]
    assert fields["CapEff"] == ["0000000000000400"], fields["CapEff"]
    assert fields["NoNewPrivs"] == ["1"] and fields["Seccomp"] == ["2"]

    # C-ECHO on port 104 from the host's DCMTK, inside the container's network namespace.
    echo = run(
        ["nsenter", "-t", str(c.pid1), "-n", echoscu, "-aec", "DICOMD", "127.0.0.1", "104"],
        env={**SYSTEM_ENV, "TCP_NODELAY": "1"},
        check=False,
    )
    assert echo.returncode == 0, echo.stdout + echo.stderr
    c.run("dicomd", "echo", "127.0.0.1", "104", "--aec", "DICOMD")

    # Native journal entries with DICOM fields.
    by_calling_ae = c.wait_journal("association_accepted", "DICOM_CALLING_AE=ECHOSCU", "-o", "cat")
    assert "association_closed" in c.wait_journal(
        "association_closed", "DICOM_CALLING_AE=ECHOSCU", "-o", "cat"
    )
    assert "DICOMD_ECHO" not in by_calling_ae
    assert c.journal("DICOM_CALLING_AE=ECHOSCU", "-p", "warning", "-o", "cat").strip() == ""

    # Reload: SIGHUP via ExecReload, same process, the new configuration is in use.
    c.run("systemctl", "reload", "dicomd")
    state = c.show("dicomd", "ActiveState", "MainPID")
    assert state == {"ActiveState": "active", "MainPID": main_pid}, state
    c.wait_journal("reloaded files=")
    c.wait_journal("Reloaded dicomd.service")

    # Socket activation: systemd listens on 104, a connection starts dicomd, which adopts
    # the socket under the listener name "dicom".
    c.run("systemctl", "stop", "dicomd")
    c.run("systemctl", "start", "dicomd.socket")
    assert c.show("dicomd", "ActiveState")["ActiveState"] == "inactive"
    echo = run(
        ["nsenter", "-t", str(c.pid1), "-n", echoscu, "-aec", "DICOMD", "127.0.0.1", "104"],
        env={**SYSTEM_ENV, "TCP_NODELAY": "1"},
        check=False,
    )
    assert echo.returncode == 0, echo.stdout + echo.stderr
    assert c.show("dicomd", "ActiveState")["ActiveState"] == "active"
    c.wait_journal("socket_activation=True")
    c.run("systemctl", "stop", "dicomd.socket", "dicomd")

    # Watchdog: a frozen event loop (SIGSTOP) is aborted and restarted. WatchdogSec=2s in a
    # drop-in, so that the test does not wait the unit's 30 s.
    c.run("mkdir", "-p", "/etc/systemd/system/dicomd.service.d")
    c.sh(
        "printf '[Service]\\nWatchdogSec=2s\\n' "
        "> /etc/systemd/system/dicomd.service.d/test-watchdog.conf"
    )
    c.run("systemctl", "daemon-reload")
    c.run("systemctl", "start", "dicomd")
    frozen = c.show("dicomd", "MainPID")["MainPID"]
    c.run("kill", "-STOP", frozen)

    def restarted() -> bool:
        state = c.show("dicomd", "ActiveState", "MainPID", "NRestarts")
        return (
            state["ActiveState"] == "active"
            and state["MainPID"] not in ("0", frozen)
            and int(state["NRestarts"]) >= 1
        )

    wait_until("a watchdog restart", restarted, 30)
    c.wait_journal("Watchdog timeout")
    c.run("rm", "/etc/systemd/system/dicomd.service.d/test-watchdog.conf")
    c.run("systemctl", "daemon-reload")

    # Stop: SIGTERM, dicomd drains and exits 0.
    c.run("systemctl", "stop", "dicomd")
    state = c.show("dicomd", "ActiveState", "Result", "ExecMainStatus")
    assert state == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, state

    # Purge: unit and configuration gone, the system account kept.
    c.run("dpkg", "--purge", "dicomd", timeout=300)
    assert c.run("systemctl", "cat", "dicomd", check=False).returncode != 0
    assert c.run("test", "-e", "/etc/dicomd", check=False).returncode != 0
    assert c.run("id", "-u", "dicomd").stdout.strip() == uid
