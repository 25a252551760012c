"""cffi (API mode) build of the benchmarks' raw baseline, ``asyncfabric.bench._raw``.

Run by setuptools at install time (``cffi_modules`` in setup.py, next to the
core's). A module of its own, outside the runtime core: _rawloop.c includes
only ``afhook.h`` (the core's public hook header) and libfabric's headers, and
links nothing of the core; it gets an engine at run time from
``asyncfabric.backends.libfabric.hook.native_hook``. libfabric's headers are
found as the core's build finds them (its ``libfabric_flags``).
"""

from __future__ import annotations

import os
import runpy
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
CORE = HERE.parent / "backends" / "libfabric"

# The raw module, every file of it: its C unit (cffi's source) and its cdef. A literal:
# setup.py reads it (package data) without running this file.
FILES = ["_rawloop.c", "_rawloop.h"]
SOURCES = [f for f in FILES if f.endswith(".c")]
CDEFS = ["_rawloop.h"]


def make_ffi() -> FFI:
    core = runpy.run_path(str(CORE / "_build.py"), run_name="__asyncfabric_raw_build__")
    incs, _, _ = core["libfabric_flags"]()
    ffibuilder = FFI()
    for name in CDEFS:
        ffibuilder.cdef((HERE / name).read_text())
    ffibuilder.set_source(
        "asyncfabric.bench._raw",
        '#include <stdint.h>\n#include "_rawloop.h"\n',
        # Relative to the current directory: setuptools runs this from setup.py's.
        sources=[os.path.relpath(HERE / n) for n in SOURCES],
        include_dirs=[str(HERE), str(CORE)],  # CORE: for afhook.h, and only that is included
        # -Wall -Wextra everywhere; _rawloop.c makes them errors in itself.
        extra_compile_args=[*core["CFLAGS"], *(f for d in incs for f in ("-isystem", d))],
        depends=[os.path.relpath(p) for p in (*(HERE / n for n in FILES), CORE / "afhook.h")],
    )
    return ffibuilder


ffibuilder = make_ffi()

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
