"""
The C{mtlsgate} command: C{mtlsgate demo}, a small local CA (C{mtlsgate ca init|issue|revoke|crl|show},
in L{mtlsgate.cli.ca}), C{mtlsgate check CONFIG} (in L{mtlsgate.cli.check}) and C{mtlsgate tac} (prints the
deployment file shipped in the package).
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from typing import NoReturn

from mtlsgate.cli import ca as ca_cli
from mtlsgate.cli import check
from mtlsgate.app.run import run_service
from mtlsgate.cli.ca import CommandError
from mtlsgate.config.model import ConfigError
from mtlsgate.tls.pki import PKIError
from mtlsgate.version import version


def _demo(args: argparse.Namespace) -> int:
    from mtlsgate.app.demo import make_demo_service
    from mtlsgate.reactors import installed_reactor

    reactor = installed_reactor()
    run_service(reactor, make_demo_service(reactor, args.dir, args.port, args.upstream_port))
    return 0


def tac_text() -> str:
    """The deployment file, C{mtlsgate.tac}, as shipped in the package."""
    return resources.files("mtlsgate").joinpath("mtlsgate.tac").read_text(encoding="utf-8")


def _tac(args: argparse.Namespace) -> int:
    sys.stdout.write(tac_text())
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, with exit status 1, like every other error of the command."""

    def error(self, message: str) -> NoReturn:
        # self.prog is "mtlsgate" or "mtlsgate ca issue": "mtlsgate: ca issue: ...", never "mtlsgate: mtlsgate ca issue: ...".
        command = self.prog.removeprefix("mtlsgate").strip()
        self.exit(1, f"mtlsgate: {command + ': ' if command else ''}{message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mtlsgate", description="A zero-trust TLS gateway on Twisted.")
    p.add_argument("--version", action="version", version=f"mtlsgate {version()}")
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a self-contained gateway + mTLS upstream with a local CA")
    demo.add_argument("--dir", default="mtlsgate-demo", help="where the CA, certificates and config go (reused) [mtlsgate-demo]")
    demo.add_argument("--port", type=int, default=8443, help="the gateway's HTTPS port on 127.0.0.1 [8443]")
    demo.add_argument("--upstream-port", type=int, default=9443, help="the echo upstream's port on 127.0.0.1 [9443]")
    demo.set_defaults(run=_demo)
    ca_cli.add_parsers(sub)
    check.add_parser(sub)
    tac = sub.add_parser("tac", help="print the deployment file: mtlsgate tac > mtlsgate.tac; twistd -ny mtlsgate.tac")
    tac.set_defaults(run=_tac)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except (PKIError, ConfigError, CommandError) as e:
        sys.stderr.write(f"mtlsgate: {e}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
