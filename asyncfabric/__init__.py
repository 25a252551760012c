"""asyncfabric: asyncio-native point-to-point RDMA messaging for LLM systems.

One-sided writes carrying a 32-bit immediate (WriteImm), and counters of
arriving immediates that resolve awaitables when they reach a count.
"""

from __future__ import annotations

from ._address import EngineAddress
from ._counter import ImmCounter
from ._descriptor import Descriptor, RemoteSlice
from ._engine import Engine
from ._errors import (
    AsyncFabricError,
    BackendUnavailable,
    DescriptorError,
    EngineClosed,
    ImmTimeout,
    PeerUnreachable,
    RegionError,
    RemoteAccessError,
    TransferError,
)
from ._imm import expected_imms
from ._policy import ProgressPolicy
from ._region import Region, RegionSlice
from ._sync import run

__version__ = "0.1.0"

__all__ = [
    "AsyncFabricError",
    "BackendUnavailable",
    "Descriptor",
    "DescriptorError",
    "Engine",
    "EngineAddress",
    "EngineClosed",
    "ImmCounter",
    "ImmTimeout",
    "PeerUnreachable",
    "ProgressPolicy",
    "Region",
    "RegionError",
    "RegionSlice",
    "RemoteAccessError",
    "RemoteSlice",
    "TransferError",
    "expected_imms",
    "run",
]
