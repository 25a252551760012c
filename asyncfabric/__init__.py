"""asyncfabric: asyncio-native point-to-point RDMA messaging for LLM systems.

One-sided writes carrying a 32-bit immediate (WriteImm), and counters of
arriving immediates that resolve awaitables when they reach a count.
"""

from __future__ import annotations

from ._errors import (
    AsyncFabricError,
    BackendUnavailable,
    BatchError,
    DescriptorError,
    EngineClosed,
    ImmTimeout,
    PeerUnreachable,
    RegionError,
    RemoteAccessError,
    TransferError,
    Unsupported,
)
from .engine import (
    Batch,
    Descriptor,
    Engine,
    EngineAddress,
    ImmCounter,
    Peer,
    ProgressPolicy,
    Region,
    RegionSlice,
    RemoteSlice,
    run,
)
from .transport import Registration, expected_imms

__version__ = "0.1.0"

__all__ = [
    "AsyncFabricError",
    "BackendUnavailable",
    "Batch",
    "BatchError",
    "Descriptor",
    "DescriptorError",
    "Engine",
    "EngineAddress",
    "EngineClosed",
    "ImmCounter",
    "ImmTimeout",
    "Peer",
    "PeerUnreachable",
    "ProgressPolicy",
    "Region",
    "RegionError",
    "RegionSlice",
    "Registration",
    "RemoteAccessError",
    "RemoteSlice",
    "TransferError",
    "Unsupported",
    "expected_imms",
    "run",
]
