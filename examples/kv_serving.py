"""Disaggregated serving of KV caches, live: one prefill member with a router, two decode
members, requests flowing; a third decode member joins, one leaves (drains first).

    .venv/bin/python examples/kv_serving.py

Everything runs on this machine (shm): an embedded group store in this process, decode
members in processes of their own (asyncfabric.testing.kv_model.decode_member_process).
"""

from __future__ import annotations

import asyncio
import collections
import multiprocessing as mp
import os

import asyncfabric as af
from asyncfabric.kv import KVPrefill, Router
from asyncfabric.testing import kv_model as km


async def main() -> None:
    secret = os.urandom(16).hex()
    store = await af.store.serve("127.0.0.1:0", secret=secret)
    ctx = mp.get_context("spawn")
    members: dict[str, tuple[mp.Process, object]] = {}
    loop = asyncio.get_running_loop()

    async def start(name: str) -> None:
        here, there = ctx.Pipe()
        p = ctx.Process(target=km.decode_member_process,
                        args=(there, store.url, secret, "decode-pool", name, 0.05))  # fmt: skip
        p.start()
        members[name] = (p, here)
        await loop.run_in_executor(None, here.recv)
        print(f"+ {name} joined the decode pool")

    served: collections.Counter[str] = collections.Counter()
    try:
        async with af.Engine("shm") as eng, KVPrefill(eng, km.kv_layout(1024)) as pre:
            g = await af.join(store, group="decode-pool", name="prefill-0", engine=eng,
                              meta={"role": "prefill"})  # fmt: skip
            router = Router(g, pre)
            await start("decode-a")
            await start("decode-b")
            await router.start()
            stop = asyncio.Event()

            async def one(i: int) -> None:
                rr = await router.submit(f"req-{i}", 100)  # 100 tokens: 7 blocks a layer
                await rr.request.push()  # (a real prefill fills pre.cache first)
                served[(await rr.result(30)).decode()] += 1

            async def stream() -> None:
                i, tasks = 0, []
                while not stop.is_set():
                    tasks.append(asyncio.ensure_future(one(i)))
                    i += 1
                    await asyncio.sleep(0.02)
                await asyncio.gather(*tasks)

            s = asyncio.ensure_future(stream())
            for step in ("join decode-c", "remove decode-a", "end"):
                await asyncio.sleep(1.5)
                print(f"  served so far: {dict(sorted(served.items()))}; routing to "
                      f"{list(router.members)}")  # fmt: skip
                if step == "join decode-c":
                    await start("decode-c")
                elif step == "remove decode-a":
                    p, conn = members["decode-a"]
                    conn.send("leave")  # type: ignore[attr-defined]
                    msg = await loop.run_in_executor(None, conn.recv)  # type: ignore[attr-defined]
                    print(f"- decode-a drained ({msg[1]} served, {msg[2]} blocks held) and left")
            stop.set()
            await s
            print(
                f"done: {sum(served.values())} requests, by member {dict(sorted(served.items()))}"
            )
            await router.aclose()
            await g.leave()
    finally:
        for p, conn in members.values():
            if p.is_alive():
                try:
                    conn.send("leave")  # type: ignore[attr-defined]
                except OSError:
                    pass
            p.join(10)
            if p.is_alive():
                p.kill()
        await store.aclose()


if __name__ == "__main__":
    asyncio.run(main())
