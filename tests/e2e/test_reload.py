"""SIGHUP reloads certificates and config: open connections continue, a broken config is refused."""

from __future__ import annotations

import http.client
import shutil
import signal
import socket
import ssl

import yaml
from cryptography.hazmat.primitives.serialization import Encoding

from tests.conftest import echo_json, free_port, https_request


def _open_keepalive(port: int, pki) -> tuple[http.client.HTTPConnection, ssl.SSLSocket]:
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.load_cert_chain(*pki["alice"])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    conn.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost")
    return conn, conn.sock


def _get(conn: http.client.HTTPConnection, path: str) -> tuple[int, bytes]:
    conn.request("GET", path, headers={"Host": "localhost"})
    response = conn.getresponse()
    return response.status, response.read()


def _serial(port: int, pki) -> int:
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.load_cert_chain(*pki["alice"])
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost") as tls:
        return int(tls.getpeercert()["serialNumber"], 16)


def _config(tmp_path, pki, upstream_port, port, **route):
    cert, key = tmp_path / "served.pem", tmp_path / "served-key.pem"
    if not cert.exists():
        shutil.copy(pki["gateway"][0], cert)
        shutil.copy(pki["gateway"][1], key)
    config = {
        "address": f"tcp:{port}:interface=127.0.0.1",
        "certificates": [{"cert": str(cert), "key": str(key)}],
        "downstream_mtls": {"ca_file": pki["ca"], "enforcement": "policy"},
        "routes": [{
            "from": "https://localhost", "to": [f"https://127.0.0.1:{upstream_port}"], "tls_custom_ca_file": pki["ca"],
            "tls_client_cert_file": pki["gateway_client"][0], "tls_client_key_file": pki["gateway_client"][1], **route,
        }],
    }  # fmt: skip
    path = tmp_path / "mtlsgate.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_sighup_swaps_certificate_and_routes_while_a_connection_stays_open(start_gateway, pki, echo_upstream, tmp_path):
    port = free_port()
    path = _config(tmp_path, pki, echo_upstream, port)
    gateway = start_gateway(["--config", str(path)], port=port)
    conn, _ = _open_keepalive(port, pki)
    assert _get(conn, "/before")[0] == 200
    old_serial = _serial(port, pki)

    renewed = pki["ca_obj"].issue_server(["localhost", "127.0.0.1"])
    renewed.write(str(tmp_path / "served.pem"), str(tmp_path / "served-key.pem"))
    _config(tmp_path, pki, echo_upstream, port, allow_client={"cn": ["bob"]})
    gateway.reload()  # with workers, every one

    # The connection opened before the reload is still usable; the new route rules apply to it.
    status, body = _get(conn, "/after")
    assert status == 403 and b"not allowed here" in body
    conn.close()
    # New handshakes get the new certificate.
    assert _serial(port, pki) == renewed.certificate.serial_number != old_serial
    assert https_request(port, "/", ca=pki["ca"], cert=pki["bob"])[0] == 200


def test_broken_config_on_reload_is_refused_and_the_old_one_kept(start_gateway, pki, echo_upstream, tmp_path):
    port = free_port()
    path = _config(tmp_path, pki, echo_upstream, port)
    gateway = start_gateway(["--config", str(path)], port=port)
    path.write_text(path.read_text().replace("routes:", "routez:"))
    gateway.proc.signal(signal.SIGHUP)
    log = gateway.proc.wait_for_log("reload refused")
    assert "routez: unknown key" in log
    status, _, body = https_request(port, "/still", ca=pki["ca"], cert=pki["alice"])
    assert status == 200 and echo_json(body)["uri"] == "/still"


def test_a_new_crl_takes_effect_without_a_signal(start_gateway, pki, echo_upstream, tmp_path):
    port = free_port()
    carol = pki["ca_obj"].issue_client("carol")
    carol.write(str(tmp_path / "carol.pem"), str(tmp_path / "carol-key.pem"))
    crl = tmp_path / "clients.crl"
    crl.write_bytes(pki["ca_obj"].crl([]).public_bytes(Encoding.PEM))
    path = _config(tmp_path, pki, echo_upstream, port)
    config = yaml.safe_load(path.read_text())
    config["downstream_mtls"] = {"ca_file": pki["ca"], "crl_file": str(crl)}
    config["watch_interval"] = "1s"
    path.write_text(yaml.safe_dump(config))
    gateway = start_gateway(["--config", str(path)], port=port)
    assert https_request(port, "/", ca=pki["ca"], cert=(str(tmp_path / "carol.pem"), str(tmp_path / "carol-key.pem")))[0] == 200

    revoked = pki["ca_obj"].crl([carol.certificate])
    crl.write_bytes(revoked.public_bytes(Encoding.PEM))
    log = gateway.wait_for_each("reloaded:", timeout=15)  # with workers, each watches the files itself
    assert "files changed; reloading" in log
    try:
        https_request(port, "/", ca=pki["ca"], cert=(str(tmp_path / "carol.pem"), str(tmp_path / "carol-key.pem")))
    except (ssl.SSLError, ConnectionError, OSError):
        pass
    else:
        raise AssertionError("a revoked certificate got through")
    assert "refused client certificate" in gateway.proc.wait_for_log("revoked")


def test_sigterm_lets_a_request_in_flight_finish(start_gateway, pki, echo_upstream):
    import threading
    import time

    from tests.conftest import gateway_args

    gateway = start_gateway(gateway_args(pki, echo_upstream, "--timeout", "20s"))
    result: list = []
    slow = threading.Thread(target=lambda: result.append(https_request(gateway.port, "/slow/2", ca=pki["ca"], cert=pki["alice"])))
    slow.start()
    time.sleep(0.7)  # the request is at the upstream now
    gateway.proc.signal(signal.SIGTERM)
    gateway.proc.wait_for_log("waiting up to 30s for 1 request(s) in flight")
    try:  # no new connections once stopping
        socket.create_connection(("127.0.0.1", gateway.port), timeout=2).close()
        raise AssertionError("still listening after SIGTERM")
    except OSError:
        pass
    slow.join(20)
    assert result and result[0][0] == 200
    assert gateway.proc.popen.wait(20) in (0, -signal.SIGTERM)  # twistd re-raises the signal it stopped on
