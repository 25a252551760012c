"""cffi (API mode) build of the libfabric native core.

Run by setuptools at install time (``cffi_modules`` in setup.py). The headers
come from pkg-config's ``libfabric``, or from ``$LIBFABRIC_HOME`` (for example
``/opt/amazon/efa``) when it is set.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
INSTALL_HINT = (
    "asyncfabric needs libfabric's development headers to build its native core. "
    "On Debian/Ubuntu: `apt-get install libfabric-dev`; on AWS with the EFA installer: "
    "set LIBFABRIC_HOME=/opt/amazon/efa; elsewhere point LIBFABRIC_HOME at a libfabric "
    "install prefix (it must hold include/rdma/fabric.h)."
)


def _flags() -> tuple[list[str], list[str], list[str]]:
    """Return (include_dirs, library_dirs, runtime_library_dirs)."""
    home = os.environ.get("LIBFABRIC_HOME")
    if home:
        inc = Path(home) / "include"
        libs = [p for p in (Path(home) / "lib64", Path(home) / "lib") if p.is_dir()]
        libs += sorted(Path(home, "lib").glob("*-linux-gnu")) if Path(home, "lib").is_dir() else []
        if not (inc / "rdma" / "fabric.h").is_file():
            raise SystemExit(f"LIBFABRIC_HOME={home} has no include/rdma/fabric.h. {INSTALL_HINT}")
        dirs = [str(p) for p in libs]
        return [str(inc)], dirs, dirs
    if shutil.which("pkg-config"):
        res = subprocess.run(
            ["pkg-config", "--cflags", "--libs", "libfabric"], capture_output=True, text=True
        )
        if res.returncode == 0:
            toks = shlex.split(res.stdout)
            incs = [t[2:] for t in toks if t.startswith("-I")]
            libdirs = [t[2:] for t in toks if t.startswith("-L")]
            for d in incs or ["/usr/include"]:
                if (Path(d) / "rdma" / "fabric.h").is_file():
                    return incs, libdirs, []
    if Path("/usr/include/rdma/fabric.h").is_file():
        return [], [], []
    raise SystemExit(f"libfabric headers not found. {INSTALL_HINT}")


def make_ffi() -> FFI:
    ffibuilder = FFI()
    ffibuilder.cdef((HERE / "afcore.h").read_text())
    # The benchmarks' raw baseline (raw.c): same engine, C loops, no Python per op.
    ffibuilder.cdef((HERE / "raw.h").read_text())
    # GPU copy notices (cudanote.c): a CUDA host function rings the notify fd.
    ffibuilder.cdef((HERE / "cudanote.h").read_text())
    incs, libdirs, rpath = _flags()
    ffibuilder.set_source(
        "asyncfabric.backends.libfabric._afcore",
        '#include "afcore.c"\n#include "raw.c"\n#include "afpeer.c"\n'
        '#include "cudanote.h"\n#include "cudanote.c"\n',
        include_dirs=[str(HERE), *incs],
        library_dirs=libdirs,
        runtime_library_dirs=rpath,
        libraries=["fabric", "pthread", "rt"],
        extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-unused-function"],
        depends=[
            str(HERE / n)
            for n in (
                "afcore.c",
                "afcore.h",
                "doorbell.h",
                "shmname.h",
                "afpeer.c",
                "raw.c",
                "raw.h",
                "cudanote.c",
                "cudanote.h",
            )
        ],
    )
    return ffibuilder


ffibuilder = make_ffi()

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
