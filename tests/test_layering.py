"""Systems on top of the engine import only its public names (``import asyncfabric as af``)."""

from __future__ import annotations

import ast
import pathlib

import pytest

import asyncfabric

ROOT = pathlib.Path(asyncfabric.__file__).parent
# system package -> the asyncfabric subpackages it may import besides the public names
SYSTEMS = {"kv": ()}
PUBLIC = set(asyncfabric.__all__)


def _imports(path: pathlib.Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, None
        elif isinstance(node, ast.ImportFrom):
            mod = ("." * node.level) + (node.module or "")
            yield node.lineno, mod, [a.name for a in node.names]


@pytest.mark.parametrize("system", sorted(SYSTEMS))
def test_system_uses_only_public_api(system):
    bad = []
    for path in sorted((ROOT / system).rglob("*.py")):
        for line, mod, names in _imports(path):
            where = f"{path.relative_to(ROOT)}:{line}"
            if mod.startswith(".."):
                bad.append(f"{where}: relative import {mod!r} leaves asyncfabric.{system}")
            elif mod == "asyncfabric" and names is not None:
                bad += [f"{where}: {n} is not public" for n in names if n not in PUBLIC]
            elif mod.startswith("asyncfabric."):
                sub = mod.split(".")[1]
                if sub != system and sub not in SYSTEMS[system]:
                    bad.append(f"{where}: imports {mod} (use `import asyncfabric as af`)")
    assert not bad, "\n".join(bad)
