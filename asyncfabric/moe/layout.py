"""Where each row goes: routing by top-k expert ids and the receive layouts, as torch ops.

Words used here: ``W`` ranks, ``E`` experts, ``El = E // W`` experts per rank (rank ``d``
holds experts ``d*El .. (d+1)*El - 1``), ``C[s, g]``: how many rows source rank ``s``
sends to expert ``g``. A *row* is one (token, expert) pair. Every rank knows its own row
``C[r]`` after routing and every row of ``C`` after the counts arrive, so all positions
below are computed on both sides of a write and never sent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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
    top-k, accumulated in fp32 and returned in ``y``'s dtype. Batched matmuls, so each
    token's sum does not depend on the other tokens (combine and the reference agree).

    On CPU a block of tokens at a time (about 4 MiB of fp32), so the fp32 copy stays in
    cache: one batch over all of them took 4x as long (9 ms against 2 at 128 x 8 x 7168,
    one process). Gathering each block's rows just before its matmul (instead of all rows
    first) was slower again with two ranks sharing the two cores (bench moe, EP 2)."""
    T, k, H = y.shape
    w = weights.float().unsqueeze(1)
    if y.device.type != "cpu":
        return torch.bmm(w, y.float()).squeeze(1).to(y.dtype)
    out = torch.empty(T, H, dtype=y.dtype, device=y.device)
    step = max(1, (1 << 20) // max(1, k * H))
    for lo in range(0, T, step):
        hi = min(T, lo + step)
        out[lo:hi] = torch.bmm(w[lo:hi], y[lo:hi].float()).squeeze(1)
    return out


def token_runs(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct token ids as runs of consecutive ids: ``(starts, lengths)``. A
    low-latency source writes each run in one entry (rows are indexed by token on both
    sides), and its receiver derives the same runs from the same ids to know what it is owed."""
    if not tokens.size:
        return tokens[:0], tokens[:0]
    brk = np.flatnonzero(np.diff(tokens) != 1) + 1
    starts = tokens[np.concatenate(([0], brk))]
    ends = np.concatenate((brk, [tokens.size]))
    return starts, np.diff(np.concatenate(([0], ends)))


def ll_layout(
    counts: np.ndarray, flats: list[np.ndarray], back_off: list[int], topk: int, max_tokens: int
) -> RecvLayout:
    """Low-latency receive side. ``counts[s, e]``: rows source ``s`` sends to local expert
    ``e``; ``flats[s]``: their flat (token * topk + j) indices in the source's send order
    (by expert, then token); ``back_off[s]``: where that run starts in the source's send
    order. Source-major order is the sources' rows one after the other; expert-major
    order is expert, then source, then the source's order (a stable sort keeps it). The
    arena holds a source's token ``t`` at row ``s * max_tokens + t``."""
    W, El = counts.shape
    n = counts.sum(1)
    N = int(n.sum())
    src_off = np.cumsum(n) - n
    z = torch.zeros(0, dtype=torch.int64)
    if not N:
        return RecvLayout(0, [0] * El, n.tolist(), src_off.tolist(), back_off, z, z)
    flat = np.concatenate(flats)
    src = np.repeat(np.arange(W, dtype=np.int64), n)
    exp = np.concatenate([np.repeat(np.arange(El, dtype=np.int64), c) for c in counts])
    em_to_sm = np.argsort(exp * W + src, kind="stable")
    slot = src[em_to_sm] * max_tokens + flat[em_to_sm] // topk
    sm_to_em = np.empty_like(em_to_sm)
    sm_to_em[em_to_sm] = np.arange(N)
    return RecvLayout(N, counts.sum(0).tolist(), n.tolist(), src_off.tolist(), back_off,
                      torch.from_numpy(sm_to_em), torch.from_numpy(slot))  # fmt: skip


# ---------------------------------------------------------------- pre-reduced combine
#
# With ``combine="reduced"`` each rank sends a source one row per token that has experts on
# it (its *partial*), not one per (token, expert). The order of every fp32 operation is
# fixed, so the result does not depend on arrival order or batch composition:
#
#   partial[d, t] = w[t, j1] * y[t, j1]            (fp32; j1 < j2 < ... the top-k slots of t
#   partial[d, t] = partial[d, t] + w[t, j] * y[t, j]    whose experts live on rank d)
#   out[t] = 0; out[t] = out[t] + partial[d, t]  for d = 0, 1, ... W-1 holding any of them
#
# each product and sum rounded to fp32 (no fused multiply-add), the partial rounded to the
# wire dtype and read back as fp32 before the source's sums, ``out`` cast to the group's
# dtype at the end. Partial rows go in *partial order*: tokens by how many of their rows the
# rank holds (most first), ties by token id, so slot i of the loop above is a prefix of
# the rows; both sides derive that order from the same rows.


def partial_tokens(flat: np.ndarray, topk: int) -> tuple[np.ndarray, np.ndarray]:
    """``flat``: flat (token * topk + j) indices of the rows one source sends one rank.
    Returns the tokens in partial order and their row counts there (same order)."""
    tok, cnt = np.unique(flat // topk, return_counts=True)
    perm = np.argsort(-cnt, kind="stable")
    return tok[perm], cnt[perm]


@dataclass(frozen=True)
class Reduction:
    """How a rank computes one source's partials: slot ``i`` adds ``weights[i, p] *
    y[rows[i, p]]`` to partial ``p`` for ``p < prefix[i]`` (``prefix`` non-increasing,
    ``prefix[0]`` = the number of partials)."""

    prefix: list[int]
    rows: torch.Tensor  # [m, n] int64: row of expert_out (expert-major index)
    weights: torch.Tensor  # [m, n] fp32, [:, None]-ready


def reduction(flat: np.ndarray, w: np.ndarray, em: np.ndarray, topk: int) -> Reduction:
    """``flat``, ``w``, ``em``: one source's rows on this rank in its send order: flat index,
    router weight (fp32), expert-major index into what dispatch returned."""
    n = flat.size
    if not n:
        z = torch.zeros(0, 0)
        return Reduction([], z.long(), z)
    so = np.argsort(flat, kind="stable")  # by token, then top-k slot j: the sum's order
    tok = flat[so] // topk
    _, start, cnt = np.unique(tok, return_index=True, return_counts=True)
    perm = np.argsort(-cnt, kind="stable")
    pos = np.empty_like(perm)
    pos[perm] = np.arange(perm.size)
    ordinal = np.arange(n) - np.repeat(start, cnt)
    col = np.repeat(pos, cnt)
    m = int(cnt.max())
    rows = np.zeros((m, perm.size), dtype=np.int64)
    wts = np.zeros((m, perm.size), dtype=np.float32)
    rows[ordinal, col] = em[so]
    wts[ordinal, col] = w[so]
    prefix = (cnt[None, :] > np.arange(m)[:, None]).sum(1).tolist()
    return Reduction(prefix, torch.from_numpy(rows), torch.from_numpy(wts).unsqueeze(2))


def reduce_rows(
    y: torch.Tensor,
    red: Reduction,
    out: torch.Tensor,
    acc: torch.Tensor,
    tmp: torch.Tensor,
    rows: torch.Tensor,
) -> None:
    """One source's partials into ``out[:n]`` (its wire dtype), in the order above.
    ``acc``, ``tmp``: fp32 scratch of ``block`` rows (``acc`` unused when ``out`` is fp32),
    ``rows``: the same in ``y``'s dtype; a block of partials at a time, so the fp32 rows
    stay in cache. Gather, convert, multiply in place: on CPU a mixed-dtype ``torch.mul``
    took 1.3-1.6x as long (bench moe, EP 2 and 4, one rank's partials)."""
    n = red.prefix[0] if red.prefix else 0
    block = tmp.shape[0]
    direct = out.dtype == torch.float32
    for a in range(0, n, block):
        b = min(n, a + block)
        dst = out[a:b] if direct else acc[: b - a]
        for i, p in enumerate(red.prefix):
            hi = min(b, p)
            if hi <= a:
                break
            g = rows[: hi - a]
            torch.index_select(y, 0, red.rows[i, a:hi], out=g)
            t = dst if i == 0 else tmp[: hi - a]
            t.copy_(g)  # exact: bf16/fp16 -> fp32
            t.mul_(red.weights[i, a:hi])
            if i:
                dst[: hi - a].add_(t)
        if not direct:
            out[a:b].copy_(dst)
