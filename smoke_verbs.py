import asyncio, time, numpy as np, sys
import asyncfabric as af
spec = sys.argv[1] if len(sys.argv) > 1 else "pyverbs"
async def main():
    t0=time.time()
    async with af.Engine(spec, peer_timeout=3) as a, af.Engine(spec, peer_timeout=3) as b:
        print("open", a, b, time.time()-t0, flush=True)
        src = a.register(np.arange(1<<20, dtype=np.uint8))
        dst = b.register(np.zeros(1<<20, np.uint8))
        d = dst.descriptor()
        await a.write(src, d, imm=5)
        await b.counter(5).wait(d.expected_imms(), timeout=10)
        print("write ok", bytes(dst.buffer[:8]) == bytes(src.buffer[:8]), np.array_equal(np.asarray(dst.buffer), np.asarray(src.buffer)), time.time()-t0, flush=True)
        await a.write_imm(d, 9); await b.counter(9).wait(1, timeout=5); print("write_imm ok", flush=True)
        await a.send(b.address, b"hello"); print("recv", await b.recv(timeout=5), flush=True)
        n = await a.write_paged(src, d, [3,1,2], [0,5,7], page_size=4096, imm=11)
        await b.counter(11).wait(3, timeout=5); print("paged ok", flush=True)
        t1=time.time(); N=200
        for i in range(N):
            await a.write(src[:65536], d[:65536], imm=1)
        await b.counter(1).wait(N, timeout=30)
        dt=time.time()-t1; print(f"64K x{N}: {N*65536/dt/1e6:.1f} MB/s", a.stats(), flush=True)
asyncio.run(main())
