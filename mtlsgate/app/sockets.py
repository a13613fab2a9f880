"""
Listening sockets made by hand, for workers: the parent binds them (before twistd drops privileges)
and each worker process adopts one with C{reactor.adoptStreamPort}.

With C{SO_REUSEPORT}, every worker gets a socket of its own in one port group, so the kernel spreads
new connections evenly over the workers (one shared socket wakes every worker on each connection and
lets whichever is least busy take most of them).  A worker that dies leaves its socket open in the
parent; connections queued on it wait for its replacement instead of being refused.
"""

from __future__ import annotations

import ctypes
import socket

import attrs

_DEFAULT_BACKLOG = 511  # nginx's default on Linux


@attrs.frozen
class TCPListen:
    """The parts of a C{tcp:} or C{tcp6:} server endpoint string that matter for binding."""

    family: int
    interface: str
    port: int
    backlog: int = _DEFAULT_BACKLOG


def _split(description: str) -> list[str]:
    """Split on C{:} except where escaped as C{\\:} (IPv6 interfaces), as Twisted's endpoint strings do."""
    parts, current, escaped = [], "", False
    for char in description:
        if escaped:
            current += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return parts


def parse_tcp_listen(description: str) -> TCPListen:
    """C{tcp:8443}, C{tcp:port=8443:interface=127.0.0.1}, C{tcp6:8443:interface=\\:\\:1}; ValueError otherwise."""
    parts = _split(str(description))
    kind = parts[0].lower()
    if kind not in ("tcp", "tcp6") or len(parts) < 2:
        raise ValueError(f"{description!r}: workers can share only a tcp: or tcp6: listener")
    positional = [p for p in parts[1:] if "=" not in p]
    options = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    unknown = set(options) - {"port", "interface", "backlog"}
    if unknown:
        raise ValueError(f"{description!r}: option {sorted(unknown)[0]!r} is not supported with workers")
    port = options.get("port", positional[0] if positional else None)
    family = socket.AF_INET6 if kind == "tcp6" else socket.AF_INET
    interface = options.get("interface", "::" if kind == "tcp6" else "0.0.0.0")
    if ":" in interface:
        family = socket.AF_INET6
    try:
        number = int(port)  # type: ignore[arg-type]
        backlog = int(options.get("backlog", _DEFAULT_BACKLOG))
    except (TypeError, ValueError):
        raise ValueError(f"{description!r}: no port number") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"{description!r}: port {number} is out of range")
    return TCPListen(family=family, interface=interface, port=number, backlog=backlog)


def listening_socket(where: TCPListen, reuse_port: bool = False) -> socket.socket:
    """A bound, listening, non-blocking socket (with C{SO_REUSEPORT} for a worker group)."""
    sock = socket.socket(where.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((where.interface, where.port))
        sock.listen(where.backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def reuse_port_group(where: TCPListen, count: int) -> list[socket.socket]:
    """C{count} sockets sharing one port (the first one's, if C{where.port} is 0)."""
    first = listening_socket(where, reuse_port=True)
    group = [first]
    try:
        same = attrs.evolve(where, port=first.getsockname()[1])
        for _ in range(count - 1):
            group.append(listening_socket(same, reuse_port=True))
    except OSError:
        for sock in group:
            sock.close()
        raise
    return group


# Classic BPF, for SO_ATTACH_REUSEPORT_CBPF: which socket of a group takes a new connection.
_SO_ATTACH_REUSEPORT_CBPF = 51
_SKF_NET_OFF = -0x100000  # loads relative to the IP header (the program starts past the TCP header)
_LD_W_ABS, _LD_B_ABS = 0x20, 0x30
_RSH_K, _MUL_K, _MOD_K = 0x74, 0x24, 0x94
_JEQ_K, _JA = 0x15, 0x05
_RET_A = 0x16


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def _k(value: int) -> int:
    return value & 0xFFFFFFFF


def client_address_program(count: int) -> list[tuple[int, int, int, int]]:
    """
    (code, jt, jf, k) instructions: the index of the socket for a connection is a hash of the client's
    address (IPv4, or the last 32 bits of IPv6) modulo C{count}.  The same client always reaches the
    same worker, so the session tickets that worker issued resume.
    """
    return [
        (_LD_B_ABS, 0, 0, _k(_SKF_NET_OFF)),  # the IP version nibble
        (_RSH_K, 0, 0, 4),
        (_JEQ_K, 0, 2, 6),
        (_LD_W_ABS, 0, 0, _k(_SKF_NET_OFF + 20)),  # IPv6: the source address's last word
        (_JA, 0, 0, 1),
        (_LD_W_ABS, 0, 0, _k(_SKF_NET_OFF + 12)),  # IPv4: the source address
        (_MUL_K, 0, 0, 2654435761),  # Knuth's multiplicative hash: neighbouring addresses spread out
        (_RSH_K, 0, 0, 16),
        (_MOD_K, 0, 0, count),
        (_RET_A, 0, 0, 0),
    ]


def steer_by_client_address(group: list[socket.socket]) -> None:
    """Attach L{client_address_program} to a C{SO_REUSEPORT} group (Linux 4.5+); OSError if the kernel refuses."""
    program = client_address_program(len(group))
    filters = (_SockFilter * len(program))(*(_SockFilter(*instruction) for instruction in program))
    fprog = _SockFprog(len(program), ctypes.cast(filters, ctypes.POINTER(_SockFilter)))
    group[0].setsockopt(socket.SOL_SOCKET, _SO_ATTACH_REUSEPORT_CBPF, bytes(fprog))
