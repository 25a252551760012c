"""Backend discovery: entry points in the ``asyncfabric.backends`` group.

``resolve("shm")`` → (libfabric backend, "shm"); ``resolve("libfabric:verbs;ofi_rxm")``;
``resolve("pyverbs")`` → a backend named pyverbs with its default provider;
``resolve("auto", local_only=...)`` picks efa, then verbs, then tcp (shm when every
peer shares the host; cuda_ipc, NVLink peer copies, with ``nvlink=True`` when CUDA is here).
"""

from __future__ import annotations

import functools
from importlib.metadata import entry_points

from .._errors import BackendUnavailable
from ..abc import Backend

SHORT_LIBFABRIC = {
    "shm",
    "tcp",
    "efa",
    "verbs",
    "verbs;ofi_rxm",
    "tcp;ofi_rxm",
    "sockets",
    "udp;ofi_rxd",
}
AUTO_ORDER = ("efa", "verbs;ofi_rxm", "tcp")


@functools.cache
def backends() -> dict[str, Backend]:
    found: dict[str, Backend] = {}
    for ep in entry_points(group="asyncfabric.backends"):
        try:
            found[ep.name] = ep.load()()
        except Exception as exc:  # a broken third-party plugin must not break the others
            _load_errors[ep.name] = f"{type(exc).__name__}: {exc}"
    if "libfabric" not in found and "libfabric" not in _load_errors:
        # running from a source tree without installed metadata
        from .libfabric import LibfabricBackend

        found["libfabric"] = LibfabricBackend()
    if "cuda_ipc" not in found and "cuda_ipc" not in _load_errors:
        from .cuda_ipc import CudaIpcBackend

        found["cuda_ipc"] = CudaIpcBackend()
    return found


_load_errors: dict[str, str] = {}


def resolve(spec: str, *, local_only: bool = False, nvlink: bool = False) -> tuple[Backend, str]:
    if not isinstance(spec, str) or not spec:
        raise BackendUnavailable(f"provider must be a non-empty string, got {spec!r}")
    bs = backends()
    if spec == "auto" and local_only and nvlink:
        ipc = bs.get("cuda_ipc")
        if ipc is not None and ipc.providers():
            return ipc, ""
        lf = bs.get("libfabric")
        if lf is None:
            raise BackendUnavailable("no libfabric backend installed; name a provider explicitly")
        have = lf.providers()
        order = ("shm",) if local_only else AUTO_ORDER
        for p in order:
            if p in have:
                return lf, p
        raise BackendUnavailable(f"no provider of {order} works here (found {have})")
    name, sep, prov = spec.partition(":")
    if sep:
        if name not in bs:
            raise _unknown(spec, bs)
        return bs[name], prov
    if spec in bs:
        return bs[spec], ""
    if spec in SHORT_LIBFABRIC or ";" in spec:
        if "libfabric" not in bs:
            raise _unknown(spec, bs)
        return bs["libfabric"], spec
    raise _unknown(spec, bs)


def _unknown(spec: str, bs: dict[str, Backend]) -> BackendUnavailable:
    hint = ", ".join(sorted(SHORT_LIBFABRIC | set(bs)))
    broken = "".join(f"; backend {n} failed to load ({e})" for n, e in _load_errors.items())
    return BackendUnavailable(
        f"unknown provider {spec!r}: use 'auto', a libfabric provider, 'BACKEND:PROVIDER' "
        f"or a backend name ({hint}){broken}"
    )
