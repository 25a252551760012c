"""Backend discovery, by entry points alone, and what ``"auto"`` picks.

Backends register in the entry-point group ``asyncfabric.backends`` (the object is
a :class:`~.contract.Backend` subclass); wrappers every transport goes through
(the staged GPU path) in ``asyncfabric.wrappers``. Nothing here names a backend.

Specs: ``"auto"``; ``"NAME"`` or ``"NAME:PROVIDER"`` (a backend by name); or a bare
provider that some backend :meth:`~.contract.Backend.accepts` (``"shm"``,
``"verbs;ofi_rxm"``). ``"auto"`` takes the lowest-ranked candidate any backend
offers (efa, then verbs, then tcp; shm with ``local_only``; cuda_ipc with
``nvlink`` when CUDA is here).
"""

from __future__ import annotations

import functools
from importlib.metadata import entry_points

from .._errors import BackendUnavailable
from .contract import Backend, Transport, Wrapper

_load_errors: dict[str, str] = {}


@functools.cache
def backends() -> dict[str, Backend]:
    """Every installed backend that loads, by name (a broken plugin is reported, not fatal)."""
    found: dict[str, Backend] = {}
    for ep in entry_points(group="asyncfabric.backends"):
        try:
            found[ep.name] = ep.load()()
        except Exception as exc:  # a broken third-party plugin must not break the others
            _load_errors[ep.name] = f"{type(exc).__name__}: {exc}"
    return found


@functools.cache
def wrappers() -> tuple[Wrapper, ...]:
    out = []
    for ep in sorted(entry_points(group="asyncfabric.wrappers"), key=lambda e: e.name):
        try:
            out.append(ep.load()())
        except Exception as exc:
            _load_errors[f"wrapper {ep.name}"] = f"{type(exc).__name__}: {exc}"
    return tuple(out)


def resolve(spec: str, *, local_only: bool = False, nvlink: bool = False) -> tuple[Backend, str]:
    """The backend and provider a spec names."""
    if not isinstance(spec, str) or not spec:
        raise BackendUnavailable(f"provider must be a non-empty string, got {spec!r}")
    bs = backends()
    if spec == "auto":
        return _auto(bs, local_only=local_only, nvlink=nvlink)
    name, sep, prov = spec.partition(":")
    if sep and name in bs:
        return bs[name], prov
    if spec in bs:
        return bs[spec], ""
    for b in bs.values():
        p = b.accepts(spec)
        if p is not None:
            return b, p
    raise _unknown(spec, bs)


def open_resolved(
    backend: Backend, provider: str, *, domains: int, node: str | None, ctrl_max: int, cuda: str
) -> Transport:
    """Open ``backend``'s ``provider`` (from :func:`resolve`) and pass the transport
    through every wrapper.

    ``ctrl_max`` is what the user may send; the backend is asked for room for the
    wrappers' framing on top."""
    ws = wrappers()
    room = ctrl_max + sum(w.ctrl_overhead for w in ws)
    t = backend.open(provider, domains=domains, node=node, ctrl_max=room, cuda=cuda)
    try:
        for w in ws:
            t = w.wrap(t, cuda=cuda)
    except BaseException:
        t.close()
        raise
    return t


def _auto(bs: dict[str, Backend], *, local_only: bool, nvlink: bool) -> tuple[Backend, str]:
    cands: list[tuple[int, str, Backend, str]] = []
    for name, b in bs.items():
        try:
            offered = b.auto(local_only=local_only, nvlink=nvlink)
        except Exception as exc:
            _load_errors.setdefault(name, f"{type(exc).__name__}: {exc}")
            continue
        cands += [(rank, name, b, p) for rank, p in offered]
    if not cands:
        what = "a same-host transport (local_only=True)" if local_only else "a network transport"
        raise BackendUnavailable(
            f"provider 'auto' found no {what} that works here. {_installed(bs)}"
        )
    cands.sort(key=lambda c: (c[0], c[1]))
    _, _, b, p = cands[0]
    return b, p


def _installed(bs: dict[str, Backend]) -> str:
    parts = []
    for name, b in sorted(bs.items()):
        try:
            have = b.providers()
        except Exception as exc:
            have = []
            _load_errors.setdefault(name, f"{type(exc).__name__}: {exc}")
        state = f"usable here: {', '.join(have)}" if have else "nothing usable here"
        need = f"; needs {b.needs}" if b.needs else ""
        parts.append(f"{name} ({state}{need})")
    broken = "".join(f"; {n} failed to load ({e})" for n, e in sorted(_load_errors.items()))
    return "Installed backends: " + ("; ".join(parts) or "none") + broken


def _unknown(spec: str, bs: dict[str, Backend]) -> BackendUnavailable:
    return BackendUnavailable(
        f"unknown provider {spec!r}: use 'auto', a provider such as 'shm', 'tcp', 'efa' or "
        f"'verbs;ofi_rxm', 'BACKEND:PROVIDER', or a backend name. {_installed(bs)}"
    )
