"""
Active health checks through the real gateway: two echo upstreams, one stopped and started again.
What is observed is the gateway's own account (its "is down"/"is up" lines, and the absence of
failover lines) and which upstream answered each request, never how long anything took.  With
workers, each worker checks on its own: the test waits for every worker's line.
"""

from __future__ import annotations

import yaml

from tests.conftest import echo_json, free_port, https_request, start_echo_upstream, gateway_config


def served_by(port: int, pki) -> str:
    """Which upstream answered: the echo shows the Host the gateway sent, the upstream's own address."""
    status, _, body = https_request(port, "/", ca=pki["ca"], cert=pki["alice"])
    assert status == 200, body
    return echo_json(body)["headers"]["host"][0]


def test_a_dead_upstream_leaves_the_rotation_and_comes_back_when_it_answers_again(start_gateway, pki, procs, tmp_path, echo_upstream):
    second, second_proc = start_echo_upstream(procs, pki, tmp_path)
    port = free_port()
    health = {"path": "/healthz", "interval": "200ms", "timeout": "1s", "unhealthy_threshold": 2, "healthy_threshold": 2}
    config = gateway_config(pki, port, [f"https://127.0.0.1:{echo_upstream}", f"https://127.0.0.1:{second}"], {"health_check": health})
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(config))
    gateway = start_gateway(["--config", str(path)], port=port)
    first, second_host = f"127.0.0.1:{echo_upstream}", f"127.0.0.1:{second}"
    assert {served_by(port, pki) for _ in range(4)} == {first, second_host}

    second_proc.stop()
    down = f"upstream https://127.0.0.1:{second} of route localhost/ is down"
    log = gateway.wait_for_each(down)
    assert "(2 failed check(s) of /healthz in a row)" in log
    before = len(gateway.proc.output())
    assert [served_by(port, pki) for _ in range(6)] == [first] * 6
    after = gateway.proc.output()[before:]
    assert "unreachable" not in after  # no request tried the dead one first and failed over

    start_echo_upstream(procs, pki, tmp_path, port=second)
    gateway.wait_for_each(f"upstream https://127.0.0.1:{second} of route localhost/ is up: 2 check(s) of /healthz passed")
    assert {served_by(port, pki) for _ in range(4)} == {first, second_host}

    # A reload builds new checkers that know what the old ones knew, and the old ones stop.
    before = len(gateway.proc.output())
    procs[-1].stop()
    gateway.wait_for_each(down, after=before)
    before = len(gateway.proc.output())
    gateway.reload()
    assert [served_by(port, pki) for _ in range(4)] == [first] * 4
    after = gateway.proc.output()[before:]
    assert "unreachable" not in after and " is up" not in after
