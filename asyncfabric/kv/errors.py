"""The KV system's exceptions: all derive from :class:`KVError` (an ``af.AsyncFabricError``)."""

from __future__ import annotations

from asyncfabric import AsyncFabricError


class KVError(AsyncFabricError):
    """Base of every error the KV-cache transfer raises."""


class LayoutMismatch(KVError):
    """The two sides' paged layouts disagree on ``field``; they cannot exchange pages."""

    def __init__(self, field: str, ours: object, theirs: object) -> None:
        self.field, self.ours, self.theirs = field, ours, theirs
        super().__init__(
            f"KV layout mismatch on {field!r}: this side has {ours!r}, the peer has {theirs!r}; "
            f"build both sides' KVLayout with the same {field}"
        )


class OutOfBlocks(KVError):
    """A request needs more free blocks than the decode side has; nothing was written."""

    def __init__(self, need: int, free: int) -> None:
        self.need, self.free = need, free
        super().__init__(
            f"the request needs {need} KV blocks but only {free} are free on the decode side; "
            "nothing was allocated or written: retry later, route it elsewhere or grow the pool"
        )


class RequestFailed(KVError):
    """A request could not complete: its peer died or left, or it was aborted."""

    def __init__(self, request: str, reason: str) -> None:
        self.request, self.reason = request, reason
        super().__init__(f"KV request {request!r} failed: {reason}")


class RequestAborted(RequestFailed):
    """The request was cancelled or aborted by one of the sides; its blocks were released."""


class MemberDraining(KVError):
    """The decode member is finishing its requests before it leaves: it takes no new
    ones (the router sends the request elsewhere)."""


class NoDecodeMembers(KVError):
    """The router has no live decode member to send a request to."""
