"""The group errors (defined with the store, the lower layer)."""

from __future__ import annotations

from ..store.errors import (
    DescriptorRevoked,
    DuplicateMember,
    GroupError,
    LookupTimeout,
    MemberLost,
    StoreAuthError,
    StoreLost,
    StoreUnavailable,
    UnknownMember,
)

__all__ = [
    "DescriptorRevoked",
    "DuplicateMember",
    "GroupError",
    "LookupTimeout",
    "MemberLost",
    "StoreAuthError",
    "StoreLost",
    "StoreUnavailable",
    "UnknownMember",
]
