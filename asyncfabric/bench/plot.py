"""``asyncfabric bench plot RESULT.json``: PNGs of bandwidth vs size, latency percentiles, ratio vs raw."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .schema import read_json


def _by_impl(rows: list[dict[str, Any]], suite: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["suite"] == suite:
            out.setdefault(r["impl"], []).append(r)
    return out


def plot(result: str | Path, outdir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = read_json(result)
    rows = doc["rows"]
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    made: list[Path] = []
    title = f"({doc['meta'].get('date', '')}, {doc['meta'].get('host', '')})"

    def save(fig: Any, name: str) -> None:
        p = out / name
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)

    w = _by_impl(rows, "write")
    if w:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for impl, rs in w.items():
            rs = sorted(rs, key=lambda r: r["size_bytes"])
            ax.plot([r["size_bytes"] for r in rs], [r["gbps"] for r in rs], marker="o", label=impl)
        ax.set(xscale="log", yscale="log", xlabel="write size (bytes)", ylabel="GB/s (10^9 B/s)",
               title=f"write bandwidth vs size {title}")  # fmt: skip
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
        save(fig, "write_bandwidth.png")
    pp = _by_impl(rows, "pingpong")
    if pp:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for impl, rs in pp.items():
            rs = sorted(rs, key=lambda r: r["size_bytes"])
            xs = [r["size_bytes"] for r in rs]
            (line,) = ax.plot(xs, [r["lat_p50_us"] for r in rs], marker="o", label=f"{impl} p50")
            ax.plot(xs, [r["lat_p99_us"] for r in rs], ls="--", color=line.get_color(),
                    label=f"{impl} p99")  # fmt: skip
        ax.set(xscale="log", yscale="log", xlabel="message size (bytes)", ylabel="RTT (µs)",
               title=f"pingpong round trip {title}")  # fmt: skip
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        save(fig, "pingpong_latency.png")
    ratio = [r for r in rows if r["impl"] == "asyncfabric" and r.get("ratio_vs_raw") is not None]
    if ratio:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        labels = [f"{r['suite']}\n{r['size_bytes']}B p{r['peers']} c{r['counters']} d{r['domains']}"
                  for r in ratio]  # fmt: skip
        ax.bar(range(len(ratio)), [r["ratio_vs_raw"] for r in ratio])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(ratio)), labels, rotation=90, fontsize=6)
        ax.set(ylabel="asyncfabric / raw", title=f"asyncfabric vs raw C loop {title}")
        save(fig, "ratio_vs_raw.png")
    return made


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="asyncfabric bench plot")
    p.add_argument("result", help="JSON written by `asyncfabric bench ... --json`")
    p.add_argument("--out", default="bench-plots", help="directory for the PNGs")
    a = p.parse_args(argv)
    for path in plot(a.result, a.out):
        print(path)
    return 0
