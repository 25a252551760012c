"""An engine in another process, driven by JSON lines on stdin/stdout.

For tests that start the process themselves, for example inside a network
namespace (``ip netns exec NS python -m asyncfabric.testing.netns_node tcp ADDR``),
where :class:`asyncfabric.testing.peer.PeerProcess` cannot go. Only JSON
crosses the pipe (bytes as hex); nothing is unpickled.

Commands (one JSON list per line), answers ``["ok", value]`` or ``["err", text]``:
``["alloc", nbytes]`` -> descriptor hex; ``["write", desc_hex, nbytes, imm, timeout]``
-> seconds taken; ``["wait", imm, n, timeout]``; ``["digest", nbytes]``; ``["exit"]``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import time

import numpy as np


async def serve(provider: str, node: str, peer_timeout: float) -> None:
    from asyncfabric import Descriptor, Engine

    loop = asyncio.get_running_loop()
    async with Engine(provider, node=node, peer_timeout=peer_timeout) as eng:
        src = eng.register(np.full(1 << 20, 0x5A, np.uint8))
        dst: np.ndarray | None = None
        region = None

        def answer(*msg: object) -> None:
            sys.stdout.write(json.dumps(list(msg)) + "\n")
            sys.stdout.flush()

        answer("ok", "ready")
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            cmd, *args = json.loads(line)
            try:
                if cmd == "exit":
                    answer("ok", None)
                    return
                if cmd == "alloc":
                    dst = np.zeros(args[0], np.uint8)
                    region = eng.register(dst)
                    answer("ok", bytes(region.descriptor()).hex())
                elif cmd == "write":
                    desc_hex, n, imm, timeout = args
                    d = Descriptor.from_bytes(bytes.fromhex(desc_hex))
                    t0 = time.monotonic()
                    await eng.write(src[0:n], d[0:n], imm=imm, timeout=timeout)
                    answer("ok", time.monotonic() - t0)
                elif cmd == "wait":
                    imm, n, timeout = args
                    await eng.counter(imm).wait(n, timeout=timeout)
                    answer("ok", None)
                elif cmd == "digest":
                    assert dst is not None
                    answer("ok", hashlib.sha256(dst[: args[0]]).hexdigest())
                else:
                    answer("err", f"unknown command {cmd!r}")
            except Exception as exc:
                answer("err", f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 5.0))
