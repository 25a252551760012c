"""The one synchronous entry point: run a coroutine from a script."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a fresh asyncio loop (scripts only).

    In Jupyter, or anywhere a loop already runs, ``await main`` instead: this
    helper refuses to nest loops rather than patching the running one.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(main)
    main.close()
    raise RuntimeError(
        "asyncfabric.run() was called inside a running event loop (Jupyter?); use `await ...` instead"
    )
