"""asyncfabric: asyncio-native point-to-point RDMA messaging for LLM systems.

One-sided writes carrying a 32-bit immediate (WriteImm), and counters of
arriving immediates that resolve awaitables when they reach a count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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
    TriggerDisarmed,
    Unsupported,
)
from ._flag import DeviceWord, Flag
from ._hostmem import host_zeros
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
    Release,
    RemoteSlice,
    Trigger,
    run,
)
from .transport import Registration, expected_imms

__version__ = "0.1.0"

# Groups and stores (asyncfabric.group, asyncfabric.store) load on first use: the
# engine alone never pays for them, and they import only the names above.
_GROUP_NAMES = frozenset(
    {
        "DescriptorRevoked",
        "DuplicateMember",
        "Group",
        "GroupError",
        "Joined",
        "Left",
        "LookupTimeout",
        "Member",
        "MemberLost",
        "StoreAuthError",
        "StoreLost",
        "StoreUnavailable",
        "UnknownMember",
        "View",
        "ViewTimeout",
        "join",
    }
)


def __getattr__(name: str) -> Any:
    if name in _GROUP_NAMES:
        from . import group

        return getattr(group, name)
    if name == "store":
        import importlib

        return importlib.import_module(".store", __name__)
    raise AttributeError(f"module 'asyncfabric' has no attribute {name!r}")


if TYPE_CHECKING:
    from . import store
    from .group import (
        DescriptorRevoked,
        DuplicateMember,
        Group,
        GroupError,
        Joined,
        Left,
        LookupTimeout,
        Member,
        MemberLost,
        StoreAuthError,
        StoreLost,
        StoreUnavailable,
        UnknownMember,
        View,
        ViewTimeout,
        join,
    )

__all__ = [
    "AsyncFabricError",
    "BackendUnavailable",
    "Batch",
    "BatchError",
    "Descriptor",
    "DescriptorError",
    "DescriptorRevoked",
    "DeviceWord",
    "DuplicateMember",
    "Engine",
    "EngineAddress",
    "EngineClosed",
    "Flag",
    "Group",
    "GroupError",
    "ImmCounter",
    "ImmTimeout",
    "Joined",
    "Left",
    "LookupTimeout",
    "Member",
    "MemberLost",
    "Peer",
    "PeerUnreachable",
    "ProgressPolicy",
    "Region",
    "RegionError",
    "RegionSlice",
    "Registration",
    "Release",
    "RemoteAccessError",
    "RemoteSlice",
    "StoreAuthError",
    "StoreLost",
    "StoreUnavailable",
    "TransferError",
    "Trigger",
    "TriggerDisarmed",
    "UnknownMember",
    "Unsupported",
    "View",
    "ViewTimeout",
    "expected_imms",
    "host_zeros",
    "join",
    "run",
    "store",
]
