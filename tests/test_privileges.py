"""Privilege drop, checked from the kernel's view (/proc/self/status) in a child process.

The drop itself always runs in a fresh ``python -c`` child: it is irreversible, and it
must not touch the test runner.
"""

from __future__ import annotations

import grp
import os
import pwd
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from dicomd.system.privileges import PrivilegeError, drop_privileges, running_as_root


def require_root() -> None:
    if os.geteuid() != 0:
        # In CI the environment promises root; a silent skip would hide a lost test.
        (pytest.fail if os.environ.get("CI") == "true" else pytest.skip)("needs root")


@dataclass(frozen=True)
class SystemUser:
    name: str
    uid: int
    gid: int
    extra_group: str
    extra_gid: int


@pytest.fixture(scope="module")
def test_user() -> Iterator[SystemUser]:
    require_root()
    suffix = secrets.token_hex(4)
    name, extra = f"dicomd-test-{suffix}", f"dicomd-tsup-{suffix}"
    subprocess.run(["groupadd", "--system", extra], check=True)
    try:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "--groups",
                extra,
                name,
            ],
            check=True,
        )
        try:
            pw = pwd.getpwnam(name)
            yield SystemUser(name, pw.pw_uid, pw.pw_gid, extra, grp.getgrnam(extra).gr_gid)
        finally:
            subprocess.run(["userdel", name], check=False)
            # userdel removes the user's own group only when USERGROUPS_ENAB says so.
            subprocess.run(["groupdel", name], check=False, capture_output=True)
    finally:
        subprocess.run(["groupdel", extra], check=False)


_DROP_AND_REPORT = """
import sys
from dicomd.system.privileges import drop_privileges
drop_privileges(sys.argv[1], sys.argv[2] or None)
try:
    open("/etc/shadow").close()
    print("shadow: readable")
except PermissionError:
    print("shadow: denied")
with open("/proc/self/status") as f:
    print(f.read())
"""


def run_child(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",  # the dropped user may not be able to enter the test's directory
    )


def parse_status(text: str) -> dict[str, list[str]]:
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.split()
    return fields


def test_running_as_root() -> None:
    assert running_as_root() == (os.geteuid() == 0)


def test_drop_to_user_and_primary_group(test_user: SystemUser) -> None:
    result = run_child(_DROP_AND_REPORT, test_user.name, "")
    assert result.returncode == 0, result.stderr
    assert "shadow: denied" in result.stdout
    status = parse_status(result.stdout)
    # real, effective, saved and filesystem ids: all four must be the user's.
    assert status["Uid"] == [str(test_user.uid)] * 4
    assert status["Gid"] == [str(test_user.gid)] * 4
    # initgroups: the user's own memberships, none of root's.
    assert sorted(map(int, status["Groups"])) == sorted({test_user.gid, test_user.extra_gid})
    assert status["CapEff"] == ["0000000000000000"]
    assert status["CapPrm"] == ["0000000000000000"]
    assert status["CapAmb"] == ["0000000000000000"]
    assert status["NoNewPrivs"] == ["1"]


def test_drop_with_explicit_group(test_user: SystemUser) -> None:
    result = run_child(_DROP_AND_REPORT, test_user.name, test_user.extra_group)
    assert result.returncode == 0, result.stderr
    status = parse_status(result.stdout)
    assert status["Uid"] == [str(test_user.uid)] * 4
    assert status["Gid"] == [str(test_user.extra_gid)] * 4
    assert str(test_user.extra_gid) in status["Groups"]
    assert "0" not in status["Groups"]
    assert status["NoNewPrivs"] == ["1"]


def test_numeric_user(test_user: SystemUser) -> None:
    result = run_child(_DROP_AND_REPORT, str(test_user.uid), "")
    assert result.returncode == 0, result.stderr
    assert parse_status(result.stdout)["Uid"] == [str(test_user.uid)] * 4


def test_not_root_any_more(test_user: SystemUser) -> None:
    """Once dropped, switching again fails loudly; asking for the same user is a no-op."""
    script = """
import sys
from dicomd.system.privileges import PrivilegeError, drop_privileges
drop_privileges(sys.argv[1], None)
drop_privileges(sys.argv[1], None)  # already that user: fine
try:
    drop_privileges("nobody", None)
except PrivilegeError as exc:
    print("PrivilegeError:", exc)
"""
    result = run_child(script, test_user.name)
    assert result.returncode == 0, result.stderr
    assert "PrivilegeError: cannot switch to user 'nobody'" in result.stdout
    assert "not running as root" in result.stdout


def test_unknown_user_is_named() -> None:
    # Resolution happens before anything changes, so this is safe in the test process.
    with pytest.raises(PrivilegeError, match="user 'dicomd-no-such-user' does not exist"):
        drop_privileges("dicomd-no-such-user", None)
    assert os.geteuid() == os.getuid()


def test_unknown_group_is_named() -> None:
    with pytest.raises(PrivilegeError, match="group 'dicomd-no-such-group' does not exist"):
        drop_privileges("nobody", "dicomd-no-such-group")


def test_refuses_to_drop_to_root() -> None:
    with pytest.raises(PrivilegeError, match="uid 0"):
        drop_privileges("root", None)
