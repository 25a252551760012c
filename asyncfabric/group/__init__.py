"""Groups: rendezvous, elastic membership, named descriptors and rank views.

``g = await af.join(store, group=..., name=..., engine=eng)``; see docs/groups.md.
Groups are asyncio-only (they run tasks on the running asyncio loop).
"""

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
from .events import Joined, Left, Member
from .group import Group, ViewTimeout
from .joining import join
from .view import View

__all__ = [
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
]
