"""asyncfabric.collectives builds on the public API only: ``import asyncfabric as af``
names, never the engine's, transport's or backends' modules."""

from __future__ import annotations

import ast
from pathlib import Path

import asyncfabric

PKG = Path(asyncfabric.__file__).parent / "collectives"
PRIVATE = ("asyncfabric.engine", "asyncfabric.transport", "asyncfabric.backends")


def test_collectives_import_only_public_names():
    bad = []
    for f in sorted(PKG.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level >= 2 or mod.startswith(PRIVATE):
                    bad.append(f"{f.name}:{node.lineno} from {'.' * node.level}{mod}")
                if mod == "asyncfabric" and any(a.name.startswith("_") for a in node.names):
                    bad.append(f"{f.name}:{node.lineno} private name from asyncfabric")
            elif isinstance(node, ast.Import):
                bad += [
                    f"{f.name}:{node.lineno} import {a.name}"
                    for a in node.names
                    if a.name.startswith(PRIVATE)
                ]
    assert not bad, "collectives must use `import asyncfabric as af` names only: " + "; ".join(bad)
