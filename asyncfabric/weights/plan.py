"""The static transfer plan: which source bytes go to which destination bytes.

Computed once per pair of layouts (and cached by their keys), then reused for
every update. For each parameter and each pair (trainer rank, inference rank)
whose shards overlap, the overlap is a box of the full tensor; a :class:`Move`
says where that box lies in both ranks' buffers. The destination side is cut
into *runs*, byte ranges contiguous in the receiver's buffer; a run whose
source bytes are contiguous too (and need no cast) is written straight from
the trainer's buffer (*direct*), the others are first packed (and cast) into a
staging buffer (*staged*), then written.

An inference parameter declared fp8 (e4m3) is cast with a per-tensor scale: its
moves are staged (quantized while packed) and each inference rank gets one more
move, the scale (a 0-dim float32, :attr:`Move.scale_of` set), from trainer rank
``rank % trainer.world``, packed from the scale the sender computed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from . import fp8
from .errors import LayoutError
from .layout import Layout, Param

_CASTABLE = {
    torch.float32, torch.float16, torch.bfloat16, torch.float64,
}  # fmt: skip


@dataclass(frozen=True)
class Move:
    """One parameter's overlap between trainer rank ``src`` and inference rank ``dst``.

    ``box``: per dim, ``(start, length)`` of the overlap in the *source shard's*
    coordinates. The destination receives the box as runs: run ``k`` is
    ``run_bytes`` bytes at ``dst_offsets[k]`` of the receiver's buffer, and holds
    the ``k``-th row-major slab of the box (its first ``outer`` dims fixed).
    ``src_offsets`` (direct moves only): where each run's bytes start in the
    trainer's buffer."""

    param: str
    src: int
    dst: int
    box: tuple[tuple[int, int], ...]
    outer: int
    dst_offsets: np.ndarray
    run_bytes: int
    src_offsets: np.ndarray | None
    src_dtype: torch.dtype
    dst_dtype: torch.dtype
    scale_of: str | None = None
    """Set on the move of an fp8 parameter's scale: that parameter's name (the bytes
    come from the sender's scale, not from its buffer)."""

    @property
    def direct(self) -> bool:
        return self.src_offsets is not None

    @property
    def nbytes(self) -> int:
        return int(self.dst_offsets.size) * self.run_bytes

    @property
    def runs(self) -> int:
        return int(self.dst_offsets.size)

    def split(self, max_bytes: int) -> list[Move]:
        """This move cut along the box's first dim into moves of at most ``max_bytes``
        (or one slab of the first dim, if a slab alone is larger)."""
        if self.nbytes <= max_bytes or not self.box or self.box[0][1] <= 1:
            return [self]
        n0 = self.box[0][1]
        per_row = self.nbytes // n0
        rows = max(1, max_bytes // per_row)
        out = []
        for lo in range(0, n0, rows):
            k = min(rows, n0 - lo)
            box = ((self.box[0][0] + lo, k), *self.box[1:])
            if self.outer == 0:
                # one run, contiguous in the destination: cut it by bytes
                d = self.dst_offsets + lo * per_row
                s = None if self.src_offsets is None else self.src_offsets + lo * per_row
                out.append(_replace(self, box, d, k * per_row, s))
            else:
                # runs are slabs of the outer dims: dim 0 picks a block of them
                per = self.runs // n0
                sl = slice(lo * per, (lo + k) * per)
                s = None if self.src_offsets is None else self.src_offsets[sl]
                out.append(_replace(self, box, self.dst_offsets[sl], self.run_bytes, s))
        return out


def _replace(
    m: Move, box: tuple[tuple[int, int], ...], d: np.ndarray, rb: int, s: np.ndarray | None
) -> Move:
    return Move(m.param, m.src, m.dst, box, m.outer, d, rb, s, m.src_dtype, m.dst_dtype,
                m.scale_of)  # fmt: skip


@dataclass
class Plan:
    """Every move from a trainer layout to an inference layout (see :func:`plan`)."""

    trainer: Layout
    inference: Layout
    moves: list[Move] = field(default_factory=list)

    @property
    def fp8(self) -> tuple[str, ...]:
        """The parameters cast to fp8 (e4m3, per-tensor scale): the senders need their
        ``amax`` over every trainer rank."""
        return self.inference.fp8

    def for_src(self, rank: int) -> list[Move]:
        """The moves trainer rank ``rank`` executes."""
        return [m for m in self.moves if m.src == rank]

    def for_dst(self, rank: int) -> list[Move]:
        """The moves that land in inference rank ``rank``."""
        return [m for m in self.moves if m.dst == rank]

    def expected_imms(self, dst: int, chunk_bytes: int) -> int:
        """Immediates inference rank ``dst`` counts per update (each run is one write)."""
        n = 0
        for m in self.moves:
            if m.dst == dst:
                n += m.runs * max(1, -(-m.run_bytes // chunk_bytes))
        return n

    def stats(self) -> dict[str, object]:
        """Bytes and writes per trainer rank and per inference rank, direct vs staged."""
        src_b = [0] * self.trainer.world
        src_ops = [0] * self.trainer.world
        dst_b = [0] * self.inference.world
        dst_ops = [0] * self.inference.world
        staged = 0
        for m in self.moves:
            src_b[m.src] += m.nbytes
            src_ops[m.src] += m.runs
            dst_b[m.dst] += m.nbytes
            dst_ops[m.dst] += m.runs
            staged += 0 if m.direct else m.nbytes
        total = sum(src_b)
        return {
            "bytes": total, "writes": sum(src_ops), "staged_bytes": staged,
            "src_bytes": src_b, "src_writes": src_ops, "dst_bytes": dst_b, "dst_writes": dst_ops,
        }  # fmt: skip


_CACHE: dict[tuple[str, str, bool], Plan] = {}


def plan(trainer: Layout, inference: Layout, *, cast: bool = False) -> Plan:
    """The static list of transfers from ``trainer`` to ``inference`` (cached).

    Refused, naming the parameter (:class:`LayoutError`): a parameter missing
    on either side, a shape disagreement, a dtype disagreement (unless ``cast``,
    which allows casts between floating types: the trainer casts while it packs,
    and to float8_e4m3fn with a per-tensor scale, see :mod:`asyncfabric.weights.fp8`).
    Scale parameters of fp8 ones exist on the inference side only.
    """
    key = (trainer.key, inference.key, cast)
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    missing = [n for n, q in inference.params.items()
               if n not in trainer.params and q.scale_of is None]  # fmt: skip
    if missing:
        raise LayoutError(
            f"parameter {missing[0]!r} of the inference layout is missing from the trainer "
            f"layout ({len(missing)} missing); both layouts must name the same parameters"
        )
    extra = [n for n in trainer.params if n not in inference.params]
    if extra:
        raise LayoutError(
            f"parameter {extra[0]!r} of the trainer layout is missing from the inference "
            f"layout ({len(extra)} missing); both layouts must name the same parameters"
        )
    for tp in trainer.params.values():
        if fp8.is_fp8(tp.dtype):
            raise LayoutError(
                f"parameter {tp.name!r}: the trainer holds it as {tp.dtype}; fp8 is an "
                "inference format only (the trainer quantizes while it sends): give the "
                "trainer layout its training dtype"
            )
    p = Plan(trainer, inference)
    for name, ip in inference.params.items():
        if ip.scale_of is not None:
            if name in trainer.params:
                raise LayoutError(
                    f"parameter {name!r} of the trainer layout has the name of the scale of "
                    f"the inference's fp8 parameter {ip.scale_of!r}; rename it"
                )
            p.moves.extend(_scale_moves(trainer, inference, ip))
            continue
        tp = trainer.params[name]
        if tp.shape != ip.shape:
            raise LayoutError(
                f"parameter {name!r}: the trainer's shape is {tp.shape}, the inference's "
                f"{ip.shape}; the layouts describe different models"
            )
        if tp.dtype != ip.dtype:
            if not cast:
                raise LayoutError(
                    f"parameter {name!r}: the trainer's dtype is {tp.dtype}, the inference's "
                    f"{ip.dtype}; pass cast=True to cast while sending"
                )
            if tp.dtype not in _CASTABLE or (ip.dtype not in _CASTABLE and ip.dtype != fp8.E4M3):
                raise LayoutError(
                    f"parameter {name!r}: no cast from {tp.dtype} to {ip.dtype}; casts go "
                    "between float32, float64, float16 and bfloat16, and from those to "
                    "float8_e4m3fn (per-tensor scale)"
                )
        p.moves.extend(_moves(trainer, inference, tp, ip))
    _CACHE[key] = p
    return p


def _scale_moves(tl: Layout, il: Layout, sp: Param) -> Iterator[Move]:
    """An fp8 parameter's scale, to every inference rank: packed by trainer rank
    ``d % tl.world`` from the scale it computed (every trainer rank has the same one)."""
    for d in range(il.world):
        off = np.array([il.offset(sp.name, d)], np.uint64)
        yield Move(sp.name, d % tl.world, d, (), 0, off, sp.itemsize, None,
                   torch.float32, torch.float32, sp.scale_of)  # fmt: skip


def _pieces(p: Param, rank: int) -> Iterator[tuple[int, int, int]]:
    """``(start, stop, local_start)`` along ``p.dim`` of ``rank``'s shard."""
    lo = 0
    for a, b in p.ranks[rank]:
        if b > a:
            yield a, b, lo
        lo += b - a


def _moves(tl: Layout, il: Layout, tp: Param, ip: Param) -> Iterator[Move]:
    shape = tp.shape
    nd = len(shape)
    ts, ds = tp.itemsize, ip.itemsize
    same = tp.dtype == ip.dtype
    for d in range(il.world):
        dshape = ip.local_shape(d)
        dbase = il.offset(ip.name, d)
        if nd == 0:
            s = d % tl.world
            so = np.array([tl.offset(tp.name, s)], np.uint64) if same else None
            yield Move(ip.name, s, d, (), 0, np.array([dbase], np.uint64), ds, so,
                       tp.dtype, ip.dtype)  # fmt: skip
            continue
        dps = list(_pieces(ip, d)) if not ip.replicated else [(0, shape[ip.dim], 0)]
        if not dps:
            continue
        if tp.replicated:
            # any trainer rank has it: spread the receivers over them
            srcs = [d % tl.world]
        elif tp.dim == ip.dim:
            # same dim: only the trainer ranks whose ranges meet this rank's
            srcs = [s for s in range(tl.world)
                    if any(a < e and c < b for a, b in tp.ranks[s] for c, e, _ in dps)]  # fmt: skip
        else:
            srcs = [s for s in range(tl.world) if any(b > a for a, b in tp.ranks[s])]
        for s in srcs:
            sshape = tp.local_shape(s)
            sbase = tl.offset(tp.name, s)
            for a, b, slo in _pieces(tp, s) if not tp.replicated else [(0, shape[tp.dim], 0)]:
                for c, e, dlo in dps:
                    full = [(0, n) for n in shape]  # (start, stop) in full coords
                    full[tp.dim] = (max(full[tp.dim][0], a), min(full[tp.dim][1], b))
                    full[ip.dim] = (max(full[ip.dim][0], c), min(full[ip.dim][1], e))
                    if any(y <= x for x, y in full):
                        continue
                    sbox = [(x, y - x) for x, y in full]
                    dbox = list(sbox)
                    sbox[tp.dim] = (full[tp.dim][0] - a + slo, sbox[tp.dim][1])
                    dbox[ip.dim] = (full[ip.dim][0] - c + dlo, dbox[ip.dim][1])
                    yield _runs(ip.name, s, d, sbox, dbox, sshape, dshape, sbase, dbase, ts, ds,
                                same, tp.dtype, ip.dtype)  # fmt: skip


def _runs(
    name: str, s: int, d: int,
    sbox: list[tuple[int, int]], dbox: list[tuple[int, int]],
    sshape: tuple[int, ...], dshape: tuple[int, ...],
    sbase: int, dbase: int, ts: int, ds: int, same: bool,
    sdt: torch.dtype, ddt: torch.dtype,
) -> Move:  # fmt: skip
    nd = len(dshape)
    # j: the outermost dim from which on every inner dim is full in the destination
    j = nd - 1
    while j > 0 and dbox[j] == (0, dshape[j]):
        j -= 1
    outer = j
    inner = 1
    for k in range(outer + 1, nd):
        inner *= dshape[k]
    run_elems = dbox[outer][1] * inner
    dstr = _strides(dshape)
    sstr = _strides(sshape)
    # every combination of the outer dims' indices, row-major
    grids = np.meshgrid(*[np.arange(st, st + n, dtype=np.int64) for st, n in dbox[:outer]],
                        indexing="ij") if outer else []  # fmt: skip
    doff = np.full(1, dbox[outer][0] * dstr[outer], np.int64)
    for k in range(outer):
        doff = doff + grids[k].reshape(-1) * dstr[k]
    dst_offsets = (dbase + doff * ds).astype(np.uint64)
    src_offsets = None
    if same and _contiguous([n for _, n in sbox[outer:]], sshape[outer:], outer_fixed=True):
        soff = np.full(1, sbox[outer][0] * sstr[outer], np.int64)
        sgr = np.meshgrid(*[np.arange(st, st + n, dtype=np.int64) for st, n in sbox[:outer]],
                          indexing="ij") if outer else []  # fmt: skip
        for k in range(outer):
            soff = soff + sgr[k].reshape(-1) * sstr[k]
        for k in range(outer + 1, nd):
            soff = soff + sbox[k][0] * sstr[k]
        src_offsets = (sbase + soff * ts).astype(np.uint64)
    return Move(name, s, d, tuple(sbox), outer, dst_offsets, run_elems * ds, src_offsets, sdt, ddt)


def _strides(shape: tuple[int, ...]) -> list[int]:
    st = [1] * len(shape)
    for k in range(len(shape) - 2, -1, -1):
        st[k] = st[k + 1] * shape[k + 1]
    return st


def _contiguous(lengths: list[int], shape: tuple[int, ...], outer_fixed: bool) -> bool:
    """A box of ``lengths`` in a tensor of ``shape`` is one contiguous byte range:
    after the first dim longer than one, every dim is whole."""
    seen = False
    for n, full in zip(lengths, shape):
        if seen and n != full:
            return False
        if n > 1:
            seen = True
    return True
