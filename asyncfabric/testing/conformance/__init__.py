"""The backend conformance suite: what every transport must do, as pytest tests.

Writes verified byte for byte (one chunk, many chunks, many in flight, zero bytes),
paged writes, batches (``write_many`` with mixed sizes and immediates, reposted
arrays, scatter and barrier to two peers, a bad entry refusing the whole batch),
one-sided reads (required of every backend), immediates counted out of order,
counter semantics, send/recv both ways, bad input, a peer that never answers and a peer that dies mid-transfer.
Where a peer matters it runs in a second OS process
(:class:`asyncfabric.testing.peer.PeerProcess`).

Run it against a backend (yours: installed, with its ``asyncfabric.backends``
entry point)::

    pytest -p anyio --pyargs asyncfabric.testing.conformance --af-conformance=mybackend

``--af-conformance`` takes engine specs, comma-separated (``mybackend``,
``mybackend:PROVIDER``, ``shm,tcp``); the environment variable
``ASYNCFABRIC_CONFORMANCE`` does the same when the option is not given. The
option comes from the pytest plugin :mod:`asyncfabric.testing.conformance.plugin`,
which asyncfabric registers as a ``pytest11`` entry point. Where plugin
autoloading is off (``PYTEST_DISABLE_PLUGIN_AUTOLOAD=1``), load it by hand::

    pytest -p anyio -p asyncfabric.testing.conformance.plugin \\
        --pyargs asyncfabric.testing.conformance --af-conformance=mybackend

The plugin is inert otherwise: it adds the option and, when a run asks for
specs, one header line naming them; it changes nothing else in any test run.

Which specs run:

* named (option or environment): exactly those. A spec named but unusable here
  (unknown, its plugin fails to load, its backend offers no such provider) FAILS
  every test with the reason; it never skips.
* none named: the collecting module's ``CONFORMANCE_REQUIRED`` (each must be
  usable, or its tests fail), plus each of :data:`DEFAULT_SPECS` usable here.
  If that leaves nothing, the run fails: a conformance run that tested nothing
  is an error, not a pass.

A project can run the suite from its own test tree with a module that imports it
(asyncfabric's ``tests/conformance/test_conformance.py`` does)::

    from asyncfabric.testing.conformance.test_conformance import *  # noqa: F403
    CONFORMANCE_REQUIRED = ("mybackend",)

docs/backends/writing-a-backend.md teaches how to write a backend on the contract.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

ENV = "ASYNCFABRIC_CONFORMANCE"
"""Environment variable naming the specs to run (comma-separated), when no option does."""

OPTION = "--af-conformance"

DEFAULT_SPECS = ("shm", "tcp", "libfabric:verbs;ofi_rxm", "pyverbs")
"""Specs run when none is named, each only where it is usable."""

__all__ = ["DEFAULT_SPECS", "ENV", "OPTION", "engine_kwargs", "requested", "select", "unusable"]


def _split(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def requested(option: str | None) -> tuple[list[str], str] | None:
    """The specs a run names, and where (the option, else the environment); None if none."""
    if option and _split(option):
        return _split(option), OPTION
    env = os.environ.get(ENV, "")
    if _split(env):
        return _split(env), ENV
    return None


def unusable(spec: str) -> str | None:
    """Why ``spec`` cannot be opened here, or None when it can.

    Only :class:`~asyncfabric.BackendUnavailable` means "not here"; any other
    exception is a bug (in the registry, in a backend) and propagates.
    """
    from ..._errors import BackendUnavailable
    from ...transport import registry

    try:
        backend, provider = registry.resolve(spec)
    except BackendUnavailable as exc:
        return str(exc)
    have = backend.providers()
    if not have:
        need = f"; it needs {backend.needs}" if backend.needs else ""
        return f"backend {backend.name!r} has nothing usable on this machine{need}"
    if provider and provider not in have:
        return (
            f"backend {backend.name!r} offers no provider {provider!r} here "
            f"(usable: {', '.join(have)})"
        )
    return None


def select(
    option: str | None, required: Sequence[str] = ()
) -> tuple[list[tuple[str, str | None]], str]:
    """``[(spec, why_it_fails_or_None)]`` to run, and a line saying how they were chosen."""
    named = requested(option)
    if named is not None:
        specs, source = named
        return [(s, _why(s, source)) for s in specs], f"named by {source}"
    out = [(s, _why(s, "the collecting module's CONFORMANCE_REQUIRED")) for s in required]
    for s in DEFAULT_SPECS:
        if s not in required and unusable(s) is None:
            out.append((s, None))
    how = "none named: " + (f"required {', '.join(required)}; " if required else "")
    if not out:
        why = "; ".join(f"{s}: {unusable(s)}" for s in DEFAULT_SPECS)
        out = [("nothing-usable", f"no spec was named and no default is usable here ({why})")]
    return out, how + "the defaults usable here"


def _why(spec: str, source: str) -> str | None:
    reason = unusable(spec)
    return reason and f"{spec!r} was asked for (by {source}) but cannot be used here: {reason}"


def engine_kwargs(spec: str) -> dict[str, str]:
    """Engine arguments a spec needs in the suite (tcp binds loopback: nothing leaves the host)."""
    return {"node": "127.0.0.1"} if spec.endswith("tcp") else {}
