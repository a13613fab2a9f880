"""What a gateway process imports: the ACME stack (acme, josepy, treq: ~9 MiB per process) only when it runs autocert, txredisapi only with a shared store."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import subprocess_env

HEAVY = ("acme", "josepy", "treq", "txredisapi")


def test_a_gateway_without_autocert_never_imports_the_acme_stack(tmp_path):
    probe = (
        "import sys\n"
        "import mtlsgate.app.tap, mtlsgate.app.service, mtlsgate.app.worker, mtlsgate.app.workers\n"
        f"print(' '.join(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "", f"imported at start-up: {result.stdout.strip()}"


def test_a_worker_serving_only_https_imports_neither_twisted_web_server_nor_prometheus(pki, tmp_path):
    """
    twisted.web's server (the redirect and admin listeners) and prometheus_client (read only through the admin
    listener) cost about 4 MiB per process: a gateway without those listeners builds its whole service without them.
    """
    flags = [
        "--https", "tcp:0:interface=127.0.0.1", "--cert", pki["gateway"][0], "--key", pki["gateway"][1], "--client-ca", pki["ca"],
        "--route", "*=https://127.0.0.1:9", "--upstream-ca", pki["ca"],
        "--upstream-cert", pki["gateway_client"][0], "--upstream-key", pki["gateway_client"][1],
    ]  # fmt: skip
    probe = (
        "import sys\n"
        "from twisted.internet import reactor\n"
        "import mtlsgate.app.worker, mtlsgate.app.workers\n"
        "from mtlsgate.app.tap import Options\n"
        "options = Options()\n"
        f"options.parseOptions({flags!r})\n"
        "service = options.service\n"
        "service.privilegedStartService()\n"
        "print(' '.join(sorted(m for m in ('twisted.web.server', 'prometheus_client') if m in sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1:] in ([], [""]), f"imported: {result.stdout.strip()}"


def test_a_gateway_with_an_admin_listener_counts_requests(pki, tmp_path):
    """The other side of the above: with admin_address, the metrics are real (prometheus_client's)."""
    flags = [
        "--https", "tcp:0:interface=127.0.0.1", "--cert", pki["gateway"][0], "--key", pki["gateway"][1], "--client-ca", pki["ca"],
        "--route", "*=https://127.0.0.1:9", "--admin", "tcp:0:interface=127.0.0.1",
    ]  # fmt: skip
    probe = (
        "from twisted.internet import reactor\n"
        "from mtlsgate.app.tap import Options\n"
        "from mtlsgate.observe.metrics import GatewayMetrics\n"
        "options = Options()\n"
        f"options.parseOptions({flags!r})\n"
        "print(type(options.service.metrics).__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "GatewayMetrics"


def test_settle_freezes_what_start_up_made(tmp_path):
    """After start-up the gateway moves start-up's objects out of the collector's way (full collections skip them)."""
    probe = (
        "import gc\n"
        "import mtlsgate.app.service, mtlsgate.app.tap\n"
        "from mtlsgate.app.memory import settle\n"
        "before = gc.get_freeze_count()\n"
        "settle()\n"
        "print(before, gc.get_freeze_count())\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    before, after = map(int, result.stdout.split())
    assert before == 0 and after > 10000


def _imported(probe: str, cwd, prefixes: tuple[str, ...]) -> list[str]:
    """The modules starting with one of C{prefixes} that C{probe} (Python source) leaves imported, in a fresh interpreter."""
    code = probe + f"\nimport sys\nprint(' '.join(sorted(m for m in sys.modules if m.startswith({prefixes!r}))))\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1].split() if result.stdout.strip() else []


def test_the_config_loader_imports_neither_the_proxy_nor_twisted_web(tmp_path):
    """The loader is a layer of values: its shared constants (GRPC_HEALTH_PATH) live in the model, not in the proxy."""
    assert _imported("import mtlsgate.config.load", tmp_path, ("mtlsgate.proxy", "twisted.web", "h2")) == []


_WORKER_FLAGS = (
    "--https tcp:0:interface=127.0.0.1 --cert {gateway[0]} --key {gateway[1]} --client-ca {ca} --upstream-ca {ca}"
    " --upstream-cert {gateway_client[0]} --upstream-key {gateway_client[1]}"
)


def _worker_probe(pki, *extra: str) -> str:
    """Python source: what a worker does before it serves (mtlsgate.app.worker.main), with a plain HTTPS gateway's flags (and C{extra})."""
    flags = _WORKER_FLAGS.format(**pki).split() + list(extra or ("--route", "*=https://127.0.0.1:9"))
    return (
        "from mtlsgate.app.memory import without_twisted_web_http2\n"
        "without_twisted_web_http2()\n"
        "from twisted.internet import reactor\n"
        "import mtlsgate.app.worker, mtlsgate.app.workers\n"
        "from mtlsgate.app.service import WorkerRole\n"
        "from mtlsgate.app.tap import Options\n"
        "options = Options()\n"
        "options.worker = WorkerRole(index=1, https_fd=None, http_fd=None, acme=False)\n"
        f"options.parseOptions({flags!r})\n"
        "options.service.privilegedStartService()\n"
    )


H2 = ("h2", "hpack", "hyperframe", "mtlsgate.http.h2server", "mtlsgate.http.h2client")


def test_a_worker_imports_h2_only_where_http2_is_used(pki, tmp_path):
    """
    h2, hpack, hyperframe and mtlsgate's HTTP/2 modules (about 1.7 MiB): imported by the first connection that
    negotiates h2, or at start for an upstream_protocol: http2 route, never by a worker that has not spoken HTTP/2 yet.
    Twisted's own HTTP/2 server, which twisted.web.http tries to import, is kept out of a worker.
    """
    assert _imported(_worker_probe(pki), tmp_path, H2) == []
    # The IResponse contract's outcomes (an upstream's failure makes one) import twisted.web.http, which stays without h2.
    assert _imported(_worker_probe(pki) + "from mtlsgate.http.outcomes import ResponseDone\nResponseDone()\n", tmp_path, H2) == []
    # The other side: the first h2 connection brings the HTTP/2 front end.
    first_h2 = _worker_probe(pki) + "options.service.site.h2.buildProtocol(None)\n"
    assert {m for m in _imported(first_h2, tmp_path, H2) if m in H2} == {"h2", "hpack", "hyperframe", "mtlsgate.http.h2server"}


def test_an_http2_upstream_route_imports_the_http2_client_at_start(pki, tmp_path):
    config = tmp_path / "http2.yaml"
    config.write_text("routes:\n  - from: https://grpc.test\n    to: [https://127.0.0.1:9]\n    upstream_protocol: http2\n")
    assert "mtlsgate.http.h2client" in _imported(_worker_probe(pki, "--config", str(config)), tmp_path, H2)


def test_twisted_web_http_still_tries_twisted_s_own_http2_server():
    """Pins what without_twisted_web_http2 stops: if Twisted stops importing it, the block (harmless) can go."""
    import inspect

    import twisted.web.http

    assert "from twisted.web._http2 import" in inspect.getsource(twisted.web.http)


#: What a worker serving HTTPS (no storage:, no redirect listener, no health checks, no HTTP/2 yet) never imports, and why not.
NOT_IN_A_PLAIN_WORKER = (
    "difflib",  # the config loader's "did you mean" hint: only on a config error
    "mtlsgate.cluster",  # the shared store: only with storage:
    "mtlsgate.proxy.healthcheck",  # only for a route with health_check
    "twisted.web.resource",  # the plain-HTTP redirect (mtlsgate.proxy.redirect) and the admin listener
    "mtlsgate.proxy.redirect",
    # The IResponse contract's outcomes (mtlsgate.http.outcomes) and Twisted's URI: made on first use, which a request
    # served whole never makes (tests/unit/test_outcomes.py); about 1.4 MiB.
    "twisted.web.client",
    "twisted.web._newclient",  # and twisted.web.http (a prefix of http_headers, which a worker uses: the test below)
    "argparse",  # the worker's own flags are read with twisted.python.usage, which the gateway's options load anyway
)


def test_a_plain_https_worker_leaves_out_what_it_does_not_use(pki, tmp_path):
    assert _imported(_worker_probe(pki), tmp_path, NOT_IN_A_PLAIN_WORKER) == []
    assert "twisted.web.http" not in _imported(_worker_probe(pki), tmp_path, ("twisted.web",))


def test_a_worker_without_the_stdlib_s_openssl_builds_its_service_without_it(pki, tmp_path):
    """
    --no-stdlib-ssl (mtlsgate.app.memory.without_stdlib_openssl): the standard library's ssl and _hashlib (and with them
    the system's libcrypto, loaded a second time beside cryptography's: about 4.5 MiB) stay out of a worker, which
    builds and starts its whole service, parses a client certificate (its SHA-256 from hashlib's built-in code) and
    makes an upstream outcome, without them.
    """
    probe = (
        "from mtlsgate.app.memory import without_stdlib_openssl\n"
        "without_stdlib_openssl()\n"
        + _worker_probe(pki)
        + "from mtlsgate.identity import IdentityCache\n"
        "from mtlsgate.tls.pki import load_certificates\n"
        "from cryptography.hazmat.primitives import hashes\n"
        "from cryptography.hazmat.primitives.serialization import Encoding\n"
        "cache = IdentityCache()\n"
        f"for path in ({pki['alice'][0]!r}, {pki['bob'][0]!r}):\n"
        "    cert = load_certificates(path)[0]\n"
        "    # the fingerprint a resumed session's verdict is keyed by (mtlsgate.tls.server): the same SHA-256 as OpenSSL's\n"
        "    assert cache.known(cert.public_bytes(Encoding.DER)).fingerprint == cert.fingerprint(hashes.SHA256())\n"
        "from mtlsgate.http.outcomes import ResponseFailed\n"
        "ResponseFailed([])\n"
        "import sys\n"
        "print(' '.join(m for m in ('ssl', '_ssl', '_hashlib') if sys.modules.get(m) is not None))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


#: The only modules of the package that need the standard library's ssl (prometheus_client's exposition imports it), and
#: so the reason the parent keeps it for a worker that counts metrics (admin_address) or runs the ACME stack and the
#: shared store (mtlsgate.app.workers).
NEEDS_STDLIB_SSL = {"mtlsgate.observe.admin", "mtlsgate.cluster.node"}


def test_every_other_module_imports_without_the_stdlib_s_openssl(tmp_path):
    """What a worker may import later (a health check, the redirect listener, HTTP/2, a reload) works under the block."""
    probe = (
        "from mtlsgate.app.memory import without_stdlib_openssl\n"
        "without_stdlib_openssl()\n"
        "import importlib, pkgutil, mtlsgate\n"
        "failed = []\n"
        "for m in pkgutil.walk_packages(mtlsgate.__path__, 'mtlsgate.'):\n"
        "    try:\n"
        "        importlib.import_module(m.name)\n"
        "    except ImportError:\n"
        "        failed.append(m.name)\n"
        "print(' '.join(failed))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert set(result.stdout.split()) == NEEDS_STDLIB_SSL
