"""
nginx as a real upstream for end-to-end tests: the parts of nginx.conf every test's nginx shares, and
starting it (stopped by the test's C{procs}).  Each test writes its own C{http} block.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.conftest import Proc, find_tool, poll_pauses, wait_for_port

NGINX = find_tool("nginx") or "nginx"

#: nginx.conf's main context, a str.format template as the rest of a test's config ({dir}: the test's directory).
MAIN = """
user root;
worker_processes 1;
daemon off;
error_log {dir}/error.log info;
pid {dir}/nginx.pid;
events {{ worker_connections 64; }}
"""

#: Temporary files under the test's directory (inside the C{http} block), likewise a template.
TEMP_PATHS = """\
    client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy; fastcgi_temp_path {dir}/fcgi;
    uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
"""


def start_nginx(procs: list[Proc], tmp_path: Path, conf: str, port: int) -> Proc:
    """Write C{conf} as the test's nginx.conf, start nginx on it and wait for C{port}; the test's C{procs} stops it."""
    path = tmp_path / "nginx.conf"
    path.write_text(conf)
    proc = Proc([NGINX, "-p", str(tmp_path), "-c", str(path)], tmp_path / "nginx.out")
    procs.append(proc)
    wait_for_port(port, proc.popen, log=proc.log)
    return proc


def access_lines(path: Path, count: int, timeout: float = 10.0) -> list[str]:
    """
    The lines of nginx's access log at C{path} once it has C{count} of them.  nginx writes a line when
    it frees the request, which for an HTTP/2 stream can come after the client has the whole response:
    read the log at once and the last line may not be there yet.
    """
    deadline = time.monotonic() + timeout
    for pause in poll_pauses():
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(pause)
    raise AssertionError("unreachable")
