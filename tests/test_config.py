"""Configuration loading: every error names file:line:column and the key path, exactly."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import ClassVar

import pytest

import dicomd.config as config_module
from dicomd.config import (
    ConfigError,
    Finding,
    LoadedConfig,
    WorklistSourceRef,
    check_config,
    development_defaults,
    load_config,
    parse_config,
)
from dicomd.services.base import Offer, Service, ServiceOptions
from dicomd.services.registry import Registry, discover
from dicomd.services.verification import VerificationService

ROOT = Path(__file__).resolve().parent.parent


class FakeOptions(ServiceOptions):
    transfer_syntaxes: list[str] = []
    source: WorklistSourceRef | None = None


class FakeService(Service):
    """A plug-in with options, to test key paths into service options."""

    name: ClassVar[str] = "fake"
    Options: ClassVar[type[ServiceOptions]] = FakeOptions
    permissions: ClassVar[tuple[str, ...]] = ("fake-verb",)

    def offers(self) -> list[Offer]:
        return []

    async def handle(self, association: object, request: object) -> None:  # type: ignore[override]
        return None


REGISTRY = Registry({"verification": VerificationService, "fake": FakeService})

# A valid configuration; most cases below change one thing in it.
BASE = """\
listeners:
  - name: dicom
    port: 11112
local_aes:
  - ae_title: DICOMD
    services:
      verification:
"""


def write(directory: Path, text: str, name: str = "dicomd.yaml") -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def load(path: Path) -> LoadedConfig:
    return load_config(path, registry=REGISTRY)


def errors(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == "\n".join(str(f) for f in info.value.findings)
    return [str(f) for f in info.value.findings]


# Each case: configuration text, and the exact findings ("{f}" is the file's path).
BAD_CONFIGS: dict[str, tuple[str, list[str]]] = {
    "wrong type, number": (
        BASE + "shutdown_timeout: soon\n",
        ["{f}:8:19: shutdown_timeout: expected a number, got 'soon'"],
    ),
    "wrong type, boolean": (
        BASE + "run_as:\n  allow_root: maybe\n",
        ["{f}:9:15: run_as.allow_root: expected true or false, got 'maybe'"],
    ),
    "wrong type, mapping": (
        BASE + "limits: [1, 2]\n",
        ["{f}:8:9: limits: expected a mapping, got a list"],
    ),
    "wrong type, integer given as boolean": (
        BASE + "limits:\n  max_associations: true\n",
        ["{f}:9:21: limits.max_associations: expected an integer, got true"],
    ),
    "literal": (
        BASE + "event_loop: fast\n",
        ["{f}:8:13: event_loop: must be one of: auto, uvloop, asyncio (got 'fast')"],
    ),
    "literal in a dict of loggers": (
        BASE + "logging:\n  levels:\n    dicomd.net: loud\n",
        [
            "{f}:10:17: logging.levels['dicomd.net']: "
            "must be one of: debug, info, warning, error (got 'loud')"
        ],
    ),
    "unknown key, top level": (
        BASE + "listner: []\n",
        [
            "{f}:8:1: unknown key 'listner' (did you mean 'listeners'? "
            "expected one of: access, archive, event_loop, limits, listeners, local_aes, "
            "logging, peers, run_as, shutdown_timeout, workers, worklist_sources)"
        ],
    ),
    "unknown key, nested": (
        """\
        listeners:
          - name: dicom
            prot: 11112
        local_aes:
          - ae_title: DICOMD
            services:
              verification:
        """,
        [
            "{f}:2:5: listeners[0]: missing required key 'port'",
            "{f}:3:5: listeners[0]: unknown key 'prot' "
            "(did you mean 'port'? expected one of: address, backlog, name, port, tls)",
        ],
    ),
    "unknown key in service options": (
        BASE + "      fake:\n        transfer_syntax: []\n",
        [
            "{f}:9:9: local_aes[0].services.fake: unknown key 'transfer_syntax' "
            "(did you mean 'transfer_syntaxes'? expected one of: source, transfer_syntaxes)"
        ],
    ),
    "AE title too long": (
        BASE.replace("ae_title: DICOMD", "ae_title: ARCHIVE_TOO_LONG_1"),
        ["{f}:5:15: local_aes[0].ae_title: 'ARCHIVE_TOO_LONG_1' is longer than 16 characters"],
    ),
    "AE title with a backslash": (
        BASE.replace("ae_title: DICOMD", "ae_title: 'DI\\COM'"),
        ["{f}:5:15: local_aes[0].ae_title: AE title 'DI\\COM' must not contain a backslash"],
    ),
    "AE title with a control character": (
        BASE.replace("ae_title: DICOMD", 'ae_title: "DI\\tCOM"'),
        [
            "{f}:5:15: local_aes[0].ae_title: "
            "AE title 'DI\\tCOM' must not contain control characters"
        ],
    ),
    "AE title of spaces": (
        BASE.replace("ae_title: DICOMD", "ae_title: '    '"),
        ["{f}:5:15: local_aes[0].ae_title: AE title '    ' must not be only spaces"],
    ),
    "AE title empty": (
        BASE.replace("ae_title: DICOMD", "ae_title: ''"),
        ["{f}:5:15: local_aes[0].ae_title: AE title must not be empty"],
    ),
    "AE title not ASCII": (
        BASE.replace("ae_title: DICOMD", "ae_title: ÄRZTE"),
        ["{f}:5:15: local_aes[0].ae_title: AE title 'ÄRZTE' must contain only ASCII characters"],
    ),
    "AE title read as a number": (
        BASE.replace("ae_title: DICOMD", "ae_title: 104"),
        ['{f}:5:15: local_aes[0].ae_title: expected a string, got 104 (quote it: "104")'],
    ),
    "port 0": (
        BASE.replace("port: 11112", "port: 0"),
        ["{f}:3:11: listeners[0].port: must be at least 1, got 0"],
    ),
    "port 70000": (
        BASE.replace("port: 11112", "port: 70000"),
        ["{f}:3:11: listeners[0].port: must be at most 65535, got 70000"],
    ),
    "port abc": (
        BASE.replace("port: 11112", "port: abc"),
        ["{f}:3:11: listeners[0].port: expected an integer, got 'abc'"],
    ),
    "port missing": (
        BASE.replace("    port: 11112\n", ""),
        ["{f}:2:5: listeners[0]: missing required key 'port'"],
    ),
    "bad address": (
        BASE.replace("    port: 11112\n", "    port: 11112\n    address: dicom server\n"),
        [
            "{f}:4:14: listeners[0].address: "
            "'dicom server' is neither an IP address nor a valid host name"
        ],
    ),
    "bad IPv4 address": (
        BASE.replace("    port: 11112\n", "    port: 11112\n    address: 10.0.0.300\n"),
        ["{f}:4:14: listeners[0].address: '10.0.0.300' is not a valid IPv4 address"],
    ),
    "bad listener name": (
        BASE.replace("name: dicom", "name: dicom tls"),
        [
            "{f}:2:11: listeners[0].name: "
            "name 'dicom tls' may contain only letters, digits, '_', '.' and '-'"
        ],
    ),
    "no listeners": (
        "listeners: []\n" + BASE[BASE.index("local_aes:") :],
        ["{f}:1:12: listeners: must not be empty"],
    ),
    "missing required top-level key": (
        BASE.split("local_aes:")[0],
        ["{f}:1:1: missing required key 'local_aes'"],
    ),
    "duplicate AE titles (spaces are not significant)": (
        BASE + "  - ae_title: ' DICOMD '\n    services:\n      verification:\n",
        [
            "{f}:8:15: local_aes[1].ae_title: duplicate AE title 'DICOMD' "
            "(first defined at {f}:5:15)"
        ],
    ),
    "duplicate listener names": (
        BASE.replace("local_aes:", "  - name: dicom\n    port: 11113\nlocal_aes:"),
        [
            "{f}:4:11: listeners[1].name: duplicate listener name 'dicom' "
            "(first defined at {f}:2:11)"
        ],
    ),
    "duplicate ports": (
        BASE.replace("local_aes:", "  - name: dicom2\n    port: 11112\nlocal_aes:"),
        [
            "{f}:5:11: listeners[1].port: port 11112 on 0.0.0.0 is already used by "
            "listener 'dicom' on 0.0.0.0 (defined at {f}:3:11)"
        ],
    ),
    "port clash with the wildcard address": (
        BASE.replace(
            "local_aes:", "  - name: local\n    address: 127.0.0.1\n    port: 11112\nlocal_aes:"
        ),
        [
            "{f}:6:11: listeners[1].port: port 11112 on 127.0.0.1 is already used by "
            "listener 'dicom' on 0.0.0.0 (defined at {f}:3:11)"
        ],
    ),
    "listener reference that does not exist": (
        BASE.replace("    services:", "    listeners: [dicom, dicom-tls]\n    services:"),
        ["{f}:6:24: local_aes[0].listeners[1]: unknown listener 'dicom-tls' (known: dicom)"],
    ),
    "unknown service": (
        BASE + "      storage:\n",
        ["{f}:8:7: local_aes[0].services: unknown service 'storage' (known: fake, verification)"],
    ),
    "no service enabled": (
        BASE.replace("      verification:\n", "      verification: false\n"),
        [
            "{f}:7:7: local_aes[0].services: "
            "at least one service must be enabled (known: fake, verification)"
        ],
    ),
    "wrong type deep in service options": (
        BASE + "      fake:\n        transfer_syntaxes: [1.2.840.10008.1.2.1, '1.2', 3]\n",
        [
            "{f}:9:57: local_aes[0].services.fake.transfer_syntaxes[2]: "
            'expected a string, got 3 (quote it: "3")'
        ],
    ),
    "service option naming an unknown worklist source": (
        BASE + "      fake:\n        source: ris\n",
        [
            "{f}:9:17: local_aes[0].services.fake.source: "
            "unknown worklist source 'ris' (known: none)"
        ],
    ),
    "TLS require without a CA": (
        BASE.replace(
            "local_aes:",
            "    tls:\n      certificate: /etc/dicomd/tls/server.crt\n"
            "      private_key: /etc/dicomd/tls/server.key\nlocal_aes:",
        ),
        [
            "{f}:5:7: listeners[0].tls: peer_certificate 'require' needs ca_file or "
            "ca_directory to verify client certificates"
        ],
    ),
    "TLS verify without a CA": (
        BASE.replace(
            "local_aes:",
            "    tls:\n      certificate: /c.pem\n      private_key: /k.pem\n"
            "      peer_certificate: verify\nlocal_aes:",
        ),
        [
            "{f}:7:25: listeners[0].tls.peer_certificate: peer_certificate 'verify' needs "
            "ca_file or ca_directory to verify client certificates"
        ],
    ),
    "TLS version": (
        BASE.replace(
            "local_aes:",
            "    tls:\n      certificate: /c.pem\n      private_key: /k.pem\n"
            "      peer_certificate: ignore\n      min_version: 1.1\nlocal_aes:",
        ),
        ["{f}:8:20: listeners[0].tls.min_version: must be one of: 1.2, 1.3 (got '1.1')"],
    ),
    "bad layout placeholder": (
        BASE + "archive:\n  layout: '{PatientName}/{SOPInstanceUID}.dcm'\n",
        [
            "{f}:9:11: archive.layout: unknown placeholder {PatientName} (allowed: Modality, "
            "PatientID, SOPInstanceUID, SeriesInstanceUID, StudyDate, StudyInstanceUID)"
        ],
    ),
    "layout without SOPInstanceUID": (
        BASE + "archive:\n  layout: '{StudyInstanceUID}.dcm'\n",
        ["{f}:9:11: archive.layout: must contain {SOPInstanceUID}"],
    ),
    "layout escaping the archive": (
        BASE + "archive:\n  layout: '../{SOPInstanceUID}'\n",
        ["{f}:9:11: archive.layout: must not contain '..'"],
    ),
    "max_pdu_length 100": (
        BASE + "limits:\n  max_pdu_length: 100\n",
        [
            "{f}:9:19: limits.max_pdu_length: "
            "must be 0 (unlimited) or between 4096 and 4294967295, got 100"
        ],
    ),
    "negative timeout": (
        BASE + "limits:\n  dimse_timeout: -1\n",
        ["{f}:9:18: limits.dimse_timeout: must be greater than 0, got -1"],
    ),
    "peer references": (
        BASE
        + """\
peers:
  - name: pacs
    ae_title: PACS
    host: pacs.example
    port: 104
    services: [echo, store, fly]
    allowed_move_destinations: [pacs, viewer]
""",
        [
            "{f}:13:29: peers[0].services[2]: unknown service 'fly' "
            "(known: commitment, echo, fake-verb, find, get, move, mpps, store, worklist)",
            "{f}:14:33: peers[0].allowed_move_destinations[0]: peer 'pacs' is not a move "
            "destination (set move_destination: true on it)",
            "{f}:14:39: peers[0].allowed_move_destinations[1]: unknown peer 'viewer' (known: pacs)",
        ],
    ),
    "access rules": (
        BASE
        + """\
access:
  rules:
    - name: lan
      from: [10.0.0.0/8, 10.1.2.3, intranet]
      called: [DICOMD, ARCHIVE]
      listeners: [dicom-tls]
      action: permit
    - name: lan
""",
        [
            "{f}:11:36: access.rules[0].from[2]: 'intranet' is not an IP address or network "
            "(such as 10.1.0.0/16 or fd00::/8)",
            "{f}:12:24: access.rules[0].called[1]: unknown local AE title 'ARCHIVE' "
            "(known: DICOMD)",
            "{f}:13:19: access.rules[0].listeners[0]: unknown listener 'dicom-tls' (known: dicom)",
            "{f}:14:15: access.rules[0].action: must be one of: allow, deny (got 'permit')",
            "{f}:15:13: access.rules[1].name: duplicate access rule name 'lan' "
            "(first defined at {f}:10:13)",
        ],
    ),
    "worklist source without a path": (
        BASE + "worklist_sources:\n  - name: ris\n    kind: folder\n",
        ["{f}:9:5: worklist_sources[0]: kind 'folder' needs a path"],
    ),
    "YAML syntax error": (
        BASE + "limits:\n  acse_timeout: 30\n dimse_timeout: 60\n",
        ["{f}:10:2: YAML syntax error: expected <block end>, but found '<block mapping start>'"],
    ),
    "YAML duplicate key": (
        BASE.replace("    port: 11112\n", "    port: 11112\n    port: 11113\n"),
        ["{f}:4:5: listeners[0]: duplicate key 'port' (first defined at {f}:3:5)"],
    ),
    "top level not a mapping": (
        "- listeners\n",
        ["{f}:1:1: the top level must be a mapping, got a list"],
    ),
    "several errors in one run": (
        """\
        event_loop: fast
        listeners:
          - name: dicom
            port: 0
        local_aes:
          - ae_title: THIS_AE_TITLE_IS_TOO_LONG
            listeners: [nowhere]
            services:
              verification:
        limits:
          max_pdu_length: 100
        """,
        [
            "{f}:1:13: event_loop: must be one of: auto, uvloop, asyncio (got 'fast')",
            "{f}:4:11: listeners[0].port: must be at least 1, got 0",
            "{f}:6:15: local_aes[0].ae_title: "
            "'THIS_AE_TITLE_IS_TOO_LONG' is longer than 16 characters",
            "{f}:7:17: local_aes[0].listeners[0]: unknown listener 'nowhere' (known: dicom)",
            "{f}:11:19: limits.max_pdu_length: "
            "must be 0 (unlimited) or between 4096 and 4294967295, got 100",
        ],
    ),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS), ids=list(BAD_CONFIGS))
def test_bad_config(tmp_path: Path, case: str) -> None:
    text, expected = BAD_CONFIGS[case]
    path = write(tmp_path, text)
    assert errors(path) == [line.replace("{f}", str(path)) for line in expected]


def test_unreadable_file_is_a_directory(tmp_path: Path) -> None:
    path = tmp_path / "dicomd.yaml"
    path.mkdir()
    assert errors(path) == [f"{path}: cannot read: Is a directory"]


def test_unreadable_file_permission(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    path.chmod(0)
    if os.geteuid() != 0:
        assert errors(path) == [f"{path}: cannot read: Permission denied"]
        return
    # Root reads files whatever their mode: check as 'nobody' in a forked child, which
    # already has every module loaded (the interpreter may live where nobody can read),
    # on a file in a directory nobody can traverse (pytest's tmp_path parents are 0700).
    import shutil
    import tempfile

    public = Path(tempfile.mkdtemp(prefix="dicomd-perm-"))
    public.chmod(0o755)
    path = write(public, BASE)
    path.chmod(0)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(read_end)
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            os.write(write_end, "\n".join(errors(path)).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        found = pipe.read().decode()
    os.waitpid(pid, 0)
    shutil.rmtree(public)
    assert found == f"{path}: cannot read: Permission denied"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert errors(path) == [f"{path}: cannot read: No such file or directory"]


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "dicomd.yaml"
    path.write_bytes(BASE.encode() + b"# caf\xe9\n")
    assert errors(path) == [
        f"{path}: cannot read: not UTF-8 text (byte 0xe9 at offset {len(BASE) + 5})"
    ]


def test_all_files_are_read_before_reporting(tmp_path: Path) -> None:
    main = write(tmp_path, BASE + "limits: {\n")
    broken = write(tmp_path, "peers: [\n", "conf.d/10-peers.yaml")
    assert errors(main) == [
        f"{main}:9:1: YAML syntax error: expected the node content, but found '<stream end>'",
        f"{broken}:2:1: YAML syntax error: expected the node content, but found '<stream end>'",
    ]


# conf.d


def test_conf_d_duplicate_ae_across_files(tmp_path: Path) -> None:
    main = write(tmp_path, BASE)
    extra = write(
        tmp_path,
        """\
        local_aes:
          - ae_title: STORE
            services: {verification: }
          - ae_title: DICOMD
            services: {verification: }
        """,
        "conf.d/20-aes.yaml",
    )
    assert errors(main) == [
        f"{extra}:4:15: local_aes[2].ae_title: duplicate AE title 'DICOMD' "
        f"(first defined at {main}:5:15)"
    ]


def test_conf_d_mapping_vs_scalar(tmp_path: Path) -> None:
    main = write(tmp_path, BASE + "limits:\n  acse_timeout: 10\n")
    extra = write(tmp_path, "limits: 5\n", "conf.d/10-limits.yaml")
    assert errors(main) == [
        f"{extra}:1:9: limits: cannot merge a scalar with the mapping at {main}:9:3"
    ]


def test_conf_d_named_list_vs_mapping(tmp_path: Path) -> None:
    main = write(tmp_path, BASE)
    extra = write(tmp_path, "listeners:\n  name: other\n", "conf.d/10-x.yaml")
    assert errors(main) == [
        f"{extra}:2:3: listeners: cannot merge a mapping with the list at {main}:2:3"
    ]


def test_conf_d_errors_point_into_the_right_file(tmp_path: Path) -> None:
    main = write(tmp_path, BASE)
    extra = write(
        tmp_path,
        """\
        # peers of the cardiology department
        peers:
          - name: echo-lab
            ae_title: ECHO_LAB
            host: 10.3.0.7
            port: 104000
        """,
        "conf.d/30-cardio.yaml",
    )
    assert errors(main) == [f"{extra}:6:11: peers[0].port: must be at most 65535, got 104000"]


def test_conf_d_merge(tmp_path: Path) -> None:
    main = write(
        tmp_path,
        BASE
        + """\
limits:
  acse_timeout: 10
  dimse_timeout: 20
logging:
  level: info
access:
  rules:
    - name: echo
      services: [echo]
""",
    )
    write(
        tmp_path,
        """\
        limits:
          dimse_timeout: 90
        logging:
          level: debug
          levels: {dicomd.net: warning}
        listeners:
          - name: dicom-tls
            port: 2762
        access:
          default: allow
          rules:
            - name: lan
              from: [10.0.0.0/8]
        """,
        "conf.d/10-site.yaml",
    )
    write(tmp_path, "logging:\n  level: warning\n", "conf.d/20-quiet.yaml")
    write(tmp_path, "event_loop: nonsense\n", "conf.d/20-quiet.yaml.dpkg-old")
    write(tmp_path, "event_loop: nonsense\n", "conf.d/.30-hidden.yaml")
    yml = write(tmp_path, "event_loop: nonsense\n", "conf.d/40-typo.yml")
    loaded = load(main)
    config = loaded.config
    assert loaded.files == (
        main,
        tmp_path / "conf.d/10-site.yaml",
        tmp_path / "conf.d/20-quiet.yaml",
    )
    assert not loaded.is_default
    assert config.limits.acse_timeout == 10  # kept from the main file
    assert config.limits.dimse_timeout == 90  # overridden by 10-site
    assert config.logging.level == "warning"  # overridden again by 20-quiet
    assert config.logging.levels == {"dicomd.net": "warning"}
    assert [listener.name for listener in config.listeners] == ["dicom", "dicom-tls"]
    assert [rule.name for rule in config.access.rules] == ["echo", "lan"]
    assert config.access.default == "allow"
    assert config.event_loop == "auto"
    assert [str(w) for w in loaded.warnings] == [
        f"{yml}: warning: ignored: only files ending in .yaml are read"
    ]


def test_conf_d_beside_explicit_config(tmp_path: Path) -> None:
    main = write(tmp_path / "site", BASE)
    write(tmp_path / "site", "shutdown_timeout: 5\n", "conf.d/10.yaml")
    assert load(main).config.shutdown_timeout == 5


# Positive cases and semantics


def test_values(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        listeners:
          - name: dicom
            address: "::"
            port: 104
        local_aes:
          - ae_title: "  NO  "
            services:
              fake: {transfer_syntaxes: ["1.2.840.10008.1.2"], source: ris}
          - ae_title: ECHO_ONLY
            services:
              verification: true
              fake: false
        worklist_sources:
          - name: ris
            kind: sql
        peers:
          - name: pacs
            ae_title: PACS
            host: 192.0.2.7
            port: 104
            move_destination: yes
            tls:
              min_version: 1.3
        access:
          rules:
            - name: lan
              from: [10.1.2.3/16, 192.0.2.7, "fd00::/8"]
              calling: ["CT_*"]
        """,
    )
    config = load(path).config
    # YAML 1.1 would read NO as false and 1:30 as 90; we use YAML 1.2 scalars.
    assert config.local_aes[0].ae_title == "NO"
    assert config.local_aes[0].enabled_services() == {
        "fake": FakeOptions(transfer_syntaxes=["1.2.840.10008.1.2"], source="ris")
    }
    assert list(config.local_aes[1].enabled_services()) == ["verification"]
    assert config.listeners[0].address == "::"
    assert config.peers[0].move_destination is True
    assert config.peers[0].tls is not None and config.peers[0].tls.min_version == "1.3"
    assert [str(n) for n in config.access.rules[0].from_] == [
        "10.1.0.0/16",
        "192.0.2.7/32",
        "fd00::/8",
    ]
    assert config.access.default == "deny"
    assert config.limits.max_pdu_length == 65536


def test_string_that_yaml_1_1_would_mangle(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "shutdown_timeout: 1:30\n")
    assert errors(path) == [f"{path}:8:19: shutdown_timeout: expected a number, got '1:30'"]


def test_relative_path_warning(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "archive:\n  root: var/archive\n")
    loaded = load(path)
    assert [str(w) for w in loaded.warnings] == [
        f"{path}:9:9: warning: archive.root: relative path 'var/archive' depends on the "
        "working directory (/ when started by systemd); use an absolute path"
    ]
    findings, checked = check_config(path)
    assert [f.severity for f in findings] == ["warning"]
    assert checked is not None


def test_shipped_config_loads() -> None:
    loaded = load_config(ROOT / "etc/dicomd/dicomd.yaml")
    assert loaded.warnings == ()
    config = loaded.config
    assert [(listener.name, listener.port) for listener in config.listeners] == [("dicom", 104)]
    assert [ae.ae_title for ae in config.local_aes] == ["DICOMD"]
    assert "verification" in config.local_aes[0].enabled_services()
    assert config.access.default == "deny"
    assert config.archive.root == Path("/var/lib/dicomd/archive")


def test_shipped_config_tls_example_loads(tmp_path: Path) -> None:
    """The commented-out TLS listener is valid once uncommented."""
    text = (ROOT / "etc/dicomd/dicomd.yaml").read_text()
    start = text.index("  # - name: dicom-tls")
    end = text.index("\n\n", start)
    block = "\n".join(
        line.replace("  # ", "  ", 1) if line.startswith("  # ") else line
        for line in text[start:end].splitlines()
        if not line.startswith("  #     #") and line.strip() != "#"
    )
    path = write(tmp_path, text[:start] + block + text[end:])
    config = load_config(path).config
    tls = config.listeners[1].tls
    assert (
        tls is not None and tls.peer_certificate == "require" and config.listeners[1].port == 2762
    )


def test_shipped_default_file() -> None:
    values = {}
    for line in (ROOT / "etc/default/dicomd").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    assert values == {"DICOMD_ENABLE": "no", "DICOMD_OPTS": ""}


def test_development_defaults(tmp_path: Path) -> None:
    registry, _ = discover()
    config = development_defaults(tmp_path / "var")
    assert [(ln.name, ln.address, ln.port, ln.tls) for ln in config.listeners] == [
        ("dicom", "0.0.0.0", 11112, None)
    ]
    assert [ae.ae_title for ae in config.local_aes] == ["DICOMD"]
    assert set(config.local_aes[0].enabled_services()) == set(registry.services)
    assert config.archive.root == tmp_path / "var/archive"
    assert config.archive.index_url == f"sqlite:///{tmp_path}/var/index.sqlite"
    assert config.worklist_sources[0].path == tmp_path / "var/worklists"
    assert config.access.default == "allow"
    assert config.run_as.allow_root is False


def test_development_defaults_base_is_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert development_defaults().archive.root == tmp_path / "var/archive"


def test_load_default_without_etc_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", tmp_path / "dicomd.yaml")
    loaded = load_config(None, registry=REGISTRY)
    assert loaded.is_default
    assert loaded.files == ()
    assert loaded.config.listeners[0].port == 11112
    assert set(loaded.config.local_aes[0].enabled_services()) == {"verification", "fake"}
    findings, checked = check_config(None)
    assert findings == [] and checked is not None and checked.is_default


def test_load_default_with_etc_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, BASE.replace("11112", "104"))
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", path)
    loaded = load_config(None, registry=REGISTRY)
    assert not loaded.is_default
    assert loaded.files == (path,)
    assert loaded.config.listeners[0].port == 104


def test_check_config_reports_errors(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("port: 11112", "port: 0"))
    findings, loaded = check_config(path)
    assert loaded is None
    assert [str(f) for f in findings] == [
        f"{path}:3:11: listeners[0].port: must be at least 1, got 0"
    ]


def test_models_are_frozen(tmp_path: Path) -> None:
    config = load(write(tmp_path, BASE)).config
    with pytest.raises(ValueError):
        config.listeners[0].port = 1  # type: ignore[misc]


def test_parse_config_without_file() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(
            {
                "listeners": [{"name": "a", "port": 1}, {"name": "a", "port": 2}],
                "local_aes": [{"ae_title": "X", "services": {"verification": None}}],
            },
            registry=REGISTRY,
        )
    assert [str(f) for f in info.value.findings] == [
        "listeners[1].name: duplicate listener name 'a' (first defined at listeners[0].name)"
    ]


@pytest.mark.parametrize(
    ("finding", "text"),
    [
        (Finding("/f.yaml", 3, 7, "a.b[0]", "bad"), "/f.yaml:3:7: a.b[0]: bad"),
        (Finding("/f.yaml", 3, 7, "", "bad"), "/f.yaml:3:7: bad"),
        (Finding("/f.yaml", None, None, "", "cannot read: x"), "/f.yaml: cannot read: x"),
        (Finding(None, None, None, "a", "bad", "warning"), "warning: a: bad"),
    ],
)
def test_finding_str(finding: Finding, text: str) -> None:
    assert str(finding) == text
