"""What a group holds and reports: members and membership events."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True, eq=False)
class Member:
    """A live member: its engine ``address`` (connect to it), ``meta`` and join time.

    ``incarnation`` is unique per join (a name that leaves and joins again gets a
    new one); ``version`` is the store revision at which it joined (the group's
    order of arrival); ``descriptor`` is the member's small group region, which
    view barriers write their immediates into."""

    name: str
    address: bytes = field(repr=False)
    meta: dict[str, Any] = field(default_factory=dict)
    joined: float = 0.0
    incarnation: str = ""
    version: int = 0
    descriptor: bytes = field(default=b"", repr=False)
    ttl: float = 0.0

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Member)
            and other.name == self.name
            and other.incarnation == self.incarnation
        )

    def __hash__(self) -> int:
        return hash((self.name, self.incarnation))


@dataclass(frozen=True)
class Joined:
    """``member`` joined; ``version`` is the membership version (store revision)."""

    member: Member
    version: int

    @property
    def name(self) -> str:
        return self.member.name


LeftReason = Literal["left", "expired"]


@dataclass(frozen=True)
class Left:
    """Member ``name`` left: ``reason`` is ``"left"`` (it called leave) or ``"expired"``
    (its lease ran out: killed, hung or cut off)."""

    name: str
    reason: LeftReason
    version: int
