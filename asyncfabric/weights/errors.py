"""The exceptions of the weight-update system (all are ``asyncfabric.AsyncFabricError``)."""

from __future__ import annotations

from asyncfabric import AsyncFabricError


class LayoutError(AsyncFabricError, ValueError):
    """A layout or a pair of layouts cannot be planned; the message names the parameter."""


class UpdateError(AsyncFabricError):
    """Some receivers did not get an update; the others did.

    ``failures`` maps each failed receiver's name to its exception; ``completed``
    names the receivers whose update landed."""

    def __init__(
        self, message: str, failures: dict[str, BaseException], completed: tuple[str, ...]
    ) -> None:
        super().__init__(message)
        self.failures = failures
        self.completed = completed


class ReceiverFailed(AsyncFabricError):
    """One receiver's update failed: it was too slow to free its buffer, or it went away."""
