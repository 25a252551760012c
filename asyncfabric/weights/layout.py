"""Parameter layouts: each parameter's name, shape, dtype and how it is sharded over ranks.

A shard is what one rank holds of a parameter: the concatenation, along one
dimension, of one or more ranges of the full tensor. That one form covers an
even split over ranks (FSDP-style, dim 0), Megatron column parallel (dim 0 of
an ``nn.Linear`` weight), row parallel (dim 1), fused column parallel (q/k/v or
gate/up: each fused block split over the ranks, a rank holding its part of
every block), and replication (every rank holds the whole tensor).

Each rank keeps its shards packed in one flat buffer, in layout order, each
shard starting on a 64-byte boundary: that buffer is what a receiver registers
and what the plan's byte offsets point into.

A parameter declared ``torch.float8_e4m3fn`` (inference side) gets a scale parameter
of its own right after it: ``name + "_scale"``, a 0-dim float32 on every rank (see
:mod:`asyncfabric.weights.fp8`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

import asyncfabric as af

from . import fp8
from .errors import LayoutError

ALIGN = 64
"""Every shard starts at a multiple of this many bytes of its rank's buffer."""

Ranges = tuple[tuple[int, int], ...]


class Spec:
    """How a parameter is sharded; resolved against its shape and the world size."""

    def pieces(
        self, name: str, shape: tuple[int, ...], world: int
    ) -> tuple[int, tuple[Ranges, ...]]:
        """``(dim, per-rank ranges along dim)``; raises :class:`LayoutError` naming ``name``."""
        raise NotImplementedError


@dataclass(frozen=True)
class Replicated(Spec):
    """Every rank holds the whole tensor (norms, small biases)."""

    def pieces(
        self, name: str, shape: tuple[int, ...], world: int
    ) -> tuple[int, tuple[Ranges, ...]]:
        n = shape[0] if shape else 1
        return 0, tuple(((0, n),) for _ in range(world))


@dataclass(frozen=True)
class Split(Spec):
    """Dim ``dim`` cut into ``world`` consecutive parts (uneven sizes allowed, as
    ``torch.tensor_split`` cuts: the first ``size % world`` parts one longer).

    ``fused``: the sizes of blocks fused along ``dim`` (q, k, v or gate, up); each
    block is cut into ``world`` equal parts and a rank holds its part of every
    block, in block order. Fused and ``exact=True`` splits must divide evenly."""

    dim: int = 0
    fused: tuple[int, ...] | None = None
    exact: bool = False

    def pieces(
        self, name: str, shape: tuple[int, ...], world: int
    ) -> tuple[int, tuple[Ranges, ...]]:
        if not 0 <= self.dim < len(shape):
            raise LayoutError(
                f"parameter {name!r}: split dim {self.dim} does not exist in shape {shape}; "
                "give a dim of the tensor"
            )
        size = shape[self.dim]
        blocks = self.fused if self.fused is not None else (size,)
        if sum(blocks) != size:
            raise LayoutError(
                f"parameter {name!r}: fused blocks {blocks} add up to {sum(blocks)}, not to "
                f"dim {self.dim}'s size {size}; give the block sizes of the fused tensor"
            )
        exact = self.exact or self.fused is not None
        per: list[list[tuple[int, int]]] = [[] for _ in range(world)]
        base = 0
        for b in blocks:
            if exact and b % world:
                raise LayoutError(
                    f"parameter {name!r}: a block of {b} along dim {self.dim} does not divide "
                    f"over {world} ranks; tensor parallelism needs sizes divisible by the degree"
                )
            q, rem = divmod(b, world)
            lo = base
            for r in range(world):
                n = q + (1 if r < rem else 0)
                per[r].append((lo, lo + n))
                lo += n
            base += b
        return self.dim, tuple(tuple(p) for p in per)


def column(fused: Sequence[int] | None = None) -> Split:
    """Megatron column parallel (``nn.Linear`` weight dim 0, the output features)."""
    return Split(0, tuple(fused) if fused is not None else None, exact=True)


def row() -> Split:
    """Megatron row parallel (``nn.Linear`` weight dim 1, the input features)."""
    return Split(1, exact=True)


@dataclass(frozen=True)
class Pieces(Spec):
    """Explicit shards: rank ``r`` holds the ranges ``per_rank[r]`` of dim ``dim``,
    concatenated. The ranges of all ranks must tile the dimension exactly once."""

    dim: int
    per_rank: tuple[Ranges, ...]

    def pieces(
        self, name: str, shape: tuple[int, ...], world: int
    ) -> tuple[int, tuple[Ranges, ...]]:
        if len(self.per_rank) != world:
            raise LayoutError(
                f"parameter {name!r}: pieces name {len(self.per_rank)} ranks but the layout has "
                f"{world}; give one tuple of ranges per rank"
            )
        if not 0 <= self.dim < len(shape):
            raise LayoutError(f"parameter {name!r}: dim {self.dim} does not exist in shape {shape}")
        return self.dim, tuple(tuple((int(a), int(b)) for a, b in rs) for rs in self.per_rank)


@dataclass(frozen=True)
class Param:
    """One parameter of a layout, resolved: where each rank's shard comes from."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    dim: int
    ranks: tuple[Ranges, ...]
    replicated: bool
    scale_of: str | None = None
    """For a per-tensor fp8 scale: the name of the parameter it scales."""

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def local_shape(self, rank: int) -> tuple[int, ...]:
        if not self.shape:
            return ()
        s = list(self.shape)
        s[self.dim] = sum(b - a for a, b in self.ranks[rank])
        return tuple(s)

    def numel(self, rank: int) -> int:
        n = 1
        for x in self.local_shape(rank):
            n *= x
        return n


class Layout:
    """The parameters of a model as ``world`` ranks hold them (trainer or inference side).

    ``params``: ``(name, shape, dtype, spec)`` in order. Raises :class:`LayoutError`
    (naming the parameter) when a spec does not tile its tensor."""

    def __init__(
        self, world: int, params: Iterable[tuple[str, Sequence[int], torch.dtype, Spec]]
    ) -> None:
        if isinstance(world, bool) or not isinstance(world, int) or world < 1:
            raise LayoutError(f"a layout needs world >= 1 ranks, got {world!r}")
        self.world = world
        self.params: dict[str, Param] = {}
        for name, shape, dtype, spec in params:
            if name in self.params:
                raise LayoutError(f"parameter {name!r} appears twice; names must be unique")
            if not isinstance(dtype, torch.dtype):
                raise LayoutError(f"parameter {name!r}: dtype must be a torch.dtype, got {dtype!r}")
            if not isinstance(spec, Spec):
                raise LayoutError(
                    f"parameter {name!r}: spec must be Split, Replicated, Pieces (or column()/"
                    f"row()), got {spec!r}"
                )
            if fp8.is_fp8(dtype) and dtype != fp8.E4M3:
                raise LayoutError(
                    f"parameter {name!r}: {dtype} is not supported; the fp8 format sent is "
                    "torch.float8_e4m3fn with a per-tensor scale"
                )
            shp = tuple(int(x) for x in shape)
            if any(x < 0 for x in shp):
                raise LayoutError(f"parameter {name!r}: negative size in shape {shp}")
            dim, ranks = spec.pieces(name, shp, world)
            rep = isinstance(spec, Replicated)
            if not rep:
                _check_tiles(name, shp[dim] if shp else 1, dim, ranks)
            self.params[name] = Param(name, shp, dtype, dim, ranks, rep)
            if dtype == fp8.E4M3:
                sname = name + fp8.SCALE_SUFFIX
                if sname in self.params:
                    raise LayoutError(
                        f"parameter {sname!r} appears twice: it is the scale of the fp8 "
                        f"parameter {name!r}; rename the other one"
                    )
                one = tuple(((0, 1),) for _ in range(world))
                self.params[sname] = Param(sname, (), torch.float32, 0, one, True, name)
        self._offsets: list[dict[str, int]] = []
        self._nbytes: list[int] = []
        for r in range(world):
            off, offs = 0, {}
            for p in self.params.values():
                offs[p.name] = off
                off += -(-p.numel(r) * p.itemsize // ALIGN) * ALIGN
            self._offsets.append(offs)
            self._nbytes.append(off)
        self.fp8: tuple[str, ...] = tuple(
            p.name for p in self.params.values() if p.dtype == fp8.E4M3
        )
        """The parameters held as fp8 (e4m3, per-tensor scale), in layout order."""
        h = hashlib.sha256(repr(world).encode())
        for p in self.params.values():
            h.update(repr((p.name, p.shape, str(p.dtype), p.dim, p.ranks, p.replicated)).encode())
        self.key = h.hexdigest()[:16]
        """A fingerprint: equal layouts have equal keys (plans are cached by it)."""

    @classmethod
    def of(
        cls,
        tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
        world: int,
        rule: Callable[[str, tuple[int, ...]], Spec],
        *,
        dtype: torch.dtype | Callable[[str, tuple[int, ...]], torch.dtype] | None = None,
    ) -> Layout:
        """A layout of full tensors (``model.named_parameters()`` or a state dict):
        ``rule(name, shape)`` gives each one's spec; ``dtype`` overrides theirs (a dtype,
        or ``dtype(name, shape)`` per parameter, e.g. fp8 for the linear weights only)."""
        items = tensors.items() if isinstance(tensors, Mapping) else tensors

        def dt(n: str, t: torch.Tensor) -> torch.dtype:
            if dtype is None:
                return t.dtype
            return dtype if isinstance(dtype, torch.dtype) else dtype(n, tuple(t.shape))

        return cls(
            world,
            [(n, tuple(t.shape), dt(n, t), rule(n, tuple(t.shape))) for n, t in items],
        )

    def __repr__(self) -> str:
        return f"<Layout {self.key}: {len(self.params)} params over {self.world} ranks>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)

    def nbytes(self, rank: int) -> int:
        """Bytes of ``rank``'s buffer (its shards, each 64-byte aligned)."""
        return self._nbytes[self._rank(rank)]

    def offset(self, name: str, rank: int) -> int:
        """Where parameter ``name``'s shard starts in ``rank``'s buffer."""
        return self._offsets[self._rank(rank)][self.param(name).name]

    def param(self, name: str) -> Param:
        try:
            return self.params[name]
        except KeyError:
            raise LayoutError(f"no parameter {name!r} in this layout") from None

    def alloc(self, rank: int, device: Any = "cpu") -> torch.Tensor:
        """A zeroed flat uint8 buffer for ``rank``'s shards (host memory on huge
        pages: :func:`asyncfabric.host_zeros`)."""
        buf: torch.Tensor = af.host_zeros(self.nbytes(rank), torch.uint8, device)
        return buf

    def views(self, buf: torch.Tensor, rank: int) -> dict[str, torch.Tensor]:
        """Typed views of each shard in ``buf`` (a buffer from :meth:`alloc`)."""
        r = self._rank(rank)
        if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() < self.nbytes(r):
            raise LayoutError(
                f"rank {r}'s buffer must be a flat uint8 tensor of {self.nbytes(r)} bytes "
                f"(layout.alloc(rank)), got {tuple(buf.shape)} {buf.dtype}"
            )
        out = {}
        for p in self.params.values():
            off = self._offsets[r][p.name]
            n = p.numel(r) * p.itemsize
            out[p.name] = buf[off : off + n].view(p.dtype).view(p.local_shape(r))
        return out

    def shard(self, name: str, full: torch.Tensor, rank: int) -> torch.Tensor:
        """``rank``'s shard of the full tensor ``full`` (the reference: a new tensor)."""
        p = self.param(name)
        if tuple(full.shape) != p.shape:
            raise LayoutError(f"parameter {name!r}: full tensor {tuple(full.shape)} != {p.shape}")
        if not p.shape:
            return full.clone()
        parts = [full.narrow(p.dim, a, b - a) for a, b in p.ranks[self._rank(rank)]]
        return torch.cat(parts, dim=p.dim) if len(parts) > 1 else parts[0].clone()

    def fill(self, buf: torch.Tensor, rank: int, full: Mapping[str, torch.Tensor]) -> None:
        """Write ``rank``'s shards of the full tensors ``full`` into ``buf`` (cast to
        the layout's dtypes)."""
        views = self.views(buf, rank)
        for name, v in views.items():
            if name not in full:
                p = self.params[name]
                what = (f" (the scale of fp8 parameter {p.scale_of!r}: give it as a 0-dim "
                        "float32 beside the fp8 tensor)" if p.scale_of else "")  # fmt: skip
                raise LayoutError(f"parameter {name!r} is missing from the tensors given{what}")
            v.copy_(self.shard(name, full[name].to(v.device), rank))

    def assemble(self, name: str, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        """The full tensor from every rank's shard (inverse of :meth:`shard`)."""
        p = self.param(name)
        if len(shards) != self.world:
            raise LayoutError(f"parameter {name!r}: {len(shards)} shards for {self.world} ranks")
        if p.replicated or not p.shape:
            return shards[0].clone()
        out = torch.empty(p.shape, dtype=shards[0].dtype, device=shards[0].device)
        for r, sh in enumerate(shards):
            lo = 0
            for a, b in p.ranks[r]:
                out.narrow(p.dim, a, b - a).copy_(sh.narrow(p.dim, lo, b - a))
                lo += b - a
        return out

    def _rank(self, rank: int) -> int:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world:
            raise LayoutError(f"rank {rank!r} is not in 0..{self.world - 1}")
        return rank


def _check_tiles(name: str, size: int, dim: int, ranks: tuple[Ranges, ...]) -> None:
    """The ranges of all ranks cover ``[0, size)`` exactly once."""
    spans = sorted((a, b, r) for r, rs in enumerate(ranks) for a, b in rs)
    pos = 0
    for a, b, r in spans:
        if a < 0 or b < a or b > size:
            raise LayoutError(
                f"parameter {name!r}: rank {r}'s range [{a}, {b}) of dim {dim} is outside "
                f"[0, {size}); the shard spec does not tile the tensor"
            )
        if a != pos:
            what = "overlaps another" if a < pos else f"leaves [{pos}, {a}) to no rank"
            raise LayoutError(
                f"parameter {name!r}: along dim {dim}, rank {r}'s range [{a}, {b}) {what}; "
                "the shard spec does not tile the tensor"
            )
        pos = b
    if pos != size:
        raise LayoutError(
            f"parameter {name!r}: along dim {dim}, [{pos}, {size}) belongs to no rank; the "
            "shard spec does not tile the tensor"
        )
