"""
Connections to Redis through txredisapi (Twisted-native: nothing blocks the reactor): one for
commands and one subscribed to the event channel, both reconnecting on their own with back-off.

Every command gets a deadline (L{RedisClient.call}): while Redis is away txredisapi queues commands
until it is back, and the gateway must learn of the outage, not wait on it.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import txredisapi
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTime
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS, platformTrust
from twisted.logger import Logger

from mtlsgate.cluster.url import StorageURL, parse_storage_url
from mtlsgate.config.model import Storage

log = Logger(namespace="mtlsgate.cluster")

CONNECT_TIMEOUT = 5


class StoreUnavailable(Exception):
    """Redis did not answer (down, unreachable, too slow, or refused us); the message says which."""


def storage_password(settings: Storage) -> str | None:
    """The password from C{storage_password_file} (its first line) or C{storage_password_env}; never from the command line."""
    if settings.password_file:
        with open(settings.password_file, encoding="utf-8") as f:
            password = f.readline().rstrip("\r\n")
        if not password:
            raise ValueError(f"{settings.password_file}: the first line (the password) is empty")
        return password
    if settings.password_env:
        from_env = os.environ.get(settings.password_env)
        if not from_env:
            raise ValueError(f"storage_password_env: the environment variable {settings.password_env} is not set or empty")
        return from_env
    return None


def _tls_options(url: StorageURL, settings: Storage) -> Any:
    trust = platformTrust()
    if settings.ca_file:
        with open(settings.ca_file, "rb") as f:
            trust = Certificate.loadPEM(f.read())
    client = None
    if settings.cert:
        with open(settings.cert, "rb") as f:
            pem = f.read()
        if settings.key:
            with open(settings.key, "rb") as f:
                pem += b"\n" + f.read()
        client = PrivateCertificate.loadPEM(pem)
    return optionsForClientTLS(url.host, trustRoot=trust, clientCertificate=client)


def endpoint_for(reactor: Any, settings: Storage) -> Any:
    """The client endpoint for C{settings.url}: TCP, or TLS (with the client certificate) for rediss://."""
    url = parse_storage_url(settings.url)
    endpoint: Any = HostnameEndpoint(reactor, url.host, url.port, timeout=CONNECT_TIMEOUT)
    if url.tls:
        endpoint = wrapClientTLS(_tls_options(url, settings), endpoint)
    return endpoint


class RedisClient:
    """Commands with a deadline; C{StoreUnavailable} when Redis does not answer in time."""

    def __init__(self, reactor: IReactorTime, settings: Storage, endpoint: Any = None) -> None:
        self.reactor = reactor
        self.settings = settings
        self.url = parse_storage_url(settings.url)
        self._factory = txredisapi.RedisFactory(
            self.url.display(), self.url.db, 1, isLazy=True, charset="utf-8", password=storage_password(settings),
            replyTimeout=settings.timeout, username=settings.username,
        )  # fmt: skip
        self._factory.reconnect = True
        # txredisapi reports a refusal (a wrong password, an unknown database) here, once, and stops trying.
        self._factory.deferred.addErrback(
            lambda f: log.error("shared store {url} refused the connection: {error}", url=self.url.display(), error=f.getErrorMessage())
        )
        self._factory.startConnecting(endpoint or endpoint_for(reactor, settings))
        self._handler = self._factory.handler

    @property
    def connected(self) -> bool:
        return self._factory.size > 0

    def call(self, command: str, *args: Any, timeout: float | None = None) -> defer.Deferred[Any]:
        """C{handler.command(*args)} within the deadline; errors become L{StoreUnavailable} (a Redis error reply stays itself)."""
        d: defer.Deferred[Any] = getattr(self._handler, command)(*args)
        d.addTimeout(timeout or self.settings.timeout, self.reactor)

        def unavailable(failure: Any) -> Any:
            if failure.check(txredisapi.ResponseError):
                return failure
            if failure.check(defer.TimeoutError, defer.CancelledError):
                raise StoreUnavailable(f"{self.url.display()} did not answer within {timeout or self.settings.timeout:.0f}s")
            raise StoreUnavailable(f"{self.url.display()}: {failure.getErrorMessage() or failure.type.__name__}")

        return d.addErrback(unavailable)

    def close(self) -> defer.Deferred[Any]:
        return self._factory.disconnect()


class _Subscriber(txredisapi.SubscriberProtocol):
    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        self.factory.on_message(channel, message)


class _SubscriberFactory(txredisapi.RedisFactory):
    protocol = _Subscriber

    def __init__(self, name: str, password: str | None, username: str | None, channel: str,
                 on_message: Callable[[str, str], None], on_subscribed: Callable[[], None], on_lost: Callable[[], None]) -> None:  # fmt: skip
        super().__init__(name, None, 1, isLazy=True, password=password, username=username)
        self.channel = channel
        self.on_message = on_message
        self.on_subscribed = on_subscribed
        self.on_lost = on_lost

    def addConnection(self, conn: Any) -> None:
        super().addConnection(conn)
        if conn.connected:
            d = conn.subscribe(self.channel)
            d.addCallback(lambda _: self.on_subscribed())
            d.addErrback(lambda f: log.warn("subscribing to {channel} failed: {error}", channel=self.channel, error=f.getErrorMessage()))

    def delConnection(self, conn: Any) -> None:
        super().delConnection(conn)
        if not self.disconnectCalled:
            self.on_lost()


class Subscription:
    """
    Subscribed to C{channel}, resubscribing after every reconnection; C{on_subscribed} runs each time
    (the moment to reconcile: messages sent while away are lost), C{on_lost} when the connection drops.
    """

    def __init__(self, reactor: Any, settings: Storage, channel: str, on_message: Callable[[str, str], None],
                 on_subscribed: Callable[[], None], on_lost: Callable[[], None], endpoint: Any = None) -> None:  # fmt: skip
        url = parse_storage_url(settings.url)
        self._factory = _SubscriberFactory(url.display(), storage_password(settings), settings.username, channel, on_message, on_subscribed, on_lost)
        self._factory.reconnect = True
        self._factory.deferred.addErrback(lambda f: None)  # reported by the command connection, which meets the same refusal
        self._factory.startConnecting(endpoint or endpoint_for(reactor, settings))

    def close(self) -> defer.Deferred[Any]:
        return self._factory.disconnect()
