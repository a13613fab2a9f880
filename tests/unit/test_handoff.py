"""
The configuration a worker group's parent hands its workers (mtlsgate.app.handoff): the same L{Config}
and the same errors as the parent's own load, a private file, and no yaml in a worker.
"""

from __future__ import annotations

import datetime
import os
import stat
import subprocess
import sys

import attrs
import pytest

from mtlsgate.app import handoff
from mtlsgate.app.tap import Options
from mtlsgate.config.model import ConfigError
from tests.conftest import subprocess_env


def _flags(pki) -> list[str]:
    return [
        "--https", "tcp:0:interface=127.0.0.1", "--client-ca", pki["ca"], "--route", "*=https://127.0.0.1:9",
        "--upstream-ca", pki["ca"], "--upstream-cert", pki["gateway_client"][0], "--upstream-key", pki["gateway_client"][1],
    ]  # fmt: skip


@pytest.fixture
def store():
    store = handoff.Handoff()
    yield store
    store.remove()


def _parent_and_handed(flags: list[str], store: handoff.Handoff) -> tuple[Options, str]:
    parent = Options()
    parent.parseOptions(flags)
    _, document = parent.load_document()
    return parent, store.write(handoff.encode(document))


def test_a_worker_builds_the_parents_configuration_from_the_handed_document(pki, tmp_path, store):
    (tmp_path / "certs").mkdir()
    for name in ("gateway.pem", "gateway-key.pem"):
        (tmp_path / "certs" / name).write_bytes(open(pki["gateway"][0 if name == "gateway.pem" else 1], "rb").read())
    config_file = tmp_path / "mtlsgate.yaml"  # relative paths, resolved against the file's directory
    config_file.write_text("certificates:\n  - cert: certs/gateway.pem\n    key: certs/gateway-key.pem\nlimits:\n  idle_timeout: 2m\nworkers: 2\n")
    parent, path = _parent_and_handed([*_flags(pki), "--config", str(config_file)], store)
    assert parent.config is not None
    handed = handoff.load(path)
    assert handed.source is None  # a worker does not watch the YAML file: its parent does
    assert handed == attrs.evolve(parent.config, source=None)
    assert handed.certificates[0].cert == str(tmp_path / "certs" / "gateway.pem")


def test_a_worker_names_the_same_key_and_flag_as_its_parent(pki, tmp_path, store):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(open(pki["gateway"][0], "rb").read())
    key.write_bytes(open(pki["gateway"][1], "rb").read())
    parent, path = _parent_and_handed([*_flags(pki), "--cert", str(cert), "--key", str(key)], store)
    cert.unlink()  # gone between the parent's check and a worker's reload
    with pytest.raises(ConfigError) as in_parent:
        parent.load()
    with pytest.raises(ConfigError) as in_worker:
        handoff.load(path)
    assert str(in_worker.value) == str(in_parent.value)
    assert "(set by --cert/--key)" in str(in_worker.value)


@pytest.mark.parametrize(
    "config, key",
    [
        ({"access_log": datetime.date(2026, 12, 1)}, "access_log"),  # YAML reads 2026-12-01 as a date
        ({"routes": [{"from": "https://a", "to": [b"\x00"]}]}, "routes[0].to[0]"),  # !!binary
        ({"limits": {1: "2s"}}, "limits"),  # a key JSON would turn into "1"
    ],
)
def test_what_json_would_not_give_back_as_it_is_is_refused_naming_the_key(config, key):
    with pytest.raises(ConfigError) as e:
        handoff.encode({"config": config})
    assert e.value.key == key


def test_the_handed_file_is_private_replaced_whole_and_removed(tmp_path):
    old = os.umask(0)  # the modes do not depend on the umask
    store = handoff.Handoff()
    try:
        path = store.write(handoff.encode({"config": {"workers": 2}}))
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        assert store.write(handoff.encode({"config": {"workers": 3}})) == path
        assert os.listdir(os.path.dirname(path)) == ["config.json"]
        assert handoff.read(path)["config"] == {"workers": 3}
        store.remove()
        assert not os.path.exists(os.path.dirname(path))
    finally:
        os.umask(old)
        store.remove()


def test_a_worker_imports_neither_yaml_nor_an_options_parser(pki, tmp_path, store):
    parent = Options()
    parent.parseOptions([*_flags(pki), "--cert", pki["gateway"][0], "--key", pki["gateway"][1], "--workers", "2"])
    path = store.write(handoff.encode(parent.load_document()[1]))
    probe = (  # what mtlsgate.app.worker.main does before it starts the service
        "import sys\n"
        "from twisted.internet import reactor\n"
        "import mtlsgate.app.worker, mtlsgate.app.workers\n"
        "from mtlsgate.app import handoff\n"
        "from mtlsgate.app.service import WorkerRole, make_gateway\n"
        f"args = mtlsgate.app.worker.parse_args(['--index', '0', '--config-json', {path!r}])\n"
        "service = make_gateway(reactor, handoff.load(args.config_json), None, WorkerRole(index=args.number, https_fd=-1))\n"
        "print(type(service).__name__, *(m in sys.modules for m in ('yaml', 'argparse', 'twisted.python.usage', 'mtlsgate.app.tap')))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["GatewayService", "False", "False", "False", "False"]


@pytest.mark.parametrize(
    "argv, problem",
    [
        ([], "--index and --config-json are required"),
        (["--index", "0"], "--index and --config-json are required"),
        (["--index", "x", "--config-json", "p"], "--index: expected a number"),
        (["--index", "0", "--config-json"], "--config-json needs a value"),
        (["--index", "0", "--config-json", "p", "--nope"], "unknown argument '--nope'"),
    ],
)
def test_the_worker_refuses_flags_it_does_not_know(argv, problem):
    from mtlsgate.app.worker import parse_args

    with pytest.raises(ValueError, match=problem):
        parse_args(argv)


def test_the_worker_reads_the_flags_its_parent_gives():
    from mtlsgate.app.worker import WorkerArgs, parse_args

    argv = ["--index", "1", "--parent", "42", "--config-json", "/x/config.json", "--http", "--acme"]
    assert parse_args(argv) == WorkerArgs(1, 42, "/x/config.json", True, True)
    assert parse_args(argv + ["--no-stdlib-ssl"]) == WorkerArgs(1, 42, "/x/config.json", True, True, False)
    assert parse_args(["--index=0", "--config-json=/p"]) == WorkerArgs(0, None, "/p", False, False)
