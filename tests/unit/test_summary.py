"""The start-up tables."""

from mtlsgate.config.model import Route
from mtlsgate.identity import AllowRules
from mtlsgate.observe.summary import routes_table, table


def test_table_aligns_columns():
    assert table(("a", "bb"), [("xxx", "y")]) == "A    BB\nxxx  y"


def test_routes_table_shows_rules_and_upstream_tls():
    routes = [
        Route(host="app.example.com", prefix="/api", to=("https://10.0.0.5:9443",), tls_custom_ca_file="up.pem", allow_client=AllowRules.from_lists(cn=["alice"])),
        Route(host="*.example.com", to=("https://10.0.0.6",), tls_skip_verify=True),
        Route(host="*", to=("http://127.0.0.1:9000",)),
    ]
    text = routes_table(routes)
    assert "cn in {alice}" in text and "CA up.pem" in text
    assert "skip-verify!" in text and "none (http://)" in text
    assert text.splitlines()[0].split() == ["HOST", "PREFIX", "UPSTREAMS", "CLIENT", "RULES", "UPSTREAM", "TLS"]
