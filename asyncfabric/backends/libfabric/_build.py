"""cffi (API mode) build of the libfabric native core.

Run by setuptools at install time (``cffi_modules`` in setup.py). The headers
come from pkg-config's ``libfabric``, or from ``$LIBFABRIC_HOME`` (for example
``/opt/amazon/efa``) when it is set.

The core is separate translation units, one concept each (afint.h lists them),
named once in :data:`FILES`: the build's sources and dependencies, and the
package data setup.py ships, all come from that list. Every unit includes
afint.h first, which makes each -Wall/-Wextra warning an error in our code;
cffi's generated wrapper is compiled with the same flags but only warns.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
CONTRACT = HERE.parent.parent / "transport"

# The native core, every file of it: C units (cffi's sources) and headers. A literal:
# setup.py reads it (package data) without running this file.
FILES = [
    "events.c",  # the event ring, notify and wake fds
    "counters.c",  # the immediate counter table
    "ops.c",  # the op slab, posting, afe_post_*
    "batch.c",  # batches: many writes, one call, one event
    "cq.c",  # completions and errors
    "progress.c",  # the progress pass, thread and spins
    "workers.c",  # several progress threads, each owning domains
    "wpost.c",  # the workers post large transfers, outside the engine lock
    "setup.c",  # getinfo, open/close, peers, registrations
    "quirks.c",  # what differs per provider, one table
    "afpeer.c",  # peer failure detection
    "doorbell.c",  # waking sleeping engines on this host
    "shmname.c",  # shm region names, reclaiming dead processes' regions
    "qlock.c",  # looking at a shm queue lock before libfabric takes it
    "cma.c",  # the sender's own copy into a shm peer (sender_copy)
    "hook.c",  # the native hook (afhook.h)
    "cudanote.c",  # the CUDA host function
    "native.c",  # the contract's native table (transport/native_ops.h)
    "triggers.c",  # triggered batches (a watcher thread) and counter release words
    "afcore.h",  # public: what Python sees (cdef)
    "cudanote.h",  # public: cudanote.c's part of the cdef
    "triggers.h",  # public: triggers.c's part of the cdef
    "afhook.h",  # public: the native hook, for C outside the core
    "afint.h",  # internal: the engine's layout, shared inline helpers
    "doorbell.h",
    "quirks.h",
    "shmname.h",
    "qlock.h",
]
SOURCES = [f for f in FILES if f.endswith(".c")]
# Parsed by cffi's cdef (no preprocessor), in this order.
CDEFS = ["afcore.h", "cudanote.h", "triggers.h"]
# Every file: -Wall -Wextra (afint.h turns them into errors in our units).
CFLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra"]
INSTALL_HINT = (
    "asyncfabric needs libfabric's development headers to build its native core. "
    "On Debian/Ubuntu: `apt-get install libfabric-dev`; on AWS with the EFA installer: "
    "set LIBFABRIC_HOME=/opt/amazon/efa; elsewhere point LIBFABRIC_HOME at a libfabric "
    "install prefix (it must hold include/rdma/fabric.h)."
)


def libfabric_flags() -> tuple[list[str], list[str], list[str]]:
    """Return libfabric's (include_dirs, library_dirs, runtime_library_dirs)."""
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


def _rel(name: str) -> str:
    return os.path.relpath(HERE / name)


def _check_units() -> None:
    """Each of our units must include afint.h first: that is what holds it to -Werror."""
    for name in SOURCES:
        text = (HERE / name).read_text()
        first = next((ln for ln in text.splitlines() if ln.startswith("#include")), "")
        if first.split("/*")[0].strip() != '#include "afint.h"':
            raise SystemExit(f'{HERE / name}: its first #include must be "afint.h"')


def make_ffi() -> FFI:
    _check_units()
    ffibuilder = FFI()
    for name in CDEFS:
        ffibuilder.cdef((HERE / name).read_text())
    incs, libdirs, rpath = libfabric_flags()
    ffibuilder.set_source(
        "asyncfabric.backends.libfabric._afcore",
        # The wrapper needs only the declarations; the core is in SOURCES.
        '#include <stddef.h>\n#include <stdint.h>\n#include "afcore.h"\n#include "cudanote.h"\n#include "triggers.h"\n',
        # setuptools wants paths relative to setup.py's directory, where it runs this;
        # relative to the current directory, they also serve an in-place compile().
        sources=[_rel(n) for n in SOURCES],
        # ../../transport: the contract's native_ops.h
        include_dirs=[str(HERE), str(CONTRACT)],
        library_dirs=libdirs,
        runtime_library_dirs=rpath,
        libraries=["fabric", "pthread", "rt"],
        # libfabric's headers as system headers: warnings in them are not ours.
        extra_compile_args=[*CFLAGS, *(f for d in incs for f in ("-isystem", d))],
        depends=[_rel(n) for n in FILES] + [os.path.relpath(CONTRACT / "native_ops.h")],
    )
    return ffibuilder


ffibuilder = make_ffi()

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
