"""The access decision: may this peer open this association, and for which services?

One function, ``decide()``, takes the facts of an association request and the configured
policy and returns the decision with the rule that made it, so every refusal can be logged
and explained (``dicomd explain``). It is taken per service (echo, store, find, move, get,
worklist, ...), each time in this order:

1. ``access.rules``, first match wins. A rule matches when all its conditions hold (a rule
   without conditions matches everything); its ``services``, when given, are a condition
   too: ``{services: [echo]}`` at the top of the list lets everyone C-ECHO and leaves the
   other services to the rules below;
2. otherwise a configured peer whose AE title is the calling AE title (and, when the
   peer's ``host`` is an IP address, whose address is the caller's) is allowed the
   services its ``services`` list names;
3. otherwise ``access.default``.

The association is accepted when at least one service is allowed; its presentation
contexts are then filtered service by service. The decision names the rules that allowed
(or, for a refusal, the first rule that refused).

The same function decides at the three enforcement points, with what is known there:

- **on connect** only the source address and the listener are known (and, after a TLS
  handshake, the peer certificate). A condition on a fact not known yet *may* match, so
  the answer is "denied" only when no rule could allow that address whatever the AE titles
  turn out to be; then the connection is closed before any PDU is read.
- **at A-ASSOCIATE-RQ** everything is known: the decision is final. A refusal is an
  A-ASSOCIATE-RJ, permanent, source service-user, with the reason the deciding rule tested
  (see ``reject_reason_for``).
- **per request** the services the decision grants filter the presentation contexts: a
  context whose service is not granted is rejected with result *user-rejection* (PS3.8
  9.3.3.2), and a request that still arrives for a service not granted is answered with
  status 0x0124 (Refused: Not Authorized).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dicomd.config import AccessRule, Config, LocalAE, Peer
    from dicomd.services.registry import Registry

ALL_SERVICES: frozenset[str] = frozenset(
    {"echo", "store", "find", "move", "get", "worklist", "commitment", "mpps"}
)

# A-ASSOCIATE-RJ reasons with source service-user (PS3.8 9.3.4).
REASON_NO_REASON = 1
REASON_CALLING_AE_NOT_RECOGNIZED = 3
REASON_CALLED_AE_NOT_RECOGNIZED = 7

REASON_TEXT = {
    REASON_NO_REASON: "no reason given",
    REASON_CALLING_AE_NOT_RECOGNIZED: "calling AE title not recognized",
    REASON_CALLED_AE_NOT_RECOGNIZED: "called AE title not recognized",
}


@dataclass(frozen=True, slots=True)
class AssociationFacts:
    """What is known about a peer. ``calling_ae``/``called_ae`` None: not known yet (the
    connection is open, no A-ASSOCIATE-RQ read); then the user identity is not known
    either. ``tls_known`` False: a TLS listener before its handshake."""

    address: str
    calling_ae: str | None = None
    called_ae: str | None = None
    listener: str = ""
    tls_subject: str | None = None
    tls_names: tuple[str, ...] = ()
    user_identity: str | None = None
    tls_known: bool = True

    @property
    def request_known(self) -> bool:
        return self.calling_ae is not None


@dataclass(frozen=True, slots=True)
class AccessDecision:
    allowed: bool
    rule: str  # which rule(s) decided, in words, for the log and `dicomd explain`
    services: frozenset[str] = ALL_SERVICES  # granted, among the services evaluated
    move_destinations: tuple[str, ...] = ()
    # A-ASSOCIATE-RJ reason (source service-user) when refused.
    reject_reason: int = REASON_CALLING_AE_NOT_RECOGNIZED
    # True when decided on partial facts and allowed: "a later fact may still refuse".
    provisional: bool = False
    # service → the rule that allowed or refused it
    by_service: dict[str, str] = field(default_factory=dict)
    # Whether services no rule or peer names (a plug-in's own verbs) are granted.
    others: bool = False

    def permits(self, service: str) -> bool:
        if service in self.by_service:
            return service in self.services
        return self.others


@dataclass(frozen=True, slots=True)
class _Verdict:
    allowed: bool
    rule: str
    order: int  # position of the deciding rule: rules, then peers, then the default
    provisional: bool = False
    move_destinations: tuple[str, ...] = ()
    reject_reason: int = REASON_CALLING_AE_NOT_RECOGNIZED


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


def rule_matches(rule: AccessRule, facts: AssociationFacts) -> bool | None:
    """True: the rule matches. False: it cannot match. None: it matches only if a fact not
    known yet (AE titles, user identity, TLS certificate) turns out to fit."""
    addr = _address(facts.address)
    if rule.from_ and (addr is None or not _in_networks(addr, rule.from_)):
        return False
    if rule.except_from and addr is not None and _in_networks(addr, rule.except_from):
        return False
    if rule.listeners and facts.listener not in rule.listeners:
        return False
    unknown = False
    if rule.calling:
        if facts.calling_ae is None:
            unknown = True
        elif not any(fnmatchcase(facts.calling_ae, p) for p in rule.calling):
            return False
    if rule.called:
        if facts.called_ae is None:
            unknown = True
        elif facts.called_ae not in rule.called:
            return False
    if rule.tls_subject:
        if not facts.tls_known:
            unknown = True
        else:
            names = (facts.tls_subject, *facts.tls_names)
            if not any(
                n is not None and fnmatchcase(n, p) for p in rule.tls_subject for n in names
            ):
                return False
    if rule.user_identity:
        if not facts.request_known:
            unknown = True
        elif facts.user_identity not in rule.user_identity:
            return False
    return None if unknown else True


def reject_reason_for(rule: AccessRule) -> int:
    """The A-ASSOCIATE-RJ reason a deny rule gives: the fact it tested, so the peer's
    administrator knows what to fix. A rule on the calling AE title says "calling AE title
    not recognized"; one on the called AE title (and not the calling) "called AE title not
    recognized"; one on the address, listener, certificate or user identity only "no reason
    given" (PS3.8 has no reason for those, and "calling AE" would send people hunting for an
    AE title problem)."""
    if rule.calling:
        return REASON_CALLING_AE_NOT_RECOGNIZED
    if rule.called:
        return REASON_CALLED_AE_NOT_RECOGNIZED
    return REASON_NO_REASON


def _peer_matches(peer: Peer, facts: AssociationFacts) -> bool | None:
    peer_addr = _address(peer.host)
    if peer_addr is not None and peer_addr != _address(facts.address):
        return False
    if facts.calling_ae is None:
        return None
    return peer.ae_title == facts.calling_ae


def _verdict(config: Config, facts: AssociationFacts, service: str | None) -> _Verdict:
    """First match for one service (None: a service no rule or peer names)."""
    uncertain = False  # an earlier deny rule might still match once all facts are known
    rules = config.access.rules
    for index, rule in enumerate(rules):
        if rule.services and (service is None or service not in rule.services):
            continue
        matched = rule_matches(rule, facts)
        if matched is False:
            continue
        where = f"access.rules[{index}] ({rule.name})"
        if rule.action == "deny":
            if matched is None:
                uncertain = True
                continue
            return _Verdict(False, where, index, reject_reason=reject_reason_for(rule))
        return _Verdict(
            True,
            where,
            index,
            provisional=uncertain or matched is None,
            move_destinations=tuple(rule.move_destinations),
        )
    for index, peer in enumerate(config.peers):
        if service is None or service not in peer.services:
            continue
        matched = _peer_matches(peer, facts)
        if matched is False:
            continue
        return _Verdict(
            True,
            f"peers[{index}] ({peer.name})",
            len(rules) + index,
            provisional=uncertain or matched is None,
            move_destinations=tuple(peer.allowed_move_destinations),
        )
    order = len(rules) + len(config.peers)
    if config.access.default == "allow":
        return _Verdict(True, "access.default (allow)", order, provisional=uncertain)
    return _Verdict(False, "access.default (deny)", order)


def _named_services(config: Config) -> frozenset[str]:
    named = set(ALL_SERVICES)
    for rule in config.access.rules:
        named.update(rule.services)
    for peer in config.peers:
        named.update(peer.services)
    return frozenset(named)


# Decisions are pure functions of (config, facts) and peers repeat the same facts, so they
# are remembered per configuration object (a reload brings a new one). The config is kept
# beside its cache so a recycled id() can never serve another config's decisions.
#
# The memo is keyed by the facts the configuration can tell apart, not by all of them: with
# no rule on calling AE titles, every calling AE title that is not a configured peer's
# decides alike, and so on for the called AE title, the address, the certificate and the
# user identity. A site whose policy is "these networks" then decides once per network, not
# once per modality (a new AE title used to cost a full evaluation, ~15 µs).
_DECISION_CACHE_CONFIGS = 4
_DECISION_CACHE_SIZE = 4096
_decision_cache: dict[int, tuple[object, _Tested, dict[tuple[object, ...], AccessDecision]]] = {}


@dataclass(frozen=True, slots=True)
class _Tested:
    """Which facts some rule or peer of one configuration looks at."""

    address: bool  # rules with from/except_from, peers whose host is an IP address
    calling: bool  # rules with calling AE title patterns
    peer_aes: frozenset[str]  # calling AE titles a peer matches (always tested)
    called: bool
    tls: bool
    identity: bool


def _tested(config: Config) -> _Tested:
    rules = config.access.rules
    return _Tested(
        address=any(r.from_ or r.except_from for r in rules)
        or any(_address(p.host) is not None for p in config.peers),
        calling=any(r.calling for r in rules),
        peer_aes=frozenset(p.ae_title for p in config.peers),
        called=any(r.called for r in rules),
        tls=any(r.tls_subject for r in rules),
        identity=any(r.user_identity for r in rules),
    )


# Stands for a known AE title no rule or peer tests (no valid AE title contains a NUL). A
# known value must stay distinct from None, which means "not known yet" (on connect).
_UNTESTED = "\x00"


def _memo_key(tested: _Tested, facts: AssociationFacts) -> tuple[object, ...]:
    calling = facts.calling_ae
    if calling is not None and not tested.calling and calling not in tested.peer_aes:
        calling = _UNTESTED
    called = facts.called_ae
    if called is not None and not tested.called:
        called = _UNTESTED
    tls = tested.tls
    return (
        facts.address if tested.address else "",
        calling,
        called,
        facts.listener,
        (facts.tls_subject, facts.tls_names, facts.tls_known) if tls else None,
        facts.user_identity if tested.identity else None,
    )


def decide(config: Config, facts: AssociationFacts) -> AccessDecision:
    """The access decision for ``facts`` (see the module docstring), memoised."""
    entry = _decision_cache.get(id(config))
    if entry is None or entry[0] is not config:
        if len(_decision_cache) >= _DECISION_CACHE_CONFIGS:
            _decision_cache.clear()
        entry = (config, _tested(config), {})
        _decision_cache[id(config)] = entry
    memo = entry[2]
    key = _memo_key(entry[1], facts)
    decision = memo.get(key)
    if decision is None:
        if len(memo) >= _DECISION_CACHE_SIZE:
            memo.clear()
        decision = memo[key] = _decide(config, facts)
    return decision


def _decide(config: Config, facts: AssociationFacts) -> AccessDecision:
    verdicts = {service: _verdict(config, facts, service) for service in _named_services(config)}
    others = _verdict(config, facts, None)
    granted = {s: v for s, v in verdicts.items() if v.allowed}
    by_service = {s: v.rule for s, v in verdicts.items()}
    if granted or others.allowed:
        deciding = sorted({(v.order, v.rule) for v in granted.values()} or {(0, others.rule)})
        move = granted.get("move")
        return AccessDecision(
            True,
            ", ".join(rule for _, rule in deciding),
            frozenset(granted),
            move.move_destinations if move is not None else (),
            provisional=all(v.provisional for v in granted.values())
            if granted
            else others.provisional,
            by_service=by_service,
            others=others.allowed,
        )
    first = min((*verdicts.values(), others), key=lambda v: v.order)
    return AccessDecision(
        False,
        first.rule,
        frozenset(),
        (),
        first.reject_reason,
        by_service=by_service,
    )


def local_ae_for(config: Config, called_ae: str, listener: str) -> LocalAE | None:
    """The local AE that answers ``called_ae`` on ``listener`` (as the acceptor routes)."""
    for ae in config.local_aes:
        if ae.ae_title == called_ae:
            if ae.listeners is not None and listener not in ae.listeners:
                return None
            return ae
    return None


def move_destination(
    config: Config, decision: AccessDecision, ae_title: str, calling_ae: str | None = None
) -> Peer | None:
    """The peer a C-MOVE may send to when it names ``ae_title`` as Move Destination, or None
    (answer 0xA801, Refused: Move Destination unknown). A peer qualifies when it has
    ``move_destination: true`` and is one of the peers (by name) the rule that allowed
    ``move`` lists; a rule that lists none defers to the calling peer's
    ``allowed_move_destinations``; when that is empty too, any move destination will do."""
    if not decision.permits("move"):
        return None
    names: tuple[str, ...] | list[str] = decision.move_destinations
    if not names and calling_ae is not None:
        caller = next((p for p in config.peers if p.ae_title == calling_ae), None)
        if caller is not None:
            names = caller.allowed_move_destinations
    for peer in config.peers:
        if peer.ae_title != ae_title or not peer.move_destination:
            continue
        if names and peer.name not in names:
            continue
        return peer
    return None


# --------------------------------------------------------------------------------------------
# `dicomd explain`: the same path an association takes, without a network.


@dataclass(frozen=True)
class Explanation:
    allowed: bool
    stage: str  # where the outcome is decided: connect, associate, service
    rule: str
    outcome: str  # what the peer experiences, in words
    listener: str
    connect: AccessDecision
    decision: AccessDecision | None = None
    reject: tuple[int, int, int] | None = None  # (result, source, reason) of the A-ASSOCIATE-RJ
    offered: frozenset[str] = frozenset()  # permissions the called AE serves
    granted: frozenset[str] = frozenset()  # offered ∩ what the decision allows
    service: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict[str, object]:
        return {
            "allowed": self.allowed,
            "stage": self.stage,
            "rule": self.rule,
            "outcome": self.outcome,
            "listener": self.listener,
            "reject": list(self.reject) if self.reject else None,
            "services": sorted(self.granted),
            "service": self.service,
            "move_destinations": list(self.decision.move_destinations) if self.decision else [],
            "notes": list(self.notes),
        }


def ae_permissions(ae: LocalAE, registry: Registry) -> frozenset[str]:
    """The permission verbs the services enabled on ``ae`` serve."""
    verbs: set[str] = set()
    for name in ae.enabled_services():
        plugin = registry.services.get(name)
        if plugin is not None:
            verbs.update(plugin.permissions)
    return frozenset(verbs)


def explain(
    config: Config,
    facts: AssociationFacts,
    *,
    service: str | None = None,
    registry: Registry | None = None,
) -> Explanation:
    """What happens to an association with ``facts`` (all known), step by step as the
    acceptor does it; limits (counts of open associations) are not part of it."""
    if registry is None:
        from dicomd.services.registry import discover

        registry = discover()[0]
    listener = facts.listener
    notes: list[str] = []
    tls = next((li.tls for li in config.listeners if li.name == listener), None)
    if tls is None and (facts.tls_subject or facts.tls_names):
        notes.append(f"listener {listener!r} has no TLS: a peer there has no certificate")
        facts = AssociationFacts(
            facts.address,
            facts.calling_ae,
            facts.called_ae,
            listener,
            None,
            (),
            facts.user_identity,
        )
    at_connect = AssociationFacts(facts.address, listener=listener, tls_known=False)
    connect = decide(config, at_connect)
    if not connect.allowed:
        return Explanation(
            False,
            "connect",
            connect.rule,
            "connection closed before any PDU is read (no rule can allow this address "
            "on this listener)",
            listener,
            connect,
            notes=tuple(notes),
        )
    if tls is not None:
        after_tls = AssociationFacts(
            facts.address,
            listener=listener,
            tls_subject=facts.tls_subject,
            tls_names=facts.tls_names,
        )
        connect = decide(config, after_tls)
        if not connect.allowed:
            return Explanation(
                False,
                "connect",
                connect.rule,
                "connection closed after the TLS handshake, before any PDU is read",
                listener,
                connect,
                notes=tuple(notes),
            )
    called = facts.called_ae or ""
    local_ae = local_ae_for(config, called, listener)
    if local_ae is None:
        reject = (1, 1, REASON_CALLED_AE_NOT_RECOGNIZED)
        return Explanation(
            False,
            "associate",
            "local_aes",
            f"A-ASSOCIATE-RJ (permanent, service-user, called AE title not recognized): "
            f"{called!r} is not served on listener {listener!r}",
            listener,
            connect,
            reject=reject,
            notes=tuple(notes),
        )
    decision = decide(config, facts)
    if not decision.allowed:
        reject = (1, 1, decision.reject_reason)
        return Explanation(
            False,
            "associate",
            decision.rule,
            f"A-ASSOCIATE-RJ (permanent, service-user, {REASON_TEXT[decision.reject_reason]})",
            listener,
            connect,
            decision,
            reject,
            notes=tuple(notes),
        )
    offered = ae_permissions(local_ae, registry)
    granted = frozenset(v for v in offered if decision.permits(v))
    if service is None:
        outcome = "association accepted; services: " + (", ".join(sorted(granted)) or "none")
        unserved = sorted(decision.services - offered)
        if unserved:
            outcome += (
                f" (the policy also allows {', '.join(unserved)}, which {called} does not serve)"
            )
        return Explanation(
            True,
            "associate",
            decision.rule,
            outcome,
            listener,
            connect,
            decision,
            offered=offered,
            granted=granted,
            notes=tuple(notes),
        )
    if service not in offered:
        outcome = (
            f"association accepted, but {called} does not serve {service!r}: its presentation "
            "contexts are rejected (abstract syntax not supported)"
        )
        return Explanation(
            False,
            "service",
            f"local_aes ({called})",
            outcome,
            listener,
            connect,
            decision,
            offered=offered,
            granted=granted,
            service=service,
            notes=tuple(notes),
        )
    by = decision.by_service.get(service, decision.rule)
    if not decision.permits(service):
        return Explanation(
            False,
            "service",
            by,
            f"association accepted, but {service!r} is not granted: its presentation "
            "contexts are rejected (user-rejection)",
            listener,
            connect,
            decision,
            offered=offered,
            granted=granted,
            service=service,
            notes=tuple(notes),
        )
    return Explanation(
        True,
        "service",
        by,
        f"association accepted; {service!r} granted",
        listener,
        connect,
        decision,
        offered=offered,
        granted=granted,
        service=service,
        notes=tuple(notes),
    )
