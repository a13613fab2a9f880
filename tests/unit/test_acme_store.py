"""
The certificate store when the disk is full, with a real fault rather than a mock: a child process
lowers its own RLIMIT_FSIZE (SIGXFSZ ignored), so its writes fail with EFBIG past the limit exactly
as they fail with ENOSPC on a full disk, and stores a certificate over the one already there.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from mtlsgate.tls import pki
from mtlsgate.acme.store import DirectoryStore
from tests.conftest import subprocess_env

NAME = "a.example.test"

CHILD = """
import json, resource, signal, sys
from mtlsgate.tls import pki
from mtlsgate.acme.store import DirectoryStore

directory, name, cert, key, limit = sys.argv[1:]
new_key, chain = pki.load_key_and_chain(cert, key)
if limit != "none":
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    DirectoryStore(directory).store(name, new_key, chain)
except Exception as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e)}))
else:
    print(json.dumps({"error": None}))
"""


def store_in_child(directory: str, issued: tuple[str, str], limit: int | None) -> dict:
    """Store the certificate in C{issued} (files) under NAME from a child process with at most C{limit} bytes per file."""
    argv = [sys.executable, "-c", CHILD, directory, NAME, *issued, "none" if limit is None else str(limit)]
    done = subprocess.run(argv, env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr  # neither killed by SIGXFSZ nor crashed
    return json.loads(done.stdout)


@pytest.fixture
def certificates(pki, tmp_path):
    """An old certificate for NAME (to be stored first) and a new one, also as files for the child."""
    ca = pki["ca_obj"]
    old, new = ca.issue_server([NAME]), ca.issue_server([NAME])
    files = (str(tmp_path / "new.pem"), str(tmp_path / "new-key.pem"))
    new.write(*files)
    return {"old": (old.key, [old.certificate]), "new": new.certificate, "new_files": files}


def test_a_full_disk_leaves_the_stored_certificate_as_it_was_and_no_temporary_file(certificates, tmp_path):
    directory = tmp_path / "certs"
    old_key, old_chain = certificates["old"]
    DirectoryStore(str(directory)).store(NAME, old_key, old_chain)
    path = directory / f"{NAME}.pem"
    before = path.read_bytes()
    limit = 512  # less than any key and certificate
    assert len(before) > limit

    outcome = store_in_child(str(directory), certificates["new_files"], limit)
    assert outcome == {
        "error": "PKIError",
        "message": f"{path}: cannot write (File too large) (disk full, quota or file size limit); the file there before, if any, is unchanged",
    }
    assert path.read_bytes() == before  # byte for byte
    key, chain = pki.load_key_and_chain(str(path))  # and it still loads, as the gateway will load it
    assert chain[0] == old_chain[0] and pki.key_matches_certificate(key, chain[0])
    assert sorted(os.listdir(directory)) == [f"{NAME}.pem"]  # the temporary file is gone

    assert store_in_child(str(directory), certificates["new_files"], None) == {"error": None}  # room again: it lands
    key, chain = pki.load_key_and_chain(str(path))
    assert chain[0] == certificates["new"] and pki.key_matches_certificate(key, chain[0])
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sorted(os.listdir(directory)) == [f"{NAME}.pem"]
