"""Collectives over one-sided writes: all-reduce, exact or int8-quantized (docs/collectives.md).

Built on the public ``asyncfabric`` API and group views only; immediates in the 0x5 nibble.
"""

from __future__ import annotations

from .allreduce import ONESHOT_BYTES, AllReduce, all_reduce
from .errors import CollectiveError, CollectiveMismatch, CollectiveTimeout

__all__ = [
    "ONESHOT_BYTES",
    "AllReduce",
    "CollectiveError",
    "CollectiveMismatch",
    "CollectiveTimeout",
    "all_reduce",
]
