"""A peer engine in another OS process, driven over a pipe: for tests and benchmarks.

The child runs a small command loop on its own asyncio loop; the parent talks
to it with :class:`PeerProcess` from asyncio or trio (pipe reads happen in a
worker thread). Only plain tuples of bytes, ints and strings cross the pipe.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import traceback
from multiprocessing.connection import Connection
from typing import Any

import anyio
import numpy as np


def _child_main(conn: Connection, provider: str, kwargs: dict[str, Any]) -> None:
    import asyncio

    from asyncfabric import Descriptor, Engine

    cuda_device = kwargs.pop("_cuda_device", None)
    if cuda_device is not None:
        import torch

        torch.cuda.set_device(cuda_device)

    async def serve() -> None:
        async with Engine(provider, **kwargs) as eng:
            regions: dict[int, Any] = {}
            bufs: dict[int, Any] = {}  # outlive their regions: to see what lands after unregister
            conn.send(("ok", eng.address))
            loop = asyncio.get_running_loop()
            while True:
                cmd, *args = await loop.run_in_executor(None, conn.recv)
                try:
                    if cmd == "exit":
                        conn.send(("ok", None))
                        return
                    if cmd == "alloc":
                        nbytes, seed, *rest = args
                        remote_write = rest[0] if rest else True
                        remote_read = rest[1] if len(rest) > 1 else True
                        if seed is None:
                            buf = np.zeros(nbytes, np.uint8)
                        else:
                            buf = np.random.default_rng(seed).integers(
                                0, 256, nbytes, dtype=np.uint8
                            )
                        r = eng.register(buf, remote_write=remote_write, remote_read=remote_read)
                        regions[id(r)] = r
                        bufs[id(r)] = buf
                        conn.send(("ok", (id(r), bytes(r.descriptor()))))
                    elif cmd == "alloc_t":
                        # a torch tensor on `device`; staged=True stages even a host tensor
                        nbytes, seed, device, staged = args
                        t = _tensor(nbytes, seed, device)
                        r = register_staged(eng, t) if staged else eng.register(t)
                        regions[id(r)] = r
                        bufs[id(r)] = r.buffer
                        conn.send(("ok", (id(r), bytes(r.descriptor()))))
                    elif cmd == "free":
                        regions.pop(args[0]).close()
                        bufs.pop(args[0], None)
                        conn.send(("ok", None))
                    elif cmd == "unregister":
                        # unregister but keep the memory, so a late write could be seen
                        regions.pop(args[0]).close()
                        conn.send(("ok", None))
                    elif cmd == "wait":
                        imm, n, timeout = args
                        await eng.counter(imm).wait(n, timeout=timeout)
                        conn.send(("ok", None))
                    elif cmd == "count":
                        conn.send(("ok", eng.counter(args[0]).count))
                    elif cmd == "digest":
                        rid, off, n = args
                        mv = _host_view(bufs[rid])[off : off + n]
                        conn.send(("ok", hashlib.sha256(mv).hexdigest()))
                    elif cmd == "read":
                        rid, off, n = args
                        conn.send(("ok", bytes(memoryview(bufs[rid]).cast("B")[off : off + n])))
                    elif cmd == "write":
                        rid, desc, off, roff, n, imm = args
                        d = Descriptor.from_bytes(desc)
                        await eng.write(regions[rid][off : off + n], d[roff : roff + n], imm=imm)
                        conn.send(("ok", None))
                    elif cmd == "pull":
                        # a one-sided read from the descriptor into our region
                        rid, desc, off, roff, n = args
                        d = Descriptor.from_bytes(desc)
                        await eng.read(regions[rid][off : off + n], d[roff : roff + n])
                        conn.send(("ok", None))
                    elif cmd == "write_imms":
                        # many small writes with the given immediates, all in flight at once
                        rid, desc, imms = args
                        d = Descriptor.from_bytes(desc)
                        src = regions[rid]
                        await asyncio.gather(*(eng.write(src[0:8], d[0:8], imm=i) for i in imms))
                        conn.send(("ok", None))
                    elif cmd == "echo":
                        # answer each immediate `imm_in` with a zero-byte write of `imm_out`
                        desc, imm_in, imm_out, n = args
                        d = Descriptor.from_bytes(desc)
                        c = eng.counter(imm_in)
                        conn.send(("ok", None))  # ready: the caller may start
                        for _ in range(n):
                            await c.wait(1, timeout=30)
                            await eng.write_imm(d, imm_out)
                        conn.send(("ok", None))
                    elif cmd == "cpu":
                        t = os.times()
                        conn.send(("ok", t.user + t.system))
                    elif cmd == "blast":
                        # `count` 8-byte writes carrying `imm`, `window` in flight at a time
                        rid, desc, imm, count, window = args
                        d = Descriptor.from_bytes(desc)
                        src, dst = regions[rid][0:8], d[0:8]
                        done = 0
                        while done < count:
                            k = min(window, count - done)
                            await asyncio.gather(*(eng.write(src, dst, imm=imm) for _ in range(k)))
                            done += k
                        conn.send(("ok", done))
                    elif cmd == "send":
                        to, data = args
                        await eng.send(to, data)
                        conn.send(("ok", None))
                    elif cmd == "recv":
                        conn.send(("ok", await eng.recv(timeout=args[0])))
                    elif cmd == "stats":
                        conn.send(("ok", eng.stats()))
                    else:
                        conn.send(("err", f"unknown command {cmd!r}"))
                except Exception as exc:  # reported to the parent, which raises it
                    conn.send(("err", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))

    asyncio.run(serve())


def register_staged(eng: Any, tensor: Any, **kwargs: Any) -> Any:
    """Register a torch tensor on the staged GPU path, even a CPU one (for CPU CI).

    Sets the staged wrapper's ``stage_host_tensors`` switch around the call: a host
    tensor then gets a host mirror and travels by the real staged protocol (pieces,
    landing notices, credits after the copy), the copies being host copies.
    """
    t = eng.transport
    if not hasattr(t, "stage_host_tensors"):
        raise RuntimeError(
            f"{t.backend}:{t.provider} has no staged path (it moves GPU memory itself)"
        )
    before = t.stage_host_tensors
    t.stage_host_tensors = True
    try:
        return eng.register(tensor, **kwargs)
    finally:
        t.stage_host_tensors = before


def _tensor(nbytes: int, seed: int | None, device: str) -> Any:
    import torch

    if seed is None:
        return torch.zeros(nbytes, dtype=torch.uint8, device=device)
    g = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)
    return torch.from_numpy(g).to(device)


def _host_view(buf: Any) -> memoryview:
    """The bytes of a buffer as host memory (a CUDA tensor is copied to the host first)."""
    mod = type(buf).__module__
    if mod.startswith("torch"):
        t = buf.reshape(-1)
        if t.device.type == "cuda":
            # Deliberately no device-wide synchronize: the copy is ordered only on the
            # current stream, so a counter that fired before the data reached GPU
            # memory shows up as a wrong digest.
            t = t.cpu()
        return memoryview(t.contiguous().numpy()).cast("B")
    return memoryview(buf).cast("B")


class PeerError(RuntimeError):
    """The peer process reported an error."""


class PeerProcess:
    """Start with ``async with PeerProcess("shm") as peer``; ``peer.address`` is its engine address."""

    def __init__(self, provider: str, **engine_kwargs: Any) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_child_main,
            args=(child, provider, engine_kwargs),
            daemon=True,
            name="asyncfabric-peer",
        )
        self._child = child
        self.address: bytes = b""

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    async def __aenter__(self) -> PeerProcess:
        self.proc.start()
        self._child.close()
        self.address = await self._reply(timeout=60)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self.proc.is_alive():
            try:
                await self.call("exit", timeout=10)
            except Exception:
                pass
            await anyio.to_thread.run_sync(self.proc.join, 10)
        if self.proc.is_alive():
            self.proc.kill()
            await anyio.to_thread.run_sync(self.proc.join, 5)
        self._conn.close()

    def kill(self) -> None:
        """SIGKILL the peer (failure tests)."""
        self.proc.kill()

    async def _reply(self, timeout: float) -> Any:
        def get() -> Any:
            if not self._conn.poll(timeout):
                raise TimeoutError(f"peer process gave no answer within {timeout} s")
            return self._conn.recv()

        status, value = await anyio.to_thread.run_sync(get)
        if status != "ok":
            raise PeerError(value)
        return value

    async def call(self, cmd: str, *args: Any, timeout: float = 120) -> Any:
        self._conn.send((cmd, *args))
        return await self._reply(timeout)

    # conveniences
    async def alloc(
        self,
        nbytes: int,
        seed: int | None = None,
        *,
        remote_write: bool = True,
        remote_read: bool = True,
    ) -> tuple[int, bytes]:
        return await self.call("alloc", nbytes, seed, remote_write, remote_read)

    async def wait(self, imm: int, n: int, timeout: float = 30) -> None:
        await self.call("wait", imm, n, timeout, timeout=timeout + 30)

    async def digest(self, rid: int, off: int, n: int) -> str:
        return await self.call("digest", rid, off, n)

    async def alloc_tensor(
        self, nbytes: int, seed: int | None = None, device: str = "cpu", staged: bool = False
    ) -> tuple[int, bytes]:
        return await self.call("alloc_t", nbytes, seed, device, staged)


def sha256(buf: Any, off: int = 0, n: int | None = None) -> str:
    mv = _host_view(buf)
    return hashlib.sha256(mv[off : off + n if n is not None else None]).hexdigest()


def random_bytes(n: int, seed: int | None = None) -> np.ndarray:
    if seed is None:
        return np.frombuffer(os.urandom(n), np.uint8).copy()
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)
