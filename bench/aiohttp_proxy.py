"""
The best plain-Python peer for bench/run.py: an aiohttp + uvloop mTLS reverse proxy doing mtlsgate's job.

TLS 1.3 downstream with a client certificate required and verified against the CA, every path forwarded
to one mTLS upstream over a kept-alive aiohttp.ClientSession (the gateway's client certificate, the
upstream verified against the same CA under --server-name), an X-Forwarded-Client-Cert header set from
the client's certificate, hop-by-hop headers dropped, the body streamed back, no access log.  --workers N
processes share the port through SO_REUSEPORT: the parent builds the TLS context, forks N-1 children
and serves too (so, as with nginx, all share one session-ticket key).

    python bench/aiohttp_proxy.py --port 8443 --cert server.pem --key server-key.pem --ca ca.pem \\
        --upstream https://127.0.0.1:9443 --upstream-cert gw.pem --upstream-key gw-key.pem --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import hashlib
import os
import resource
import signal
import ssl
import sys
import weakref
from collections.abc import AsyncIterator

import uvloop
from aiohttp import ClientError, ClientSession, TCPConnector, web

HOP_BY_HOP = frozenset(h.lower() for h in ("Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
                                           "Transfer-Encoding", "Upgrade", "Host", "X-Forwarded-Client-Cert"))  # fmt: skip
SHORT = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C", "localityName": "L",
         "stateOrProvinceName": "ST", "domainComponent": "DC", "emailAddress": "emailAddress"}
_xfcc: weakref.WeakKeyDictionary[ssl.SSLObject, str] = weakref.WeakKeyDictionary()


def xfcc(request: web.Request) -> str:
    """The client certificate's Hash and Subject, worked out once per connection."""
    tls = request.transport.get_extra_info("ssl_object") if request.transport else None
    if tls is None:
        raise web.HTTPForbidden()
    value = _xfcc.get(tls)
    if value is None:
        subject = ",".join(f"{SHORT.get(k, k)}={v}" for rdn in reversed(tls.getpeercert()["subject"]) for k, v in rdn)
        value = _xfcc[tls] = f'Hash={hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest()};Subject="{subject}"'
    return value


def make_app(upstream: str, upstream_ctx: ssl.SSLContext, server_name: str) -> web.Application:
    app = web.Application()

    async def session(app: web.Application) -> AsyncIterator[None]:
        connector = TCPConnector(ssl=upstream_ctx, limit=0, keepalive_timeout=300)
        app["session"] = ClientSession(connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent", "Accept-Encoding"))
        yield
        await app["session"].close()

    async def proxy(request: web.Request) -> web.StreamResponse:
        named = {h.strip().lower() for h in request.headers.get("Connection", "").split(",")}  # hop-by-hop too (RFC 9110 7.6.1)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP and k.lower() not in named}
        headers["Host"] = server_name
        headers["X-Forwarded-Client-Cert"] = xfcc(request)
        body = request.content if request.body_exists else None
        response = web.StreamResponse()
        try:
            async with request.app["session"].request(request.method, upstream + request.raw_path, headers=headers, data=body,
                                                      server_hostname=server_name, allow_redirects=False) as up:  # fmt: skip
                response.set_status(up.status, up.reason)
                response.headers.extend((k, v) for k, v in up.headers.items() if k.lower() not in HOP_BY_HOP)
                await response.prepare(request)
                async for chunk in up.content.iter_any():
                    await response.write(chunk)
            await response.write_eof()
        except (ClientError, ConnectionResetError, asyncio.TimeoutError):
            if not response.prepared:
                return web.Response(status=502, text="upstream unavailable\n")
            if request.transport:  # the client left, or the upstream broke off mid-body: the response cannot be completed
                request.transport.abort()
        return response

    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app


def contexts(args: argparse.Namespace) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    downstream = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    downstream.minimum_version = ssl.TLSVersion.TLSv1_3
    downstream.verify_mode = ssl.CERT_REQUIRED
    downstream.load_verify_locations(args.ca)
    downstream.load_cert_chain(args.cert, args.key)
    upstream = ssl.create_default_context(cafile=args.ca)
    upstream.minimum_version = ssl.TLSVersion.TLSv1_3
    upstream.load_cert_chain(args.upstream_cert, args.upstream_key)
    return downstream, upstream


def serve(args: argparse.Namespace, downstream: ssl.SSLContext, upstream: ssl.SSLContext, worker: int) -> None:
    def ready(_: str) -> None:
        print(f"worker {worker} serving", flush=True)

    web.run_app(make_app(args.upstream, upstream, args.server_name), host=args.host, port=args.port, ssl_context=downstream,
                reuse_port=True, backlog=1024, access_log=None, print=ready, loop=uvloop.new_event_loop())  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    for name in ("cert", "key", "ca", "upstream", "upstream-cert", "upstream-key"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--server-name", default="localhost", help="the upstream's name, for SNI, verification and Host")
    args = parser.parse_args(argv)
    args.upstream = args.upstream.rstrip("/")
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    downstream, upstream = contexts(args)
    children = []
    for worker in range(1, args.workers):
        pid = os.fork()
        if pid == 0:
            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: never outlive the parent
            serve(args, downstream, upstream, worker)
            os._exit(0)
        children.append(pid)
    try:
        serve(args, downstream, upstream, 0)
    finally:
        for pid in children:
            os.kill(pid, signal.SIGTERM)
        for pid in children:
            os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
