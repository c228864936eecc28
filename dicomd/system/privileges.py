"""Dropping root privileges for starts as root outside systemd (config ``run_as``).

Under systemd the shipped unit uses ``User=dicomd`` and never runs this as root; when an
administrator starts dicomd as root by hand (or from another init), the supervisor binds
the listeners, loads TLS keys and opens files first, then calls :func:`drop_privileges`.

Call it before any thread starts (no executor use, no ``asyncio.to_thread`` before it):
glibc applies setresuid/setresgid to every thread, but ``PR_SET_NO_NEW_PRIVS`` is per
thread and is only inherited by threads created afterwards.
"""

from __future__ import annotations

import ctypes
import grp
import os
import pwd

__all__ = ["PrivilegeError", "drop_privileges", "running_as_root"]

# <linux/prctl.h>
PR_SET_NO_NEW_PRIVS = 38


class PrivilegeError(RuntimeError):
    """The privilege drop could not be done or did not hold; the daemon must not go on."""


def running_as_root() -> bool:
    return os.geteuid() == 0


def _resolve_user(user: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(user)
    except KeyError:
        pass
    # A numeric run_as (e.g. "999") names a uid, as chown and systemd's User= accept.
    if user.isdigit():
        try:
            return pwd.getpwuid(int(user))
        except KeyError:
            pass
    raise PrivilegeError(f"cannot drop privileges: user {user!r} does not exist")


def _resolve_group(group: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        pass
    if group.isdigit():
        try:
            return grp.getgrgid(int(group)).gr_gid
        except KeyError:
            pass
    raise PrivilegeError(f"cannot drop privileges: group {group!r} does not exist")


def _set_no_new_privs() -> None:
    """prctl(PR_SET_NO_NEW_PRIVS, 1): no later execve can gain privileges (setuid, caps)."""
    libc = ctypes.CDLL(None, use_errno=True)
    args = (ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
    if libc.prctl(ctypes.c_int(PR_SET_NO_NEW_PRIVS), *args) != 0:
        err = ctypes.get_errno()
        raise PrivilegeError(f"prctl(PR_SET_NO_NEW_PRIVS) failed: {os.strerror(err)}")


def drop_privileges(user: str, group: str | None = None) -> None:
    """Become *user* (and *group*, default the user's primary group) for good.

    Order matters: supplementary groups and gids can only be changed while still root,
    so initgroups → setresgid → setresuid, after forbidding regaining privileges through
    execve (no_new_privs); then prove the drop is irreversible (setuid(0) must fail).

    When not running as root, the call succeeds only if the process already is that
    user and group (e.g. the unit's ``User=dicomd`` with ``run_as: dicomd`` in the config);
    otherwise it raises, since silently staying another user would be worse.
    """
    pw = _resolve_user(user)
    uid = pw.pw_uid
    gid = pw.pw_gid if group is None else _resolve_group(group)
    if uid == 0:
        raise PrivilegeError(f"cannot drop privileges to {user!r}: it is uid 0 (root)")

    if os.geteuid() != 0:
        if os.getresuid() == (uid, uid, uid) and os.getresgid() == (gid, gid, gid):
            _set_no_new_privs()
            return
        raise PrivilegeError(
            f"cannot switch to user {pw.pw_name!r} (uid {uid}, gid {gid}): not running as "
            f"root (uid {os.getuid()}, gid {os.getgid()})"
        )

    # First, while still root: no_new_privs does not hinder the id changes below (it only
    # governs execve), and set first it is never missing from a process that already shows
    # the new uid (a check of /proc/PID/status in between once saw uid 995, NoNewPrivs 0).
    _set_no_new_privs()
    try:
        # Supplementary groups from /etc/group for the target user, plus gid; dropping
        # root's own supplementary groups is the point (root may be in e.g. "disk").
        os.initgroups(pw.pw_name, gid)
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as exc:
        raise PrivilegeError(
            f"cannot drop privileges to user {pw.pw_name!r} (uid {uid}, gid {gid}): {exc}"
        ) from exc

    # Trust but verify: with saved-set-uid 0 or a kept capability this would succeed.
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise PrivilegeError("privilege drop did not hold: setuid(0) succeeded afterwards")
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise PrivilegeError(
            f"privilege drop did not hold: uids {os.getresuid()}, gids {os.getresgid()}"
        )
