"""Where a group keeps things in the store (one prefix per group)."""

from __future__ import annotations

ROOT = "asyncfabric/groups/"


def check_name(what: str, s: object) -> str:
    if not isinstance(s, str) or not s or "/" in s or len(s) > 200 or not s.isprintable():
        raise ValueError(
            f"{what} must be a non-empty printable string without '/' (at most 200 "
            f"characters), got {s!r}"
        )
    return s


def check_key(s: object) -> str:
    if not isinstance(s, str) or not s or s.startswith("/") or len(s) > 500 or not s.isprintable():
        raise ValueError(
            f"a descriptor name must be a non-empty printable string not starting with '/' "
            f"(like 'kv/layer0'), got {s!r}"
        )
    return s


class Keys:
    def __init__(self, group: str) -> None:
        self.prefix = f"{ROOT}{group}/"
        self.members = self.prefix + "m/"
        self.bye = self.prefix + "bye/"
        self.pub = self.prefix + "p/"
        self.revoked = self.prefix + "r/"
        self.gather = self.prefix + "ag/"

    def member(self, name: str) -> str:
        return self.members + name

    def publication(self, name: str, key: str) -> str:
        return f"{self.pub}{name}/{key}"

    def tombstone(self, name: str, key: str) -> str:
        return f"{self.revoked}{name}/{key}"
