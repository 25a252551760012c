"""Exceptions of asyncfabric.moe (all are asyncfabric.AsyncFabricError)."""

from __future__ import annotations

import asyncfabric as af


class MoEError(af.AsyncFabricError):
    """Something went wrong in an expert-parallel dispatch or combine."""


class MoEInputError(MoEError, ValueError):
    """Bad input to dispatch/combine or to the group's construction, found before anything
    was sent. The message names the field and what to pass instead."""


class RankLost(MoEError):
    """A rank of the expert-parallel group stopped taking part: a write to it failed, or
    what it owed did not arrive within the group's timeout. ``ranks`` names the ranks."""

    def __init__(self, message: str, ranks: tuple[int, ...]) -> None:
        super().__init__(message)
        self.ranks = ranks
