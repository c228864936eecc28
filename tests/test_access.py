"""The access policy: decide() on partial and full facts, and enforcement against a real
dicomd from several loopback source addresses (our requestor binds them; DCMTK echoscu
cannot, so it covers the AE-title cases from 127.0.0.1), and `dicomd explain` agreeing with
what each association really experiences."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Dicomd, base_config, free_port, require_program

from dicomd.access import AssociationFacts, decide, explain, move_destination
from dicomd.association import AssociationAborted, AssociationRejected, associate
from dicomd.config import ConfigError, load_config, parse_config
from dicomd.net.dimse import VERIFICATION
from dicomd.services.registry import Registry
from dicomd.services.verification import VerificationService

IMPLICIT = "1.2.840.10008.1.2"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
REGISTRY = Registry({"verification": VerificationService})


# --------------------------------------------------------------------------------------------
# decide() without a network


def policy(rules: list[dict[str, Any]], **extra: Any):  # type: ignore[no-untyped-def]
    data: dict[str, Any] = {
        "listeners": [
            {"name": "dicom", "port": 11112},
            {"name": "tls", "port": 2762},
        ],
        "local_aes": [
            {"ae_title": "ARCHIVE", "services": {"verification": None}},
            {"ae_title": "QUERY", "services": {"verification": None}},
        ],
        "access": {"default": "deny", "rules": rules},
    }
    data.update(extra)
    return parse_config(data, registry=REGISTRY)


def test_connect_time_decision_is_denied_only_when_no_rule_can_allow() -> None:
    config = policy(
        [
            {"name": "bad-net", "action": "deny", "from": ["10.66.0.0/16"]},
            {"name": "no-guests", "action": "deny", "calling": ["GUEST*"]},
            {"name": "ct", "from": ["10.1.0.0/16"], "calling": ["CT*"], "services": ["store"]},
            {"name": "tls-only", "listeners": ["tls"], "tls_subject": ["*.example.org"]},
        ]
    )
    on_connect = AssociationFacts("10.66.1.1", listener="dicom")
    assert decide(config, on_connect).allowed is False
    assert decide(config, on_connect).rule == "access.rules[0] (bad-net)"
    # 10.1.x may be allowed once the calling AE is known: not refused on connect.
    maybe = decide(config, AssociationFacts("10.1.2.3", listener="dicom"))
    assert maybe.allowed and maybe.provisional and maybe.rule == "access.rules[2] (ct)"
    # Elsewhere on this listener nothing can allow: refused by the default, on connect.
    nothing = decide(config, AssociationFacts("192.0.2.1", listener="dicom"))
    assert (nothing.allowed, nothing.rule) == (False, "access.default (deny)")
    # On the TLS listener, before the handshake, the certificate may still allow it...
    before_tls = AssociationFacts("192.0.2.1", listener="tls", tls_known=False)
    assert decide(config, before_tls).allowed
    # ...after the handshake, a certificate that does not fit cannot.
    after_tls = AssociationFacts("192.0.2.1", listener="tls", tls_subject="x.example.com")
    assert not decide(config, after_tls).allowed
    fits = AssociationFacts("192.0.2.1", listener="tls", tls_names=("pacs.example.org",))
    assert decide(config, fits).allowed
    # With everything known the decision is final.
    full = AssociationFacts("10.1.2.3", "CT1", "ARCHIVE", "dicom")
    decision = decide(config, full)
    assert (decision.allowed, decision.provisional, decision.services) == (
        True,
        False,
        frozenset({"store"}),
    )


@pytest.mark.parametrize(
    ("rule", "reason"),
    [
        ({"calling": ["BAD*"]}, 3),
        ({"calling": ["BAD*"], "called": ["ARCHIVE"]}, 3),
        ({"called": ["ARCHIVE"]}, 7),
        ({"from": ["10.0.0.0/8"]}, 1),
        ({"user_identity": ["mallory"]}, 1),
        ({}, 1),
    ],
)
def test_reject_reason_names_what_the_rule_tested(rule: dict[str, Any], reason: int) -> None:
    config = policy([{"name": "deny", "action": "deny", **rule}])
    facts = AssociationFacts("10.1.1.1", "BADAE", "ARCHIVE", "dicom", user_identity="mallory")
    decision = decide(config, facts)
    assert (decision.allowed, decision.reject_reason) == (False, reason)


def test_default_deny_says_calling_ae_not_recognized() -> None:
    decision = decide(policy([]), AssociationFacts("10.1.1.1", "WHO", "ARCHIVE", "dicom"))
    assert (decision.allowed, decision.rule, decision.reject_reason) == (
        False,
        "access.default (deny)",
        3,
    )


def test_calling_ae_exact_glob_and_list_user_identity_and_exceptions() -> None:
    config = policy(
        [
            {
                "name": "r",
                "from": ["10.0.0.0/8", "fd00::/8"],
                "except_from": ["10.9.0.0/16"],
                "calling": ["CT1", "MR?", "US_*"],
                "called": ["ARCHIVE"],
                "user_identity": ["alice"],
            }
        ]
    )

    def ok(address: str, calling: str, called: str = "ARCHIVE", user: str = "alice") -> bool:
        facts = AssociationFacts(address, calling, called, "dicom", user_identity=user)
        return decide(config, facts).allowed

    assert ok("10.1.1.1", "CT1") and ok("10.1.1.1", "MR7") and ok("fd00::5", "US_NORTH")
    assert ok("::ffff:10.1.1.1", "CT1")  # IPv4-mapped compares as IPv4
    assert not ok("10.9.1.1", "CT1")  # the exception
    assert not ok("10.1.1.1", "CT2") and not ok("10.1.1.1", "MR77")
    assert not ok("10.1.1.1", "CT1", called="QUERY")
    assert not ok("10.1.1.1", "CT1", user="bob")
    assert not ok("192.0.2.1", "CT1")


def test_peers_and_move_destinations() -> None:
    config = policy(
        [{"name": "viewer", "calling": ["VIEWER"], "move_destinations": ["ws2"]}],
        peers=[
            {"name": "ws1", "ae_title": "WS1", "host": "10.0.0.1", "port": 104,
             "services": ["echo", "find"], "move_destination": True},
            {"name": "ws2", "ae_title": "WS2", "host": "ws2.example", "port": 104,
             "move_destination": True},
        ],
    )  # fmt: skip
    ws1 = decide(config, AssociationFacts("10.0.0.1", "WS1", "ARCHIVE", "dicom"))
    assert ws1.allowed and ws1.rule == "peers[0] (ws1)" and ws1.services == {"echo", "find"}
    # The peer's address is checked when it is an IP address.
    assert not decide(config, AssociationFacts("10.0.0.2", "WS1", "ARCHIVE", "dicom")).allowed
    # A peer without services (a move destination only) is not let in by being listed.
    ws2 = decide(config, AssociationFacts("10.0.0.3", "WS2", "ARCHIVE", "dicom"))
    assert not ws2.allowed and ws2.rule == "access.default (deny)"
    viewer = decide(config, AssociationFacts("10.0.0.9", "VIEWER", "ARCHIVE", "dicom"))
    assert move_destination(config, viewer, "WS2") is not None
    assert move_destination(config, viewer, "WS1") is None  # not in the rule's list
    assert move_destination(config, ws1, "WS2") is None  # ws1 may not move at all


def test_config_errors_for_access_and_limits(tmp_path: Path) -> None:
    path = tmp_path / "dicomd.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            listeners:
              - name: dicom
                port: 11112
            local_aes:
              - ae_title: DICOMD
                services:
                  verification:
            peers:
              - name: pacs
                ae_title: PACS
                host: 10.0.0.1
                port: 104
            limits:
              max_associations_per_address: 0
            access:
              rules:
                - name: r
                  move_destinations: [pacs, nowhere]
            """
        )
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, registry=REGISTRY)
    assert [str(f) for f in info.value.findings] == [
        f"{path}:14:33: limits.max_associations_per_address: must be at least 1, got 0",
        f"{path}:18:27: access.rules[0].move_destinations[0]: peer 'pacs' is not a move "
        "destination (set move_destination: true on it)",
        f"{path}:18:33: access.rules[0].move_destinations[1]: unknown peer 'nowhere' (known: pacs)",
    ]


# --------------------------------------------------------------------------------------------
# A real dicomd


def live_config(tmp_path: Path, port: int, port2: int) -> dict[str, Any]:
    config = base_config(tmp_path, port)
    config["listeners"].append({"name": "dicom2", "address": "127.0.0.1", "port": port2})
    config["local_aes"] = [
        {
            "ae_title": "ARCHIVE",
            "services": {"verification": None, "storage": {"min_free_space": 0}},
        },
        {"ae_title": "QUERY", "services": {"verification": None}},
        {"ae_title": "RESTRICTED", "listeners": ["dicom2"], "services": {"verification": None}},
    ]
    config["peers"] = [
        {"name": "ws", "ae_title": "WS1", "host": "127.0.0.30", "port": 104, "services": ["echo"]}
    ]
    config["access"] = {
        "default": "deny",
        "rules": [
            {"name": "blocked-net", "action": "deny", "from": ["127.0.0.64/26"]},
            {"name": "no-guests", "action": "deny", "calling": ["GUEST*"]},
            {"name": "query-readonly", "action": "deny", "from": ["127.0.0.3"],
             "called": ["QUERY"]},
            {
                "name": "modalities",
                "from": ["127.0.0.2", "127.0.0.3"],
                "except_from": ["127.0.0.4"],
                "calling": ["CT*", "MR1"],
                "called": ["ARCHIVE"],
                "services": ["echo", "store"],
            },
            {"name": "echo-anywhere", "calling": ["ECHO*"], "services": ["echo"]},
            {"name": "second-listener", "listeners": ["dicom2"], "services": ["echo"]},
            {"name": "lan-deny", "action": "deny", "from": ["127.0.0.0/28"]},
        ],
    }  # fmt: skip
    return config


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dicomd]:
    tmp_path = tmp_path_factory.mktemp("access")
    instance = Dicomd(tmp_path)
    port, port2 = free_port(), free_port()
    instance.start(live_config(tmp_path, port, port2))
    instance.port2 = port2  # type: ignore[attr-defined]
    try:
        yield instance
    finally:
        instance.stop()


async def attempt(
    port: int, source: str, calling: str, called: str
) -> tuple[str, object, dict[int, int] | None]:
    """('accepted', granted verbs, rejected context results) | ('rejected', (r, s, reason))
    | ('dropped', None)."""
    try:
        assoc = await associate(
            "127.0.0.1",
            port,
            calling_ae=calling,
            called_ae=called,
            contexts=[(VERIFICATION, [IMPLICIT]), (CT_IMAGE_STORAGE, [IMPLICIT])],
            local_addr=(source, 0),
            acse_timeout=10,
        )
    except AssociationRejected as exc:
        return "rejected", (exc.result, exc.source, exc.reason), None
    except (AssociationAborted, ConnectionError):
        return "dropped", None, None
    assert assoc.accept is not None
    granted = set()
    for cx in assoc.accept.accepted.values():
        granted.add("echo" if cx.abstract_syntax == VERIFICATION else "store")
    if "echo" in granted:
        assert await assoc.echo(timeout=10) == 0
    rejected = dict(assoc.accept.rejected)
    await assoc.release()
    return "accepted", granted, rejected


# (source address, calling, called, listener, expected outcome, rule)
LIVE_CASES = [
    ("127.0.0.2", "CT1", "ARCHIVE", "dicom", ("accepted", {"echo", "store"}), "modalities"),
    ("127.0.0.3", "MR1", "ARCHIVE", "dicom", ("accepted", {"echo", "store"}), "modalities"),
    ("127.0.0.2", "CT1", "QUERY", "dicom", ("rejected", (1, 1, 1)), "lan-deny"),
    ("127.0.0.4", "CT1", "ARCHIVE", "dicom", ("rejected", (1, 1, 1)), "lan-deny"),
    ("127.0.0.2", "GUEST1", "ARCHIVE", "dicom", ("rejected", (1, 1, 3)), "no-guests"),
    ("127.0.0.3", "CT2", "QUERY", "dicom", ("rejected", (1, 1, 7)), "query-readonly"),
    ("127.0.0.65", "CT1", "ARCHIVE", "dicom", ("dropped", None), "blocked-net"),
    ("127.0.0.20", "ECHO1", "ARCHIVE", "dicom", ("accepted", {"echo"}), "echo-anywhere"),
    ("127.0.0.20", "OTHER", "ARCHIVE", "dicom", ("rejected", (1, 1, 3)), "access.default"),
    ("127.0.0.30", "WS1", "ARCHIVE", "dicom", ("accepted", {"echo"}), "ws"),
    ("127.0.0.31", "WS1", "ARCHIVE", "dicom", ("rejected", (1, 1, 3)), "access.default"),
    # Rules come before peers: the peer's AE from an address a deny rule covers.
    ("127.0.0.8", "WS1", "ARCHIVE", "dicom", ("rejected", (1, 1, 1)), "lan-deny"),
    ("127.0.0.2", "CT1", "NOPE", "dicom", ("rejected", (1, 1, 7)), "local_aes"),
    ("127.0.0.20", "ECHO2", "RESTRICTED", "dicom", ("rejected", (1, 1, 7)), "local_aes"),
    ("127.0.0.2", "ANY", "RESTRICTED", "dicom2", ("accepted", {"echo"}), "second-listener"),
]


def find_log(server: Dicomd, event: str, **fields: Any) -> dict[str, Any]:
    return server.wait_for_log(event, timeout=10, **fields)


@pytest.mark.parametrize(
    "case", LIVE_CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}-{c[3]}" for c in LIVE_CASES]
)
def test_live_policy_and_explain_agree(server: Dicomd, case: tuple[Any, ...]) -> None:
    source, calling, called, listener, expected, rule = case
    port = server.port if listener == "dicom" else server.port2  # type: ignore[attr-defined]
    kind, detail, rejected_contexts = asyncio.run(attempt(port, source, calling, called))
    assert (kind, detail) == expected, (kind, detail)

    # `dicomd explain` (the function and the command) predicts exactly that.
    config = load_config(server.config_path).config
    facts = AssociationFacts(source, calling, called, listener)
    predicted = explain(config, facts)
    assert rule in predicted.rule
    # The log line names the rule and the facts.
    if kind == "rejected":
        entry = find_log(
            server,
            "association_rejected",
            dicom_calling_ae=calling,
            dicom_called_ae=called,
            address=source,
        )
        assert rule in entry["rule"]
    elif kind == "dropped":
        entry = find_log(server, "connection_refused", address=source)
        assert rule in entry["rule"] and entry["listener"] == listener
    else:
        entry = find_log(
            server, "association_accepted", dicom_calling_ae=calling, dicom_called_ae=called
        )
        assert rule in entry["rule"]
        if "store" not in detail and called != "ARCHIVE":  # type: ignore[operator]
            # Not served there at all: abstract syntax not supported.
            assert list(rejected_contexts.values()) == [3]  # type: ignore[union-attr]
        elif "store" not in detail:  # type: ignore[operator]
            # Served, but refused by policy: user-rejection, and one log line.
            assert list(rejected_contexts.values()) == [1]  # type: ignore[union-attr]
            refused = find_log(server, "service_refused", dicom_calling_ae=calling)
            assert refused["service"] == "store"
            assert predicted.decision is not None
            assert refused["rule"] == predicted.decision.by_service["store"]
            assert refused["address"] == source

    if kind == "accepted":
        assert predicted.allowed and set(predicted.granted) == detail
    elif kind == "rejected":
        assert not predicted.allowed and predicted.reject == detail
    else:
        assert not predicted.allowed and predicted.stage == "connect"
    cli = subprocess.run(
        [sys.executable, "-m", "dicomd", "explain", "--from", source, "--calling", calling,
         "--called", called, "--listener", listener, "--config", str(server.config_path),
         "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert cli.returncode == (0 if kind == "accepted" else 1), cli.stderr
    assert json.loads(cli.stdout) == predicted.as_dict()


def test_refused_on_connect_before_any_pdu(server: Dicomd) -> None:
    """A blocked address gets no A-ASSOCIATE-RJ, nothing: the connection is closed at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.66", 0))
    sock.settimeout(5)
    t0 = time.monotonic()
    sock.connect(("127.0.0.1", server.port))
    try:
        data = sock.recv(100)
    except ConnectionResetError:
        data = b""
    finally:
        sock.close()
    assert data == b"" and time.monotonic() - t0 < 2
    entry = find_log(server, "connection_refused", address="127.0.0.66")
    assert entry["rule"] == "access.rules[0] (blocked-net)"


def run_echoscu(port: int, env: dict[str, str], *args: str) -> str:
    exe = require_program("echoscu")
    result = subprocess.run(
        [exe, "-v", "-to", "10", "-ta", "10", "-td", "10", *args, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    return result.stdout + result.stderr


@pytest.mark.parametrize(
    ("aet", "aec", "expect", "rule"),
    [
        ("GUEST7", "ARCHIVE", "Calling AE Title Not Recognized", "no-guests"),
        ("CT9", "ARCHIVE", "No Reason", "lan-deny"),
        ("CT9", "NOPE", "Called AE Title Not Recognized", "local_aes"),
        ("ECHO9", "ARCHIVE", "Received Echo Response (Success)", "echo-anywhere"),
    ],
)
def test_echoscu_sees_the_reject_reason(
    server: Dicomd, dcmtk_env: dict[str, str], aet: str, aec: str, expect: str, rule: str
) -> None:
    out = run_echoscu(server.port, dcmtk_env, "-aet", aet, "-aec", aec)
    assert expect in out, out
    if "Success" in expect:
        assert rule in find_log(server, "association_accepted", dicom_calling_ae=aet)["rule"]
    else:
        entry = find_log(server, "association_rejected", dicom_calling_ae=aet, dicom_called_ae=aec)
        assert rule in entry["rule"] and entry["address"] == "127.0.0.1"


def test_max_associations_per_address(dicomd: Dicomd, tmp_path: Path) -> None:
    port = free_port()
    dicomd.start(base_config(tmp_path, port, limits={"max_associations_per_address": 2}))

    async def main() -> None:
        async def open_from(source: str):  # type: ignore[no-untyped-def]
            return await associate(
                "127.0.0.1",
                port,
                calling_ae="LIMITS",
                called_ae="DICOMD",
                contexts=[(VERIFICATION, [IMPLICIT])],
                local_addr=(source, 0),
            )

        held = [await open_from("127.0.0.2"), await open_from("127.0.0.2")]
        with pytest.raises(AssociationRejected) as info:
            await open_from("127.0.0.2")
        assert (info.value.result, info.value.source, info.value.reason) == (2, 3, 2)
        other = await open_from("127.0.0.3")  # another address is not affected
        assert await other.echo(timeout=10) == 0
        await other.release()
        await held[0].release()
        again = await open_from("127.0.0.2")  # a slot is free again
        await again.release()
        await held[1].release()

    asyncio.run(main())
    entry = dicomd.wait_for_log("association_rejected", address="127.0.0.2")
    assert entry["rule"] == "limits.max_associations_per_address"
    assert "limit of 2 associations from 127.0.0.2 reached" in entry["reason"]


def test_explain_cli_text(server: Dicomd) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dicomd", "explain", "--from", "127.0.0.2", "--calling", "GUEST1",
         "--called", "ARCHIVE", "--config", str(server.config_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert "decision:  REFUSED by access.rules[1] (no-guests)" in result.stdout
    assert "A-ASSOCIATE-RJ (permanent, service-user, calling AE title not recognized)" in (
        result.stdout
    )
    allowed = subprocess.run(
        [sys.executable, "-m", "dicomd", "explain", "--from", "127.0.0.2", "--calling", "CT1",
         "--called", "ARCHIVE", "--service", "store", "--config", str(server.config_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert "decision:  allowed by access.rules[3] (modalities)" in allowed.stdout
    assert "'store' granted" in allowed.stdout


def test_request_for_a_verb_not_granted_is_refused_with_0124() -> None:
    """A service whose one context carries several verbs: negotiation lets the context
    through for the granted verb, and a request needing another verb is answered 0x0124."""
    from types import SimpleNamespace
    from typing import ClassVar

    from dicomd.acceptor import STATUS_NOT_AUTHORIZED, AcceptorAssociation, Counters, Generation
    from dicomd.services.base import Offer, Service

    class TwoVerbs(Service):
        name: ClassVar[str] = "twoverbs"
        permissions: ClassVar[tuple[str, ...]] = ("find", "move")

        def offers(self) -> list[Offer]:
            return [Offer("1.2.3.4", (IMPLICIT,), permission="find")]

        def permission_for(self, request):  # type: ignore[no-untyped-def,override]
            return "move" if request.command.command_field == 0x0021 else "find"

        async def handle(self, association, request):  # type: ignore[no-untyped-def,override]
            await association.respond(request, status=0)

    async def main() -> None:
        config = policy([{"name": "finders", "services": ["find"]}])
        service = TwoVerbs(TwoVerbs.Options(), None)  # type: ignore[arg-type]
        generation = Generation(config, {"ARCHIVE": {"twoverbs": service}}, Counters())
        assoc = AcceptorAssociation(generation, "dicom")
        assoc.local_ae = generation.local_aes["ARCHIVE"]
        assoc.decision = decide(config, AssociationFacts("10.0.0.1", "X", "ARCHIVE", "dicom"))
        assert assoc.decision.services == {"find"}
        context = SimpleNamespace(abstract_syntax="1.2.3.4")
        find = SimpleNamespace(context=context, command=SimpleNamespace(command_field=0x0020))
        move = SimpleNamespace(context=context, command=SimpleNamespace(command_field=0x0021))
        assert assoc.service_for(find) is service  # type: ignore[arg-type]
        refused = assoc.service_for(move)  # type: ignore[arg-type]
        assert refused is not service and refused is not None
        answers: list[int] = []

        class Recorder:
            log = SimpleNamespace(warning=lambda *a, **k: answers.append(-1))
            link = SimpleNamespace(peer=("10.0.0.1", 1234))

            async def respond(self, request, status, **extra):  # type: ignore[no-untyped-def]
                answers.append(status)

        await refused.handle(Recorder(), move)  # type: ignore[arg-type]
        assert answers == [-1, STATUS_NOT_AUTHORIZED]
        generation.open_associations -= 1

    asyncio.run(main())


def test_shipped_example_policy_is_per_service_first_match() -> None:
    """etc/dicomd/dicomd.yaml starts with "echo from anywhere": a rule's services are a
    condition, so it answers C-ECHO for everyone and leaves the rest to later rules."""
    root = Path(__file__).resolve().parent.parent
    config = load_config(root / "etc" / "dicomd" / "dicomd.yaml").config

    def decision(address: str, calling: str):  # type: ignore[no-untyped-def]
        return decide(config, AssociationFacts(address, calling, "DICOMD", "dicom"))

    guest = decision("10.99.1.1", "CT_GUEST")
    assert guest.services == {"echo"}
    assert guest.by_service["store"] == "access.rules[1] (guest-network)"
    modality = decision("10.20.1.5", "CT_1")
    assert modality.services == {"echo", "store", "worklist", "mpps"}
    assert modality.by_service["echo"] == "access.rules[0] (echo-from-anywhere)"
    assert modality.by_service["store"] == "access.rules[2] (modalities)"
    assert modality.by_service["find"] == "access.default (deny)"
    viewer = decision("10.20.30.7", "VIEWER")
    assert viewer.services == {"echo", "find", "move", "get"}
    assert move_destination(config, viewer, "READING_01") is not None
    assert move_destination(config, viewer, "MAIN_PACS") is None  # the rule lists reading-room
    pacs = decision("192.0.2.1", "MAIN_PACS")
    assert pacs.services == {"echo", "store", "find", "move"}
    assert pacs.by_service["store"] == "peers[0] (main-pacs)"
    # The calling peer's allowed_move_destinations apply when the rule lists none.
    assert move_destination(config, pacs, "READING_01", "MAIN_PACS") is not None
    # Nobody is refused on connect: echo is for everyone.
    assert decide(config, AssociationFacts("203.0.113.9", listener="dicom")).allowed
