"""
Builds the running gateway from a L{Config}: the TLS listener, the HTTP redirect listener, the
proxy, and reload on SIGHUP.

A reload follows Caddy's rule: the new world (certificates, contexts, route table, upstream pools) is
built completely beside the old one and swapped in one step, or not at all.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Sequence, cast

import attrs
from twisted.application.service import MultiService, Service
from twisted.internet import defer, task
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IReactorFDSet, IReactorTime
from twisted.logger import Logger

from mtlsgate.app import fdlimit
from mtlsgate.accounting import RequestObservers
from mtlsgate.observe.accesslog import AccessEvents, AccessLogService
from mtlsgate.config.model import Config, ConfigError
from mtlsgate.app.filewatch import FileWatch, watched_files
from mtlsgate.observe.metrics import GatewayMetrics, NoMetrics
from mtlsgate.tls.pki import PKIError
from mtlsgate.http import compiled
from mtlsgate.http.negotiate import LazyH2ServerFactory, NegotiatingFactory
from mtlsgate.proxy.exchange import GatewaySite, ProxyResource, ProxyState, RouteEntry
from mtlsgate.proxy.routing import RouteTable
from mtlsgate.proxy.tcp import SNIDispatchFactory, TCPProxy, TCPState, tcp_state
from mtlsgate.observe.summary import certificates_table, routes_table
from mtlsgate.tls.server import (
    CertificateSet,
    ClientVerification,
    GatewayTLSFactory,
    ServedCertificate,
    ServerTLS,
    load_served_certificates,
    placeholder_certificate,
)  # fmt: skip
from mtlsgate.proxy.upstream import UpstreamGroup
from mtlsgate.reactors import IGatewayReactor, IReactorTimeAndTCP

if TYPE_CHECKING:
    # The ACME stack (acme, josepy, treq: ~9 MiB) is imported only by a gateway that runs autocert,
    # txredisapi only by one with a shared store.
    from mtlsgate.acme.service import AcmeIssuingService
    from mtlsgate.cluster.node import ClusterNode

log = Logger(namespace="mtlsgate")

_FLUSH_GRACE = 0.5  # seconds between the last request finishing and the reactor stopping
_STORE_WATCH_INTERVAL = 5.0  # how often workers without autocert look for new certificates


def tls_alpn_publish_dir(certs_dir: str) -> str:
    """Where the autocert worker publishes TLS-ALPN-01 validation certificates for its siblings."""
    return os.path.join(certs_dir, ".tls-alpn-01")


@attrs.frozen
class World:
    """One configuration made real: the certificate set and the proxy state built from it."""

    config: Config
    verification: ClientVerification
    certificates: CertificateSet
    proxy: ProxyState
    upstreams: tuple[UpstreamGroup, ...]
    tcp: TCPState = TCPState(routes={})


def private_key_files(config: Config) -> list[str]:
    """Every file holding a private key the configuration reads."""
    files = [spec.key or spec.cert for spec in config.certificates]
    if config.certs_dir and os.path.isdir(config.certs_dir):
        files += [os.path.join(config.certs_dir, n) for n in sorted(os.listdir(config.certs_dir)) if n.endswith((".pem", ".key"))]
    files += [route.tls_client_key_file or route.tls_client_cert_file for route in config.routes if route.tls_client_cert_file]
    files += [route.tls_client_key_file or route.tls_client_cert_file for route in config.tcp_routes if route.tls_client_cert_file]
    return sorted(set(files))


def check_key_permissions(config: Config) -> None:
    """Warn about private keys that group or others can read; with strict_permissions, refuse them."""
    for path in private_key_files(config):
        try:
            mode = os.stat(path).st_mode & 0o777
        except OSError:
            continue  # reported by whatever loads it
        if mode & 0o077:
            problem = f"{path}: private key file is readable by group or others (mode {mode:04o}); chmod 600 it"
            if config.strict_permissions:
                raise PKIError(f"{problem} (strict_permissions is on)")
            log.warn("{problem}", problem=problem)


def build_world(reactor: IReactorTimeAndTCP, config: Config, server_tls: ServerTLS, shared_crls: Sequence[Any] = ()) -> World:
    """
    Load every file and build every context; raises L{ConfigError} or L{PKIError} on a problem.
    C{shared_crls}: the CRLs of a cluster's shared store (L{mtlsgate.cluster}), beside C{crl_file}'s.
    """
    check_key_permissions(config)
    verification = ClientVerification.load(config.downstream_mtls, shared_crls)
    certificates = server_tls.build(served_certificates(config), verification, config.unknown_sni, config.http2)
    entries = []
    for route in config.routes:
        entries.append(RouteEntry(route=route, upstreams=UpstreamGroup(reactor, route)))
    table = RouteTable((e.route.host, e.route.prefix, e) for e in entries)
    state = ProxyState(
        routes=table,
        global_rules=config.allow_client,
        require_client_certificate=config.downstream_mtls.client_auth == "require",
        hsts_header=config.hsts.header() if config.hsts is not None else None,
    )
    tcp = tcp_state(config.tcp_routes, config.allow_client, state.require_client_certificate, config.access_log != "off")
    return World(config=config, verification=verification, certificates=certificates, proxy=state, upstreams=tuple(e.upstreams for e in entries), tcp=tcp)


def served_certificates(config: Config) -> list[ServedCertificate]:
    """The configured certificates and certs_dir's; with autocert (or a shared store to copy from) and nothing yet, a placeholder."""
    served = load_served_certificates(config.certificates, config.certs_dir)
    if not served and (config.autocert is not None or config.storage is not None):
        served = [placeholder_certificate()]
    return served


def certificate_problem(served: Sequence[ServedCertificate]) -> str | None:
    """Why these certificates cannot serve (none issued yet, one expired), or None."""
    if all(s.placeholder for s in served):
        return "no certificate yet (autocert has not issued one)"
    now = datetime.now(timezone.utc)
    for s in served:
        if s.leaf.not_valid_after_utc <= now:
            return f"certificate {', '.join(s.names)} from {s.source} expired at {s.leaf.not_valid_after_utc.isoformat()}"
    return None


def certificate_expiries(served: Sequence[ServedCertificate]) -> list[tuple[str, datetime]]:
    """(first name, or the file, and not-after) of each certificate, for the expiry metric."""
    return [(s.names[0] if s.names else s.source, s.leaf.not_valid_after_utc) for s in served]


def warn_about(config: Config) -> None:
    """Start-up warnings for settings that weaken security on request."""
    for route in config.routes:
        if route.tls_skip_verify:
            log.warn("route {route}: tls_skip_verify is on; the upstream's certificate is NOT verified", route=route.name)
        elif any(url.startswith("http://") for url in route.to):
            log.warn("route {route}: upstream over plain http://; traffic to it is not encrypted", route=route.name)
    for tcp_route in config.tcp_routes:
        if tcp_route.tls_skip_verify:
            log.warn("TCP route {route}: tls_skip_verify is on; the upstream's certificate is NOT verified", route=tcp_route.name)
        elif any(url.startswith("tcp://") for url in tcp_route.to):
            log.warn("TCP route {route}: upstream over plain tcp://; traffic to it is not encrypted", route=tcp_route.name)
    if config.downstream_mtls.client_auth == "off":
        log.warn("client certificates are not requested (client_auth off): the gateway only terminates TLS")


@attrs.frozen
class WorkerRole:
    """
    What one process of a worker group does (L{mtlsgate.app.workers}): it serves the TLS listener the
    parent bound (C{https_fd}); only one worker holds the HTTP listener and runs autocert, the others
    pick up what autocert stores by watching C{certs_dir}.
    """

    index: int
    https_fd: int
    http_fd: int | None = None
    acme: bool = False


class StartupError(SystemExit, Exception):
    """
    A listener that cannot start: one line on stderr and exit status 1, as a SystemExit. It is an
    Exception too, so that twistd's runner, which cleans up after an Exception from starting the
    application (and passes it to a daemon's parent), removes the pidfile it wrote.
    """


class _Listener(Service):
    """
    Listens on an endpoint string, or adopts a socket a parent process bound (C{adopt_fd});
    binding happens in privilegedStartService (before twistd -u).
    """

    def __init__(self, reactor: IGatewayReactor, description: str, factory: Any, what: str, adopt_fd: int | None = None) -> None:
        self.reactor = reactor
        self.description = description
        self.factory = factory
        self.what = what
        self.adopt_fd = adopt_fd
        self.port: Any = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self.port is None:
            self._listen()

    def startService(self) -> None:
        super().startService()
        if self.port is None:
            self._listen()

    def _listen(self) -> None:
        if self.adopt_fd is not None:
            probe = socket.socket(fileno=os.dup(self.adopt_fd))
            family = probe.family
            probe.close()
            self.port = self.reactor.adoptStreamPort(self.adopt_fd, family, self.factory)
            os.close(self.adopt_fd)  # the port holds a duplicate
            return
        endpoint = serverFromString(self.reactor, self.description)
        d = endpoint.listen(self.factory)
        result: list[Any] = []
        d.addBoth(result.append)
        if not result:
            raise StartupError(f"mtlsgate: {self.what} {self.description}: listening did not complete")
        if not hasattr(result[0], "getHost"):
            raise StartupError(f"mtlsgate: cannot listen for {self.what} on {self.description}: {result[0].getErrorMessage()}")
        self.port = result[0]
        host = self.port.getHost()
        log.info("{what} listening on {host}:{port}", what=self.what, host=getattr(host, "host", "?"), port=getattr(host, "port", "?"))

    def stopService(self) -> Any:
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        return None

    @property
    def bound_port(self) -> int | None:
        return getattr(self.port.getHost(), "port", None) if self.port is not None else None


def admin_listener_for(
    reactor: IGatewayReactor, address: str, registry: Any, readiness: Callable[[], str | None], degraded: Callable[[], str | None] = lambda: None,
) -> _Listener:
    """The admin listener (C{/metrics}, C{/healthz}, C{/readyz}), not yet started."""
    # twisted.web's server and prometheus_client's exposition (about 4 MiB per process together) are imported only by a
    # process that serves the admin or the plain-HTTP listener: a worker serving only HTTPS never does.
    from twisted.web import server

    from mtlsgate.observe.admin import admin_resource

    admin = server.Site(admin_resource(registry, readiness, degraded))
    admin.noisy = False  # no "Starting factory" lines
    admin.log = lambda request: None  # type: ignore[method-assign]
    return _Listener(reactor, address, admin, "admin (/metrics, /healthz, /readyz)")


def written_out(reactor: IReactorTime, grace: float, interval: float = 0.01) -> defer.Deferred[None]:
    """
    Fires once no transport has bytes waiting to be sent (none is among the reactor's writers), or after
    C{grace} seconds, whichever is first: a stop with nothing left to send does not wait.  A reactor that
    does not tell its writers (no L{IReactorFDSet}) waits the whole C{grace}.
    """
    if not IReactorFDSet.providedBy(reactor):
        return task.deferLater(reactor, grace, lambda: None)
    fdset = cast(IReactorFDSet, reactor)
    deadline = reactor.seconds() + grace
    done: defer.Deferred[None] = defer.Deferred()

    def check() -> None:
        if not fdset.getWriters() or reactor.seconds() >= deadline:
            done.callback(None)
        else:
            reactor.callLater(interval, check)

    check()
    return done


class GatewayService(MultiService):
    """The gateway: listeners plus the current L{World}, reloadable with L{reload} (SIGHUP)."""

    def __init__(
        self, reactor: IGatewayReactor, world: World, server_tls: ServerTLS, reload_config: Callable[[], Config] | None = None,
        worker: WorkerRole | None = None, shared_crls: Sequence[Any] = (),
    ) -> None:  # fmt: skip
        super().__init__()
        self.reactor = reactor
        self.shared_crls = list(shared_crls)
        self.server_tls = server_tls
        self.reload_config = reload_config
        self.world = world
        self.worker = worker
        server_tls.install(world.certificates)
        # Metrics are read only through the admin listener (a worker group's parent serves it, from the files
        # the workers' GatewayMetrics write); without one, nothing is counted.
        self.metrics: GatewayMetrics | NoMetrics = GatewayMetrics(self._expiries) if world.config.admin_address else NoMetrics()
        self.access_events = AccessEvents(enabled=world.config.access_log != "off")  # off: no per-request event at all
        self.resource = ProxyResource(reactor, world.proxy, RequestObservers([self.access_events, self.metrics]), self.metrics)
        config = world.config
        # HTTP/1.1 and HTTP/2 front ends over the same handler, by ALPN (h2 is offered only with http2 on; a reload may turn it on).
        # The HTTP/2 one (and the h2 library) is imported by the first connection that negotiates h2.
        h2 = LazyH2ServerFactory(self.resource.handle, config.limits, reactor)
        site = self.site = NegotiatingFactory(GatewaySite(self.resource, config.limits), h2)
        # TCP routes: the connection's SNI, once its handshake is done, picks a TCP route or HTTP (mtlsgate.proxy.tcp).
        self.tcp = TCPProxy(reactor, world.tcp, self.metrics)
        server_tls.alpn_for_name = self.tcp.alpn_for
        tls_factory = GatewayTLSFactory(server_tls, SNIDispatchFactory(site, self.tcp), reactor, metrics=self.metrics, limits=config.limits)
        self.https = _Listener(reactor, config.address, tls_factory, "HTTPS", worker.https_fd if worker else None)
        self.https.setServiceParent(self)
        self.listeners = [self.https]
        self.autocert: AcmeIssuingService | None = None
        self.cluster: ClusterNode | None = None
        if config.storage is not None and (worker is None or worker.acme):
            self._join_cluster(config)
        elif config.storage is not None:
            self._follow_cluster(config)
        http01 = None
        if config.autocert is not None:
            if worker is None or worker.acme:
                http01 = self._start_autocert(config)
            else:
                self._follow_autocert(config)
        if config.http_address and (worker is None or worker.http_fd is not None):
            from twisted.web import server

            from mtlsgate.proxy.redirect import RedirectToHTTPS

            redirect = server.Site(RedirectToHTTPS(lambda: self.https.bound_port, http01))
            redirect.log = lambda request: None  # type: ignore[method-assign]
            redirect.noisy = False
            http_listener = _Listener(reactor, config.http_address, redirect, "HTTP (redirect)", worker.http_fd if worker else None)
            http_listener.setServiceParent(self)
            self.listeners.append(http_listener)
        if config.admin_address and worker is None:  # a worker group's parent serves the admin listener
            assert isinstance(self.metrics, GatewayMetrics)
            admin_listener = admin_listener_for(reactor, config.admin_address, self.metrics.registry, self.readiness, self.degraded)
            admin_listener.setServiceParent(self)
            self.listeners.append(admin_listener)
        if config.access_log and config.access_log != "off":
            AccessLogService(config.access_log, config.access_log_format).setServiceParent(self)
        if self.autocert is not None:
            self.autocert.setServiceParent(self)  # after the listeners: validation needs them up
        if reload_config is not None and config.watch_interval is not None:
            FileWatch(reactor, lambda: watched_files(self.world.config), self._files_changed, config.watch_interval).setServiceParent(self)
        self._previous_hup: Any = None

    _ticket_rotation: task.LoopingCall | None = None

    def rotate_session_ticket_key(self) -> None:
        """
        New server contexts for the same certificates: OpenSSL gives each context a fresh random
        session-ticket key (pyOpenSSL cannot set one), so tickets issued before stop resuming and a
        stolen key exposes at most one rotation period of sessions.  Connections open carry on.
        """
        self._swap_certificates(self.world.certificates.served)
        log.info("session-ticket key rotated (every {period:.0f}s)", period=self.world.config.session_ticket_rotation)

    def _swap_certificates(self, served: Sequence[ServedCertificate]) -> None:
        """Build contexts for C{served} and install them (raises L{PKIError} and leaves the old ones on a problem)."""
        world = self.world
        certificates = self.server_tls.build(served, world.verification, world.config.unknown_sni, world.config.http2)
        self.world = attrs.evolve(world, certificates=certificates)
        self.server_tls.install(certificates)

    def _restart_ticket_rotation(self, period: float | None) -> None:
        """Stop the rotation timer, and start it again with C{period} (None: leave it stopped)."""
        if self._ticket_rotation is not None and self._ticket_rotation.running:
            self._ticket_rotation.stop()
        if period is not None:
            self._ticket_rotation = task.LoopingCall(self.rotate_session_ticket_key)
            self._ticket_rotation.clock = self.reactor
            self._ticket_rotation.start(period, now=False)

    def _follow_autocert(self, config: Config) -> None:
        """A worker without autocert: serve what the autocert worker stores and the validations it publishes."""
        assert config.autocert is not None and config.certs_dir is not None
        if "tls-alpn-01" in config.autocert.challenges:
            from mtlsgate.acme.responders import PublishedValidations

            self.server_tls.acme_validation = PublishedValidations(tls_alpn_publish_dir(config.certs_dir))
        certs_dir = config.certs_dir

        def stored() -> list[str]:
            names = sorted(os.listdir(certs_dir)) if os.path.isdir(certs_dir) else []
            return [certs_dir] + [os.path.join(certs_dir, n) for n in names if n.endswith(".pem")]

        FileWatch(self.reactor, stored, self.refresh_certificates, config.watch_interval or _STORE_WATCH_INTERVAL).setServiceParent(self)

    def _join_cluster(self, config: Config) -> None:
        """The shared store (docs/cluster.md): certificates and CRLs from the other gateways, swapped in as they come."""
        from mtlsgate.cluster.node import ClusterNode

        assert config.storage is not None and config.certs_dir is not None
        self.cluster = ClusterNode(
            self.reactor, config.storage, config.certs_dir, self.metrics.registry,
            on_certificates=self.refresh_certificates, on_crls=self.install_shared_crls,
        )  # fmt: skip
        self.cluster.setServiceParent(self)

    def _follow_cluster(self, config: Config) -> None:
        """A worker beside the one connected to the shared store: it picks up what that one copies to disk (CRLs, certificates)."""
        from mtlsgate.cluster.cache import cached_crls, crl_cache_file

        assert config.certs_dir is not None
        certs_dir = config.certs_dir
        interval = config.watch_interval or _STORE_WATCH_INTERVAL
        FileWatch(self.reactor, lambda: [crl_cache_file(certs_dir)], lambda: self.install_shared_crls(cached_crls(certs_dir)), interval).setServiceParent(self)
        if config.autocert is None:  # with autocert, _follow_autocert watches the certificates

            def stored() -> list[str]:
                names = sorted(os.listdir(certs_dir)) if os.path.isdir(certs_dir) else []
                return [certs_dir] + [os.path.join(certs_dir, n) for n in names if n.endswith(".pem")]

            FileWatch(self.reactor, stored, self.refresh_certificates, interval).setServiceParent(self)

    def install_shared_crls(self, crls: Sequence[Any]) -> None:
        """New CRLs from the shared store: new contexts for the same certificates; open connections carry on."""
        world = self.world
        try:
            verification = ClientVerification.load(world.config.downstream_mtls, crls)
            certificates = self.server_tls.build(world.certificates.served, verification, world.config.unknown_sni)
        except (PKIError, OSError) as e:
            log.error("shared CRLs not installed, keeping the ones in use: {error}", error=str(e))
            return
        self.shared_crls = list(crls)
        self.world = attrs.evolve(world, verification=verification, certificates=certificates)
        self.server_tls.install(certificates)
        log.info("installed {n} CRL(s) for client certificates (shared store and crl_file)", n=len(verification.crls))

    def degraded(self) -> str | None:
        """Why the gateway serves in a degraded state (the shared store is away), or None."""
        return self.cluster.degraded() if self.cluster is not None else None

    def _files_changed(self) -> None:
        log.info("configuration or certificate files changed; reloading")
        self.reload()

    def _start_autocert(self, config: Config) -> Callable[[str], str | None] | None:
        """Build the issuing service and its responders; returns the http-01 lookup, if any."""
        from mtlsgate.acme.responders import DNS01Responder, HTTP01Responder, TLSALPN01Responder
        from mtlsgate.acme.service import AcmeIssuingService
        from mtlsgate.acme.store import DirectoryStore, ICertificateStore

        settings = config.autocert
        assert settings is not None and config.certs_dir is not None
        responders: list[Any] = []
        http01 = None
        if "tls-alpn-01" in settings.challenges:
            alpn = TLSALPN01Responder(tls_alpn_publish_dir(config.certs_dir) if self.worker is not None else None)
            self.server_tls.acme_validation = alpn
            responders.append(alpn)
        if "http-01" in settings.challenges and config.http_address:
            http = HTTP01Responder()
            http01 = http.answer
            responders.append(http)
        store: ICertificateStore = DirectoryStore(config.certs_dir)
        if self.cluster is not None:  # any gateway may be the one the CA reaches: all answer every challenge
            from mtlsgate.cluster.node import ClusterCertificateStore, SharedResponder

            responders = [SharedResponder(self.cluster, r) if r.challenge_type != "dns-01" else r for r in responders]
            self.cluster.names = frozenset(name.lower() for group in settings.domains for name in group)
            store = ClusterCertificateStore(self.cluster)
        if "dns-01" in settings.challenges and settings.dns_hook:
            responders.append(DNS01Responder(self.reactor, settings.dns_hook, settings.dns_resolver, settings.propagation_timeout))
        self.autocert = AcmeIssuingService(self.reactor, settings, store, responders, self.refresh_certificates, metrics=self.metrics)
        return http01

    def _expiries(self) -> list[tuple[str, datetime]]:
        return certificate_expiries(self.world.certificates.served)

    def readiness(self) -> str | None:
        """None when the gateway can serve; else the first reason it cannot (for /readyz)."""
        for listener in self.listeners:
            if listener.port is None:
                return f"{listener.what} listener is not listening"
        return certificate_problem(self.world.certificates.served)

    def refresh_certificates(self) -> None:
        """Re-read the served certificates (autocert stored a new one) and swap them in."""
        try:
            served = served_certificates(self.world.config)
            self._swap_certificates(served)
        except (PKIError, OSError) as e:
            log.error("new certificates not installed, keeping the served ones: {error}", error=str(e))
            return
        # With workers, each says so: the one running autocert, and each that found the new file.
        log.info("certificates refreshed: serving {names}", names=", ".join(name for s in served for name in s.names) or "-")

    def startService(self) -> None:
        warn_about(self.world.config)
        if self.worker is None and self.world.config.workers > 1:
            log.warn("workers: {n} is a 'twistd mtlsgate' feature; this gateway (a .tac file?) runs as one process", n=self.world.config.workers)
        super().startService()
        for group in self.world.upstreams:
            group.start()
        if self.worker is None or self.worker == 0:
            log.info("the HTTP/1.1 engine: {how}", how="compiled (mypyc)" if compiled() else
                     "pure Python (built without a C compiler, or with MTLSGATE_COMPILE=0): about twice its CPU per request")
        served = self.world.certificates.served
        log.info("serving {n} certificate(s):\n{table}", n=len(served), table=certificates_table((s.names, s.leaf, s.source) for s in served))
        routes = self.world.config.routes
        if not self.world.config.allow_client.is_empty():
            log.info("every route also requires: {rule}", rule=self.world.config.allow_client.explain())
        if routes:
            log.info("{n} route(s):\n{table}", n=len(routes), table=routes_table(routes))
        elif not self.world.config.tcp_routes:
            log.warn("no routes: every request will get 404")
        for tcp_route in self.world.config.tcp_routes:
            log.info("TCP route {route}: TLS connections naming {host} (SNI) on {address} are piped to {to} ({rule})",
                     route=tcp_route.name, host=tcp_route.host, address=self.world.config.address, to=", ".join(tcp_route.to),
                     rule=tcp_route.allow_client.explain())  # fmt: skip
        if self.reload_config is not None and hasattr(signal, "SIGHUP"):
            self._previous_hup = signal.signal(signal.SIGHUP, self._on_sighup)
        self._restart_ticket_rotation(self.world.config.session_ticket_rotation)

    def stopService(self) -> Any:
        """Stop listening, let requests in flight finish (up to shutdown_timeout), then stop the rest."""
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
            self._previous_hup = None
        self._restart_ticket_rotation(None)
        closing = defer.DeferredList([defer.maybeDeferred(listener.stopService) for listener in self.listeners])
        closing.addCallback(lambda _: self.site.drain())  # HTTP/2 connections: GOAWAY, no new streams
        closing.addCallback(lambda _: defer.DeferredList([
            self.resource.drained(self.world.config.limits.shutdown_timeout), self.tcp.drained(self.world.config.limits.shutdown_timeout),
        ]))  # fmt: skip
        closing.addCallback(lambda _: defer.DeferredList([defer.maybeDeferred(group.close) for group in self.world.upstreams]))
        # The last responses may still sit in the transports' write buffers (Twisted's TCP transport sends
        # on a later reactor turn); the reactor aborts connections once it stops, so give them a moment.
        closing.addCallback(lambda _: written_out(self.reactor, _FLUSH_GRACE))
        closing.addCallback(lambda _: super(GatewayService, self).stopService())
        return closing

    def _on_sighup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> bool:
        """Re-read config and certificates; swap them in, or keep the running ones and say why."""
        assert self.reload_config is not None
        try:
            config = self.reload_config()
            world = build_world(self.reactor, config, self.server_tls, self.shared_crls)
        except (ConfigError, PKIError, OSError) as e:
            log.error("reload refused, keeping the running configuration: {error}", error=str(e))
            return False
        old_config = self.world.config
        listeners_changed = (config.address, config.http_address, config.autocert, config.storage) != (
            old_config.address, old_config.http_address, old_config.autocert, old_config.storage
        )
        old = self.world
        self.world = world
        self.server_tls.install(world.certificates)
        self.resource.state = world.proxy
        self.tcp.state = world.tcp
        self.access_events.enabled = config.access_log != "off"
        for group in world.upstreams:
            group.start(replacing=old.upstreams)
        for group in old.upstreams:
            group.close()
        warn_about(config)
        if config.session_ticket_rotation != old_config.session_ticket_rotation:
            self._restart_ticket_rotation(config.session_ticket_rotation)
        if listeners_changed:
            log.warn("reload: listener addresses, autocert or storage settings changed; those take effect on restart")
        log.info(
            "reloaded: {certs} certificate(s), {routes} route(s)",
            certs=len(world.certificates.served), routes=len(config.routes) + len(config.tcp_routes),
        )
        return True


def fit_to_descriptors(config: Config) -> Config:
    """
    Raise the soft descriptor limit to the hard one, and lower C{max_connections} (with a warning) to
    what the descriptors allow: a flood of idle connections then meets the connection limit, not EMFILE.
    """
    before, nofile = fdlimit.raise_soft_limit()
    if nofile > before:
        log.info("file descriptors: soft limit raised from {before} to {after} (the hard limit)", before=before, after=nofile)
    ceiling = fdlimit.connection_ceiling(nofile)
    if config.limits.max_connections <= ceiling:
        return config
    log.warn(
        "max_connections lowered from {wanted} to {ceiling}: the descriptor limit (RLIMIT_NOFILE) is {nofile}, and each connection "
        "may need {per} (client and upstream) beside {reserved} reserved; raise LimitNOFILE (systemd) or ulimit -n to allow more",
        wanted=config.limits.max_connections, ceiling=ceiling, nofile=nofile, per=fdlimit.PER_CONNECTION, reserved=fdlimit.RESERVED,
    )  # fmt: skip
    return attrs.evolve(config, limits=attrs.evolve(config.limits, max_connections=ceiling))


def make_gateway(
    reactor: IGatewayReactor, config: Config, reload_config: Callable[[], Config] | None = None, worker: WorkerRole | None = None,
) -> GatewayService:
    """Build the whole gateway service, or raise L{ConfigError}/L{PKIError} before anything listens."""
    config = fit_to_descriptors(config)
    server_tls = ServerTLS()
    shared_crls: list[Any] = []
    if config.storage is not None:  # what this node last loaded from the shared store: revocations hold while Redis is away
        from mtlsgate.cluster.cache import cached_crls

        shared_crls = list(cached_crls(config.certs_dir))
    world = build_world(reactor, config, server_tls, shared_crls)
    return GatewayService(reactor, world, server_tls, reload_config, worker, shared_crls)


def fail(message: str) -> None:
    """Exit for a configuration problem, with one line on stderr."""
    sys.stderr.write(f"mtlsgate: {message}\n")
    raise SystemExit(1)
