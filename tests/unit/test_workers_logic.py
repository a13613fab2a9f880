"""The worker group's pure parts: endpoint parsing for shared sockets, and the restart back-off on a Clock."""

from __future__ import annotations

import socket

import pytest
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from mtlsgate.config.load import config_from_mapping
from mtlsgate.app.sockets import TCPListen, parse_tcp_listen, reuse_port_group, steer_by_client_address
from mtlsgate.app.workers import WorkerGroup, _Worker


@pytest.mark.parametrize(
    "text, expected",
    [
        ("tcp:8443", TCPListen(socket.AF_INET, "0.0.0.0", 8443)),
        ("tcp:port=8443:interface=127.0.0.1:backlog=64", TCPListen(socket.AF_INET, "127.0.0.1", 8443, 64)),
        (r"tcp6:8443:interface=\:\:1", TCPListen(socket.AF_INET6, "::1", 8443)),
        ("tcp6:8443", TCPListen(socket.AF_INET6, "::", 8443)),
    ],
)
def test_tcp_endpoints_parse_as_twisted_reads_them(text, expected):
    assert parse_tcp_listen(text) == expected


def test_a_reuse_port_group_shares_one_port():
    group = reuse_port_group(parse_tcp_listen("tcp:0:interface=127.0.0.1"), 3)
    try:
        assert len({sock.getsockname() for sock in group}) == 1
    finally:
        for sock in group:
            sock.close()


def _group(pki, clock: Clock) -> WorkerGroup:
    config = config_from_mapping({"certificates": [{"cert": pki["gateway"][0], "key": pki["gateway"][1]}], "workers": 2})
    group = WorkerGroup(clock, config, {"config": {}})
    group._spawn = lambda index: group.workers.__setitem__(index, _Worker(group, index))  # type: ignore[method-assign]
    return group


def _kill(group: WorkerGroup, index: int) -> None:
    group.ended(group.workers[index], Failure(ProcessTerminated(signal=9)))


def test_a_worker_dying_young_waits_longer_each_time_and_a_long_life_resets_it(pki):
    clock = Clock()
    group = _group(pki, clock)
    group._spawn(0)
    delays = []
    for _ in range(8):
        _kill(group, 0)
        (call,) = clock.getDelayedCalls()
        delays.append(call.getTime() - clock.seconds())
        clock.advance(delays[-1])
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    clock.advance(60)  # this one lived a minute
    _kill(group, 0)
    (call,) = clock.getDelayedCalls()
    assert call.getTime() - clock.seconds() == 0.5


def test_no_restart_while_stopping(pki):
    clock = Clock()
    group = _group(pki, clock)
    group._spawn(1)
    group.stopping = True
    group.ended(group.workers[1], Failure(ProcessDone(0)))
    assert not clock.getDelayedCalls() and not group.workers


def test_client_address_steering_sends_each_address_to_one_socket_of_the_group():
    group = reuse_port_group(parse_tcp_listen("tcp:0:interface=127.0.0.1"), 2)
    steer_by_client_address(group)
    port = group[0].getsockname()[1]
    landed: dict[str, set[int]] = {}
    try:
        for source in ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"] * 3:
            with socket.create_connection(("127.0.0.1", port), source_address=(source, 0)):
                for index, sock in enumerate(group):
                    sock.settimeout(0.2)
                    try:
                        accepted, _ = sock.accept()
                    except TimeoutError:
                        continue
                    accepted.close()
                    landed.setdefault(source, set()).add(index)
                    break
    finally:
        for sock in group:
            sock.close()
    assert all(len(indexes) == 1 for indexes in landed.values()), landed
    assert len(landed) == 4 and set().union(*landed.values()) == {0, 1}


def test_a_workers_log_line_reads_as_the_same_line_of_a_single_process(pki):
    """The parent writes a worker's event with its format specs applied ({:g}, {:.3f}), and its braces and fields intact."""
    from twisted.logger import formatEvent, globalLogPublisher

    from mtlsgate.app.workers import EVENTS_FD, relayed_event

    event = {
        "log_format": "handshake not done within {timeout:g}s; {duration:.3f}s for {path!r} {{literal}}",
        "timeout": 1.0, "duration": 0.0123456, "path": "/a{b}", "log_namespace": "mtlsgate.tls", "log_level": None,
        "log_time": 0.0, "status": 200,
    }  # fmt: skip
    single = formatEvent(event)
    assert single == "handshake not done within 1s; 0.012s for '/a{b}' {literal}"
    relayed: list[dict] = []
    globalLogPublisher.addObserver(relayed.append)
    try:
        worker = _Worker(_group(pki, Clock()), 1)
        worker.childDataReceived(EVENTS_FD, relayed_event(event).encode())
    finally:
        globalLogPublisher.removeObserver(relayed.append)
    [seen] = [e for e in relayed if e.get("log_namespace") == "mtlsgate.tls"]
    assert formatEvent(seen) == single
    assert seen["log_system"] == "worker-1" and seen["status"] == 200 and seen["duration"] == 0.0123456


class _SpawningClock(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[list[str]] = []

    def spawnProcess(self, protocol, executable, args, env=None, path=None, childFDs=None):  # type: ignore[no-untyped-def]
        self.spawned.append(list(args))
        return type("Process", (), {"pid": 1})()


@pytest.mark.parametrize(
    "extra, index, stdlib_ssl",
    [
        ({}, 0, False),
        ({}, 1, False),
        ({"admin_address": "tcp:0:interface=127.0.0.1"}, 1, True),  # prometheus_client imports ssl
        ({"autocert": {"domains": ["a.test"], "email": "ops@a.test", "directory": "https://127.0.0.1:1/dir"}}, 0, True),  # the ACME stack
        ({"autocert": {"domains": ["a.test"], "email": "ops@a.test", "directory": "https://127.0.0.1:1/dir"}}, 1, False),
    ],
)
def test_a_worker_goes_without_the_stdlib_s_openssl_unless_it_runs_acme_or_metrics(pki, tmp_path, extra, index, stdlib_ssl):
    """mtlsgate.app.memory.without_stdlib_openssl: passed to every worker but one that runs the ACME stack or counts metrics."""
    if "autocert" in extra:
        extra = {**extra, "certs_dir": str(tmp_path / "certs")}
    config = config_from_mapping({"certificates": [{"cert": pki["gateway"][0], "key": pki["gateway"][1]}], "workers": 2, **extra})
    reactor = _SpawningClock()
    group = WorkerGroup(reactor, config, {"config": {}})
    group.https_sockets = [socket.socket(), socket.socket()]
    group.handoff.directory = str(tmp_path)
    try:
        group._spawn(index)
    finally:
        for sock in group.https_sockets:
            sock.close()
    (args,) = reactor.spawned
    assert ("--no-stdlib-ssl" not in args) is stdlib_ssl
