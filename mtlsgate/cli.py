"""
The C{mtlsgate} command: C{mtlsgate demo}, and a small local CA (C{mtlsgate ca init|issue}).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mtlsgate.pki import DevCA, PKIError


def run_service(reactor: Any, service: Any) -> None:
    """Run a service in the foreground with log lines on stdout, until SIGINT/SIGTERM."""
    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    service.privilegedStartService()
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()


def _demo(args: argparse.Namespace) -> int:
    from twisted.internet import reactor

    from mtlsgate.demo import make_demo_service

    run_service(reactor, make_demo_service(reactor, args.dir, args.port, args.upstream_port))
    return 0


def _ca_init(args: argparse.Namespace) -> int:
    import os

    if os.path.exists(os.path.join(args.dir, "ca-key.pem")) and not args.force:
        raise PKIError(f"{args.dir}/ca-key.pem exists; use --force to replace the CA")
    ca = DevCA.create(args.dir, name=args.name, rsa=args.rsa)
    print(f"created CA {ca.certificate.subject.rfc4514_string()} in {args.dir}/ca.pem (key ca-key.pem, mode 0600)")
    return 0


def _ca_issue(args: argparse.Namespace) -> int:
    ca = DevCA.load(args.dir)
    out = args.out or args.names[0].replace("*", "_wildcard")
    if args.kind == "server":
        issued = ca.issue_server(args.names, days=args.days or 825, rsa=args.rsa)
    else:
        if len(args.names) != 1:
            raise PKIError("a client certificate takes exactly one NAME (its CN)")
        issued = ca.issue_client(args.names[0], uris=args.uri, emails=args.email, ou=args.ou, days=args.days or 90, rsa=args.rsa)
    issued.write(f"{out}.pem", f"{out}-key.pem")
    print(f"wrote {out}.pem and {out}-key.pem (mode 0600)")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtlsgate", description="A zero-trust TLS gateway on Twisted.")
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a self-contained gateway + mTLS upstream with a local CA")
    demo.add_argument("--dir", default="mtlsgate-demo", help="where the CA, certificates and config go (reused) [mtlsgate-demo]")
    demo.add_argument("--port", type=int, default=8443, help="the gateway's HTTPS port on 127.0.0.1 [8443]")
    demo.add_argument("--upstream-port", type=int, default=9443, help="the echo upstream's port on 127.0.0.1 [9443]")
    demo.set_defaults(run=_demo)
    ca = sub.add_parser("ca", help="a local development CA").add_subparsers(dest="ca_command", required=True)
    init = ca.add_parser("init", help="create a root CA")
    init.add_argument("--dir", default="mtlsgate-ca")
    init.add_argument("--name", default="mtlsgate development CA")
    init.add_argument("--rsa", action="store_true", help="RSA 3072 instead of ECDSA P-256")
    init.add_argument("--force", action="store_true")
    init.set_defaults(run=_ca_init)
    issue = ca.add_parser("issue", help="issue a server or client certificate")
    issue.add_argument("kind", choices=["server", "client"])
    issue.add_argument("names", nargs="+", help="server: DNS names/IPs/*.wildcards; client: the CN")
    issue.add_argument("--dir", default="mtlsgate-ca")
    issue.add_argument("--out", help="file name prefix [the first name]")
    issue.add_argument("--days", type=int)
    issue.add_argument("--rsa", action="store_true")
    issue.add_argument("--uri", action="append", default=[], help="client: a URI SAN such as spiffe://example.org/web")
    issue.add_argument("--email", action="append", default=[])
    issue.add_argument("--ou", action="append", default=[])
    issue.set_defaults(run=_ca_issue)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except PKIError as e:
        sys.stderr.write(f"mtlsgate: {e}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
