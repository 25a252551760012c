"""asyncfabric benchmarks: asyncfabric's ``await`` path next to a raw C loop and peer libraries.

CLI: ``asyncfabric bench all --provider shm --json out.json`` (or
``python -m asyncfabric.bench``). From a notebook::

    rows = await asyncfabric.bench.run_suite("write", provider="shm")
"""

from __future__ import annotations

from typing import Any

from .schema import FIELD_NAMES, IMPLS, SCHEMA
from .suites import ORDER as SUITE_NAMES

__all__ = ["FIELD_NAMES", "IMPLS", "SCHEMA", "SUITE_NAMES", "run_suite"]


async def run_suite(
    name: str,
    provider: str = "shm",
    impls: tuple[str, ...] = ("asyncfabric", "raw"),
    sizes: list[int] | None = None,
    iters: int | None = None,
    quick: bool = False,
    **runner_kwargs: Any,
) -> list[dict[str, Any]]:
    """Run one suite in a fresh pair of worker processes; return its rows (see schema.FIELDS).

    Peers named in ``impls`` that cannot run here are skipped (their reasons are
    in ``Runner.skipped``; the CLI prints them).
    """
    from .runner import Runner
    from .suites import select

    (suite,) = select([name])
    async with Runner(provider, tuple(impls), quick=quick, **runner_kwargs) as r:
        return await r.run_suite(suite, sizes=sizes, iters=iters)
