"""The package's layers: no import circle, engine/ free of backends and CUDA, transport/
free of the engine. Read from the source (ast), so lazy imports inside functions count."""

from __future__ import annotations

import ast
from pathlib import Path

import asyncfabric

PKG = Path(asyncfabric.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


MODS = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Modules ``name`` imports (absolute), skipping ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text())
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for n in child.orelse:
                    visit(n)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = pkg.split(".")
                    base = base[: len(base) - child.level + 1]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                found.add(mod)
                for a in child.names:
                    if f"{mod}.{a.name}" in MODS:
                        found.add(f"{mod}.{a.name}")
            visit(child)

    visit(tree)
    return found


GRAPH = {m: _imports(m, p) for m, p in MODS.items()}


def _internal(m: str) -> set[str]:
    return {i for i in GRAPH[m] if i in MODS and i != m}


def test_no_import_cycles():
    # Edges into a package's __init__ from its own submodules are how Python packages
    # work (importing a.b runs a/__init__ first), not a dependency: drop them.
    def deps(m: str) -> set[str]:
        return {d for d in _internal(m) if not m.startswith(d + ".")}

    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def dfs(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(deps(m)):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d) :] + [d])
            elif d not in state:
                dfs(d)
        stack.pop()
        state[m] = 2

    for m in sorted(MODS):
        if m not in state:
            dfs(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_engine_imports_no_backend_and_no_cuda():
    bad = {}
    for m in MODS:
        if m == "asyncfabric.engine" or m.startswith("asyncfabric.engine."):
            hits = {
                i
                for i in GRAPH[m]
                if i.startswith("asyncfabric.backends")
                or i.split(".")[0] in ("torch", "cupy", "cuda", "pyverbs")
                or "cuda" in i
            }
            if hits:
                bad[m] = hits
    assert not bad, f"engine/ must reach backends only through transport/: {bad}"


def test_engine_source_never_mentions_cuda_code():
    for p in (PKG / "engine").glob("*.py"):
        code = "\n".join(
            line for line in p.read_text().splitlines() if not line.lstrip().startswith("#")
        )
        tree = ast.parse(code)
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        attrs = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        # (``cuda=`` is a user option the engine hands to the transport unread)
        assert not ({"torch"} & names or {"torch", "cuda"} & attrs), f"{p.name} handles CUDA"


def test_transport_imports_no_engine_and_no_backend():
    bad = {}
    for m in MODS:
        if m == "asyncfabric.transport" or m.startswith("asyncfabric.transport."):
            hits = {
                i
                for i in _internal(m)
                if not (i.startswith("asyncfabric.transport") or i == "asyncfabric._errors")
            }
            if hits:
                bad[m] = hits
    assert not bad, f"transport/ may import only itself and asyncfabric._errors: {bad}"


def test_backends_never_import_the_engine():
    bad = {}
    for m in MODS:
        if m.startswith("asyncfabric.backends."):
            hits = {
                i for i in _internal(m) if i.startswith("asyncfabric.engine") or i == "asyncfabric"
            }
            if hits:
                bad[m] = hits
    assert not bad, f"backends must stand on transport/ alone: {bad}"


def test_moe_uses_only_the_public_api():
    """asyncfabric.moe is a system on top: it may import ``asyncfabric`` (the public names)
    and itself, never the engine, the transport or a backend."""
    bad = {}
    for m in MODS:
        if m == "asyncfabric.moe" or m.startswith("asyncfabric.moe."):
            hits = {
                i
                for i in _internal(m)
                if not (i == "asyncfabric" or i.startswith("asyncfabric.moe"))
            }
            if hits:
                bad[m] = hits
    assert "asyncfabric.moe.expert_parallel" in MODS
    assert not bad, f"asyncfabric.moe may import only `asyncfabric` and itself: {bad}"


def test_groups_and_stores_use_only_the_public_api():
    """Systems on top import ``asyncfabric`` names, never the engine's internals."""
    allowed = ("asyncfabric.group", "asyncfabric.store")
    bad = {}
    for m in MODS:
        if m.startswith(allowed) or m == "asyncfabric.testing.groups":
            hits = {
                i
                for i in _internal(m)
                if not (i == "asyncfabric" or i.startswith(allowed) or i == "asyncfabric._cli")
            }
            if hits:
                bad[m] = hits
    assert not bad, f"groups and stores may import only `asyncfabric` names: {bad}"


def test_kv_uses_only_the_public_api():
    """asyncfabric.kv (and its test model) import ``asyncfabric`` names and itself only."""
    bad = {}
    for m in MODS:
        if m.startswith("asyncfabric.kv") or m == "asyncfabric.testing.kv_model":
            hits = {
                i
                for i in _internal(m)
                if not (i == "asyncfabric" or i.startswith("asyncfabric.kv"))
            }
            if hits:
                bad[m] = hits
    assert not bad, f"asyncfabric.kv may import only `asyncfabric` names: {bad}"


def test_weights_uses_only_the_public_api():
    # the weight-update system stands on `import asyncfabric as af` names alone
    bad = {}
    for m in MODS:
        if m == "asyncfabric.weights" or m.startswith("asyncfabric.weights."):
            hits = {
                i
                for i in _internal(m)
                if not (i == "asyncfabric" or i.startswith("asyncfabric.weights"))
            }
            if hits:
                bad[m] = hits
    assert not bad, f"asyncfabric.weights may import only `asyncfabric` names: {bad}"
