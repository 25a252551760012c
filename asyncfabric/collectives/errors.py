"""The collectives' exceptions (all :class:`asyncfabric.AsyncFabricError`)."""

from __future__ import annotations

import asyncfabric as af


class CollectiveError(af.AsyncFabricError):
    """A collective could not complete on this rank; the message says why and what to do."""


class CollectiveMismatch(CollectiveError, ValueError):
    """Ranks called the same collective with different shapes, dtypes or options."""


class CollectiveTimeout(CollectiveError, TimeoutError):
    """A rank's data did not arrive within the collective's ``timeout``."""
