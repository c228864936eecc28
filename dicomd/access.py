"""The access decision: may this peer open this association, and for which services?

One function, ``decide()``, takes the facts of an association request and the configured
policy and returns the decision with the rule that made it, so every refusal can be logged
and explained (``dicomd explain``). The order:

1. ``access.rules``, first match wins (a rule with no conditions matches everything);
2. otherwise a configured peer whose AE title is the calling AE title (and, when the
   peer's ``host`` is an IP address, whose address is the caller's) is allowed the
   services its ``services`` list names;
3. otherwise ``access.default``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dicomd.config import AccessRule, Config

ALL_SERVICES: frozenset[str] = frozenset(
    {"echo", "store", "find", "move", "get", "worklist", "commitment", "mpps"}
)


@dataclass(frozen=True, slots=True)
class AssociationFacts:
    address: str
    calling_ae: str
    called_ae: str
    listener: str = ""
    tls_subject: str | None = None
    tls_names: tuple[str, ...] = ()
    user_identity: str | None = None


@dataclass(frozen=True, slots=True)
class AccessDecision:
    allowed: bool
    rule: str  # which rule decided, in words, for the log and `dicomd explain`
    services: frozenset[str] = ALL_SERVICES
    move_destinations: tuple[str, ...] = ()
    # A-ASSOCIATE-RJ reason when refused: calling AE not recognized (3) or no reason (1).
    reject_reason: int = 3


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _in_networks(addr: object, networks: object) -> bool:
    return any(addr in net for net in networks)  # type: ignore[operator,attr-defined]


def rule_matches(rule: AccessRule, facts: AssociationFacts) -> bool:
    addr = _address(facts.address)
    if rule.from_ and (addr is None or not _in_networks(addr, rule.from_)):
        return False
    if rule.except_from and addr is not None and _in_networks(addr, rule.except_from):
        return False
    if rule.calling and not any(fnmatchcase(facts.calling_ae, p) for p in rule.calling):
        return False
    if rule.called and facts.called_ae not in rule.called:
        return False
    if rule.listeners and facts.listener not in rule.listeners:
        return False
    if rule.tls_subject:
        names = (facts.tls_subject, *facts.tls_names)
        if not any(n is not None and fnmatchcase(n, p) for p in rule.tls_subject for n in names):
            return False
    return not (rule.user_identity and facts.user_identity not in rule.user_identity)


def decide(config: Config, facts: AssociationFacts) -> AccessDecision:
    for index, rule in enumerate(config.access.rules):
        if rule_matches(rule, facts):
            where = f"access.rules[{index}] ({rule.name})"
            if rule.action == "deny":
                return AccessDecision(False, where, frozenset())
            services = frozenset(rule.services) if rule.services else ALL_SERVICES
            return AccessDecision(True, where, services, tuple(rule.move_destinations))
    addr = _address(facts.address)
    for index, peer in enumerate(config.peers):
        if peer.ae_title != facts.calling_ae:
            continue
        peer_addr = _address(peer.host)
        if peer_addr is not None and peer_addr != addr:
            continue
        return AccessDecision(
            True,
            f"peers[{index}] ({peer.name})",
            frozenset(peer.services),
            tuple(peer.allowed_move_destinations),
        )
    if config.access.default == "allow":
        return AccessDecision(True, "access.default (allow)")
    return AccessDecision(False, "access.default (deny)", frozenset())
