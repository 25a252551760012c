"""A small router: spreads requests over the live decode members of a group.

It lives with a prefill side (:class:`KVPrefill`) and follows the group's
membership events: a decode member that joins is shaken hands with and gets
requests; one that leaves gracefully (it drains first: its in-flight requests
finish, new ones it refuses are sent elsewhere) stops getting them; one that
dies fails only the requests it held, with :class:`RequestFailed`, as soon as
a probe of its engine fails or its lease expires, whichever comes first, and
gets no more. Decode members say ``meta={"role": "decode"}`` when they join.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Sequence
from typing import Any

import asyncfabric as af

from .errors import KVError, MemberDraining, NoDecodeMembers, OutOfBlocks, RequestFailed
from .prefill import DecodeLink, KVPrefill, PrefillRequest

log = logging.getLogger("asyncfabric.kv")


class RoutedRequest:
    """A request the router placed: ``member`` is the decode member serving it."""

    def __init__(self, router: Router, member: str, req: PrefillRequest) -> None:
        self.member, self.request, self._router = member, req, router

    async def result(self, timeout: float | None = None) -> bytes:
        """The decode member's result; :class:`RequestFailed` if it died holding it."""
        try:
            return await self.request.result(timeout)
        except RequestFailed:
            self._router._dead(self.member, "a request's probe failed")
            raise
        finally:
            self._router._inflight[self.member] = self._router._inflight.get(self.member, 1) - 1


class Router:
    """Routes requests from ``prefill`` to the decode members of ``group``
    (members whose meta has ``role == "decode"``), least loaded first."""

    def __init__(self, group: Any, prefill: KVPrefill, *, role: str = "decode") -> None:
        self.group, self.prefill, self.role = group, prefill, role
        self._links: dict[str, DecodeLink] = {}
        self._inflight: dict[str, int] = {}
        self._gone: dict[str, str] = {}  # members that left or died: why
        self._task: asyncio.Task[None] | None = None
        self._rr = itertools.count()
        self.changed = asyncio.Event()  # set on every change of the live set

    @property
    def members(self) -> Sequence[str]:
        """Decode members requests go to now."""
        return sorted(self._links)

    async def start(self) -> None:
        await self.prefill.start()
        events = self.group.events()
        for name, m in list(self.group.members.items()):
            if m.meta.get("role") == self.role:
                await self._add(name, m)
        self._task = asyncio.get_running_loop().create_task(self._follow(events))

    async def _follow(self, events: Any) -> None:
        async for ev in events:
            if isinstance(ev, af.Joined):
                if ev.member.meta.get("role") == self.role:
                    self._gone.pop(ev.name, None)
                    await self._add(ev.name, ev.member)
            elif isinstance(ev, af.Left):
                if ev.reason == "expired":
                    self._dead(ev.name, "its group lease expired")
                else:
                    self._drop(ev.name, "it left the group")

    async def _add(self, name: str, m: Any) -> None:
        try:
            self._links[name] = await self.prefill.connect(m.address)
        except (KVError, af.AsyncFabricError, asyncio.TimeoutError) as exc:
            log.warning("decode member %s not routed to: %s", name, exc)
            return
        self._inflight.setdefault(name, 0)
        self.changed.set()

    def _drop(self, name: str, why: str) -> None:
        if self._links.pop(name, None) is not None:
            self.changed.set()
        self._gone[name] = why

    def _dead(self, name: str, why: str) -> None:
        link = self._links.get(name)
        self._drop(name, f"it died ({why})")
        if link is not None:
            self.prefill._lost(link, KVError(f"decode member {name!r} died: {why}"))

    def pick(self) -> str:
        if not self._links:
            raise NoDecodeMembers(
                "no live decode member in group "
                f"{self.group.group!r}; start one (meta role={self.role!r}) or wait"
            )
        names = sorted(self._links)
        k = next(self._rr)
        return min(names, key=lambda n: (self._inflight.get(n, 0),
                                         (names.index(n) - k) % len(names)))  # fmt: skip

    async def submit(self, request: str, tokens: int, **kw: Any) -> RoutedRequest:
        """Place a request on a live decode member (another one if the first is
        draining or full); raises :class:`NoDecodeMembers` when none can take it."""
        tried: set[str] = set()
        last: Exception | None = None
        while True:
            live = [n for n in self._links if n not in tried]
            if not live:
                if last is not None:
                    raise last
                self.pick()  # raises NoDecodeMembers
            name = self.pick() if not tried else min(live, key=lambda n: self._inflight.get(n, 0))
            tried.add(name)
            link = self._links.get(name)
            if link is None:
                continue
            try:
                req = await self.prefill.submit(link, request, tokens, **kw)
            except MemberDraining as exc:
                self._drop(name, "it is draining before it leaves")
                last = exc
                continue
            except OutOfBlocks as exc:
                last = exc
                continue
            except (af.TransferError, asyncio.TimeoutError) as exc:
                self._dead(name, str(exc) or type(exc).__name__)
                last = RequestFailed(request, f"decode member {name!r} is unreachable: {exc}")
                continue
            self._inflight[name] = self._inflight.get(name, 0) + 1
            return RoutedRequest(self, name, req)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
