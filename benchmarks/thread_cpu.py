"""Run a command and report which threads of it (and its children) use the CPU.

For machines without perf or py-spy (the GPU device machine): every INTERVAL seconds it
reads /proc/PID/task/TID/stat of the command's process tree and prints, per sample, the
busiest threads as "pid:name cpu%", where name is the thread's comm (the engine names its
threads af-progress, af-worker-N and af-trigger). A thread at 100 % is the bound; many
at 30-60 % that still do not add throughput point at hand-offs (locks, wake-ups).

Usage: python3 benchmarks/thread_cpu.py [--interval 1.0] [--top 12] -- CMD ARG...
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")


def _children(root: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _threads(pids: list[int]) -> dict[tuple[int, int], tuple[str, int]]:
    got = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for t in tids:
            try:
                with open(f"/proc/{pid}/task/{t}/stat") as f:
                    s = f.read()
            except OSError:
                continue
            name = s[s.index("(") + 1 : s.rindex(")")]
            fields = s.rsplit(")", 1)[1].split()
            got[(pid, int(t))] = (name, int(fields[11]) + int(fields[12]))  # utime + stime
    return got


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        ap.error("give the command to run after --")
    proc = subprocess.Popen(cmd)
    prev = _threads(_children(proc.pid))
    t_prev = time.monotonic()
    while proc.poll() is None:
        time.sleep(a.interval)
        cur = _threads(_children(proc.pid))
        t = time.monotonic()
        dt = t - t_prev
        rows = []
        for k, (name, ticks) in cur.items():
            before = prev.get(k, (name, ticks))[1]
            pct = 100.0 * (ticks - before) / TICK / dt
            if pct >= 5:
                rows.append((pct, f"{k[0]}:{name}"))
        rows.sort(reverse=True)
        total = sum(r[0] for r in rows)
        top = " ".join(f"{n}={p:.0f}%" for p, n in rows[: a.top])
        print(f"[threads] t={time.strftime('%H:%M:%S')} sum={total:.0f}% {top}", file=sys.stderr)
        prev, t_prev = cur, t
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
