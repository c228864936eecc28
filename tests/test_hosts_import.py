"""hosts.allow/hosts.deny importer, checked against Debian's tcpdmatch (package tcpd).

``tcpdmatch -d dicomd ADDRESS`` reads hosts.allow and hosts.deny from the current directory
(so the host's /etc files are never touched) and predicts what tcpd does for a client whose
name lookup fails, which is dicomd's situation: it resolves no names. For every rule set and
address below, dicomd's decision on the imported rules must be tcpdmatch's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import missing

from dicomd.access import AssociationFacts, decide
from dicomd.config import parse_config
from dicomd.importers.hosts_access import import_hosts
from dicomd.services.registry import Registry
from dicomd.services.verification import VerificationService

REGISTRY = Registry({"verification": VerificationService})

# (hosts.allow, hosts.deny, addresses); "{dir}" is the test's directory (for /file lists).
CASES: dict[str, tuple[str, str, list[str]]] = {
    "mostly closed, exact and prefix": (
        "dicomd: 10.0.0.1 192.168.\n",
        "ALL: ALL\n",
        ["10.0.0.1", "10.0.0.2", "192.168.7.9", "192.169.0.1", "::1"],
    ),
    "net/mask with EXCEPT": (
        "dicomd: 10.0.0.0/255.0.0.0 EXCEPT 10.1.0.0/255.255.0.0\n",
        "ALL: ALL\n",
        ["10.2.3.4", "10.1.3.4", "11.0.0.1", "10.255.255.255"],
    ),
    "nested EXCEPT": (
        "dicomd: ALL EXCEPT 10. EXCEPT 10.1.\n",
        "ALL: ALL\n",
        ["10.0.0.1", "10.1.0.1", "11.1.1.1", "2001:db8::1"],
    ),
    "net/len and invalid masks": (
        "dicomd: 10.0.0.0/8 172.16.0.1/32 192.168.0.0/0 1.2.3.4/255.255.255.255 5.5.5.0/1\n",
        "ALL: ALL\n",
        ["10.9.9.9", "172.16.0.1", "172.16.0.2", "192.168.0.1", "1.2.3.4", "5.5.5.1"],
    ),
    "non-contiguous mask and octal fields": (
        "dicomd: 10.0.0.0/255.0.255.0 010.0.0.0/255.0.0.0\n",
        "ALL: ALL\n",
        ["10.2.0.9", "10.2.1.9", "8.1.2.3", "9.0.0.1"],
    ),
    "IPv6 exact and prefix": (
        "dicomd: [::1] [2001:db8::]/32 [fe80::1]/10\n",
        "ALL: ALL\n",
        ["::1", "2001:db8:1::5", "2001:db9::1", "fe81::7", "fec0::1", "10.0.0.1"],
    ),
    "IPv4-mapped clients compare as IPv4": (
        "dicomd: 10.0.0.0/255.0.0.0 [::ffff:11.0.0.1]\n",
        "ALL: ALL\n",
        ["::ffff:10.1.2.3", "::ffff:11.0.0.1", "11.0.0.1"],
    ),
    "names never match without DNS": (
        "dicomd: localhost .example.org LOCAL KNOWN PARANOID @pacs\n",
        "ALL: ALL\n",
        ["127.0.0.1", "10.0.0.1"],
    ),
    "UNKNOWN and wildcards matching 'unknown' match everyone": (
        "dicomd: 10.0.0.1\n",
        "dicomd: UNKNOWN\n",
        ["10.0.0.1", "10.0.0.2", "::1"],
    ),
    "unk* wildcard": (
        "dicomd: unk*\n",
        "ALL: ALL\n",
        ["10.0.0.2"],
    ),
    "mostly open": (
        "",
        "dicomd: 10.0.0.0/255.255.255.0, 10.0.1.5\nALL EXCEPT dicomd: ALL\n",
        ["10.0.0.7", "10.0.1.5", "10.0.1.6", "192.0.2.1"],
    ),
    "daemon lists": (
        "sshd, dicomd: 10.0.0.1\nALL EXCEPT dicomd: 10.0.0.2\n"
        "ALL EXCEPT sshd EXCEPT dicomd: 10.0.0.3\nDICOM*: 10.0.0.4\nstorescp: 10.0.0.5\n"
        "dicomd@ALL: 10.0.0.6\n",
        "ALL: ALL\n",
        ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"],
    ),
    "allow and deny options": (
        "dicomd: 10.0.0.0/255.0.0.0 EXCEPT 10.9.0.0/255.255.0.0 : deny\n"
        "dicomd: ALL : severity auth.info : allow\n",
        "",
        ["10.1.1.1", "10.9.1.1", "192.0.2.1"],
    ),
    "option errors refuse": (
        "dicomd: 10.0.0.1 : bogus\ndicomd: 10.0.0.2 : allow : deny\n"
        "dicomd: 10.0.0.3 :\ndicomd: 10.0.0.4 : spawn /bin/true\n",
        "",
        ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"],
    ),
    "allow option in hosts.deny": (
        "",
        "dicomd: 10.0.0.1 : allow\ndicomd: ALL\n",
        ["10.0.0.1", "10.0.0.2"],
    ),
    "comments, blanks before '#', continuation": (
        "# dicomd: ALL\n\n # x: 10.0.0.9\ndicomd: 10.0.0.1 \\\n  10.0.0.2\n",
        "ALL: ALL\n",
        ["10.0.0.1", "10.0.0.2", "10.0.0.9", "10.0.0.3"],
    ),
    "line without a final newline is ignored": (
        "dicomd: 10.0.0.1",
        "ALL: ALL\n",
        ["10.0.0.1"],
    ),
    "file lists": (
        "dicomd: {dir}/clients.txt\n",
        "ALL: ALL\n",
        ["10.0.0.1", "11.2.3.4", "::1", "12.0.0.1"],
    ),
    "user@host": (
        "dicomd: ALL@10. UNKNOWN@11. KNOWN@12. someone@13.\n",
        "ALL: ALL\n",
        ["10.0.0.1", "11.0.0.1", "12.0.0.1", "13.0.0.1"],
    ),
    "address wildcards that are prefixes": (
        "dicomd: 10.1.* 10.2.*.*\n",
        "ALL: ALL\n",
        ["10.1.5.5", "10.2.0.1", "10.3.0.1"],
    ),
    "malformed lines are skipped": (
        "dicomd 10.0.0.1\ndicomd: 10.0 10.0.0.256 10.0.0.1.\n",
        "ALL: ALL\n",
        ["10.0.0.1", "10.0.0.0"],
    ),
    "case-insensitive keywords": (
        "DICOMD: all except 10.0.0.1\n",
        "all: all\n",
        ["10.0.0.1", "10.0.0.2"],
    ),
}


def tcpdmatch() -> str:
    path = shutil.which("tcpdmatch") or "/usr/sbin/tcpdmatch"
    if not os.access(path, os.X_OK):
        missing("program 'tcpdmatch' (Debian package tcpd)")
    return path


def oracle(exe: str, directory: Path, address: str) -> bool:
    out = subprocess.run(
        [exe, "-d", "dicomd", address],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    verdict = next(line.split()[-1] for line in out.splitlines() if line.startswith("access:"))
    assert verdict in ("granted", "denied", "delegated"), out
    return verdict == "granted"


def dicomd_allows(fragment: dict, address: str) -> bool:
    config = parse_config(
        {
            "listeners": [{"name": "dicom", "port": 11112}],
            "local_aes": [{"ae_title": "DICOMD", "services": {"verification": None}}],
            **fragment,
        },
        registry=REGISTRY,
    )
    facts = AssociationFacts(address, "ANYONE", "DICOMD", listener="dicom")
    return decide(config, facts).allowed


def test_enough_cases() -> None:
    assert sum(len(addresses) for *_, addresses in CASES.values()) >= 50


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_import_agrees_with_tcpdmatch(tmp_path: Path, case: str) -> None:
    exe = tcpdmatch()
    allow, deny, addresses = CASES[case]
    allow = allow.replace("{dir}", str(tmp_path))
    (tmp_path / "hosts.allow").write_text(allow)
    (tmp_path / "hosts.deny").write_text(deny)
    (tmp_path / "clients.txt").write_text("10.0.0.1 11.\n[::1]\n")
    result = import_hosts(allow, deny)
    fragment = result.fragment()
    disagreements = []
    for address in addresses:
        expected = oracle(exe, tmp_path, address)
        got = dicomd_allows(fragment, address)
        if expected != got:
            disagreements.append(f"{address}: tcpdmatch {expected}, dicomd {got}")
    assert not disagreements, "\n".join(disagreements) + "\n" + result.yaml(("allow", "deny"))


def test_notes_name_what_was_not_converted() -> None:
    result = import_hosts(
        "dicomd: pacs.example.org 10.0.0.1\nsshd@10.0.0.1: ALL\ndicomd: 1?.0.0.1\ndicomd: .5\n",
        "dicomd: ALL : twist /bin/echo no\n",
        allow_name="/etc/hosts.allow",
        deny_name="/etc/hosts.deny",
    )
    text = [str(n) for n in result.notes if not n.converted]
    assert (
        "/etc/hosts.allow:1: 'pacs.example.org': a host name; dicomd resolves no names: "
        "matches no client" in text
    )
    assert any(t.startswith("/etc/hosts.allow:3: '1?.0.0.1': a wildcard") for t in text)
    assert any(t.startswith("/etc/hosts.allow:4: '.5': an address suffix") for t in text)
    assert any("twist" in t and t.startswith("/etc/hosts.deny:1") for t in text)
    assert result.rules[0] == {
        "name": "hosts.allow:1",
        "action": "allow",
        "from": ["10.0.0.1/32"],
    }
    assert result.rules[-1] == {"name": "hosts.deny:1", "action": "deny"}


def test_cli_prints_a_valid_fragment(tmp_path: Path) -> None:
    import yaml

    (tmp_path / "hosts.allow").write_text("dicomd: 10.0.0.0/255.0.0.0 host.example\n")
    (tmp_path / "hosts.deny").write_text("ALL: ALL\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dicomd",
            "import-hosts",
            "--allow",
            str(tmp_path / "hosts.allow"),
            "--deny",
            str(tmp_path / "hosts.deny"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    fragment = yaml.safe_load(result.stdout)
    assert fragment["access"]["rules"][0]["from"] == ["10.0.0.0/8"]
    assert "'host.example': a host name" in result.stdout
    assert "1 item(s) not converted" in result.stderr
    assert dicomd_allows(fragment, "10.1.2.3")
    assert not dicomd_allows(fragment, "11.1.2.3")
