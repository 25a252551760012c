"""The result schema: one row per (suite, impl, point), written as JSON and CSV.

Units: ``gbps`` is 10^9 bytes per second (not bits); latencies are microseconds.
``ratio_vs_raw`` compares a row with the raw C baseline of the same point, so
that 1.0 means "as fast as raw": throughput / raw throughput for bandwidth
suites, raw latency / latency for ``pingpong``. ``ratio_vs_independent`` is the
same against the ``independent`` row (af_indep.c, libfabric alone), for every
other row of the point, raw's included.
"""

from __future__ import annotations

import csv
import json
import math
import platform
import statistics
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

SCHEMA = "asyncfabric.bench/1"
IMPLS = (
    "asyncfabric",
    "batch",
    "raw",
    "independent",
    "ucxx",
    "nixl",
    "nixl64",
    "mooncake",
    "gloo",
    "zmq",
    "torch_copy",
)

# (name, type, meaning); the order is the CSV column order.
FIELDS: tuple[tuple[str, type, str], ...] = (
    ("suite", str, "write, paged, pingpong, fanout, scale or domains"),
    (
        "impl",
        str,
        "asyncfabric, raw, independent (af_indep.c: a C program on libfabric alone, the "
        "bar), ucxx, nixl (NIXL, one descriptor a WRITE transfer), nixl64 (NIXL, "
        "64 descriptors a transfer), mooncake (Mooncake Transfer Engine), gloo, zmq, or "
        "torch_copy (CUDA: torch's own copy between the same devices in one process, the "
        "baseline of --device cuda rows)",
    ),
    ("backend", str, "transport under the impl (libfabric, ucx, mooncake, gloo, zmq)"),
    ("provider", str, "provider or transport (shm, tcp, ipc, ...)"),
    ("size_bytes", int, "bytes per write (per page for paged)"),
    ("pages", int, "pages per paged write (0 otherwise)"),
    ("peers", int, "receiving peers"),
    ("counters", int, "live counters per receiving engine"),
    ("domains", int, "domains striped over"),
    ("workers", int, "progress workers per engine (each owns domains / workers domains)"),
    ("iters", int, "operations per repeat"),
    ("repeats", int, "timed repeats (after warm-up)"),
    ("gbps", float, "median over repeats, 10^9 bytes/s"),
    ("gbps_low", float, "1st percentile over repeats (the slow tail), 10^9 bytes/s"),
    (
        "ops_per_s",
        float,
        "median over repeats: writes/s (pages/s for paged, round trips/s for pingpong)",
    ),
    ("lat_p50_us", float, "pingpong: RTT median; others: time per operation, median over repeats"),
    ("lat_p99_us", float, "pingpong: RTT p99; others: time per operation, p99 over repeats"),
    (
        "ratio_vs_raw",
        float,
        "vs the raw C baseline of the same point (1.0 = as fast), or vs torch_copy where "
        "there is no raw row (--device cuda); None for the baselines",
    ),
    (
        "ratio_vs_independent",
        float,
        "vs the independent libfabric-only baseline of the same point (1.0 = as fast; "
        "write and pingpong); None for independent rows and where it did not run",
    ),
    ("policy", str, "progress policy of the engines (asyncfabric and raw)"),
    (
        "device",
        str,
        "where the buffers live: cpu, or SENDER->RECEIVER and the CUDA path "
        "(cuda:0->cuda:1 nvlink / staged / direct)",
    ),
)
FIELD_NAMES = tuple(f[0] for f in FIELDS)
REQUIRED = [
    "suite",
    "impl",
    "backend",
    "provider",
    "size_bytes",
    "pages",
    "peers",
    "domains",
    "iters",
    "gbps",
    "ops_per_s",
    "lat_p50_us",
    "lat_p99_us",
    "ratio_vs_raw",
]


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    if not values:
        return math.nan
    v = sorted(values)
    k = (len(v) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def make_row(
    *,
    suite: str,
    impl: str,
    backend: str,
    provider: str,
    size_bytes: int,
    iters: int,
    times_ns: Sequence[int],
    bytes_per_rep: int,
    ops_per_rep: int,
    pages: int = 0,
    peers: int = 1,
    counters: int = 1,
    domains: int = 1,
    workers: int = 1,
    rtts_ns: Sequence[int] | None = None,
    policy: str = "",
    device: str = "cpu",
) -> dict[str, Any]:
    """Build a row from per-repeat durations (and, for pingpong, every round trip)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if not times_ns:
        raise ValueError("no timed repeats to summarize")
    secs = [max(t, 1) / 1e9 for t in times_ns]
    gbps = [bytes_per_rep / s / 1e9 for s in secs]
    ops = [ops_per_rep / s for s in secs]
    if rtts_ns:
        us = [r / 1e3 for r in rtts_ns]
    else:
        us = [s * 1e6 / max(ops_per_rep, 1) for s in secs]
    return {
        "suite": suite,
        "impl": impl,
        "backend": backend,
        "provider": provider,
        "size_bytes": int(size_bytes),
        "pages": int(pages),
        "peers": int(peers),
        "counters": int(counters),
        "domains": int(domains),
        "workers": int(workers),
        "iters": int(iters),
        "repeats": len(times_ns),
        "gbps": statistics.median(gbps),
        "gbps_low": percentile(gbps, 1),
        "ops_per_s": statistics.median(ops),
        "lat_p50_us": percentile(us, 50),
        "lat_p99_us": percentile(us, 99),
        "ratio_vs_raw": None,
        "ratio_vs_independent": None,
        "policy": policy,
        "device": device,
    }


def point_key(row: dict[str, Any]) -> tuple:
    return tuple(
        row.get(k, 1 if k == "workers" else "cpu")
        for k in ("suite", "provider", "size_bytes", "pages", "peers", "counters", "domains",
                  "workers", "device")
    )  # fmt: skip


BASELINES = ("raw", "torch_copy", "independent")


def _ratio(row: dict[str, Any], base: dict[str, Any]) -> float | None:
    if row["suite"] == "pingpong":
        return base["lat_p50_us"] / row["lat_p50_us"] if row["lat_p50_us"] else None
    return row["ops_per_s"] / base["ops_per_s"] if base["ops_per_s"] else None


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Fill ratio_vs_raw of every non-baseline row whose point has a raw (else torch_copy) row,
    and ratio_vs_independent of every row but the independent one where the point has one."""
    indep = {point_key(r): r for r in rows if r["impl"] == "independent"}
    for r in rows:
        ib = indep.get(point_key(r))
        r["ratio_vs_independent"] = (
            _ratio(r, ib) if ib is not None and r["impl"] != "independent" else None
        )
    raw = {point_key(r): r for r in rows if r["impl"] == "raw"}
    copy = {point_key(r): r for r in rows if r["impl"] == "torch_copy"}
    for r in rows:
        if r["impl"] in BASELINES:
            r["ratio_vs_raw"] = None
            continue
        base = raw.get(point_key(r)) or copy.get(point_key(r))
        if base is None:
            continue
        if r["suite"] == "pingpong":
            r["ratio_vs_raw"] = base["lat_p50_us"] / r["lat_p50_us"] if r["lat_p50_us"] else None
        else:
            r["ratio_vs_raw"] = r["ops_per_s"] / base["ops_per_s"] if base["ops_per_s"] else None


def validate_row(row: dict[str, Any]) -> None:
    """Raise ValueError naming what is wrong with a row."""
    missing = [k for k in REQUIRED if k not in row]
    if missing:
        raise ValueError(f"row lacks fields {missing}")
    for name, typ, _ in FIELDS:
        if name not in row:
            continue
        v = row[name]
        if v is None and name in ("ratio_vs_raw", "ratio_vs_independent"):
            continue
        if typ is float and isinstance(v, (int, float)) and not isinstance(v, bool):
            continue
        if not isinstance(v, typ) or isinstance(v, bool):
            raise ValueError(f"field {name} should be {typ.__name__}, got {v!r}")
    if row["impl"] not in IMPLS:
        raise ValueError(f"impl {row['impl']!r} is not one of {IMPLS}")


def meta(argv: Iterable[str] | None = None) -> dict[str, Any]:
    import os

    try:
        load = os.getloadavg()
    except OSError:
        load = (math.nan,) * 3
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "host": platform.node(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_at_start": list(load),
        "argv": list(argv or []),
    }


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_json(
    path: str | Path,
    rows: list[dict[str, Any]],
    skipped: list[dict[str, str]],
    info: dict[str, Any],
) -> None:
    doc = {
        "schema": SCHEMA,
        "meta": info,
        "fields": {n: d for n, _, d in FIELDS},
        "rows": [{k: _clean(r.get(k)) for k in FIELD_NAMES} for r in rows],
        "skipped": skipped,
    }
    Path(path).write_text(json.dumps(doc, indent=1))


def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(FIELD_NAMES))
        w.writeheader()
        for r in rows:
            w.writerow({k: _clean(r.get(k)) for k in FIELD_NAMES})


def read_json(path: str | Path) -> dict[str, Any]:
    doc = json.loads(Path(path).read_text())
    if doc.get("schema") != SCHEMA:
        raise ValueError(
            f"{path} is not an asyncfabric bench result (schema {doc.get('schema')!r})"
        )
    return doc
