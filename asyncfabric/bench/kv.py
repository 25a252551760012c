"""``asyncfabric bench kv``: a request's KV pages, prefill process to decode process.

Llama-3-8B-like layout by default: 32 layers, 8 KV heads, head dim 128, bf16,
16-token blocks (K and V are 32 KiB pages each, 64 KiB per block per layer), in
vLLM's flash layout (``[2, blocks, 16, 8, 128]`` per layer). For 1k, 4k and 16k
token prompts, the same pages move with each implementation, one pair of fresh
processes each, one after the other, in one run:

* ``kv``: asyncfabric.kv, one request after another: submit (the decode side
  grants blocks), push every layer in one post, the decode side awaits its
  counter and answers; ``kv-layers`` posts layer by layer (32 posts);
* ``af-batch``: the transport alone: the same writes as one prebuilt
  ``Batch`` (``write_many``), a counter on the decode side, an immediate back;
* ``af-paged``: the transport's paged call: one ``write_paged`` per layer and
  half (64 calls, one write per 32 KiB page), a counter, an immediate back;
* ``nixl``: NIXL (UCX): descriptor lists of every page prepared at start (as
  vLLM's NixlConnector does), per request one transfer of the request's pages
  (``make_prepped_xfer``, NIXL merges adjacent descriptors) with a notification;
  the decode side answers with one;
* ``mooncake``: Mooncake Transfer Engine (tcp): ``batch_transfer_sync_write`` of
  the pages, then a notification each way.

``--blocks contiguous`` (default): the request's blocks are adjacent on both
sides (a fresh pool); ``scattered``: the prefill side's blocks are a random
permutation, so no two pages are adjacent and each page is its own write.

The time of a request runs from the first post of its pages to the answer from
the decode side (``kv``: from the grant; the grant's round trip is reported
apart). ``--pipeline`` adds rows for layer-wise pipelining with compute stood in
by a sleep per layer: time from the end of the prefill's compute to KV-complete.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

MOONCAKE_BATCH = 64  # entries per batch_transfer_sync_write (larger batches fail)
IMPLS = ("kv", "kv-layers", "af-batch", "af-paged", "nixl", "mooncake")
ROW_ORDER = (*IMPLS, "kv-pipe", "kv-serial", "tiny-pipe", "tiny-serial")
ACK_IMM = 0x0ACC0000  # the application nibble: the bench's own immediates
DATA_IMM = 0x0DA70000


def _layout(a: dict[str, Any]) -> Any:
    from asyncfabric.kv import KVLayout

    return KVLayout(layers=a["layers"], blocks=a["pool"], block_tokens=a["block_tokens"],
                    kv_heads=a["kv_heads"], head_dim=a["head_dim"], dtype=a["dtype"],
                    order=a["order"])  # fmt: skip


def _blocks(a: dict[str, Any], tokens: int) -> tuple[np.ndarray, np.ndarray]:
    n = -(-tokens // a["block_tokens"])
    dst = np.arange(n, dtype=np.int64)  # the decode pool hands out lowest first
    if a["blocks"] == "scattered":
        src = np.random.default_rng(tokens).permutation(a["pool"])[:n].astype(np.int64)
    else:
        src = np.arange(n, dtype=np.int64)
    return src, dst


# ---------------------------------------------------------------- asyncfabric roles


def _touch(cache: Any) -> None:
    """Write every page once, as the peers' buffers are (np.ones): no first-touch
    page faults, and no reads of the shared zero page, inside the clock."""
    for t in cache.tensors:
        t.fill_(1)


async def _af_decode(impl: str, a: dict[str, Any], conn: Any) -> None:
    import asyncfabric as af
    from asyncfabric.kv import KVDecode
    from asyncfabric.kv.cache import PagedCache

    lay = _layout(a)
    async with af.Engine(
        a["provider"], chunk_bytes=a["chunk"], domains=a["domains"], workers=a["domains"]
    ) as eng:
        if impl.startswith("kv"):
            async with KVDecode(eng, lay, device=a.get("device", "cpu")) as dec:
                _touch(dec.cache)
                conn.send(eng.address)
                while True:
                    try:
                        r = await dec.next_request(timeout=1.0)
                    except asyncio.TimeoutError:
                        if conn.poll():
                            return
                        continue
                    await r.wait()
                    await r.finish(b"")
        with PagedCache(eng, lay, a.get("device", "cpu")) as cache:
            _touch(cache)
            conn.send((eng.address, [bytes(d) for d in cache.descriptors()]))
            ack = af.Descriptor.from_bytes(conn.recv())
            c = eng.counter(DATA_IMM)
            while True:
                msg = conn.recv()
                if msg is None:
                    return
                expected, reps = msg
                for _ in range(reps):
                    await c.wait(expected)
                    await eng.write_imm(ack, ACK_IMM)


async def _af_prefill(impl: str, a: dict[str, Any], conn: Any) -> list[dict[str, Any]]:
    import asyncfabric as af
    from asyncfabric.kv import KVPrefill, pages_per_block
    from asyncfabric.kv.cache import PagedCache
    from asyncfabric.kv.plan import add_layers, expected_imms

    lay = _layout(a)
    rows = []
    clock = time.perf_counter
    async with af.Engine(a["provider"], domains=a["domains"], workers=a["domains"]) as eng:
        if impl.startswith("kv"):
            async with KVPrefill(eng, lay, device=a.get("device", "cpu")) as pre:
                _touch(pre.cache)
                link = await pre.connect(conn.recv())
                for tokens in a["tokens"]:
                    src, _ = _blocks(a, tokens)
                    for mode in ("push", "pipe", "serial") if a["pipeline"] else ("push",):
                        if mode != "push" and impl != "kv":
                            continue
                        grant, times, ends = [], [], []
                        for i in range(a["warmup"] + a["reps"]):
                            t0 = clock()
                            r = await pre.submit(link, f"r{tokens}-{mode}-{i}", tokens, blocks=src)
                            t1 = tg = clock()
                            if mode == "push" and impl == "kv":
                                r.post(range(lay.layers))
                            elif mode == "push":
                                for layer in range(lay.layers):
                                    r.post(layer)
                            else:  # compute stood in by a sleep per layer
                                per = a["layer_ms"] * tokens / 1024 / 1e3
                                for layer in range(lay.layers):
                                    await asyncio.sleep(per)
                                    if mode == "pipe":
                                        r.post(layer)
                                t1 = clock()  # the end of the prefill's compute
                            tw = clock()
                            await r.push()
                            tp = clock()
                            await r.result()
                            t2 = clock()
                            if os.environ.get("KVB_DEBUG"):
                                print(
                                    f"post {1e3 * (tw - t1):.2f} push {1e3 * (tp - tw):.2f} "
                                    f"result {1e3 * (t2 - tp):.2f}",
                                    file=sys.stderr,
                                )
                            if i >= a["warmup"]:
                                grant.append(tg - t0)
                                times.append(t2 - t1)
                                ends.append(t2 - t0)
                        name = impl if mode == "push" else f"kv-{mode}"
                        rows.append(_row(name, a, tokens, times, r.pages, grant=grant))
                        if mode != "push":  # a lag after compute, not a transfer time
                            rows[-1]["gbps"] = 0.0
            conn.send(None)
            return rows
        descs, ack_reg = None, None
        addr, dd = conn.recv()
        descs = [af.Descriptor.from_bytes(d) for d in dd]
        ack_buf = np.zeros(8, np.uint8)
        ack_reg = eng.register(ack_buf)
        conn.send(bytes(ack_reg.descriptor()))
        ackc = eng.counter(ACK_IMM)
        with PagedCache(eng, lay, a.get("device", "cpu")) as cache:
            _touch(cache)
            ppb = pages_per_block(lay, lay)
            for tokens in a["tokens"]:
                src, dst = _blocks(a, tokens)
                if impl == "af-batch":
                    b = af.Batch()
                    add_layers(b, cache, lay, descs, range(lay.layers), src, dst, DATA_IMM, ppb)
                    expected = expected_imms(lay, lay, ppb, src, dst, descs[0].chunk_bytes)
                    writes = len(b)
                else:
                    expected = writes = lay.layers * 2 * len(src)
                conn.send((expected, a["warmup"] + a["reps"]))
                times = []
                for i in range(a["warmup"] + a["reps"]):
                    t0 = clock()
                    if impl == "af-batch":
                        await eng.write_many(b)
                    else:
                        posts = []
                        for layer in range(lay.layers):
                            for kv in (0, 1):
                                ts, so = lay.where(layer, kv, np.zeros(1, np.int64))
                                td, do = lay.where(layer, kv, np.zeros(1, np.int64))
                                posts.append(eng.write_paged(
                                    cache.regions[ts], descs[td], src, dst,
                                    page_size=lay.half_bytes, src_offset=int(so[0]),
                                    dst_offset=int(do[0]), imm=DATA_IMM))  # fmt: skip
                        await asyncio.gather(*posts)
                    await ackc.wait(1)
                    if i >= a["warmup"]:
                        times.append(clock() - t0)
                rows.append(_row(impl, a, tokens, times, writes))
        conn.send(None)
        ack_reg.close()
    return rows


# ---------------------------------------------------------------- NIXL and Mooncake roles


def _pages(a: dict[str, Any], base: int) -> list[tuple[int, int, int]]:
    """Every page of a pool (layer, half, block), in the flash layout: address, size, dev."""
    lay = _layout(a)
    hb = lay.half_bytes
    layer_bytes = 2 * lay.blocks * hb
    out = []
    for layer in range(lay.layers):
        for kv in (0, 1):
            b0 = base + layer * layer_bytes + kv * lay.blocks * hb
            out += [(b0 + i * hb, hb, 0) for i in range(lay.blocks)]
    return out


def _page_idx(a: dict[str, Any], blocks: np.ndarray) -> np.ndarray:
    per = [
        (layer * 2 + kv) * a["pool"] + blocks
        for layer in range(a["layers"])
        for kv in (0, 1)
    ]  # fmt: skip
    return np.concatenate(per).astype(np.int32)


def _nixl(role: str, a: dict[str, Any], conn: Any) -> list[dict[str, Any]]:
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    from nixl._api import nixl_agent, nixl_agent_config

    lay = _layout(a)
    ag = nixl_agent(role, nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
    buf = np.ones(lay.nbytes, np.uint8)  # one tensor for all layers: the same bytes, touched
    ag.register_memory([(buf.ctypes.data, buf.nbytes, 0, "")], "DRAM")
    conn.send((ag.get_agent_metadata(), int(buf.ctypes.data)))
    meta, raddr = conn.recv()
    peer = ag.add_remote_agent(meta)
    peer = peer.decode() if isinstance(peer, bytes) else str(peer)

    def wait_notif() -> None:
        end = time.monotonic() + 60
        while not any(ag.get_new_notifs().values()):
            if time.monotonic() > end:
                raise TimeoutError("no NIXL notification in 60 s")

    rows = []
    if role == "decode":
        for _tokens in a["tokens"]:
            for _ in range(a["warmup"] + a["reps"]):
                wait_notif()
                ag.send_notif(peer, b"ack")
        conn.recv()
        return rows
    ag.make_connection(peer)
    loc = ag.prep_xfer_dlist("NIXL_INIT_AGENT", _pages(a, int(buf.ctypes.data)), "DRAM")
    rem = ag.prep_xfer_dlist(peer, _pages(a, raddr), "DRAM")
    for tokens in a["tokens"]:
        src, dst = _blocks(a, tokens)
        si, di = _page_idx(a, src), _page_idx(a, dst)
        times = []
        for i in range(a["warmup"] + a["reps"]):
            t0 = time.perf_counter()
            h = ag.make_prepped_xfer("WRITE", loc, si, rem, di, b"kv")
            st = ag.transfer(h)
            while st == "PROC":
                st = ag.check_xfer_state(h)
            if st != "DONE":
                raise RuntimeError(f"NIXL transfer failed ({st})")
            wait_notif()
            if i >= a["warmup"]:
                times.append(time.perf_counter() - t0)
            h.release()
        rows.append(_row("nixl", a, tokens, times, len(si)))
    conn.send(None)
    return rows


def _mooncake(role: str, a: dict[str, Any], conn: Any) -> list[dict[str, Any]]:
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
    from mooncake.engine import TransferEngine, TransferNotify, TransferOpcode

    lay = _layout(a)
    te = TransferEngine()
    if te.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") != 0:
        raise RuntimeError("Mooncake TransferEngine.initialize failed")
    buf = np.ones(lay.nbytes, np.uint8)
    if te.register_memory(int(buf.ctypes.data), buf.nbytes) != 0:
        raise RuntimeError("Mooncake register_memory failed")
    conn.send((f"127.0.0.1:{te.get_rpc_port()}", int(buf.ctypes.data)))
    peer, raddr = conn.recv()

    def notify(msg: str) -> None:
        if te.transfer_sync(peer, int(buf.ctypes.data), raddr, 1, TransferOpcode.Write,
                            TransferNotify("kv", msg)) != 0:  # fmt: skip
            raise RuntimeError("Mooncake notification failed")

    def wait() -> None:
        end = time.monotonic() + 120
        while not te.get_notifies():
            if time.monotonic() > end:
                raise TimeoutError("no Mooncake notification in 120 s")

    rows = []
    if role == "decode":
        for _ in a["tokens"]:
            for _ in range(a["warmup"] + a["reps"]):
                wait()
                notify("ack")
        conn.recv()
        return rows
    lp, rp = _pages(a, int(buf.ctypes.data)), _pages(a, raddr)
    for tokens in a["tokens"]:
        src, dst = _blocks(a, tokens)
        si, di = _page_idx(a, src), _page_idx(a, dst)
        # adjacent pages merged into one entry (as NIXL does itself), MOONCAKE_BATCH a call
        s_addr, d_addr, lens = [], [], []
        for x, y in zip(si, di):
            sa, da = lp[x][0], rp[y][0]
            if lens and s_addr[-1] + lens[-1] == sa and d_addr[-1] + lens[-1] == da:
                lens[-1] += lay.half_bytes
            else:
                s_addr.append(sa)
                d_addr.append(da)
                lens.append(lay.half_bytes)
        k = MOONCAKE_BATCH
        times = []
        for i in range(a["warmup"] + a["reps"]):
            t0 = time.perf_counter()
            for j in range(0, len(lens), k):
                rc = te.batch_transfer_sync_write(peer, s_addr[j : j + k], d_addr[j : j + k],
                                                  lens[j : j + k])  # fmt: skip
                if rc != 0:
                    raise RuntimeError(f"Mooncake batch_transfer_sync_write failed ({rc})")
            notify("end")
            wait()
            if i >= a["warmup"]:
                times.append(time.perf_counter() - t0)
        rows.append(_row("mooncake", a, tokens, times, len(lens)))
    conn.send(None)
    return rows


# ---------------------------------------------------------------- processes and rows


def _row(impl: str, a: dict[str, Any], tokens: int, times: list[float], writes: int,
         grant: list[float] | None = None) -> dict[str, Any]:  # fmt: skip
    lay = _layout(a)
    nbytes = -(-tokens // lay.block_tokens) * lay.layers * lay.block_bytes
    t = statistics.median(times)
    return {
        "impl": impl, "tokens": tokens, "bytes": nbytes, "writes": writes,
        "ms": round(t * 1e3, 3), "ms_min": round(min(times) * 1e3, 3),
        "gbps": round(nbytes / t / 1e9, 3), "reps": len(times),
        "grant_ms": round(statistics.median(grant) * 1e3, 3) if grant else None,
    }  # fmt: skip


def _child(impl: str, role: str, a: dict[str, Any], conn: Any, out: Any) -> None:
    try:
        if impl == "nixl":
            rows = _nixl(role, a, conn)
        elif impl == "mooncake":
            rows = _mooncake(role, a, conn)
        elif role == "decode":
            asyncio.run(_af_decode(impl, a, conn))
            rows = []
        else:
            rows = asyncio.run(_af_prefill(impl, a, conn))
        out.put((role, rows, None))
    except BaseException as exc:  # reported to the parent, which names the impl
        out.put((role, [], f"{type(exc).__name__}: {exc}"))
    finally:
        if impl in ("nixl", "mooncake"):
            out.close()
            out.join_thread()  # the rows must leave before os._exit
            sys.stdout.flush()
            os._exit(0)  # their libraries crash in the interpreter's teardown


def _available(impl: str) -> str | None:
    mod = {"nixl": "nixl._api", "mooncake": "mooncake.engine"}.get(impl)
    if mod is None:
        return None
    try:
        __import__(mod)
    except Exception as exc:
        return f"{impl} skipped: cannot import {mod} ({exc}); pip install 'asyncfabric[peers]'"
    return None


def run_impl(impl: str, a: dict[str, Any], timeout: float = 300) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    c1, c2 = ctx.Pipe()
    out = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(impl, "decode", a, c1, out)),
             ctx.Process(target=_child, args=(impl, "prefill", a, c2, out))]  # fmt: skip
    for p in procs:
        p.start()
    rows, errs = [], []
    try:
        for _ in procs:
            role, r, err = out.get(timeout=timeout)
            rows += r
            if err:
                errs.append(f"{impl} {role}: {err}")
                break
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
    if errs:
        raise RuntimeError("; ".join(errs))
    return rows


def model_pipeline(prompt_len: int, reps: int) -> list[dict[str, Any]]:
    """The tiny-model pipelining rows: a Llama-like model (8 layers, hidden 256, 8 KV
    heads) on CPU, prefill here, decode in a process; time from the end of the
    prefill's forward to KV-complete on the decode side, pipelined and not."""
    import torch

    import asyncfabric as af
    from asyncfabric.kv import KVPrefill
    from asyncfabric.testing import kv_model as km

    kw = {"layers": 8, "heads": 8, "kv_heads": 8, "head_dim": 32}
    torch.set_num_threads(1)
    model = km.tiny_llama(0, **kw)
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    blocks = 2 * -(-prompt_len // 16) + 8
    proc = ctx.Process(target=km.decode_process, args=(there, 0, blocks, 16, kw, {}))
    proc.start()
    rows = []

    async def run() -> None:
        addr = here.recv()
        async with af.Engine("shm") as eng:
            async with KVPrefill(eng, km.layout_for(model, blocks, 16)) as pre:
                link = await pre.connect(addr)
                for pipe in (True, False):
                    lag = []
                    for i in range(reps + 1):
                        prompt = km.np_prompt((2000 if pipe else 3000) + i, prompt_len)  # no hits
                        r = await km.prefill(pre, link, model, f"m{pipe}{i}", prompt, 2,
                                             pipeline=pipe)  # fmt: skip
                        out = json.loads(await r.result(60))
                        if i:
                            lag.append(out["kv_at"] - r.prefill_end)  # type: ignore[attr-defined]
                    rows.append({
                        "impl": "tiny-pipe" if pipe else "tiny-serial", "tokens": prompt_len,
                        "bytes": r.pages, "writes": r.pages, "reps": reps,
                        "ms": round(statistics.median(lag) * 1e3, 3),
                        "ms_min": round(min(lag) * 1e3, 3), "gbps": 0.0, "grant_ms": None,
                    })  # fmt: skip

    try:
        asyncio.run(run())
        here.send("stop")
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    return rows


def main(argv: list[str]) -> int:
    from .._cli import CliParser

    p = CliParser(prog="asyncfabric bench kv", description=__doc__.split("\n\n")[0])
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated: " + ", ".join(IMPLS))
    p.add_argument("--tokens", default="1024,4096,16384", help="prompt lengths")
    p.add_argument("--provider", default="shm")
    p.add_argument("--blocks", default="contiguous", choices=["contiguous", "scattered"])
    p.add_argument("--order", default="kv_first", choices=["kv_first", "block_first"])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-tokens", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--pipeline",
        action="store_true",
        help="kv rows with compute stood in by a sleep per layer (--layer-ms)",
    )
    p.add_argument(
        "--layer-ms",
        type=float,
        default=2.0,
        help="compute per layer per 1k tokens, for --pipeline (default 2 ms)",
    )
    p.add_argument(
        "--chunk",
        type=lambda x: int(x) << 20,
        default=None,
        help="the decode engine's chunk_bytes in MiB (default: the engine's)",
    )
    p.add_argument(
        "--domains",
        type=int,
        default=1,
        help="domains (and as many progress workers) per engine, for many cores",
    )
    p.add_argument("--device", default="cpu", help="where both caches live: cpu or cuda")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",")]
    bt = args.block_tokens
    a = {
        "provider": args.provider, "layers": args.layers, "kv_heads": args.kv_heads,
        "head_dim": args.head_dim, "block_tokens": bt, "dtype": args.dtype, "order": args.order,
        "pool": -(-max(tokens) // bt) + 64, "tokens": tokens, "blocks": args.blocks,
        "reps": args.reps, "warmup": args.warmup, "pipeline": args.pipeline,
        "layer_ms": args.layer_ms, "chunk": args.chunk, "domains": args.domains,
        "device": args.device,
    }  # fmt: skip
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    bad = [i for i in impls if i not in IMPLS]
    if bad:
        print(f"asyncfabric bench kv: unknown impls {bad}; choose from {IMPLS}", file=sys.stderr)
        return 2
    rows: list[dict[str, Any]] = []
    skipped = []
    for impl in impls:
        why = _available(impl)
        if why:
            skipped.append(why)
            print(why, file=sys.stderr)
            continue
        if impl in ("nixl", "mooncake") and a["device"] != "cpu":
            skipped.append(f"{impl} skipped: its roles here move host memory only")
            continue
        if impl in ("nixl", "mooncake") and a["order"] != "kv_first":
            skipped.append(f"{impl} skipped: its page lists are written for order=kv_first")
            continue
        print(f"running {impl} ...", file=sys.stderr, flush=True)
        try:
            rows += run_impl(impl, a)
        except Exception as exc:  # one baseline failing must not lose the others' rows
            if impl.startswith(("kv", "af")):
                raise
            skipped.append(f"{impl} failed: {exc}")
            print(f"{impl} failed: {exc}", file=sys.stderr)
    if args.pipeline:
        print("running the tiny model (CPU) ...", file=sys.stderr, flush=True)
        rows += model_pipeline(512, args.reps)
    _table(rows, a)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": a, "rows": rows, "skipped": skipped}, f, indent=1)
    return 0


def _table(rows: list[dict[str, Any]], a: dict[str, Any]) -> None:
    base = {r["tokens"]: r for r in rows if r["impl"] == "af-batch"}
    paged = {r["tokens"]: r for r in rows if r["impl"] == "af-paged"}
    print(f"KV of a request: {a['layers']} layers, {a['kv_heads']} KV heads x {a['head_dim']}, "
          f"{a['dtype']}, {a['block_tokens']}-token blocks, {a['order']}, {a['blocks']} blocks, "
          f"{a['provider']}")  # fmt: skip
    print(f"{'impl':10} {'tokens':>6} {'MiB':>6} {'writes':>7} {'ms':>9} {'GB/s':>7} "
          f"{'vs batch':>8} {'vs paged':>8} {'grant ms':>8}")  # fmt: skip
    for r in sorted(rows, key=lambda r: (r["tokens"], ROW_ORDER.index(r["impl"]))):
        vb = base.get(r["tokens"])
        vp = paged.get(r["tokens"])
        print(f"{r['impl']:10} {r['tokens']:>6} {r['bytes'] / 2**20:>6.0f} {r['writes']:>7} "
              f"{r['ms']:>9.2f} {r['gbps'] if r['gbps'] else '-':>7} "
              f"{(r['gbps'] / vb['gbps']) if vb else float('nan'):>8.2f} "
              f"{(r['gbps'] / vp['gbps']) if vp else float('nan'):>8.2f} "
              f"{r['grant_ms'] if r['grant_ms'] is not None else '-':>8}")  # fmt: skip
