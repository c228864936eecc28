"""access.decide() remembers decisions by the facts the policy can tell apart: it must give
exactly what a fresh evaluation (``access._decide``) gives, for any policy and any facts, in
any order (earlier facts fill the memo that later ones may hit)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from dicomd import access
from dicomd.access import AssociationFacts
from dicomd.config import parse_config
from dicomd.services.registry import Registry
from dicomd.services.verification import VerificationService

REGISTRY = Registry({"verification": VerificationService})
ADDRESSES = ["10.1.2.3", "10.1.9.9", "10.2.0.1", "192.168.5.5", "::1", "127.0.0.1"]
AES = ["CT1", "CT2", "MR1", "GUEST7", "PACS", "WS", "X"]
SERVICES = ["echo", "store", "find", "move", "get", "worklist"]

rules = st.fixed_dictionaries(
    {"action": st.sampled_from(["allow", "deny"])},
    optional={
        "from": st.sampled_from([["10.1.0.0/16"], ["10.0.0.0/8", "::1/128"], ["127.0.0.1/32"]]),
        "except_from": st.sampled_from([["10.1.9.0/24"], ["192.168.0.0/16"]]),
        "calling": st.sampled_from([["CT*"], ["GUEST*"], ["MR1", "WS"]]),
        "called": st.sampled_from([["ARCHIVE"], ["QUERY"]]),
        "listeners": st.sampled_from([["dicom"], ["tls"]]),
        "services": st.lists(st.sampled_from(SERVICES), min_size=1, max_size=3, unique=True),
        "tls_subject": st.sampled_from([["*.example.org"], ["ws1"]]),
        "user_identity": st.sampled_from([["alice"], ["bob", "carol"]]),
    },
)
peers = st.lists(
    st.fixed_dictionaries(
        {
            "ae_title": st.sampled_from(AES),
            "host": st.sampled_from(["10.1.2.3", "pacs.example.org", "::1"]),
            "services": st.lists(st.sampled_from(SERVICES), max_size=3, unique=True),
        }
    ),
    max_size=3,
    unique_by=lambda p: p["ae_title"],
)
FIELDS = {
    "address": st.sampled_from(ADDRESSES),
    "calling_ae": st.one_of(st.none(), st.sampled_from(AES)),
    "called_ae": st.sampled_from(["ARCHIVE", "QUERY", "OTHER"]),
    "listener": st.sampled_from(["dicom", "tls"]),
    "tls_subject": st.sampled_from([None, "ws1", "a.example.org"]),
    "tls_names": st.sampled_from([(), ("b.example.org",)]),
    "user_identity": st.sampled_from([None, "alice", "bob", "mallory"]),
    "tls_known": st.booleans(),
}
facts = st.builds(AssociationFacts, **FIELDS)


@st.composite
def fact_sequences(draw: st.DrawFn) -> list[AssociationFacts]:
    """Facts that mostly differ from one another in one field: the memo's hard case."""
    out = [draw(facts)]
    for _ in range(draw(st.integers(0, 24))):
        name = draw(st.sampled_from(sorted(FIELDS)))
        previous = draw(st.sampled_from(out))
        out.append(replace(previous, **{name: draw(FIELDS[name])}))
    return out


def policy(rule_list: list[dict[str, Any]], peer_list: list[dict[str, Any]], default: str):  # type: ignore[no-untyped-def]
    return parse_config(
        {
            "listeners": [{"name": "dicom", "port": 11112}, {"name": "tls", "port": 2762}],
            "local_aes": [
                {"ae_title": "ARCHIVE", "services": {"verification": None}},
                {"ae_title": "QUERY", "services": {"verification": None}},
            ],
            "peers": [
                {"name": f"peer{i}", "port": 104, **peer} for i, peer in enumerate(peer_list)
            ],
            "access": {
                "default": default,
                "rules": [{"name": f"rule{i}", **rule} for i, rule in enumerate(rule_list)],
            },
        },
        registry=REGISTRY,
    )


@given(
    st.lists(rules, max_size=4),
    peers,
    st.sampled_from(["allow", "deny"]),
    fact_sequences(),
)
@settings(max_examples=500, deadline=None)
def test_memoised_decisions_equal_fresh_ones(
    rule_list: list[dict[str, Any]],
    peer_list: list[dict[str, Any]],
    default: str,
    sequence: list[AssociationFacts],
) -> None:
    config = policy(rule_list, peer_list, default)
    for f in sequence:
        assert access.decide(config, f) == access._decide(config, f), f


def test_ae_titles_no_rule_tests_share_one_decision() -> None:
    config = policy([{"name": "lan", "from": ["10.0.0.0/8"]}], [], "deny")
    first = access.decide(config, AssociationFacts("10.1.2.3", "MODALITY1", "ARCHIVE", "dicom"))
    again = access.decide(config, AssociationFacts("10.1.2.3", "MODALITY2", "ARCHIVE", "dicom"))
    assert again is first and first.allowed
    # A peer's own AE title is told apart: its services may differ.
    config = policy(
        [], [{"ae_title": "CT1", "host": "pacs.example.org", "services": ["store"]}], "deny"
    )
    peer = access.decide(config, AssociationFacts("10.1.2.3", "CT1", "ARCHIVE", "dicom"))
    other = access.decide(config, AssociationFacts("10.1.2.3", "CT2", "ARCHIVE", "dicom"))
    assert peer.allowed and not other.allowed
