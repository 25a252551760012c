"""Suite definitions: which points each suite measures, with full and quick grids.

Sizes and iteration counts are chosen so that ``bench all`` finishes in a few
minutes on a 2-core machine: every repeat of a write stream moves about
``BYTES_PER_REP`` bytes (at least ``MIN_ITERS`` and at most ``MAX_ITERS``
operations).

Why 512 MiB: a repeat must be a stream, not a burst. With the runner's 64
lanes, 64 MiB of 1 MiB writes is one write per lane: the repeat then times
asyncio starting 64 tasks before the first post and resuming them after the
last completion (about 0.6 ms together, 10-15 % of a 5 ms repeat), which the
C loop does not have. At 512 MiB every lane streams eight writes and the
repeat measures the steady rate (benchmarks/README.md has both).
"""

from __future__ import annotations

from dataclasses import dataclass, field

KiB, MiB = 1 << 10, 1 << 20
BYTES_PER_REP = 512 * MiB
MIN_ITERS, MAX_ITERS = 4, 20000


@dataclass(frozen=True)
class Point:
    size: int
    iters: int
    pages: int = 0
    peers: int = 1
    counters: int = 1
    domains: int = 1
    workers: int = 1
    # Distinct source and destination slots the writes cycle through (1: every write
    # moves the same bytes). With several domains, each domain's receiving thread copies
    # into memory of its own instead of all of them into the same cache lines.
    slots: int = 1


# The workers suite's writes cycle through this many bytes of distinct slots: with few
# slots (8 x 64 KiB) every domain's copies pin and touch the same pages at once, and the
# pair stops at one rate whatever D is (benchmarks/README.md, "workers: distinct pages").
WORKERS_SPAN = 32 * MiB


@dataclass(frozen=True)
class Suite:
    name: str
    doc: str
    points: tuple[Point, ...]
    quick: tuple[Point, ...]
    peer_impls: bool = False  # whether peers (ucxx, gloo, zmq, ...) run it too
    reps: int = 3
    extra: dict = field(default_factory=dict)


def stream_iters(size: int, multiple: int = 1, budget: int = BYTES_PER_REP) -> int:
    n = max(MIN_ITERS, min(MAX_ITERS, budget // max(size, 1)))
    return max(multiple, n - n % multiple)


WRITE_SIZES = (8, 64, 256, KiB, 4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, MiB, 4 * MiB, 16 * MiB,
               64 * MiB, 256 * MiB)  # fmt: skip
PING_SIZES = (8, 64, 512, 4 * KiB, 32 * KiB, 256 * KiB, MiB)


def _ping_iters(size: int) -> int:
    return 2000 if size <= 4 * KiB else 300


SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        Suite(
            "write",
            "a stream of writes with immediates, 8 B to 256 MiB -> GB/s",
            tuple(Point(s, stream_iters(s)) for s in WRITE_SIZES),
            tuple(Point(s, stream_iters(s, budget=4 * MiB) // 10 or 4) for s in (8, 4 * KiB, MiB)),
            peer_impls=True,
            reps=5,  # its target is a ratio within this machine's noise: more pairs
        ),
        Suite(
            "paged",
            "write_paged of 10,000 pages (1 to 64 KiB), random page maps, strided destination",
            tuple(Point(p, 1, pages=10000) for p in (KiB, 4 * KiB, 16 * KiB, 64 * KiB)),
            (Point(4 * KiB, 1, pages=500),),
        ),
        Suite(
            "pingpong",
            "WriteImm -> counter wait -> WriteImm back: round-trip time",
            tuple(Point(s, _ping_iters(s)) for s in PING_SIZES),
            (Point(8, 100), Point(64 * KiB, 20)),
            peer_impls=True,
        ),
        Suite(
            "fanout",
            "one sender to N receivers (the weight-update shape) -> aggregate GB/s",
            tuple(Point(s, 4 * n, peers=n) for s in (MiB, 16 * MiB) for n in (1, 2, 4, 8)),
            (Point(MiB, 2 * n, peers=n) for n in (1, 2)),  # type: ignore[arg-type]
        ),
        Suite(
            "scale",
            "8-byte writes round-robin over P peers with C live counters each -> cost per op",
            # 79,872 writes (a multiple of 64) a repeat: every repeat ends with each
            # receiver acknowledging, which takes 3-10 ms with 64 receivers against
            # 0.5-1 ms with one; over ~0.4 s that tail is 1-2 % of the per-op cost,
            # over the 0.1 s of 19,968 writes it was 5-10 %.
            tuple(Point(8, 79872, peers=p, counters=c) for p in (1, 8, 64) for c in (1, 10000)),
            (Point(8, 400, peers=1), Point(8, 400, peers=4, counters=100)),
            reps=5,
        ),
        Suite(
            "workers",
            "one engine pair over D = 1, 2, 4 domains with D pinned progress workers each "
            "(a many-core machine; shm domains stand in for NICs) -> aggregate GB/s",
            tuple(
                Point(
                    s,
                    stream_iters(s, budget=4 * BYTES_PER_REP),
                    domains=d,
                    workers=d,
                    slots=max(8, WORKERS_SPAN // s),
                )
                for s in (64 * KiB, MiB)
                for d in (1, 2, 4)
            ),  # fmt: skip
            (
                Point(64 * KiB, 64, domains=1, workers=1, slots=8),
                Point(64 * KiB, 64, domains=2, workers=2, slots=8),
            ),  # fmt: skip
        ),
        Suite(
            "pairs",
            "K = 1, 2, 4, 8 independent sender/receiver process pairs at once, each pair "
            "pinned to two CPUs of its own, batch streams vs K af_indep pairs -> aggregate GB/s",
            tuple(
                Point(s, stream_iters(s), peers=k) for s in (64 * KiB, MiB) for k in (1, 2, 4, 8)
            ),
            (Point(64 * KiB, 64, peers=1),),
        ),
        Suite(
            "domains",
            "writes striped over 1, 2, 4 domains -> aggregate GB/s",
            tuple(Point(16 * MiB, 8, domains=d) for d in (1, 2, 4)),
            (Point(4 * MiB, 4, domains=d) for d in (1, 2)),  # type: ignore[arg-type]
        ),
    )
}
# generators above are materialized here so the dataclasses hold tuples
for _k, _s in list(SUITES.items()):
    object.__setattr__(_s, "quick", tuple(_s.quick))

ORDER = ("write", "paged", "pingpong", "fanout", "scale", "domains", "workers", "pairs")


def select(names: list[str] | tuple[str, ...]) -> list[str]:
    """Expand ``all`` and check names; keeps the canonical order, no duplicates."""
    if not names:
        raise ValueError(f"name a suite ({', '.join(ORDER)}) or 'all'")
    want: set[str] = set()
    for n in names:
        if n == "all":
            want.update(ORDER)
        elif n in SUITES:
            want.add(n)
        else:
            raise ValueError(f"unknown suite {n!r}; choose from {', '.join(ORDER)} or 'all'")
    return [n for n in ORDER if n in want]


def points(
    name: str,
    quick: bool,
    sizes: list[int] | None = None,
    iters: int | None = None,
    budget: int | None = None,
) -> list[Point]:
    """The suite's points; ``budget``: bytes per repeat of a write stream (faster paths)."""
    s = SUITES[name]
    pts = list(s.quick if quick else s.points)
    if budget and name == "write" and not sizes:
        pts = [Point(p.size, stream_iters(p.size, budget=budget)) for p in pts]
    if sizes:
        base = pts[0]
        pts = [
            Point(z, stream_iters(z, budget=budget or BYTES_PER_REP) if name == "write"
                  else base.iters, base.pages, p.peers,
                  p.counters, p.domains, p.workers)
            for z in sizes
            for p in {(q.peers, q.counters, q.domains, q.workers): q for q in pts}.values()
        ]  # fmt: skip
    if iters:
        pts = [Point(p.size, iters - iters % p.peers or p.peers, p.pages, p.peers, p.counters,
                     p.domains, p.workers) for p in pts]  # fmt: skip
    return pts
