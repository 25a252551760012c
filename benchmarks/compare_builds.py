"""Two builds side by side: ``asyncfabric bench`` on each, alternating, in one run.

    .venv/bin/python benchmarks/compare_builds.py BEFORE_TREE AFTER_TREE [--rounds 4]

Each tree is a source checkout whose native extensions are built in place
(``python asyncfabric/backends/libfabric/_build.py`` inside it, or ``pip install -e``);
it runs with ``PYTHONPATH=TREE`` under this interpreter. Rounds alternate the order
(A B, B A, ...) so neighbours in time are compared, and the medians over rounds
give each point's ratio AFTER / BEFORE (bandwidth: higher is better; latency: lower).
This is how a change to the engine or the contract proves it costs nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SUITES = ["write", "pingpong", "paged"]
# (suites, sizes) per bench call: --sizes picks the points of every suite named, and a
# paged point is 10,000 pages of its size, so paged gets page sizes of its own.
CALLS = [(["write", "pingpong"], "8,4K,64K,1M,16M"), (["paged"], "4K,64K")]
QUICK = [(["write", "pingpong"], "8,4K,64K,1M"), (["paged"], "4K")]


def run(tree: Path, out: Path, provider: str, repeats: int, quick: bool) -> list[dict]:
    # the tree first; what PYTHONPATH held already (a machine's extra site dir) after it
    path = os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1")
    rows: list[dict] = []
    for suites, sizes in QUICK if quick else CALLS:
        cmd = [sys.executable, "-m", "asyncfabric", "bench", *suites, "--provider", provider,
               "--impls", "asyncfabric", "--sizes", sizes, "--repeats", str(repeats),
               "--json", str(out), "--no-progress"]  # fmt: skip
        r = subprocess.run(cmd, env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"{tree}: {' '.join(cmd[2:])} failed:\n{r.stderr[-2000:]}")
        data = json.loads(out.read_text())
        rows += data["rows"] if isinstance(data, dict) else data
    return rows


def key(r: dict) -> tuple:
    return (r["suite"], r["size_bytes"], r.get("pages", 0))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--provider", default="shm")
    ap.add_argument("--json", type=Path, help="write the per-round rows here")
    ap.add_argument("--quick", action="store_true", help="fewer sizes, for more rounds")
    a = ap.parse_args()
    res: dict[str, dict[tuple, list[dict]]] = {"before": {}, "after": {}}
    with tempfile.TemporaryDirectory() as td:
        for rnd in range(a.rounds):
            order = ["before", "after"] if rnd % 2 == 0 else ["after", "before"]
            for which in order:
                tree = a.before if which == "before" else a.after
                rows = run(
                    tree.resolve(), Path(td) / f"{which}{rnd}.json", a.provider, a.repeats, a.quick
                )
                for r in rows:
                    if r["impl"] == "asyncfabric":
                        res[which].setdefault(key(r), []).append(r)
                print(f"round {rnd + 1}/{a.rounds}: {which} done", file=sys.stderr, flush=True)
    print("| suite | size | pages | before | after | after/before |")
    print("| --- | --- | --- | --- | --- | --- |")
    for k in sorted(res["after"], key=lambda k: (SUITES.index(k[0]), k[1])):
        b, n = res["before"].get(k, []), res["after"][k]
        if not b:
            continue
        lat = k[0] == "pingpong"
        f = "lat_p50_us" if lat else "gbps"
        vb = statistics.median(r[f] for r in b)
        vn = statistics.median(r[f] for r in n)
        unit = "µs p50" if lat else "GB/s"
        ratio = vn / vb
        note = " (lower is better)" if lat else ""
        print(
            f"| {k[0]} | {k[1]} | {k[2]} | {vb:.3f} {unit} | {vn:.3f} {unit} | {ratio:.3f}{note} |"
        )
    if a.json:
        a.json.write_text(
            json.dumps({w: {str(k): v for k, v in d.items()} for w, d in res.items()})
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
