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
