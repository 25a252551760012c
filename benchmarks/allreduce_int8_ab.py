"""The int8 all-reduce's native kernels on and off, side by side, in one run.

python benchmarks/allreduce_int8_ab.py [--provider tcp] [--sizes 1M,4M,16M,64M,256M] [--rounds 3]
    [--json benchmarks/results/allreduce_int8_ab_tcp.json]

Runs `asyncfabric bench allreduce --impls af,af-int8` `--rounds` times, alternating
"before" (ASYNCFABRIC_NO_AVX512=1: the portable, auto-vectorized kernels, as before
issue 17's kernel work) and "after" (the AVX-512 kernels where the CPU has them), and
prints the best wall time and CPU per call of each over the rounds: on a shared machine
the best of a few alternating runs is the fairest comparison. Hold the bench lock:
`flock /work/notes/bench.lock python benchmarks/allreduce_int8_ab.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--provider", default="tcp")
    p.add_argument("--ranks", default="2")
    p.add_argument("--sizes", default="1M,4M,16M,64M,256M")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    exe = str(Path(sys.executable).with_name("asyncfabric"))
    best: dict[tuple[str, str, int], list[float]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="ar_ab_"))
    for i in range(a.rounds):
        for side in ("before", "after"):
            env = dict(os.environ)
            env.pop("ASYNCFABRIC_NO_AVX512", None)
            if side == "before":
                env["ASYNCFABRIC_NO_AVX512"] = "1"
            out = tmp / f"{side}{i}.json"
            cmd = [exe, "bench", "allreduce", "--provider", a.provider, "--ranks", a.ranks,
                   "--sizes", a.sizes, "--impls", "af,af-int8", "--repeats", "3",
                   "--json", str(out)]  # fmt: skip
            try:
                subprocess.run(cmd, env=env, check=True, timeout=a.timeout,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            except subprocess.TimeoutExpired:
                print(f"round {i} {side}: timed out after {a.timeout} s, skipped", file=sys.stderr)
                continue
            for r in json.loads(out.read_text())["rows"]:
                k = (side, r["impl"], int(r["size_bytes"]))
                b = best.setdefault(k, [float("inf"), float("inf")])
                b[0], b[1] = min(b[0], r["lat_us"]), min(b[1], r["cpu_us"])
    sizes = sorted({k[2] for k in best})
    print(f"provider {a.provider}, {a.ranks} ranks, bf16, best of {a.rounds} alternating rounds")
    print(
        "| size | 16-bit µs | int8 before µs | int8 after µs | int8/16-bit before | after "
        "| CPU ms a call: 16-bit / int8 before / int8 after | CPU ratio before | after |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for s in sizes:
        # the 16-bit path runs no quantize kernel: best of both sides' runs
        af = [min(best[(d, "af", s)][j] for d in ("before", "after")) for j in (0, 1)]
        b, n = best[("before", "af-int8", s)], best[("after", "af-int8", s)]
        mib = f"{s >> 20} MiB" if s >= 1 << 20 else f"{s >> 10} KiB"
        print(f"| {mib} | {af[0]:.0f} | {b[0]:.0f} | {n[0]:.0f} | {af[0] / b[0]:.2f}x "
              f"| {af[0] / n[0]:.2f}x | {af[1] / 1e3:.2f} / {b[1] / 1e3:.2f} / {n[1] / 1e3:.2f} "
              f"| {af[1] / b[1]:.2f}x | {af[1] / n[1]:.2f}x |")  # fmt: skip
        rows.append({"size_bytes": s, "af_us": af[0], "int8_before_us": b[0],
                     "int8_after_us": n[0], "af_cpu_us": af[1], "int8_before_cpu_us": b[1],
                     "int8_after_cpu_us": n[1]})  # fmt: skip
    if a.json:
        Path(a.json).write_text(json.dumps({"provider": a.provider, "ranks": a.ranks,
                                            "rounds": a.rounds, "rows": rows}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
