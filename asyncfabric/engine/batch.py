"""Batches: many writes checked once, then posted and awaited as one (``Engine.write_many``).

A :class:`Batch` is built with Python calls (one per write, or one per array
of writes) and compiled for an engine on its first post: its sources resolved
to registrations, its destinations to the transport's prepared remotes, every
entry packed into flat arrays. The compiled form is cached, so posting the
same batch again costs O(1) Python however many entries it holds, and the
transport keeps its own packed form beside it (``WriteBatch.cache``).

Every entry is checked before anything is posted; an error names the index of
the first bad entry. An entry's index is its place in the batch, in the order
it was added (an array adds one index per element).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .._errors import RegionError
from ..transport.contract import Registration, Remote
from ..transport.counting import NO_IMM, check_imm
from .descriptor import Descriptor, RemoteSlice
from .region import Region, RegionSlice

if TYPE_CHECKING:
    from .engine import Engine

_U64 = np.uint64


class _Part:
    """Entries added together: one source region (or None) and one destination, or
    (``add_table``) tuples of them with an index array per side."""

    __slots__ = ("src", "dst", "soff", "doff", "nbytes", "imm", "sidx", "didx")

    def __init__(
        self,
        src: Region | None | tuple[Region, ...],
        dst: Descriptor | tuple[Descriptor, ...],
        soff: np.ndarray,
        doff: np.ndarray,
        nbytes: np.ndarray,
        imm: np.ndarray,
        sidx: np.ndarray | None = None,
        didx: np.ndarray | None = None,
    ) -> None:
        self.src, self.dst = src, dst
        self.soff, self.doff, self.nbytes, self.imm = soff, doff, nbytes, imm
        self.sidx, self.didx = sidx, didx


class Compiled:
    """A batch as one engine posts it (cached in the batch, per engine)."""

    __slots__ = ("n", "srcs", "dsts", "regions", "src", "dst", "soff", "doff", "nbytes", "imm",
                 "cache", "self_targets", "descs")  # fmt: skip

    n: int
    srcs: tuple[Registration | None, ...]
    dsts: tuple[Remote, ...]
    regions: tuple[Region, ...]
    descs: tuple[Descriptor, ...]
    self_targets: tuple[Descriptor, ...]
    src: np.ndarray
    dst: np.ndarray
    soff: np.ndarray
    doff: np.ndarray
    nbytes: np.ndarray
    imm: np.ndarray

    def __init__(self) -> None:
        self.cache: dict[str, Any] = {}


class Batch:
    """Writes to post together: ``await engine.write_many(batch)``.

    Build it once and post it as often as you like: its checks and packing are
    done on the first post, and each later post costs the same few Python
    operations whatever its size. Adding to a batch makes it compile again.
    Entries may go to many peers and carry different immediates.
    """

    def __init__(self) -> None:
        self._parts: list[_Part] = []
        self._one: list[tuple[Region | None, Descriptor, int, int, int, int]] = []
        self._n = 0
        self._compiled: dict[bytes, Compiled] = {}

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return f"<Batch of {self._n} writes>"

    # ------------------------------------------------------------ building

    def add(
        self, src: Region | RegionSlice, dst: Descriptor | RemoteSlice, *, imm: int | None = None
    ) -> Batch:
        """One write of ``src`` into ``dst`` (like ``Engine.write``)."""
        i = self._n
        s = _slice(src, i)
        d = _remote(dst, i)
        if s.nbytes != d.nbytes:
            raise ValueError(
                f"batch entry {i}: the source has {s.nbytes} bytes but the destination has "
                f"{d.nbytes}"
            )
        self._one.append((s.region, d.descriptor, s.offset, d.offset, s.nbytes, _imm(imm, i)))
        return self._grew(1)

    def add_imm(self, dst: Descriptor | RemoteSlice, imm: int) -> Batch:
        """A zero-byte write that only delivers ``imm`` to ``dst``'s engine (``write_imm``)."""
        i = self._n
        d = _remote(dst, i)
        self._one.append((None, d.descriptor, 0, d.offset, 0, _imm(imm, i, required=True)))
        return self._grew(1)

    def add_many(
        self,
        src: Region,
        dst: Descriptor,
        src_offsets: Any,
        dst_offsets: Any,
        nbytes: Any,
        *,
        imm: Any = None,
    ) -> Batch:
        """Writes ``k``: ``nbytes[k]`` bytes from ``src`` at ``src_offsets[k]`` to ``dst``
        at ``dst_offsets[k]``. ``nbytes`` and ``imm`` may be one value or an array each."""
        first = self._n
        if not isinstance(src, Region):
            raise TypeError(f"batch entry {first}: add_many takes a Region as the source")
        if not isinstance(dst, Descriptor):
            raise TypeError(f"batch entry {first}: add_many takes a Descriptor as the destination")
        _live(src, first)
        so = _offsets(src_offsets, "src_offsets", first)
        do = _offsets(dst_offsets, "dst_offsets", first)
        if so.shape != do.shape:
            raise ValueError(
                f"batch entry {first}: src_offsets has {so.size} entries, dst_offsets {do.size}"
            )
        nb = np.broadcast_to(_offsets(nbytes, "nbytes", first), so.shape).astype(_U64)
        im = _imms(imm, so.shape, first)
        _bounds(so, nb, src.nbytes, "source", first)
        _bounds(do, nb, dst.nbytes, "destination", first)
        self._flush()
        self._parts.append(_Part(src, dst, so, do, nb, im))
        return self._grew(int(so.size))

    def add_table(
        self,
        srcs: Sequence[Region],
        dsts: Sequence[Descriptor],
        src_index: Any,
        dst_index: Any,
        src_offsets: Any,
        dst_offsets: Any,
        nbytes: Any,
        *,
        imm: Any = None,
    ) -> Batch:
        """Writes ``k``: ``nbytes[k]`` bytes from ``srcs[src_index[k]]`` at
        ``src_offsets[k]`` to ``dsts[dst_index[k]]`` at ``dst_offsets[k]``.

        ``add_many`` over several regions and descriptors in one call, for layouts
        that spread one transfer over many buffers (a KV cache with a tensor per
        layer): the Python cost does not grow with the number of buffers either."""
        first = self._n
        srcs, dsts = tuple(srcs), tuple(dsts)
        for k, r in enumerate(srcs):
            if not isinstance(r, Region):
                raise TypeError(f"batch entry {first}: add_table's srcs[{k}] is not a Region")
            _live(r, first)
        for k, d in enumerate(dsts):
            if not isinstance(d, Descriptor):
                raise TypeError(f"batch entry {first}: add_table's dsts[{k}] is not a Descriptor")
        so = _offsets(src_offsets, "src_offsets", first)
        do = _offsets(dst_offsets, "dst_offsets", first)
        if so.shape != do.shape:
            raise ValueError(
                f"batch entry {first}: src_offsets has {so.size} entries, dst_offsets {do.size}"
            )
        si = _index(src_index, len(srcs), "src_index", so.shape, first)
        di = _index(dst_index, len(dsts), "dst_index", so.shape, first)
        nb = np.broadcast_to(_offsets(nbytes, "nbytes", first), so.shape).astype(_U64)
        im = _imms(imm, so.shape, first)
        _bounds(so, nb, _sizes(srcs, si), "source", first)
        _bounds(do, nb, _sizes(dsts, di), "destination", first)
        self._flush()
        self._parts.append(_Part(srcs, dsts, so, do, nb, im, si, di))
        return self._grew(int(so.size))

    def add_pages(
        self,
        src: Region,
        dst: Descriptor,
        src_pages: Any,
        dst_pages: Any,
        *,
        page_size: int,
        src_stride: int | None = None,
        dst_stride: int | None = None,
        src_offset: int = 0,
        dst_offset: int = 0,
        imm: int | None = None,
    ) -> Batch:
        """Pages, as ``Engine.write_paged`` takes them: one entry (one immediate) per page."""
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size <= 0:
            raise ValueError(f"page_size must be a positive int, got {page_size!r}")
        ss = page_size if src_stride is None else src_stride
        ds = page_size if dst_stride is None else dst_stride
        sp = _offsets(src_pages, "src_pages", self._n)
        dp = _offsets(dst_pages, "dst_pages", self._n)
        return self.add_many(
            src,
            dst,
            _U64(src_offset) + sp * _U64(ss),
            _U64(dst_offset) + dp * _U64(ds),
            page_size,
            imm=imm,
        )

    @classmethod
    def of(cls, ops: Iterable[Any], *, imm: int | None = None) -> Batch:
        """A batch from ``(src, dst)`` or ``(src, dst, imm)`` tuples (``imm``: the default)."""
        b = cls()
        for i, op in enumerate(ops):
            if isinstance(op, tuple) and len(op) == 2:
                b.add(op[0], op[1], imm=imm)
            elif isinstance(op, tuple) and len(op) == 3:
                b.add(op[0], op[1], imm=op[2])
            else:
                raise TypeError(
                    f"batch entry {i}: expected (src, dst) or (src, dst, imm), got "
                    f"{type(op).__name__}"
                )
        return b

    def _grew(self, k: int) -> Batch:
        self._n += k
        self._compiled.clear()
        return self

    def _flush(self) -> None:
        """Turn the single adds so far into parts (one per run of one source and target)."""
        one, self._one = self._one, []
        i = 0
        while i < len(one):
            j = i
            while j < len(one) and one[j][0] is one[i][0] and one[j][1] is one[i][1]:
                j += 1
            run = one[i:j]
            self._parts.append(
                _Part(
                    run[0][0],
                    run[0][1],
                    np.array([r[2] for r in run], _U64),
                    np.array([r[3] for r in run], _U64),
                    np.array([r[4] for r in run], _U64),
                    np.array([r[5] for r in run], np.int64),
                )
            )
            i = j

    # ------------------------------------------------------------ compiling

    def compile(self, engine: Engine) -> Compiled:
        """Check every entry against ``engine`` and pack the batch (cached)."""
        key = engine._addr.uid
        c = self._compiled.get(key)
        if c is not None:
            for r in c.regions:
                if r._closed:
                    raise RegionError(
                        "a source region of this batch was unregistered; register it again "
                        "and build a new batch"
                    )
            for d in c.self_targets:
                engine._check_target(d)
            return c
        self._flush()
        if not self._parts:
            raise ValueError("the batch is empty: add writes to it first")
        c = Compiled()
        srcs: dict[int, int] = {}
        dsts: dict[int, int] = {}
        regs: list[Registration | None] = []
        remotes: list[Remote] = []
        regions: list[Region] = []
        descs: list[Descriptor] = []
        cols: list[tuple[np.ndarray, ...]] = []

        def src_slot(r: Any, at: int) -> int:
            """The compiled source index of region ``r`` (None: an immediate-only write)."""
            if r is None:
                si = srcs.setdefault(0, len(regs))
                if si == len(regs):
                    regs.append(None)
                return si
            si = srcs.get(id(r), -1)
            if si < 0:
                if r._engine is not engine:
                    raise RegionError(
                        f"batch entry {at}: the source region is registered with another engine"
                    )
                _live(r, at)
                si = srcs[id(r)] = len(regs)
                regs.append(r._reg)
                regions.append(r)
            return si

        def dst_slot(d: Any, at: int) -> int:
            di = dsts.get(id(d), -1)
            if di < 0:
                try:
                    route = engine._route(d)
                except Exception as exc:
                    raise type(exc)(f"batch entry {at}: {exc}") from exc
                di = dsts[id(d)] = len(remotes)
                remotes.append(route.remote)
                descs.append(d)
            return di

        first = 0
        for p in self._parts:
            n = len(p.soff)
            if p.sidx is None or p.didx is None:
                scol = np.full(n, src_slot(p.src, first), np.uint32)
                dcol = np.full(n, dst_slot(p.dst, first), np.uint32)
            else:
                scol = _slots(p.src, p.sidx, src_slot, first)
                dcol = _slots(p.dst, p.didx, dst_slot, first)
            cols.append((scol, dcol, p.soff, p.doff, p.nbytes, p.imm))
            first += n
        c.n = first
        c.srcs, c.dsts, c.regions = tuple(regs), tuple(remotes), tuple(regions)
        c.descs = tuple(descs)
        c.self_targets = tuple(d for d in descs if d.address.uid == key)
        c.src, c.dst, c.soff, c.doff, c.nbytes, c.imm = (
            np.ascontiguousarray(np.concatenate([col[k] for col in cols])) for k in range(6)
        )
        self._compiled[key] = c
        return c


# ---------------------------------------------------------------- checks, with the entry's index


def _slice(src: Any, i: int) -> RegionSlice:
    if isinstance(src, Region):
        src = src[:]
    if not isinstance(src, RegionSlice):
        raise TypeError(
            f"batch entry {i}: the source must be a Region or region[a:b], got "
            f"{type(src).__name__} (register the buffer first: engine.register(buf))"
        )
    _live(src.region, i)
    return src


def _remote(dst: Any, i: int) -> RemoteSlice:
    if isinstance(dst, Descriptor):
        return dst[:]
    if isinstance(dst, RemoteSlice):
        return dst
    raise TypeError(
        f"batch entry {i}: the destination must be a peer's Descriptor or desc[a:b], got "
        f"{type(dst).__name__}"
    )


def _live(region: Region, i: int) -> None:
    if region._closed:
        raise RegionError(
            f"batch entry {i}: the source region was unregistered; register the buffer again"
        )


def _imm(imm: int | None, i: int, required: bool = False) -> int:
    if imm is None:
        if required:
            raise ValueError(f"batch entry {i}: an immediate-only write needs an imm")
        return NO_IMM
    try:
        return check_imm(imm)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"batch entry {i}: {exc}") from None


def _offsets(v: Any, name: str, first: int) -> np.ndarray:
    a = np.asarray(v)
    if a.ndim > 1:
        raise ValueError(f"batch entry {first}: {name} must be one-dimensional, got {a.shape}")
    if a.size and a.dtype.kind not in "iu":
        raise TypeError(f"batch entry {first}: {name} must hold integers, got {a.dtype}")
    if a.size and a.dtype.kind == "i" and int(a.min()) < 0:
        k = int(np.argmax(a < 0))
        raise ValueError(f"batch entry {first + k}: {name} is negative ({int(a.flat[k])})")
    return np.ascontiguousarray(a, _U64).reshape(-1)


def _imms(imm: Any, shape: tuple[int, ...], first: int) -> np.ndarray:
    if imm is None:
        return np.full(shape, NO_IMM, np.int64)
    a = np.asarray(imm)
    if a.size and a.dtype.kind not in "iu":
        raise TypeError(f"batch entry {first}: imm must be integers, got {a.dtype}")
    a = np.broadcast_to(a.astype(np.int64), shape)
    bad = (a < 0) | (a > 0xFFFFFFFF)
    if bad.any():
        k = int(np.argmax(bad))
        raise ValueError(
            f"batch entry {first + k}: imm {int(a.flat[k])} is outside 0..2**32-1 "
            "(an immediate is 32 bits)"
        )
    return np.ascontiguousarray(a)


def _bounds(off: np.ndarray, nb: np.ndarray, size: Any, what: str, first: int) -> None:
    """Every entry inside its region (``size``: one size, or one per entry)."""
    sz = size if isinstance(size, np.ndarray) else _U64(size)
    end = off + nb
    bad = (end > sz) | (end < off)
    if bad.any():
        k = int(np.argmax(bad))
        n = int(sz[k]) if isinstance(sz, np.ndarray) else size
        raise RegionError(
            f"batch entry {first + k}: {int(nb[k])} bytes at offset {int(off[k])} reach past "
            f"the {n}-byte {what} region"
        )


def _index(v: Any, n: int, name: str, shape: tuple[int, ...], first: int) -> np.ndarray:
    """An add_table index array: integers in ``0..n-1``, one per entry (or one for all)."""
    a = np.asarray(v)
    if a.ndim > 1:
        raise ValueError(f"batch entry {first}: {name} must be one-dimensional, got {a.shape}")
    if a.size and a.dtype.kind not in "iu":
        raise TypeError(f"batch entry {first}: {name} must hold integers, got {a.dtype}")
    a = np.broadcast_to(a.astype(np.int64), shape)
    bad = (a < 0) | (a >= n)
    if bad.any():
        k = int(np.argmax(bad))
        raise ValueError(
            f"batch entry {first + k}: {name} is {int(a.flat[k])}, but the table has {n} entries"
        )
    return np.ascontiguousarray(a)


def _sizes(items: tuple[Any, ...], idx: np.ndarray) -> np.ndarray:
    """Each entry's region size, by its index into ``items``."""
    sizes: np.ndarray = np.array([x.nbytes for x in items], _U64)
    return np.take(sizes, idx)


def _slots(items: Any, idx: np.ndarray, slot: Any, first: int) -> np.ndarray:
    """Compiled indices for an add_table part: each table item used resolved once."""
    table = np.zeros(len(items), np.uint32)
    for k in np.unique(idx).tolist():
        table[k] = slot(items[k], first + int(np.argmax(idx == k)))
    return np.take(table, idx)
