"""
The package's layout is its architecture, and imports point down it (docs/architecture.md):

    cli  ->  app, testing, config.load  ->  proxy, observe, acme, cluster  ->  http, tls  ->  config.model, identity, version, accounting, reactors

A module may import its own layer or any below; an import that points up fails here by name.
"""

from __future__ import annotations

import ast

import pytest

from tests.conftest import PACKAGE_DIR

LAYERS = {
    "mtlsgate.identity": 0, "mtlsgate.version": 0, "mtlsgate.config.model": 0, "mtlsgate.accounting": 0, "mtlsgate.reactors": 0,
    "mtlsgate.http": 1, "mtlsgate.tls": 1,
    "mtlsgate.proxy": 2, "mtlsgate.observe": 2, "mtlsgate.acme": 2, "mtlsgate.cluster": 2,
    "mtlsgate.config.load": 3, "mtlsgate.app": 3, "mtlsgate.testing": 3,
    "mtlsgate.cli": 4,
}  # fmt: skip


def layer(module: str) -> int:
    owners = [name for name in LAYERS if module == name or module.startswith(name + ".")]
    assert owners, f"{module} belongs to no layer: add it to LAYERS (and to docs/architecture.md)"
    return LAYERS[max(owners, key=len)]


def _imports(path) -> list[tuple[str, int]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mtlsgate":
            names = [f"mtlsgate.{a.name}" for a in node.names] if node.module == "mtlsgate" else [node.module]
            found += [(name, node.lineno) for name in names]
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "mtlsgate"]
    return found


MODULES = sorted(
    (".".join(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts).removesuffix(".__init__"), path)
    for path in PACKAGE_DIR.rglob("*.py")
)  # fmt: skip


@pytest.mark.parametrize("module,path", MODULES, ids=[m for m, _ in MODULES])
def test_imports_point_down(module, path):
    if module == "mtlsgate":
        return
    up = [f"{target} (line {line})" for target, line in _imports(path) if target != "mtlsgate" and layer(target) > layer(module)]
    assert not up, f"{module} (layer {layer(module)}) imports upward: {', '.join(up)}"


def test_the_config_model_imports_nothing_but_identity():
    model = PACKAGE_DIR / "config" / "model.py"
    assert {target for target, _ in _imports(model)} <= {"mtlsgate.identity"}
