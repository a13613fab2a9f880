"""
A real gRPC server (grpcio) with mTLS, for the HTTP/2 upstream tests: generic handlers with
identity serializers (bytes in, bytes out), so no protobuf code is generated.

Methods of the service C{test.Echo}:

- C{Unary}: answers C{b"echo:" + request}; trailing metadata C{x-trailer: done} and
  C{x-xfcc: <the X-Forwarded-Client-Cert it got, or "-">}.
- C{ServerStream}: the request is a count N; answers N messages C{b"0"}, C{b"1"}, ...
- C{ClientStream}: answers the requests joined with C{b","}.
- C{Bidi}: answers each request with C{b"re:" + request} as it arrives.
- C{Count}: answers the total size of the requests (as text).
- C{Blob}: the request is "N SIZE"; answers N messages of SIZE bytes.
- C{Fail}: aborts with INVALID_ARGUMENT and the message C{"bad thing"}.
- C{Deadline}: answers the time the server has left (seconds, as text): proof that C{grpc-timeout} arrived.
- C{Sleep}: waits until the call is over (deadline or cancel), answering nothing.
- C{Whoami}: answers the server's port.

With C{health=True}, the standard health service too (grpc.health.v1.Health/Check, answering
C{GRPCServer.serving}: SERVING or NOT_SERVING), without generated code.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from typing import Any, Iterator

import grpc

SERVICE = "test.Echo"


def _unary(request: bytes, context: Any) -> bytes:
    metadata = dict(context.invocation_metadata())
    context.set_trailing_metadata((("x-trailer", "done"), ("x-xfcc", metadata.get("x-forwarded-client-cert", "-"))))
    return b"echo:" + request


def _server_stream(request: bytes, context: Any) -> Iterator[bytes]:
    for i in range(int(request)):
        yield str(i).encode()


def _client_stream(requests: Iterator[bytes], context: Any) -> bytes:
    return b",".join(requests)


def _bidi(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
    for request in requests:
        yield b"re:" + request


def _count(requests: Iterator[bytes], context: Any) -> bytes:
    return str(sum(len(r) for r in requests)).encode()


def _blob(request: bytes, context: Any) -> Iterator[bytes]:
    count, size = (int(part) for part in request.split())
    message = b"b" * size
    for _ in range(count):
        yield message


def _fail(request: bytes, context: Any) -> bytes:
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad thing")
    raise AssertionError("unreachable")


def _deadline(request: bytes, context: Any) -> bytes:
    remaining = context.time_remaining()
    return b"none" if remaining is None else f"{remaining:.3f}".encode()


def _sleep(request: bytes, context: Any) -> bytes:
    done = threading.Event()
    context.add_callback(done.set)
    done.wait(60)
    return b""


def handlers(server: GRPCServer) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(SERVICE, {
        "Whoami": grpc.unary_unary_rpc_method_handler(lambda request, context: str(server.port).encode()),
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(_server_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(_client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(_bidi),
        "Count": grpc.stream_unary_rpc_method_handler(_count),
        "Blob": grpc.unary_stream_rpc_method_handler(_blob),
        "Fail": grpc.unary_unary_rpc_method_handler(_fail),
        "Deadline": grpc.unary_unary_rpc_method_handler(_deadline),
        "Sleep": grpc.unary_unary_rpc_method_handler(_sleep),
    })  # fmt: skip


class GRPCServer:
    """A grpcio server on a free loopback port with TLS from C{cert}/C{key}, requiring client certificates from C{ca}."""

    def __init__(self, cert: str, key: str, ca: str, require_client_auth: bool = True, health: bool = False) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.serving = True
        self.port = 0
        rpc_handlers = [handlers(self)]
        if health:
            check = grpc.unary_unary_rpc_method_handler(lambda request, context: b"\x08\x01" if self.serving else b"\x08\x02")
            rpc_handlers.append(grpc.method_handlers_generic_handler("grpc.health.v1.Health", {"Check": check}))
        self.server.add_generic_rpc_handlers(rpc_handlers)
        credentials = grpc.ssl_server_credentials(
            [(_read(key), _read(cert))], root_certificates=_read(ca), require_client_auth=require_client_auth
        )  # fmt: skip
        self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
        self.server.start()

    def stop(self) -> None:
        self.server.stop(0).wait(10)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def frame(message: bytes) -> bytes:
    """One gRPC length-prefixed message (uncompressed)."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def unframe(data: bytes) -> list[bytes]:
    """The messages of a gRPC response body."""
    messages = []
    while data:
        assert data[0] == 0, "compressed message"
        size = int.from_bytes(data[1:5], "big")
        messages.append(data[5:5 + size])
        data = data[5 + size:]
    return messages


def channel(port: int, ca: str, cert: tuple[str, str] | None, name: str = "localhost") -> grpc.Channel:
    """A grpcio client channel over TLS to 127.0.0.1:C{port}, presenting C{cert} (chain, key), expecting C{name} on the server's certificate."""
    credentials = grpc.ssl_channel_credentials(_read(ca), _read(cert[1]) if cert else None, _read(cert[0]) if cert else None)
    options = (("grpc.ssl_target_name_override", name), ("grpc.default_authority", name))
    return grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options)


def call(ch: grpc.Channel, method: str, kind: str = "unary_unary") -> Any:
    """The callable for C{/test.Echo/<method>} with bytes in and out."""
    return getattr(ch, kind)(f"/{SERVICE}/{method}", request_serializer=None, response_deserializer=None)


def wait_until(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)
