"""Frozen rank views of a group: ranks by sorted name, barrier, allgather, guard."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

import asyncfabric as af

from ..store.errors import GroupError, MemberLost
from .events import Member

if TYPE_CHECKING:
    from .group import Group

T = TypeVar("T")

# Groups own the 0x1 nibble of the 32-bit immediate space (docs/groups.md). A
# barrier's imm is 0x1 | 20 bits of the view id | 8 bits of round number: two
# views on one engine almost never collide, and a member can be at most one
# round ahead of another, so rounds mod 256 never alias.
IMM_GROUPS = 0x1000_0000


class View:
    """A frozen, ordered set of ``size`` members; this member is ``rank``.

    Every pending :meth:`barrier`, :meth:`allgather` and :meth:`guard` fails
    with :class:`MemberLost` when a member of the view leaves or expires, and so
    does every later call: form a new view then."""

    def __init__(self, group: Group, members: list[Member]) -> None:
        self._group = group
        self.members: tuple[Member, ...] = tuple(members)
        self.names: tuple[str, ...] = tuple(m.name for m in members)
        self.size = len(members)
        self.rank = self.names.index(group.name)
        digest = hashlib.sha256("|".join(m.incarnation for m in members).encode()).hexdigest()
        self.id = f"{group.group}/{digest[:16]}"
        self._imm = IMM_GROUPS | ((int(digest[16:21], 16) & 0xFFFFF) << 8)
        self._peers: dict[int, af.Peer] = {}
        self._targets: list[af.Descriptor] | None = None
        self._barriers = 0
        self._gathers = 0
        self._lost: BaseException | None = None
        self._lost_fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._grace = 0.0  # see _fail

    @property
    def engine(self) -> af.Engine:
        """This member's engine."""
        return self._group.engine

    @property
    def group(self) -> Group:
        """The group this view was formed in."""
        return self._group

    def peer(self, rank: int) -> af.Peer:
        """A peer connected to ``rank``'s engine (cached)."""
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.size:
            raise ValueError(f"rank must be an int in [0, {self.size}), got {rank!r}")
        p = self._peers.get(rank)
        if p is None:
            p = self._peers[rank] = self.engine.connect(self.members[rank].address)
        return p

    def _fail(self, exc: BaseException, grace: float = 0.0) -> None:
        """The view is lost. ``grace``: a member that left on purpose sent what it owed
        before it left (its last barrier immediate, say) but the store may say so before
        this engine has counted it; an operation already under way gets that long to
        finish before it fails (bounded: lease expiries and store loss get none)."""
        if self._lost is None:
            self._lost = exc
            self._grace = grace
            self._lost_fut.set_exception(exc)
            self._lost_fut.exception()  # retrieved: no "never retrieved" warning
            self._group._views.discard(self)

    async def guard(self, aw: Awaitable[T]) -> T:
        """``await aw``, or raise :class:`MemberLost` (cancelling it) if a member of
        the view leaves first."""
        task: asyncio.Future[T] = asyncio.ensure_future(aw)
        if self._lost is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise self._lost
        both: set[asyncio.Future[Any]] = {task, self._lost_fut}
        await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
        if not task.done() and self._grace:
            await asyncio.wait({task}, timeout=self._grace)
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert self._lost is not None
        raise self._lost

    async def barrier(self, timeout: float | None = None) -> None:
        """Wait until every member of the view reached this barrier.

        One zero-byte write with an immediate to each other member
        (``Engine.barrier``), then a wait for ``size - 1`` of them."""
        rnd = self._barriers
        self._barriers += 1
        if self.size == 1:
            if self._lost is not None:
                raise self._lost
            return
        await self.guard(self._barrier(rnd, timeout))

    async def _barrier(self, rnd: int, timeout: float | None) -> None:
        if self._targets is None:
            self._targets = [
                af.Descriptor.from_bytes(m.descriptor)
                for i, m in enumerate(self.members)
                if i != self.rank
            ]
        imm = self._imm | (rnd & 0xFF)
        eng = self.engine
        await eng.barrier(self._targets, imm, timeout=timeout)
        await eng.counter(imm).wait(self.size - 1, timeout=timeout)

    async def allgather(self, data: bytes, timeout: float | None = None) -> list[bytes]:
        """Every member's ``data``, ordered by rank (through the store: for small
        values such as descriptors and addresses)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"allgather takes bytes, got {type(data).__name__}")
        rnd = self._gathers
        self._gathers += 1
        return await self.guard(self._allgather(rnd, bytes(data), timeout))

    async def _allgather(self, rnd: int, data: bytes, timeout: float | None) -> list[bytes]:
        g = self._group
        prefix = f"{g._k.gather}{self.id}/{rnd}/"
        await g.store.put(f"{prefix}{self.rank}", data, lease=g._lease)
        keys = [f"{prefix}{r}" for r in range(self.size)]

        async def all_there() -> list[bytes]:
            while True:
                changed = g._changed
                if all(k in g._kv for k in keys):
                    return [g._kv[k].value for k in keys]
                await changed.wait()

        try:
            out = await asyncio.wait_for(all_there(), timeout)
        except asyncio.TimeoutError:
            have = [r for r, k in enumerate(keys) if k in g._kv]
            raise GroupError(
                f"allgather of view {self.id}: only ranks {have} of {self.size} contributed "
                f"within {timeout} s; are all members calling allgather?"
            ) from None
        if rnd > 0:
            # everyone put round rnd, so everyone has read round rnd-1
            await g.store.delete(f"{g._k.gather}{self.id}/{rnd - 1}/{self.rank}")
        return out

    def __repr__(self) -> str:
        state = "lost" if self._lost else "live"
        return f"<View {self.id} rank {self.rank}/{self.size} {state}>"


__all__ = ["View", "MemberLost"]
