"""A member's handle on a group: membership, events, named descriptors and views.

Everything lives under one store prefix (keys.py). A member's record and its
publications share its lease, so they vanish together when it stops renewing.
A graceful leave first writes a ``bye`` key naming the incarnation that leaves,
which is how the others tell ``Left("left")`` from ``Left("expired")`` with
nothing but puts, deletes and a watch (the same on the embedded store and etcd).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import time
from collections.abc import AsyncIterator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import asyncfabric as af

from ..store.abc import KeyValue, Store, WatchEvent
from ..store.errors import (
    DescriptorRevoked,
    DuplicateMember,
    GroupError,
    LeaseNotFound,
    LookupTimeout,
    MemberLost,
    StoreLost,
    StoreUnavailable,
    UnknownMember,
)
from .events import Joined, Left, LeftReason, Member
from .keys import Keys, check_key, check_name

if TYPE_CHECKING:
    from .view import View

GROUP_REGION_BYTES = 64
BYE_TTL_S = 30.0
# A member that left on purpose sent its last writes first; the store can say it left
# before this engine counted them. Operations under way get this long to finish (View._fail).
LEFT_GRACE_S = 0.25
_END = object()


class ViewTimeout(GroupError, TimeoutError):
    """``wait_for(n)`` did not see ``n`` members within its timeout."""


class Group:
    """This member's handle on a group. Get one with :func:`asyncfabric.join`."""

    def __init__(
        self,
        store: Store,
        group: str,
        name: str,
        engine: af.Engine,
        meta: dict[str, Any],
        ttl: float,
        store_grace: float,
    ) -> None:
        self.store = store
        self.group = group
        self.name = name
        self.engine = engine
        self.meta = meta
        self.ttl = ttl
        self.store_grace = store_grace
        self._k = Keys(group)
        self._inc = os.urandom(8).hex()
        self._lease = 0
        self._kv: dict[str, KeyValue] = {}
        self._members: dict[str, Member] = {}
        self._gone: dict[str, LeftReason] = {}
        self._changed = asyncio.Event()
        self._subs: set[asyncio.Queue[Any]] = set()
        self._views: set[View] = set()
        self._published: dict[str, bytes] = {}
        self._revoked: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._main: asyncio.Task[None] | None = None
        self._lost: BaseException | None = None
        self._left = False
        self._on_leave: list[Any] = []  # async callables (close an owned store)
        self._region: af.Region | None = None
        self.version = 0

    # ------------------------------------------------------------ joining

    async def _join(self) -> None:
        self._region = self.engine.register(bytearray(GROUP_REGION_BYTES))
        self._record = json.dumps(
            {
                "name": self.name,
                "address": self.engine.address.hex(),
                "meta": self.meta,
                "joined": time.time(),
                "inc": self._inc,
                "ttl": self.ttl,
                "desc": bytes(self._region.descriptor()).hex(),
            }
        ).encode()
        try:
            await self._register()
            kvs, rev = await self.store.list(self._k.prefix)
        except BaseException:
            self._region.close()
            raise
        self._load(kvs, rev, emit=False)
        self._main = asyncio.get_running_loop().create_task(self._run(rev + 1))

    async def _register(self) -> None:
        """Take a lease and write this member's record (and its publications) under it."""
        self._lease = await self.store.grant(self.ttl)
        key = self._k.member(self.name)
        if not await self.store.cas(key, self._record, expect_mod=0, lease=self._lease):
            await self.store.revoke(self._lease)
            cur = await self.store.get(key)
            if cur is not None and _inc_of(cur.value) == self._inc:
                # our own record survived (etcd kept it): take it over
                await self.store.put(key, self._record, lease=self._lease)
            else:
                raise DuplicateMember(
                    f"group {self.group!r} already has a live member named {self.name!r}; "
                    f"pick another name, or wait until its lease ({self.ttl} s) expires if "
                    "it is a dead process of yours"
                )
        for k, v in self._published.items():
            await self.store.put(self._k.publication(self.name, k), v, lease=self._lease)
        for k in self._revoked:
            await self.store.put(self._k.tombstone(self.name, k), b"", lease=self._lease)

    # ------------------------------------------------------------ background

    async def _run(self, start: int) -> None:
        while True:
            try:
                await self._watch_and_renew(start)
                return
            except (StoreUnavailable, LeaseNotFound) as exc:
                if self._left:
                    return
                try:
                    start = await self._recover(exc)
                except StoreLost as lost:
                    self._fail(lost)
                    return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug: say so everywhere rather than hang
                self._fail(StoreLost(f"the group's store watch failed: {exc!r}"))
                return

    async def _watch_and_renew(self, start: int) -> None:
        renew = asyncio.get_running_loop().create_task(self._renew())
        watch = asyncio.get_running_loop().create_task(self._consume(start))
        try:
            done, _ = await asyncio.wait({renew, watch}, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                t.result()
        finally:
            for t in (renew, watch):
                t.cancel()
            await asyncio.gather(renew, watch, return_exceptions=True)

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            await self.store.keepalive(self._lease)

    async def _consume(self, start: int) -> None:
        async for batch in self.store.watch(self._k.prefix, start):
            for ev in batch:
                self._apply(ev)
            self._notify()
        raise StoreUnavailable("the store ended the group's watch")

    async def _recover(self, cause: BaseException) -> int:
        """Reconnect and re-register within ``store_grace`` seconds, or raise StoreLost."""
        deadline = time.monotonic() + self.store_grace
        delay = 0.1
        last: BaseException = cause
        while time.monotonic() < deadline:
            try:
                if isinstance(last, StoreUnavailable):
                    await self.store.reconnect()
                try:
                    await self.store.keepalive(self._lease)
                    cur = await self.store.get(self._k.member(self.name))
                    if cur is None or _inc_of(cur.value) != self._inc:
                        raise LeaseNotFound("our record is gone")
                except LeaseNotFound:
                    await self._register()
                kvs, rev = await self.store.list(self._k.prefix)
                self._load(kvs, rev, emit=True)
                return rev + 1
            except (StoreUnavailable, LeaseNotFound) as exc:
                last = exc
                await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 1.0)
        raise StoreLost(
            f"group {self.group!r} lost its store ({self.store.url}) and could not "
            f"re-register within {self.store_grace} s (last error: {last}); restart the "
            "store and join again"
        )

    # ------------------------------------------------------------ the mirror

    def _load(self, kvs: list[KeyValue], rev: int, *, emit: bool) -> None:
        """Replace the mirror with a fresh listing; report the differences."""
        old = self._members
        self._kv = {kv.key: kv for kv in kvs}
        self._members = {}
        for kv in kvs:
            if kv.key.startswith(self._k.members):
                m = _member(kv)
                if m is not None:
                    self._members[m.name] = m
        self.version = rev
        if emit:
            for name, m in old.items():
                cur = self._members.get(name)
                if cur is None:
                    # It may be re-registering into a restarted store: give it its TTL.
                    self._members[name] = m
                    self._spawn(self._expire_later(m))
                elif cur.incarnation != m.incarnation:
                    self._left_event(name, "expired", rev)
                    self._joined_event(cur, rev)
            for name, m in self._members.items():
                if name not in old:
                    self._joined_event(m, rev)
        self._notify()

    async def _expire_later(self, m: Member) -> None:
        await asyncio.sleep(m.ttl + 1.0)
        if self._kv.get(self._k.member(m.name)) is None and self._members.get(m.name) is m:
            del self._members[m.name]
            self._left_event(m.name, "expired", self.version)
            self._notify()

    def _apply(self, ev: WatchEvent) -> None:
        self.version = ev.revision
        if ev.kind == "put":
            self._kv[ev.key] = KeyValue(ev.key, ev.value, ev.create, ev.revision)
        else:
            self._kv.pop(ev.key, None)
        if not ev.key.startswith(self._k.members):
            return
        name = ev.key[len(self._k.members) :]
        old = self._members.get(name)
        if ev.kind == "put":
            m = _member(self._kv[ev.key])
            if m is None:
                return
            if old is not None and old.incarnation == m.incarnation:
                return  # a re-registration (store restart), not a new member
            if old is not None:
                self._left_event(name, "expired", ev.revision)
            self._members[name] = m
            self._joined_event(m, ev.revision)
        elif old is not None:
            del self._members[name]
            bye = self._kv.get(self._k.bye + name)
            reason: LeftReason = (
                "left" if bye is not None and bye.value.decode() == old.incarnation else "expired"
            )
            self._left_event(name, reason, ev.revision)

    def _joined_event(self, m: Member, version: int) -> None:
        self._gone.pop(m.name, None)
        self._publish_event(Joined(m, version))

    def _left_event(self, name: str, reason: LeftReason, version: int) -> None:
        self._gone[name] = reason
        self._publish_event(Left(name, reason, version))
        for v in list(self._views):
            if name in v.names:
                lost = MemberLost(name, _lost_message(name, reason, self.group))
                v._fail(lost, grace=LEFT_GRACE_S if reason == "left" else 0.0)

    def _publish_event(self, ev: Joined | Left) -> None:
        for q in self._subs:
            q.put_nowait(ev)

    def _notify(self) -> None:
        ev, self._changed = self._changed, asyncio.Event()
        ev.set()

    def _fail(self, exc: BaseException) -> None:
        self._lost = exc
        for q in self._subs:
            q.put_nowait(exc)
        for v in list(self._views):
            v._fail(exc)
        self._notify()

    def _spawn(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def _check(self) -> None:
        if self._left:
            raise GroupError(
                f"{self.name!r} has left group {self.group!r}; join again for a new handle"
            )
        if self._lost is not None:
            raise self._lost

    # ------------------------------------------------------------ members

    @property
    def members(self) -> Mapping[str, Member]:
        """The live members now, by name (this one included); a read-only live mapping."""
        return MappingProxyType(self._members)

    def member(self, name: str) -> Member:
        """The live member ``name``; raises :class:`UnknownMember` if there is none."""
        m = self._members.get(name)
        if m is None:
            raise UnknownMember(
                f"group {self.group!r} has no live member {name!r} (members: "
                f"{sorted(self._members)}); check the name, or wait for it to join"
            )
        return m

    def connect(self, name: str) -> af.Peer:
        """A peer connected to member ``name``'s engine."""
        return self.engine.connect(self.member(name).address)

    def events(self) -> AsyncIterator[Joined | Left]:
        """Membership changes from now on, in order: :class:`Joined` and :class:`Left`.

        Ends when this member leaves; raises :class:`StoreLost` if the group loses
        its store. A wait on it may be cancelled (``asyncio.wait_for``) without
        losing the iterator."""
        self._check()
        q: asyncio.Queue[Any] = asyncio.Queue()
        self._subs.add(q)
        return _Events(self, q)

    # ------------------------------------------------------------ descriptors

    async def publish(self, key: str, desc: af.Descriptor) -> None:
        """Publish ``desc`` under ``key`` for the others to :meth:`lookup`.

        Revoked when this member leaves (or its lease expires) and, for a region of
        this member's engine, when the region closes."""
        check_key(key)
        if not isinstance(desc, af.Descriptor):
            raise TypeError(
                f"publish takes a Descriptor (region.descriptor()), got {type(desc).__name__}"
            )
        self._check()
        region = self.engine.region_of(desc)
        if desc.address.uid == _uid(self.engine) and region is None:
            raise DescriptorRevoked(
                f"cannot publish {key!r}: its region is closed; register the buffer again"
            )
        value = bytes(desc)
        self._published[key] = value
        self._revoked.discard(key)
        await self.store.delete(self._k.tombstone(self.name, key))
        await self.store.put(self._k.publication(self.name, key), value, lease=self._lease)
        if region is not None:
            region.on_close(functools.partial(self._revoke_soon, key, value))

    def _revoke_soon(self, key: str, value: bytes, _region: af.Region) -> None:
        if self._published.get(key) == value and not self._left and self._lost is None:
            self._spawn(self._revoke_quietly(key))

    async def _revoke_quietly(self, key: str) -> None:
        try:
            await self.unpublish(key)
        except GroupError:
            # The store is away: the publication is gone from _published, so a
            # re-registration will not restore it, and the lease takes it otherwise.
            self._revoked.add(key)

    async def unpublish(self, key: str) -> None:
        """Revoke ``key``: lookups of it fail with :class:`DescriptorRevoked` from now on."""
        check_key(key)
        self._check()
        self._published.pop(key, None)
        self._revoked.add(key)
        await self.store.put(self._k.tombstone(self.name, key), b"", lease=self._lease)
        await self.store.delete(self._k.publication(self.name, key))

    async def flush(self) -> None:
        """Wait for revocations started by closing regions to reach the store."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def lookup(self, member: str, key: str, *, timeout: float | None = 5.0) -> af.Descriptor:
        """The descriptor ``member`` published as ``key``, waiting up to ``timeout`` s for it.

        Raises :class:`DescriptorRevoked` if it was revoked (region closed, member
        left) and :class:`LookupTimeout` if it did not appear in time. The answer
        comes from the store, never from a cache."""
        check_name("member name", member)
        check_key(key)
        self._check()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            changed = self._changed
            try:
                kv = await self.store.get(self._k.publication(member, key))
                tomb = (
                    None if kv is not None else await self.store.get(self._k.tombstone(member, key))
                )
            except StoreUnavailable:
                # The group reconnects on its own within store_grace (past it, _check
                # raises StoreLost): a lookup with time left waits for it.
                self._check()
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.05)
                continue
            if kv is not None:
                return af.Descriptor.from_bytes(kv.value)
            if tomb is not None:
                raise DescriptorRevoked(
                    f"{member!r} revoked {key!r} in group {self.group!r} (its region closed or "
                    "it unpublished it); ask it to publish a new descriptor"
                )
            if member in self._gone and member not in self._members:
                raise DescriptorRevoked(
                    f"{member!r} left group {self.group!r} ({self._gone[member]}); its "
                    f"publications, {key!r} included, were revoked"
                )
            self._check()
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                where = (
                    "it is a member but has not published it"
                    if member in self._members
                    else "it is not a member of the group (check the name, or wait for it to join)"
                )
                raise LookupTimeout(
                    f"{member!r} did not publish {key!r} in group {self.group!r} within "
                    f"{timeout} s: {where}"
                )
            try:
                await asyncio.wait_for(changed.wait(), left)
            except asyncio.TimeoutError:
                pass

    # ------------------------------------------------------------ views

    async def wait_for(self, n: int, *, timeout: float | None = 30.0) -> View:
        """A frozen view of ``n`` members, ranked by name, once the group has them.

        The view is the first ``n`` members to join (the store orders joins), so
        every member of it computes the same one. A member that is not among them
        waits until it is (someone left)."""
        from .view import View

        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._check()
            changed = self._changed
            if len(self._members) >= n:
                first = sorted(self._members.values(), key=lambda m: m.version)[:n]
                if any(m.name == self.name for m in first):
                    v = View(self, sorted(first, key=lambda m: m.name))
                    self._views.add(v)
                    return v
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                if len(self._members) >= n:
                    raise ViewTimeout(
                        f"{self.name!r} is not among the first {n} members to join group "
                        f"{self.group!r} ({sorted(self._members)}), and none of them left "
                        f"within {timeout} s; ask for a view of all of them, or use another group"
                    )
                raise ViewTimeout(
                    f"group {self.group!r} has {len(self._members)} of the {n} members "
                    f"this view needs after {timeout} s ({sorted(self._members)}); start "
                    "the missing members or raise the timeout"
                )
            try:
                await asyncio.wait_for(changed.wait(), left)
            except asyncio.TimeoutError:
                pass

    # ------------------------------------------------------------ leaving

    async def leave(self) -> None:
        """Leave the group: the others see ``Left(reason="left")``; publications go."""
        if self._left:
            return
        self._left = True
        if self._main is not None:
            self._main.cancel()
            await asyncio.gather(self._main, return_exceptions=True)
        for t in list(self._tasks):
            t.cancel()
        try:
            if self._lost is None:
                bye = await self.store.grant(BYE_TTL_S)
                await self.store.put(self._k.bye + self.name, self._inc.encode(), lease=bye)
                await self.store.revoke(self._lease)
        except (StoreUnavailable, LeaseNotFound):
            pass  # the store is gone: our lease expires with it
        finally:
            for v in list(self._views):
                v._fail(MemberLost(self.name, f"this member ({self.name!r}) left the group"))
            for q in self._subs:
                q.put_nowait(_END)
            if self._region is not None:
                self._region.close()
            for cb in self._on_leave:
                await cb()

    async def __aenter__(self) -> Group:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.leave()

    def __repr__(self) -> str:
        return f"<Group {self.group!r} as {self.name!r}: {len(self._members)} members>"


class _Events:
    """The async iterator :meth:`Group.events` returns (a class, not an async
    generator: cancelling one ``__anext__`` must not close it)."""

    def __init__(self, group: Group, q: asyncio.Queue[Any]) -> None:
        self._group, self._q, self._done = group, q, False

    def __aiter__(self) -> _Events:
        return self

    async def __anext__(self) -> Joined | Left:
        if self._done:
            raise StopAsyncIteration
        item = await self._q.get()
        if isinstance(item, (Joined, Left)):
            return item
        self._done = True
        self._group._subs.discard(self._q)
        if isinstance(item, BaseException):
            raise item
        raise StopAsyncIteration  # _END: this member left

    async def aclose(self) -> None:
        self._done = True
        self._group._subs.discard(self._q)


def _inc_of(value: bytes) -> str:
    try:
        return str(json.loads(value)["inc"])
    except (ValueError, KeyError, TypeError):
        return ""


def _member(kv: KeyValue) -> Member | None:
    try:
        d = json.loads(kv.value)
        return Member(
            name=d["name"],
            address=bytes.fromhex(d["address"]),
            meta=d.get("meta", {}),
            joined=float(d["joined"]),
            incarnation=d["inc"],
            version=kv.create,
            descriptor=bytes.fromhex(d["desc"]),
            ttl=float(d["ttl"]),
        )
    except (ValueError, KeyError, TypeError):
        return None  # not ours (another writer under the prefix): ignore it


def _uid(engine: af.Engine) -> bytes:
    return af.EngineAddress.from_bytes(engine.address).uid


def _lost_message(name: str, reason: str, group: str) -> str:
    how = "left" if reason == "left" else "stopped renewing its lease (killed, hung or cut off)"
    return (
        f"member {name!r} of group {group!r} {how}; the view's pending waits failed: form "
        "a new view with `await group.wait_for(n)`"
    )
