"""
The bare Twisted ceiling for bench/run.py: the least a Twisted + pyOpenSSL + httptools mTLS proxy does, with none of mtlsgate's work.

mtlsgate's own stack (Twisted's epoll reactor, pyOpenSSL through Twisted's TLSMemoryBIOProtocol, httptools
parsing requests and responses) doing the bench's job and nothing more: TLS downstream with a client
certificate required and verified against the CA, every request forwarded (method, path, headers less the
hop-by-hop ones) over a pool of kept-alive mTLS connections to one upstream (the gateway's client
certificate, the upstream verified under --server-name), an X-Forwarded-Client-Cert header worked out once
per connection, Content-Length bodies relayed as they come (chunked ones re-chunked), keep-alive downstream.
No hardening, limits, timeouts, routing, metrics or logging: it is the ceiling, not a product.  --workers N
processes listen on one SO_REUSEPORT port; the parent builds the server TLS context, forks N-1 children and
serves too (so all share one session-ticket key).

    python bench/bare_proxy.py --port 8443 --cert server.pem --key server-key.pem --ca ca.pem \\
        --upstream https://127.0.0.1:9443 --upstream-cert gw.pem --upstream-key gw-key.pem --workers 2
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import hashlib
import os
import resource
import signal
import socket
import sys
from collections import deque
from typing import Any
from urllib.parse import urlsplit

import httptools
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade", b"host", b"x-forwarded-client-cert"})  # fmt: skip
BAD_GATEWAY = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 21\r\nConnection: close\r\n\r\nupstream unavailable\n"


def xfcc(cert: Any) -> bytes:
    """The client certificate's Hash and Subject (as aiohttp_proxy.py sets them)."""
    digest = hashlib.sha256(crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)).hexdigest()
    return f'Hash={digest};Subject="{cert.to_cryptography().subject.rfc4514_string()}"'.encode()


class Request:
    """A request parsed, its response not yet all relayed: what is still to go upstream, and how the client frames it."""

    __slots__ = ("pending", "chunked", "done", "keep_alive", "http11")
    pending: list[bytes]
    chunked: bool
    done: bool
    keep_alive: bool
    http11: bool


class Upstream(Protocol):
    """One kept-alive mTLS connection to the upstream: relays each response to the Downstream it serves."""

    down: Downstream | None = None
    head: bytes | None = None  # the response head, held to go out in one TLS write with the first piece of the body
    answering = False  # a response head came for the request in flight
    transport: Any

    def __init__(self, gateway: Gateway, ready: Deferred[Upstream]) -> None:
        self.gateway, self.parser, self.chunked, self.producing, self.ready = gateway, httptools.HttpResponseParser(self), False, False, ready

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.ready.callback(self)

    def dataReceived(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.abortConnection()

    def on_message_begin(self) -> None:
        self.reason, self.headers = b"", list[tuple[bytes, bytes]]()

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.down is None:
            return
        self.answering = True
        req, status = self.down.queue[0], self.parser.get_status_code()
        head, length = [b"HTTP/1.1 %d %s\r\n" % (status, self.reason)], -1
        for name, value in self.headers:
            lower = name.lower()
            if lower == b"content-length":
                length = int(value)
            if lower not in HOP_BY_HOP:
                head.append(b"%s: %s\r\n" % (name, value))
        self.chunked = length < 0 and status >= 200 and status not in (204, 304) and req.http11
        if self.chunked:
            head.append(b"Transfer-Encoding: chunked\r\n")
        elif length < 0 and status >= 200 and status not in (204, 304):
            req.keep_alive = False  # an HTTP/1.0 client: the end of the connection ends the body
        head.append((b"" if req.http11 else b"Connection: keep-alive\r\n") if req.keep_alive else b"Connection: close\r\n")
        self.head = b"".join(head) + b"\r\n"
        self.producing = length < 0 or length > 65536  # a large body: the upstream waits while the client is slow
        if self.producing:
            self.down.transport.registerProducer(self.transport, True)

    def on_body(self, data: bytes) -> None:
        if self.down is not None:
            data = b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data
            if self.head is not None:
                data, self.head = self.head + data, None
            self.down.transport.write(data)

    def on_message_complete(self) -> None:
        down, self.down, self.answering = self.down, None, False
        if down is None:
            return
        if self.head is not None or self.chunked:
            down.transport.write((self.head or b"") + (b"0\r\n\r\n" if self.chunked else b""))
            self.head = None
        if self.producing:
            down.transport.unregisterProducer()
            self.transport.resumeProducing()
        down.finished(self, self.parser.should_keep_alive())

    def connectionLost(self, reason: object = None) -> None:
        if self in self.gateway.pool:
            self.gateway.pool.remove(self)
        if self.down is not None:  # mid-exchange: a 502 if the client has seen nothing yet, else the client's connection ends too
            self.down.unavailable() if not self.answering else self.down.transport.loseConnection()


class Downstream(Protocol):
    """One client connection: parses its requests, sends each upstream in turn, its responses come back in order."""

    transport: Any

    def __init__(self, gateway: Gateway) -> None:
        self.gateway, self.parser, self.queue = gateway, httptools.HttpRequestParser(self), deque[Request]()
        self.up: Upstream | None = None
        self.xfcc: bytes | None = None
        self.lost = False

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)  # responses leave in whole writes: Nagle would only hold back their last segment

    def dataReceived(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.transport.loseConnection()

    def on_message_begin(self) -> None:
        self.url, self.headers = b"", list[tuple[bytes, bytes]]()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.xfcc is None:
            self.xfcc = xfcc(self.transport.getPeerCertificate())
        p, req = self.parser, Request()
        head = [b"%s %s HTTP/1.1\r\nHost: %s\r\nX-Forwarded-Client-Cert: %s\r\n" % (p.get_method(), self.url, self.gateway.server_name, self.xfcc)]
        req.chunked = False
        for name, value in self.headers:
            lower = name.lower()
            if lower == b"transfer-encoding":
                req.chunked = True
            elif lower not in HOP_BY_HOP:
                head.append(b"%s: %s\r\n" % (name, value))
        head.append(b"Transfer-Encoding: chunked\r\n\r\n" if req.chunked else b"\r\n")
        req.pending, req.done, req.keep_alive, req.http11 = [b"".join(head)], False, p.should_keep_alive(), p.get_http_version() == "1.1"
        self.queue.append(req)
        if len(self.queue) == 1:
            self.start()

    def on_body(self, data: bytes) -> None:
        self.send(self.queue[-1], b"%x\r\n%s\r\n" % (len(data), data) if self.queue[-1].chunked else data)

    def on_message_complete(self) -> None:
        req = self.queue[-1]
        req.done = True
        if req.chunked:
            self.send(req, b"0\r\n\r\n")

    def send(self, req: Request, data: bytes) -> None:
        if self.up is not None and req is self.queue[0]:
            self.up.transport.write(data)
        else:
            req.pending.append(data)

    def start(self) -> None:
        if self.gateway.pool:
            self.attach(self.gateway.pool.pop())
        else:
            self.gateway.connect().addCallbacks(self.attach, lambda _: self.unavailable())

    def unavailable(self) -> None:
        self.transport.write(BAD_GATEWAY)
        self.transport.loseConnection()

    def attach(self, up: Upstream) -> None:
        if self.lost:
            self.gateway.pool.append(up)
            return
        self.up, up.down = up, self
        up.transport.write(b"".join(self.queue[0].pending))

    def finished(self, up: Upstream, reusable: bool) -> None:
        req, self.up = self.queue.popleft(), None
        self.gateway.pool.append(up) if reusable and req.done else up.transport.loseConnection()
        if not (req.keep_alive and req.done):
            self.transport.loseConnection()
        elif self.queue:
            self.start()

    def connectionLost(self, reason: object = None) -> None:
        self.lost = True
        if self.up is not None:
            self.up.down = None
            self.up.transport.abortConnection()


class Gateway(Factory):
    def __init__(self, reactor: Any, args: argparse.Namespace) -> None:
        from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS, trustRootFromCertificates

        with open(args.ca, "rb") as ca, open(args.upstream_cert, "rb") as cert, open(args.upstream_key, "rb") as key:
            trust = trustRootFromCertificates([Certificate.loadPEM(ca.read())])
            options = optionsForClientTLS(args.server_name, trustRoot=trust, clientCertificate=PrivateCertificate.loadPEM(cert.read() + key.read()))
        target = urlsplit(args.upstream)
        self.connect = lambda: Connecting(self, reactor, target.hostname, target.port or 443, options).ready
        self.server_name, self.pool = args.server_name.encode(), list[Upstream]()

    def buildProtocol(self, addr: object) -> Downstream:
        return Downstream(self)


class Connecting(ClientFactory):
    """One new upstream connection; C{ready} fires with its Upstream once TCP is up (the TLS handshake goes ahead of the first write)."""

    def __init__(self, gateway: Gateway, reactor: Any, host: str, port: int, options: Any) -> None:
        self.gateway, self.ready = gateway, Deferred[Upstream]()
        reactor.connectTCP(host, port, DirectTLS(options, True, self))

    def buildProtocol(self, addr: object) -> Upstream:
        return Upstream(self.gateway, self.ready)

    def clientConnectionFailed(self, connector: object, reason: Any) -> None:
        self.ready.errback(reason)


class DirectTLS(TLSMemoryBIOFactory):
    protocol = TLSMemoryBIOProtocol  # every write goes to OpenSSL at once, not held for a callLater(0) (Twisted's BufferingTLSTransport)


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    def __init__(self, ctx: SSL.Context) -> None:
        self.ctx = ctx

    def serverConnectionForTLS(self, tls: object) -> SSL.Connection:
        return SSL.Connection(self.ctx, None)


def server_context(args: argparse.Namespace) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE)
    ctx.set_mode(0x8)  # SSL_MODE_NO_AUTO_CHAIN, as nginx and mtlsgate: no chain built from the CA store (and the root sent) per handshake
    ctx.use_certificate_chain_file(args.cert)
    ctx.use_privatekey_file(args.key)
    ctx.load_verify_locations(args.ca)
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
    ctx.set_session_id(b"bare")
    return ctx


def serve(args: argparse.Namespace, ctx: SSL.Context, worker: int) -> None:
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((args.host, args.port))
    sock.listen(1024)
    sock.setblocking(False)
    reactor.adoptStreamPort(sock.fileno(), socket.AF_INET, DirectTLS(ServerTLS(ctx), False, Gateway(reactor, args)))  # type: ignore[attr-defined]
    sock.close()
    gc.freeze()  # start-up's objects out of the collector's way, as mtlsgate does
    print(f"worker {worker} serving", flush=True)
    reactor.run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    for name in ("cert", "key", "ca", "upstream", "upstream-cert", "upstream-key"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--server-name", default="localhost", help="the upstream's name, for SNI, verification and Host")
    args = parser.parse_args(argv)
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    ctx = server_context(args)
    children = []
    for worker in range(1, args.workers):
        pid = os.fork()
        if pid == 0:
            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: never outlive the parent
            serve(args, ctx, worker)
            os._exit(0)
        children.append(pid)
    try:
        serve(args, ctx, 0)
    finally:
        for pid in children:
            os.kill(pid, signal.SIGTERM)
        for pid in children:
            os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
