"""The native hook: the documented way for C code outside the libfabric core to
drive an engine's own endpoints.

Some C code needs to post and poll on exactly the endpoints, completion queues
and registrations an engine uses: the benchmarks' raw baseline
(:mod:`asyncfabric.bench._raw`) runs fi_rma_bw-style loops there, next to the
engine's own traffic. Such code is built against ``afhook.h`` (next to this
file) and libfabric's headers only, never the core's internals, and receives
an engine through :func:`native_hook`: the engine pointer and the address of
a filled ``af_hook`` (endpoints, CQs, and the core's completion handling), as
plain integers, so any extension module can take them.

``afhook.h`` says what the hook guarantees and its locking rule: the C code
holds the engine lock for its whole loop (the progress thread stands aside),
hands every completion that is not its own to the hook, and, once it returns,
the caller drains the events that made with :meth:`Engine.poll`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import LibfabricTransport, _require, ffi, lib, strerror

#: ``afhook.h``'s directory: add it to an extension's include path.
INCLUDE_DIR = str(Path(__file__).resolve().parent)


@dataclass(frozen=True)
class NativeHook:
    """One engine's hook. ``engine`` is the ``af_engine *`` and ``hook`` the
    ``const af_hook *``, both as integers; both stay valid while this object
    lives and the engine is open (not after it closes)."""

    engine: int
    hook: int
    domains: int
    _keep: Any = field(repr=False, compare=False)


def _libfabric(transport: Any) -> LibfabricTransport:
    t = transport
    # Wrappers (staged, cuda_ipc) forward to the transport they wrap.
    while not isinstance(t, LibfabricTransport) and getattr(t, "inner", None) is not None:
        t = t.inner
    if not isinstance(t, LibfabricTransport):
        raise TypeError(
            f"the native hook needs a libfabric transport, not {type(transport).__name__} "
            f"(backend {getattr(transport, 'backend', '?')!r})"
        )
    return t


def native_hook(transport: Any) -> NativeHook:
    """Return the native hook of ``transport`` (``engine.transport``), a libfabric
    transport or one wrapping it. Raises TypeError for other backends and
    ValueError for a closed transport."""
    _require()
    t = _libfabric(transport)
    e = t._e
    if e == ffi.NULL:
        raise ValueError("the transport is closed")
    buf = ffi.new("char[]", lib.afe_hook_size())
    h = ffi.cast("af_hook *", buf)
    rc = lib.afe_hook(e, h)
    if rc:
        raise ValueError(f"afe_hook failed: {strerror(rc)} ({rc})")
    return NativeHook(
        engine=int(ffi.cast("uintptr_t", e)),
        hook=int(ffi.cast("uintptr_t", h)),
        domains=t.ndomains,
        _keep=(buf, t),
    )
