"""Build glue: setuptools needs setup.py to run cffi's builds, the native core's and
the benchmarks' raw baseline's, and to ship their C sources and headers.

Each build file names its files once, in its ``FILES`` list (a literal): the
build's sources and dependencies come from it, and so does the package data
here, read from the file rather than by running it.
"""

import ast
from pathlib import Path

from setuptools import Extension, setup

ROOT = Path(__file__).resolve().parent
CORE = "asyncfabric/backends/libfabric/_build.py"
RAW = "asyncfabric/bench/_raw_build.py"
INDEPENDENT = "asyncfabric/bench/independent/__init__.py"  # af_indep.c, built on first use


def _files(build: str) -> list[str]:
    tree = ast.parse((ROOT / build).read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "FILES" for t in node.targets
        ):
            return list(ast.literal_eval(node.value))
    raise SystemExit(f"{build} has no FILES list")


# The engine's native fast path (a CPython extension over the transport contract's
# native table, asyncfabric/transport/native_ops.h; it links no backend).
FASTPATH = Extension(
    "asyncfabric.engine._fastpath",
    sources=["asyncfabric/engine/_fastpath.c", "asyncfabric/engine/_waiter.c"],
    include_dirs=["asyncfabric/transport"],
    depends=["asyncfabric/transport/native_ops.h", "asyncfabric/engine/_waiter.h"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror"],
)

# The all-reduce's quantize/dequantize/convert kernels (collectives/_kernels.c): -O3 so
# gcc vectorizes their loops with the baseline instruction set.
KERNELS = Extension(
    "asyncfabric.collectives._kernels",
    sources=["asyncfabric/collectives/_kernels.c"],
    extra_compile_args=["-O3", "-Wall", "-Wextra", "-Werror"],
)

setup(
    ext_modules=[FASTPATH, KERNELS],
    cffi_modules=[f"{CORE}:ffibuilder", f"{RAW}:ffibuilder"],
    package_data={
        "asyncfabric": ["py.typed"],
        "asyncfabric.engine": ["_fastpath.c", "_waiter.c", "_waiter.h"],
        "asyncfabric.collectives": ["_kernels.c", "_kernels.pyi"],
        "asyncfabric.transport": ["native_ops.h"],
        "asyncfabric.backends.libfabric": _files(CORE),
        "asyncfabric.bench": _files(RAW),
        "asyncfabric.bench.independent": _files(INDEPENDENT),
    },
)
