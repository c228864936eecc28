"""Process lifecycle: config → listeners → privilege drop → services → serve → reload/drain.

The order matters and follows DESIGN.md: everything that needs root (binding port 104,
reading TLS keys) happens before the privilege drop, and the drop happens before any
thread could start. Reload (SIGHUP) builds a new ``Generation`` and swaps it in for new
associations; a config that does not validate is logged and the old one stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import resource
import signal
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicomd.acceptor import AcceptorAssociation, Counters, Generation
from dicomd.access import AssociationFacts, decide
from dicomd.config import ConfigError, LoadedConfig, load_config
from dicomd.logging import get_logger
from dicomd.services.base import Service, ServiceContext
from dicomd.services.registry import Registry, discover
from dicomd.system import activation, privileges, sd_notify
from dicomd.tls import PEER_SSL_CONTEXTS, TlsAcceptor, peer_contexts, server_context
from dicomd.transport import Link

if TYPE_CHECKING:
    from dicomd.config import Config, Listener

log = get_logger("dicomd.supervisor")

RESTART_BACKOFF_INITIAL = 1.0
RESTART_BACKOFF_MAX = 60.0


class StartupError(Exception):
    """dicomd cannot start; the message says why and what to do."""


@dataclass
class BoundListener:
    config: Listener
    sock: socket.socket
    ssl: ssl.SSLContext | None
    inherited: bool
    server: asyncio.Server | None = None


@dataclass
class ServiceSet:
    """The service instances of one generation and their supervised background tasks."""

    instances: dict[str, dict[str, Service]]
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def build_services(
    config: Config, registry: Registry, shared: dict[str, Any] | None = None
) -> dict[str, dict[str, Service]]:
    """Instantiate every enabled service per local AE. A service that cannot be built is
    a configuration error, reported as such (not a crash)."""
    result: dict[str, dict[str, Service]] = {}
    problems: list[str] = []
    for index, ae in enumerate(config.local_aes):
        services: dict[str, Service] = {}
        for name, options in ae.enabled_services().items():
            cls = registry.services.get(name)
            if cls is None:
                problems.append(f"local_aes[{index}].services.{name}: service is not installed")
                continue
            try:
                services[name] = cls(
                    options,
                    ServiceContext(
                        config=config, local_ae=ae, shared=shared if shared is not None else {}
                    ),
                )
            except Exception as exc:
                problems.append(f"local_aes[{index}].services.{name}: cannot start: {exc}")
        result[ae.ae_title] = services
    if problems:
        raise StartupError("\n".join(problems))
    return result


def bind_listener(listener: Listener) -> socket.socket:
    infos = socket.getaddrinfo(
        listener.address, listener.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    family, socktype, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, socktype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # IPv6 only, so "::" and "0.0.0.0" can both be listeners on one port (the
            # config check treats them as distinct); list both to serve both families.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(listener.backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise StartupError(
            f"listener {listener.name!r}: cannot listen on {listener.address} port "
            f"{listener.port}: {exc.strerror or exc}"
        ) from exc
    return sock


class Supervisor:
    # Worker processes (dicomd.workers) count associations across processes.
    association_class: type[AcceptorAssociation] = AcceptorAssociation

    def __init__(self, loaded: LoadedConfig, config_path: Path | None) -> None:
        self.loaded = loaded
        self.config_path = config_path
        self.registry, self.registry_problems = discover()
        self.notifier = sd_notify.Notifier.from_environment()
        self.counters = Counters()
        self.listeners: list[BoundListener] = []
        self.generation: Generation | None = None
        self.service_sets: dict[int, ServiceSet] = {}
        self.links: set[Link] = set()
        self.loop: asyncio.AbstractEventLoop | None = None  # known once connections arrive
        # Listener name → its current server context. Connections take the one current when
        # they arrive, so a reload (SIGHUP) serves renewed certificates to new connections.
        self.tls_contexts: dict[str, ssl.SSLContext] = {}
        # Process-wide resources services share (ServiceContext.shared), kept across reloads.
        self.shared: dict[str, Any] = {}
        self.stopping = asyncio.Event()
        self._reloading = False
        self._background: set[asyncio.Task[None]] = set()

    # -- start-up ------------------------------------------------------------------------

    def prepare(self) -> None:
        """Everything that may need root: bind or adopt sockets, load TLS keys, then drop."""
        config = self.loaded.config
        inherited = activation.inherited_sockets()
        for listener in config.listeners:
            socks = inherited.pop(listener.name, None)
            if socks:
                sock, is_inherited = socks[0], True
                sock.setblocking(False)
            else:
                sock, is_inherited = bind_listener(listener), False
            ctx = None
            if listener.tls is not None:
                try:
                    ctx = server_context(listener.tls)
                except (OSError, ssl.SSLError) as exc:
                    raise StartupError(
                        f"listener {listener.name!r}: cannot load TLS material: {exc}"
                    ) from exc
            self.listeners.append(BoundListener(listener, sock, ctx, is_inherited))
            if ctx is not None:
                self.tls_contexts[listener.name] = ctx
        try:
            # Client contexts of TLS peers (C-MOVE destinations): their keys too are read
            # before the privilege drop. Services find them in ServiceContext.shared.
            self.shared[PEER_SSL_CONTEXTS] = peer_contexts(config.peers)
        except (OSError, ssl.SSLError) as exc:
            raise StartupError(str(exc)) from exc
        for name, socks in inherited.items():
            log.warning(
                "unused_inherited_socket",
                name=name,
                count=len(socks),
                hint="LISTEN_FDNAMES must match listener names in the config",
            )
        self._drop_privileges(config)

    def _drop_privileges(self, config: Config) -> None:
        if not privileges.running_as_root():
            return
        if config.run_as.allow_root:
            log.warning("running_as_root", reason="run_as.allow_root is true")
            return
        if self.loaded.is_default:
            # The embedded defaults are for trying dicomd from a source tree, where ./var
            # belongs to whoever started it; a configured dicomd always drops to run_as.
            log.warning(
                "running_as_root",
                reason="development defaults keep the invoking user; never use them in "
                "production (a configuration file makes dicomd drop to run_as)",
            )
            return
        try:
            privileges.drop_privileges(config.run_as.user, config.run_as.group)
        except privileges.PrivilegeError as exc:
            raise StartupError(
                f"started as root and cannot drop privileges: {exc}; create the user "
                f"(e.g. adduser --system --group {config.run_as.user}) or set "
                "run_as.allow_root: true"
            ) from exc
        log.info("privileges_dropped", user=config.run_as.user, group=config.run_as.group)

    def _prepare_storage_dirs(self, config: Config) -> None:
        """Create the data directories of the embedded defaults so a first run just works."""
        if not self.loaded.is_default:
            return
        config.archive.root.mkdir(parents=True, exist_ok=True)
        for source in config.worklist_sources:
            if source.path is not None:
                source.path.mkdir(parents=True, exist_ok=True)

    async def start(self) -> None:
        config = self.loaded.config
        for problem in self.registry_problems:
            log.warning("service_plugin_unavailable", problem=problem)
        self._prepare_storage_dirs(config)
        self.generation = self._new_generation(config)
        await self._serve_listeners()
        loop = asyncio.get_running_loop()
        for sig, handler in (
            (signal.SIGHUP, self._on_sighup),
            (signal.SIGTERM, self.stopping.set),
            (signal.SIGINT, self.stopping.set),
        ):
            loop.add_signal_handler(sig, handler)
        interval = sd_notify.watchdog_interval()
        if interval is not None:
            self._spawn(sd_notify.watchdog_loop(self.notifier, interval))
        # What start-up made (modules, configuration, services) lives as long as the
        # process: move it out of the garbage collector's sight, so that the full
        # collections that connection after connection eventually triggers only walk
        # the objects of live connections and caches (measured in process: 7 µs less per
        # association when every A-ASSOCIATE-RQ is new, bench/profile_echo.py).
        gc.collect()
        gc.freeze()
        self.notifier.ready(self._status_line())

    async def _serve_listeners(self) -> None:
        loop = asyncio.get_running_loop()
        for bound in self.listeners:
            # TLS is not create_server(ssl=...): TlsAcceptor checks the address first, uses
            # the current context, bounds the handshake and logs a failed one.
            bound.server = await loop.create_server(self._factory(bound), sock=bound.sock)
            log.info(
                "listening",
                listener=bound.config.name,
                address=bound.config.address,
                port=bound.config.port,
                tls=bound.ssl is not None,
                socket_activation=bound.inherited,
            )

    def _status_line(self) -> str:
        aes = ", ".join(ae.ae_title for ae in self.loaded.config.local_aes)
        ports = ", ".join(str(b.config.port) for b in self.listeners)
        return f"serving {aes} on port {ports}; {self.counters.active} associations"

    def _new_generation(self, config: Config) -> Generation:
        instances = build_services(config, self.registry, self.shared)
        generation = Generation(config, instances, self.counters)
        service_set = ServiceSet(instances)
        for ae_title, services in instances.items():
            for name, service in services.items():
                service_set.tasks.append(
                    asyncio.get_running_loop().create_task(
                        self._supervise(service, f"{ae_title}/{name}"),
                        name=f"service {ae_title}/{name}",
                    )
                )
        self.service_sets[id(generation)] = service_set
        return generation

    async def _supervise(self, service: Service, label: str) -> None:
        """Keep one service's background work running; restart it with backoff on failure."""
        delay = RESTART_BACKOFF_INITIAL
        while True:
            started = asyncio.get_running_loop().time()
            try:
                await service.run()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if asyncio.get_running_loop().time() - started > 10 * RESTART_BACKOFF_MAX:
                    delay = RESTART_BACKOFF_INITIAL  # it ran well for a long while
                log.error(
                    "service_crashed",
                    service=label,
                    error=repr(exc),
                    restart_in_s=delay,
                    exc_info=True,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RESTART_BACKOFF_MAX)

    def _factory(self, bound: BoundListener):  # type: ignore[no-untyped-def]
        name = bound.config.name

        def make() -> asyncio.Protocol:
            generation = self.generation
            assert generation is not None
            if bound.ssl is None:
                return self._new_link(generation, name, 0.0)
            return TlsAcceptor(
                listener=name,
                get_context=lambda: self.tls_contexts[name],
                admit=lambda address: self._admit(generation, name, address),
                make_link=lambda elapsed: self._new_link(generation, name, elapsed),
                handshake_timeout=generation.config.limits.acse_timeout,
            )

        return make

    def _new_link(self, generation: Generation, listener: str, elapsed: float) -> Link:
        limits = generation.config.limits
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        assoc = self.association_class(generation, listener)
        link = Link(
            assoc,
            requestor=False,
            max_pdu_length=limits.max_pdu_length,
            # ARTIM bounds connect → complete A-ASSOCIATE-RQ, TLS handshake included.
            artim_timeout=max(limits.acse_timeout - elapsed, 0.001),
            idle_timeout=limits.idle_timeout,
            dimse_timeout=limits.dimse_timeout,
            loop=self.loop,
            tracker=self.links,
        )
        self.links.add(link)
        return link

    def _admit(self, generation: Generation, listener: str, address: str) -> bool:
        """Before a TLS handshake: False (logged) when no rule can allow ``address``."""
        facts = AssociationFacts(address=address, listener=listener, tls_known=False)
        decision = decide(generation.config, facts)
        if decision.allowed:
            return True
        self.counters.refused_on_connect += 1
        log.warning(
            "connection_refused",
            rule=decision.rule,
            address=address,
            listener=listener,
            reason=f"refused by {decision.rule}: no rule can allow this address",
        )
        return False

    def _spawn(self, coro) -> None:  # type: ignore[no-untyped-def]
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- reload --------------------------------------------------------------------------

    def _on_sighup(self) -> None:
        if self._reloading:
            log.warning("reload_ignored", reason="a reload is already running")
            return
        self._spawn(self.reload())

    async def reload(self) -> bool:
        self._reloading = True
        self.notifier.reloading()
        try:
            try:
                loaded = load_config(self.config_path, registry=self.registry)
            except ConfigError as exc:
                for finding in exc.findings:
                    log.error("reload_config_error", finding=str(finding))
                log.error("reload_failed", reason="configuration has errors; keeping the old one")
                return False
            changed = self._listener_changes(loaded.config)
            if changed:
                log.warning(
                    "reload_listener_changes_ignored",
                    changes=changed,
                    hint="address, port and backlog changes, and adding or removing TLS on "
                    "a listener, take effect on restart",
                )
            try:
                tls_contexts = self._reload_tls(loaded.config)
                peer_ssl = peer_contexts(loaded.config.peers)
            except (OSError, ssl.SSLError) as exc:
                log.error(
                    "reload_failed",
                    reason=f"cannot load TLS material: {exc}; keeping the old configuration",
                    hint="after the privilege drop dicomd reads keys as "
                    f"{self.loaded.config.run_as.user!r}: they must be readable by it",
                )
                return False
            try:
                new_generation = self._new_generation(loaded.config)
            except StartupError as exc:
                log.error("reload_failed", reason=str(exc))
                return False
            self.tls_contexts = tls_contexts
            self.shared[PEER_SSL_CONTEXTS] = peer_ssl
            if tls_contexts:
                log.info("tls_reloaded", listeners=sorted(tls_contexts))
            old = self.generation
            self.generation = new_generation
            self.loaded = loaded
            if old is not None:
                self._spawn(self._retire(old))
            log.info("reloaded", files=[str(f) for f in loaded.files])
            return True
        finally:
            self._reloading = False
            self.notifier.ready(self._status_line())

    def _listener_changes(self, config: Config) -> list[str]:
        def socket_part(listener: Listener) -> tuple[object, ...]:
            # TLS settings are reloaded; only whether a listener has TLS needs a restart.
            return (listener.address, listener.port, listener.backlog, listener.tls is None)

        old = {b.config.name: b.config for b in self.listeners}
        new = {listener.name: listener for listener in config.listeners}
        changes = [f"added {n}" for n in new.keys() - old.keys()]
        changes += [f"removed {n}" for n in old.keys() - new.keys()]
        changes += [
            f"changed {n}"
            for n in new.keys() & old.keys()
            if socket_part(new[n]) != socket_part(old[n])
        ]
        return sorted(changes)

    def _reload_tls(self, config: Config) -> dict[str, ssl.SSLContext]:
        """New server contexts for the TLS listeners, files read again (renewed
        certificates); a listener whose TLS was removed keeps its old context until restart."""
        new = {listener.name: listener for listener in config.listeners}
        contexts: dict[str, ssl.SSLContext] = {}
        for name, old_ctx in self.tls_contexts.items():
            listener = new.get(name)
            if listener is None or listener.tls is None:
                contexts[name] = old_ctx
                continue
            try:
                contexts[name] = server_context(listener.tls)
            except (OSError, ssl.SSLError) as exc:
                raise type(exc)(f"listener {name!r}: {exc}") from exc
        return contexts

    async def _retire(self, generation: Generation) -> None:
        """Stop an old generation's services once its last association has ended."""
        while generation.open_associations > 0:
            await asyncio.sleep(0.5)
        service_set = self.service_sets.pop(id(generation), None)
        if service_set is not None:
            for task in service_set.tasks:
                task.cancel()
            await asyncio.gather(*service_set.tasks, return_exceptions=True)

    # -- shutdown ------------------------------------------------------------------------

    async def serve_until_stopped(self) -> None:
        await self.stopping.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        config = self.loaded.config
        self.notifier.stopping()
        for bound in self.listeners:
            if bound.server is not None:
                bound.server.close()
        log.info(
            "stopping",
            open_associations=len(self.links),
            shutdown_timeout_s=config.shutdown_timeout,
        )
        deadline = asyncio.get_running_loop().time() + config.shutdown_timeout
        while self.links and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        if self.links:
            log.warning("aborting_associations", count=len(self.links))
            for link in list(self.links):
                link.abort()
            waits = [link.closed for link in list(self.links)]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waits, return_exceptions=True), 5)
        for service_set in self.service_sets.values():
            for task in service_set.tasks:
                task.cancel()
        all_tasks = [t for s in self.service_sets.values() for t in s.tasks]
        await asyncio.gather(*all_tasks, return_exceptions=True)
        for task in list(self._background):
            task.cancel()
        # Shared resources that flush on the way out (the archive commits its queue and
        # checkpoints its journal), off the event loop.
        for close in self.shared.get("on_shutdown", []):
            try:
                await asyncio.get_running_loop().run_in_executor(None, close)
            except Exception as exc:
                log.error("shutdown_hook_failed", error=repr(exc))
        log.info("stopped")


def raise_file_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard limit: each association is a socket,
    and systemd's default soft limit (1024) would cap dicomd near 1000 peers. Python never
    uses select(), so the historical reason for the low soft limit does not apply."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft, hard


def choose_event_loop(setting: str) -> str:
    """Install uvloop's policy when wanted and available; returns the loop in use."""
    if setting in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if setting == "uvloop":
                raise StartupError("event_loop: uvloop is configured but not installed") from None
            return "asyncio"
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        return "uvloop"
    return "asyncio"


def run(loaded: LoadedConfig, config_path: Path | None) -> int:
    from dicomd.workers import run_workers, worker_count

    if worker_count(loaded.config.workers) > 1:
        return run_workers(loaded, config_path)
    loop_name = choose_event_loop(loaded.config.event_loop)

    async def main() -> int:
        supervisor = Supervisor(loaded, config_path)
        config = loaded.config
        if loaded.is_default:
            log.warning(
                "running_on_defaults",
                reason="no configuration file found; using embedded development defaults",
                ae_title=config.local_aes[0].ae_title,
                port=config.listeners[0].port,
                archive=str(config.archive.root),
                index=config.archive.index_url,
                worklists=[str(s.path) for s in config.worklist_sources if s.path],
            )
        else:
            log.info("configuration_loaded", files=[str(f) for f in loaded.files])
        for warning in loaded.warnings:
            log.warning("config_warning", finding=str(warning))
        try:
            supervisor.prepare()
            await supervisor.start()
        except StartupError as exc:
            log.error("startup_failed", reason=str(exc))
            return 1
        log.info(
            "started", event_loop=loop_name, pid=os.getpid(), max_open_files=raise_file_limit()[0]
        )
        await supervisor.serve_until_stopped()
        return 0

    return asyncio.run(main())
