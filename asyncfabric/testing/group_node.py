"""A group member in its own process, driven by JSON lines on stdin/stdout.

``python -m asyncfabric.testing.group_node --store URL --group G --name N
--provider tcp --node ADDR`` (the store secret from ``$ASYNCFABRIC_STORE_SECRET``)
opens an engine, joins, publishes a 4 KiB ``inbox`` region, prints
``["ok", "ready"]`` and answers commands, each ``["ok", value]`` or
``["err", "ErrorClass: message"]``:

``["members"]``; ``["wait_members", n, timeout]``;
``["wait_event", "Joined"|"Left", name, timeout]`` -> ``[kind, name, reason, version,
time.monotonic() when seen]``; ``["write", member, byte, imm, timeout]`` (look up its
inbox once and cache it, fill it with ``byte``); ``["wait_inbox", imm, timeout]`` -> the inbox's byte
values; ``["leave"]``; ``["exit"]``. Only JSON crosses the pipe.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import asyncfabric as af

INBOX = 4096


async def serve(a: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    kw: dict[str, Any] = {"peer_timeout": a.peer_timeout}
    if a.node:
        kw["node"] = a.node
    async with af.Engine(a.provider, **kw) as eng:
        g = await af.join(a.store, group=a.group, name=a.name, engine=eng, ttl=a.ttl)
        inbox = bytearray(INBOX)
        region = eng.register(inbox)
        await g.publish("inbox", region.descriptor())
        src = eng.register(bytearray(INBOX))
        seen: list[list[Any]] = []
        descs: dict[str, af.Descriptor] = {}
        changed = asyncio.Event()

        async def collect() -> None:
            async for ev in g.events():
                if isinstance(ev, af.Joined):
                    seen.append(["Joined", ev.name, "", ev.version, time.monotonic()])
                else:
                    seen.append(["Left", ev.name, ev.reason, ev.version, time.monotonic()])
                changed.set()

        collector = loop.create_task(collect())

        def answer(*msg: object) -> None:
            sys.stdout.write(json.dumps(list(msg)) + "\n")
            sys.stdout.flush()

        async def until(pred: Any, timeout: float) -> Any:
            async def poll() -> Any:
                while True:
                    v = pred()
                    if v:
                        return v
                    changed.clear()
                    try:
                        await asyncio.wait_for(changed.wait(), 0.05)
                    except asyncio.TimeoutError:
                        pass

            return await asyncio.wait_for(poll(), timeout)

        answer("ok", "ready")
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            cmd = json.loads(line)
            try:
                op = cmd[0]
                if op == "members":
                    answer("ok", sorted(g.members))
                elif op == "wait_members":
                    n, t = cmd[1], cmd[2]
                    await until(lambda n=n: len(g.members) >= n, t)
                    answer("ok", sorted(g.members))
                elif op == "wait_event":
                    kind, name, t = cmd[1], cmd[2], cmd[3]
                    ev = await until(
                        lambda k=kind, w=name: next((e for e in seen if e[:2] == [k, w]), None), t
                    )
                    answer("ok", ev)
                elif op == "write":
                    member, byte, imm, t = cmd[1], cmd[2], cmd[3], cmd[4]
                    # looked up once, then reused (as a system would): a write to a
                    # member that died goes to the transport, which must refuse it
                    desc = descs.get(member)
                    if desc is None:
                        desc = descs[member] = await g.lookup(member, "inbox", timeout=t)
                    src.buffer[:] = bytes([byte]) * INBOX
                    await eng.write(src[:], desc[:], imm=imm, timeout=t)
                    answer("ok", None)
                elif op == "wait_inbox":
                    imm, t = cmd[1], cmd[2]
                    await eng.counter(imm).wait(1, timeout=t)
                    answer("ok", sorted(set(inbox)))
                elif op == "leave":
                    await g.leave()
                    answer("ok", None)
                elif op == "exit":
                    answer("ok", None)
                    break
                else:
                    answer("err", f"ValueError: unknown command {op!r}")
            except Exception as exc:  # report it to the driving test, keep serving
                answer("err", f"{type(exc).__name__}: {exc}")
        collector.cancel()
        await g.leave()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m asyncfabric.testing.group_node")
    p.add_argument("--store", required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--provider", default="shm")
    p.add_argument("--node", default="")
    p.add_argument("--ttl", type=float, default=2.0)
    p.add_argument("--peer-timeout", type=float, default=2.0)
    asyncio.run(serve(p.parse_args()))


if __name__ == "__main__":
    main()
