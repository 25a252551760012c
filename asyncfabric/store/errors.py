"""The exceptions groups and stores raise (one hierarchy under GroupError).

They live with the store, the lower layer; ``asyncfabric.group`` re-exports them.
Each message says what broke and what to do."""

from __future__ import annotations

from asyncfabric import AsyncFabricError


class GroupError(AsyncFabricError):
    """Base class of every group and store error."""


class MemberLost(GroupError):
    """A member of a view left (or its lease expired); ``name`` says which.

    Every pending wait of the view fails with it: form a new view with
    ``await group.wait_for(n)`` once the group is whole again."""

    def __init__(self, name: str, message: str | None = None) -> None:
        super().__init__(
            message
            or f"member {name!r} left the view; its pending waits failed: form a new view "
            "with `await group.wait_for(n)`"
        )
        self.name = name


class DuplicateMember(GroupError):
    """A live member of the group already has this name."""


class UnknownMember(GroupError, KeyError):
    """No live member of the group has this name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class LookupTimeout(GroupError, TimeoutError):
    """A named descriptor was not published within the lookup's timeout."""


class DescriptorRevoked(GroupError):
    """The named descriptor was revoked (its region closed or its member left)."""


class StoreUnavailable(GroupError, ConnectionError):
    """The store cannot be reached (not running, wrong address, network down)."""


class StoreAuthError(GroupError, PermissionError):
    """The store refused this client: its shared secret does not match."""


class StoreLost(GroupError):
    """The group lost its store and could not re-register within its lease TTL."""


class LeaseNotFound(StoreLost):
    """The lease is gone from the store (it expired, or the store restarted empty)."""
