"""asyncfabric.moe: Mixture-of-Experts dispatch and combine over one-sided writes.

Built only on the public ``asyncfabric`` API: a frozen group view gives the ranks, the
engine writes the rows, immediates in the moe nibble (0x4) count what arrived.
"""

from __future__ import annotations

from . import fp8
from .errors import MoEError, MoEInputError, RankLost
from .expert_parallel import Dispatched, ExpertParallel, View, reference

__all__ = [
    "Dispatched",
    "ExpertParallel",
    "MoEError",
    "MoEInputError",
    "RankLost",
    "View",
    "fp8",
    "reference",
]
