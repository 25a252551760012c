"""Where each row goes: routing by top-k expert ids and the receive layouts, as torch ops.

Words used here: ``W`` ranks, ``E`` experts, ``El = E // W`` experts per rank (rank ``d``
holds experts ``d*El .. (d+1)*El - 1``), ``C[s, g]``: how many rows source rank ``s``
sends to expert ``g``. A *row* is one (token, expert) pair. Every rank knows its own row
``C[r]`` after routing and every row of ``C`` after the counts arrive, so all positions
below are computed on both sides of a write and never sent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Route:
    """A source rank's routing of one batch: its rows in send order."""

    order: torch.Tensor  # [T*k] int64: send position -> flat (token*k + j) index
    back: torch.Tensor  # [T*k] int64: flat (token*k + j) index -> send position
    tokens: torch.Tensor  # [T*k] int64: send position -> token
    counts: torch.Tensor  # [E] int64 (CPU): rows per expert, C[r]
    dest_rows: list[int]  # rows per destination rank
    dest_off: list[int]  # first send position of each destination rank


def route(topk_idx: torch.Tensor, num_experts: int, world: int) -> Route:
    """Sort this rank's (token, expert) pairs by expert id; destination ranks follow, since
    experts are partitioned in rank order. A stable sort keeps each expert's tokens in
    token order, which is what makes the result independent of arrival order."""
    k = topk_idx.shape[1]
    flat = topk_idx.reshape(-1).to(torch.int64)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).cpu()
    per_dest = counts.view(world, -1).sum(1)
    off = torch.cumsum(per_dest, 0) - per_dest
    return Route(order, _inverse(order), order // k, counts, per_dest.tolist(), off.tolist())


def _inverse(p: torch.Tensor) -> torch.Tensor:
    # Gathers with the inverse are several times cheaper than scatters with ``p`` on CPU.
    inv = torch.empty_like(p)
    inv[p] = torch.arange(p.numel(), dtype=p.dtype, device=p.device)
    return inv


def _excl(x: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.cumsum(x, dim) - x


@dataclass(frozen=True)
class RecvLayout:
    """What rank ``r`` receives, from the full count matrix."""

    rows: int  # N: rows received in all
    expert_counts: list[int]  # [El] rows per local expert
    src_rows: list[int]  # [W] rows from each source
    src_off: list[int]  # [W] where each source's rows start in the packed source-major order
    # send position (in source s's own order) of this rank's first row: where combine writes
    back_off: list[int]
    sm_to_em: torch.Tensor  # [N] packed source-major index -> expert-major index
    em_to_slot: torch.Tensor | None  # [N] expert-major index -> fixed-slot index (low-latency)


def recv_layout(C: torch.Tensor, rank: int, slot_rows: int | None) -> RecvLayout:
    """Rows arrive from each source sorted by expert; users want them grouped by expert
    (all sources of expert 0, then expert 1, ...). Maps between the two orders:
    packed source-major (how combine sends them back), fixed slots per source
    (low-latency arena, ``slot_rows`` each) and expert-major (what dispatch returns)."""
    W, E = C.shape
    El = E // W
    Cl = C[:, rank * El : (rank + 1) * El]  # [W, El]
    src_rows = Cl.sum(1)
    src_off = _excl(src_rows, 0)
    within = _excl(Cl, 1)  # [W, El]: start of (s, e) inside source s's rows
    lengths = Cl.t().reshape(-1)  # blocks in expert-major order: (e, s)
    n = int(lengths.sum())
    em_start = _excl(lengths, 0)
    step = torch.arange(n, dtype=torch.int64) - torch.repeat_interleave(em_start, lengths)
    sm_start = (src_off[:, None] + within).t().reshape(-1)
    em_to_sm = torch.repeat_interleave(sm_start, lengths) + step
    em_to_slot = None
    if slot_rows is not None:
        slot_start = (torch.arange(W, dtype=torch.int64)[:, None] * slot_rows + within).t()
        em_to_slot = torch.repeat_interleave(slot_start.reshape(-1), lengths) + step
    back = C[:, : rank * El].sum(1)
    return RecvLayout(
        n,
        Cl.sum(0).tolist(),
        src_rows.tolist(),
        src_off.tolist(),
        back.tolist(),
        _inverse(em_to_sm),
        em_to_slot,
    )


def packed_targets(C: torch.Tensor, rank: int, dest: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High-throughput mode: for each of ``dest``'s experts, where rank ``rank``'s run of
    rows starts in its send order and in ``dest``'s expert-major arena, and how long it is.
    Returns ``(starts [El, 2]: send position, arena position), lengths [El]``."""
    W, E = C.shape
    El = E // W
    Cd = C[:, dest * El : (dest + 1) * El]  # [W, El]
    lengths_em = Cd.t().reshape(-1)  # (e, s) blocks
    em_start = _excl(lengths_em, 0).view(El, W)[:, rank]
    mine = Cd[rank]
    send_start = int(C[rank, : dest * El].sum()) + _excl(mine, 0)
    return torch.stack([send_start, em_start], 1), mine


def weighted_sum(y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``y`` [T, k, H] expert outputs, ``weights`` [T, k]: each token's weighted sum over its
    top-k, accumulated in fp32 and returned in ``y``'s dtype. One batched matmul, so each
    token's sum does not depend on the other tokens (combine and the reference agree)."""
    out = torch.bmm(weights.float().unsqueeze(1), y.float()).squeeze(1)
    return out.to(y.dtype)
