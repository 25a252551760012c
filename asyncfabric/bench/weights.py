"""``asyncfabric bench weights``: an RL weight update, trainer 2 ranks to inference 2 ranks.

asyncfabric bench weights                       # models of about 0.5, 2 and 4 GB (bf16)
asyncfabric bench weights --sizes 0.5 --repeats 3 --json out.json
asyncfabric bench weights --impls asyncfabric,write_many --provider tcp

Four processes (two trainer ranks, sharded on dim 0; two tensor-parallel inference ranks,
fused column and row splits of a Phi-3-shaped model), one engine each. For every model size
and repeat, side by side in one run, each of these moves the same weights:

* ``asyncfabric``: ``weights.Sender.update`` / ``Receiver.wait_version`` (the static plan,
  direct runs in one ``write_many``, strided runs packed in pipelined buckets);
* ``write_many``: the transport alone: the plan's writes (same sizes, same targets, same
  count) from contiguous source bytes, with no packing, batched as the sender batches its
  direct writes (``write_many`` calls of about 256 MiB, one at a time; one call for
  everything was slower): the bandwidth the update can at best reach;
* ``naive``: one ``await eng.write`` per tensor piece, in turn (the strided ones made
  contiguous first), as a first implementation would do;
* ``gloo``: ``torch.distributed.broadcast`` over gloo of every trainer shard, tensor by
  tensor, to both inference ranks (each receives the whole model, as a broadcast does).

Time: from the moment all four processes start (after a barrier over pipes) until the last
inference rank has all its bytes (its counter fired, or its last broadcast returned).
Effective GB/s: model bytes / time. Weights are built on the meta device from a config (no
download, no init cost) and filled with a byte pattern; the 0.5 GB model is checked
bitwise after asyncfabric's update.

``--fp8``: the inference side holds the decoder's linear weights as fp8 (e4m3, per-tensor
scale; bf16 trainers), so every one of their runs is quantized while packed. It runs
``asyncfabric`` (timed: each trainer's ``local_amax`` and its update; the max over the two
trainers' amaxes, a few floats, is exchanged once through the driver, untimed) and
``write_many`` (the same plan's writes, fp8-sized, no packing); the 0.5 GB model is checked
bitwise against the one-process reference cast.
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

IMPLS = ("asyncfabric", "write_many", "naive", "gloo")
# Phi-3-shaped configs (hidden, layers, heads, kv heads, intermediate) of about 0.5, 2, 4 GB
MODELS = {
    0.5: (1024, 16, 16, 4, 2816),
    2.0: (2048, 19, 32, 8, 5632),
    4.0: (2560, 27, 40, 8, 6912),
}
VOCAB = 32064
BASE_IMM = 0x0A000000  # the baselines' immediates: application space, one per repeat


def _cfg(size: float) -> Any:
    from transformers import Phi3Config

    h, layers, heads, kv, inter = MODELS[size]
    return Phi3Config(
        hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, intermediate_size=inter, vocab_size=VOCAB,
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip


def layouts(size: float, trainer: str = "fsdp", fp8: bool = False) -> tuple[Any, Any]:
    """The trainer (2 ranks: dim 0, or ``"tp"``: Megatron tensor parallel) and inference
    (tensor parallel 2) layouts, bf16 (``fp8``: the inference's linear weights e4m3)."""
    import torch
    from transformers import Phi3ForCausalLM

    from asyncfabric.weights import Layout, Split
    from asyncfabric.weights.rules import megatron_fused

    cfg = _cfg(size)
    with torch.device("meta"):
        model = Phi3ForCausalLM(cfg)
    tp = megatron_fused(cfg)

    params = list(model.named_parameters())
    if trainer == "tp":
        tl = Layout.of(params, 2, tp, dtype=torch.bfloat16)
    else:
        tl = Layout.of(params, 2, lambda n, s: Split(0), dtype=torch.bfloat16)
    e4m3 = torch.float8_e4m3fn if fp8 else torch.bfloat16
    il = Layout.of(
        params, 2, tp, dtype=lambda n, s: e4m3 if n.endswith("proj.weight") else torch.bfloat16
    )
    return tl, il


def _fill_model(buf: Any, rank: int, seed: int, tl: Any, fp8: bool) -> None:
    """The byte pattern; for fp8, as finite values (a per-tensor scale needs a finite amax)."""
    import torch

    _fill(buf, rank, seed)
    if fp8:
        for v in tl.views(buf, rank).values():
            torch.nan_to_num_(v, nan=0.0, posinf=1.0, neginf=-1.0)


def _reference(tl: Any, il: Any, tbufs: list[Any]) -> dict[str, Any]:
    """The full tensors the inference layout must hold: fp8 ones cast in one process
    (scale = amax / 448 in fp32, the division in fp32), with their scales."""
    import torch

    tv = [tl.views(b, r) for r, b in enumerate(tbufs)]
    full = {}
    for n in tl.params:
        x = tl.assemble(n, [v[n] for v in tv])
        if n in il.fp8:
            scale = x.abs().max().float() / 448
            full[n] = (x.float() / scale).to(torch.float8_e4m3fn)
            full[n + "_scale"] = scale
        else:
            full[n] = x
    return full


def _fill(buf: Any, rank: int, seed: int) -> None:
    import torch

    # a cheap pattern that differs per rank, byte and seed (random bytes take too long at 4 GB)
    n = buf.numel()
    step = 1 << 24
    base = torch.arange(min(n, step), dtype=torch.int64, device=buf.device)
    for off in range(0, n, step):
        k = min(step, n - off)
        buf[off : off + k] = ((base[:k] * 2654435761 + off + rank * 977 + seed * 131) >> 7).to(
            torch.uint8
        )


# ---------------------------------------------------------------- worker


def _worker(role: str, rank: int, conn: Any, provider: str, size: float, port: int,
            impls: tuple[str, ...], bucket: int, depth: int, trainer: str, group: int,
            window: int, fp8: bool = False) -> None:  # fmt: skip
    try:
        asyncio.run(
            _serve(
                role,
                rank,
                conn,
                provider,
                size,
                port,
                impls,
                bucket,
                depth,
                trainer,
                group,
                window,
                fp8,
            )  # fmt: skip
        )
    except BaseException as exc:  # reported to the parent, which raises it
        import traceback

        conn.send(("err", f"{role}{rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


async def _serve(role: str, rank: int, conn: Any, provider: str, size: float, port: int,
                 impls: tuple[str, ...], bucket: int, depth: int, trainer: str, group: int,
                 window: int, fp8: bool = False) -> None:  # fmt: skip
    import torch

    import asyncfabric as af
    from asyncfabric.weights import Receiver, ReceiverInfo, Sender, SenderInfo, plan

    torch.set_num_threads(1)
    device = os.environ.get("AF_WEIGHTS_DEVICE", "cpu")
    loop = asyncio.get_running_loop()

    async def recv() -> Any:
        return await loop.run_in_executor(None, conn.recv)

    kw = {"node": "127.0.0.1"} if provider == "tcp" else {}
    tl, il = layouts(size, trainer, fp8)
    p = plan(tl, il, cast=fp8)
    pg = None
    if "gloo" in impls:
        import torch.distributed as dist

        world_rank = rank if role == "t" else 2 + rank
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=world_rank, world_size=4
        )
        groups = [dist.new_group([0, 2, 3]), dist.new_group([1, 2, 3])]
        pg = dist
    async with af.Engine(provider, **kw) as eng:
        if role == "t":
            buf = tl.alloc(rank, device)
            _fill_model(buf, rank, 1, tl, fp8)
            tx = Sender(
                eng,
                tl,
                rank,
                buf,
                cast=fp8,
                bucket_bytes=bucket,
                depth=depth,
                group_bytes=group,
                window=window,
            )
            conn.send(("ok", (tx.name, rank, bytes(tx.info.ack))))
            rx_raw = await recv()
            rxs = [ReceiverInfo(n, i, r, il, (af.Descriptor.from_bytes(a),
                                               af.Descriptor.from_bytes(b)))
                   for n, i, r, a, b in rx_raw]  # fmt: skip
            mine = [m for m in p.moves if m.src == rank]
            region = tx._region
            stage_n = max([m.nbytes for m in mine if not m.direct] or [64])
            stage = torch.empty(stage_n, dtype=torch.uint8, device=device)
            stage_reg = eng.register(stage)
            views = tl.views(buf, rank)
            wm = _write_many_batches(af, mine, rxs, region, tl.nbytes(rank), tx.group_bytes)
            names = il.fp8
            conn.send(("ok", tx.local_amax(names).tolist()))
            got = await recv()  # the max over both trainers of each amax
            amax = dict(zip(names, got)) if names else None
            while True:
                cmd, *args = await recv()
                if cmd == "exit":
                    break
                impl, rep = args
                conn.send(("ok", None))
                await recv()  # go
                t0 = time.perf_counter()
                if impl == "asyncfabric":
                    if names:
                        tx.local_amax(names)  # timed: each rank's part of the amax
                    await tx.update(rep, rxs, amax=amax)
                elif impl == "write_many":
                    await _windowed(eng, wm(BASE_IMM + rep), tx.window)
                elif impl == "naive":
                    await _naive(eng, mine, rxs, region, stage, stage_reg, views, BASE_IMM + rep)
                elif impl == "gloo":
                    assert pg is not None
                    for name in tl.params:
                        for r in range(2):
                            t = views[name] if r == rank else None
                            if t is not None:
                                await loop.run_in_executor(
                                    None,
                                    lambda t=t, r=r: pg.broadcast(
                                        t.view(-1).view(torch.uint8)
                                        if t.dim()
                                        else t.reshape(1).view(torch.uint8),
                                        src=r,
                                        group=groups[r],
                                    ),
                                )
                t1 = time.perf_counter()
                if impl == "asyncfabric" and os.environ.get("AF_WEIGHTS_DEBUG"):
                    print(f"trainer{rank}: {tx.timings}", file=sys.stderr, flush=True)
                conn.send(("ok", (t0, t1)))
        else:
            rx = Receiver(eng, il, rank, tl, index=rank, name=f"inf{rank}", device=device,
                          cast=fp8)  # fmt: skip
            info = rx.info
            conn.send(("ok", (rx.name, rx.index, rank, bytes(info.buffers[0]),
                              bytes(info.buffers[1]))))  # fmt: skip
            tx_raw = await recv()
            await rx.start([SenderInfo(n, r, af.Descriptor.from_bytes(a)) for n, r, a in tx_raw])
            scratch = torch.empty(max(tl.params[n].numel(r) * 2 for n in tl.params
                                      for r in range(2)) or 1, dtype=torch.uint8,
                                  device=device)  # fmt: skip
            conn.send(("ok", None))
            while True:
                cmd, *args = await recv()
                if cmd == "exit":
                    break
                if cmd == "verify":
                    ref = il.alloc(rank, device)
                    tb = [tl.alloc(r, device) for r in range(2)]
                    for r in range(2):
                        _fill_model(tb[r], r, 1, tl, fp8)
                    il.fill(ref, rank, _reference(tl, il, tb))
                    conn.send(("ok", bool(torch.equal(ref, rx.buffer))))
                    continue
                impl, rep = args
                conn.send(("ok", None))
                await recv()  # go
                t0 = time.perf_counter()
                if impl == "asyncfabric":
                    await rx.wait_version(rep, timeout=600)
                elif impl in ("write_many", "naive"):
                    await eng.counter(BASE_IMM + rep).wait(rx.expected, timeout=600)
                elif impl == "gloo":
                    assert pg is not None
                    for name in tl.params:
                        for r in range(2):
                            n = tl.params[name].numel(r) * 2
                            t = scratch[:n]
                            await loop.run_in_executor(
                                None, lambda t=t, r=r: pg.broadcast(t, src=r, group=groups[r])
                            )
                t1 = time.perf_counter()
                conn.send(("ok", (t0, t1)))
    if pg is not None:
        pg.destroy_process_group()


def _write_many_batches(af: Any, moves: list[Any], rxs: list[Any], region: Any, nbytes: int,
                        group: int) -> Any:  # fmt: skip
    """The plan's writes (same sizes, targets and count) from contiguous source bytes, in
    groups of about ``group`` bytes, as the sender posts its direct writes."""
    import numpy as np

    from asyncfabric.weights.sender import _groups

    by_rank: dict[int, list[Any]] = {}
    for m in moves:
        by_rank.setdefault(m.dst, []).append(m)
    cols = []
    for r in rxs:
        ms = by_rank.get(r.rank, [])
        if not ms:
            continue
        do = np.concatenate([m.dst_offsets for m in ms])
        nb = np.concatenate([np.full(m.runs, m.run_bytes, np.uint64) for m in ms])
        so = (np.cumsum(nb) - nb) % np.uint64(max(1, nbytes - int(nb.max())))
        share = max(1, group // len({m.dst for m in moves}))
        cols.append((r.buffers[0], _groups(so.astype(np.uint64), do, nb,
                                            r.buffers[0].chunk_bytes, share)))  # fmt: skip
    ngroups = max(len(g) for _, g in cols)

    def batches(imm: int) -> list[Any]:
        out = []
        for k in range(ngroups):
            b = af.Batch()
            for desc, gs in cols:
                if k < len(gs):
                    b.add_many(region, desc, gs[k][0], gs[k][1], gs[k][2], imm=imm)
            out.append(b)
        return out

    return batches


async def _windowed(eng: Any, batches: list[Any], window: int) -> None:
    sem = asyncio.Semaphore(window)

    async def one(b: Any) -> None:
        try:
            await eng.write_many(b)
        finally:
            sem.release()

    tasks = []
    for b in batches:
        await sem.acquire()
        tasks.append(asyncio.ensure_future(one(b)))
    await asyncio.gather(*tasks)


async def _naive(eng: Any, moves: list[Any], rxs: list[Any], region: Any, stage: Any,
                 stage_reg: Any, views: Any, imm: int) -> None:  # fmt: skip
    """One ``await write`` per tensor piece (per run), strided pieces made contiguous first."""
    for r in rxs:
        for m in moves:
            if m.dst != r.rank:
                continue
            desc = r.buffers[0]
            if m.direct:
                for so, do in zip(m.src_offsets.tolist(), m.dst_offsets.tolist()):
                    await eng.write(region[so : so + m.run_bytes], desc[do : do + m.run_bytes],
                                    imm=imm)  # fmt: skip
            else:
                src = views[m.param][tuple(slice(a, a + n) for a, n in m.box)]
                stage[: m.nbytes].view(src.dtype).view(src.shape).copy_(src)
                if stage.is_cuda:
                    import torch

                    torch.cuda.synchronize(stage.device)
                for k, do in enumerate(m.dst_offsets.tolist()):
                    o = k * m.run_bytes
                    await eng.write(stage_reg[o : o + m.run_bytes], desc[do : do + m.run_bytes],
                                    imm=imm)  # fmt: skip


# ---------------------------------------------------------------- driver


class _Procs:
    def __init__(self, provider: str, size: float, impls: tuple[str, ...], bucket: int,
                 depth: int, trainer: str, group: int = 256 << 20, window: int = 1,
                 fp8: bool = False) -> None:  # fmt: skip
        import socket

        ctx = mp.get_context("spawn")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.conns = []
        self.procs = []
        for role, rank in (("t", 0), ("t", 1), ("i", 0), ("i", 1)):
            a, b = ctx.Pipe()
            pr = ctx.Process(target=_worker, args=(role, rank, b, provider, size, port, impls,
                                                   bucket, depth, trainer, group, window,
                                                   fp8),
                             daemon=True)  # fmt: skip
            pr.start()
            self.conns.append(a)
            self.procs.append(pr)

    def get(self, i: int, timeout: float = 900) -> Any:
        c = self.conns[i]
        if not c.poll(timeout):
            raise TimeoutError(f"benchmark worker {i} did not answer within {timeout} s")
        kind, val = c.recv()
        if kind != "ok":
            raise RuntimeError(str(val))
        return val

    def all(self) -> list[Any]:
        return [self.get(i) for i in range(4)]

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(("exit",))
            except OSError:
                pass
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()


def run_size(provider: str, size: float, impls: tuple[str, ...], repeats: int, bucket: int,
             depth: int, say: Any, trainer: str = "fsdp", group: int = 64 << 20,
             window: int = 2, fp8: bool = False) -> list[dict[str, Any]]:  # fmt: skip
    tl, il = layouts(size, trainer, fp8)
    from asyncfabric.weights import plan

    st = plan(tl, il, cast=fp8).stats()
    model_bytes = sum(p.numel(0) * p.itemsize for p in tl.params.values()) + sum(
        p.numel(1) * p.itemsize for p in tl.params.values()
    )
    procs = _Procs(provider, size, impls, bucket, depth, trainer, group, window, fp8)
    rows: list[dict[str, Any]] = []
    try:
        txs = [procs.get(0), procs.get(1)]
        rxs = [procs.get(2), procs.get(3)]
        for i in (0, 1):
            procs.conns[i].send(rxs)
        for i in (2, 3):
            procs.conns[i].send(txs)
        local = procs.all()[:2]  # the trainers' amaxes of their shards (fp8)
        for i in (0, 1):
            procs.conns[i].send([max(a, b) for a, b in zip(*local)])
        times: dict[str, list[float]] = {k: [] for k in impls}
        version = 0
        for rep in range(repeats + 1):  # the first round warms up, untimed
            for impl in impls:
                version += 1
                for c in procs.conns:
                    c.send(("run", impl, version))
                procs.all()
                for c in procs.conns:
                    c.send(("go",))
                spans = procs.all()
                t = max(s[1] for s in spans[2:]) - min(s[0] for s in spans)
                if rep:
                    times[impl].append(t)
                    say(f"  {size} GB {impl:11} repeat {rep}: {t:.3f} s, "
                        f"{model_bytes / t / 1e9:.2f} GB/s")  # fmt: skip
                if impl == "asyncfabric" and size == min(MODELS) and rep == 0:
                    for i in (2, 3):
                        procs.conns[i].send(("verify",))
                    if not all(procs.get(i) for i in (2, 3)):
                        raise RuntimeError("asyncfabric's update was not bitwise the reference")
                    say(f"  {size} GB asyncfabric: inference shards bitwise equal to the reference")
        for impl in impls:
            ts = times[impl]
            best = min(ts)
            rows.append({
                "model_gb": size, "model_bytes": model_bytes, "impl": impl, "trainer": trainer,
                "time_s_best": best, "time_s_median": statistics.median(ts),
                "gbps_best": model_bytes / best, "gbps_median": model_bytes / statistics.median(ts),
                "repeats": len(ts), "plan_writes": st["writes"], "plan_staged_bytes": st["staged_bytes"],
                "fp8": fp8, "plan_bytes": st["bytes"],
            })  # fmt: skip
        ref = {r["impl"]: r for r in rows}
        for r in rows:
            for base in ("write_many", "naive", "gloo"):
                if base in ref:
                    r[f"vs_{base}"] = ref[base]["time_s_median"] / r["time_s_median"]
    finally:
        procs.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    from .._cli import CliParser

    p = CliParser(prog="asyncfabric bench weights", description=__doc__.split("\n\n")[0])
    p.add_argument("--provider", default="shm")
    p.add_argument("--sizes", default="0.5,2,4", help="model sizes in GB: 0.5, 2, 4")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--trainer",
        default="fsdp",
        choices=["fsdp", "tp"],
        help="trainer sharding: fsdp (dim 0, the update reshards) or tp (as inference)",
    )
    p.add_argument("--bucket-mib", type=int, default=32, help="staging bucket size")
    p.add_argument("--depth", type=int, default=4, help="staging buckets in rotation")
    p.add_argument(
        "--group-mib", type=int, default=256, help="bytes per write_many of direct writes"
    )
    p.add_argument("--window", type=int, default=1, help="write_many calls in flight")
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu, or cuda: every buffer on GPU 0 (several processes on one GPU need CUDA MPS)",
    )
    p.add_argument(
        "--fp8",
        action="store_true",
        help="inference linear weights in fp8 e4m3 (per-tensor scale); asyncfabric, write_many",
    )
    p.add_argument("--json", help="write the rows to this JSON file")
    a = p.parse_args(argv)
    sizes = [float(s) for s in a.sizes.split(",")]
    os.environ["AF_WEIGHTS_DEVICE"] = a.device  # the spawned workers inherit it
    bad = [s for s in sizes if s not in MODELS]
    impls = tuple(i.strip() for i in a.impls.split(",") if i.strip())
    if bad or any(i not in IMPLS for i in impls):
        print(f"asyncfabric bench weights: error: sizes are {sorted(MODELS)} GB and impls "
              f"{', '.join(IMPLS)}", file=sys.stderr)  # fmt: skip
        return 2
    if a.fp8:
        if a.impls == ",".join(IMPLS):
            impls = ("asyncfabric", "write_many")
        elif set(impls) - {"asyncfabric", "write_many"}:
            print("asyncfabric bench weights: error: --fp8 runs the impls asyncfabric and "
                  "write_many only (naive and gloo send the trainer's bf16)",
                  file=sys.stderr)  # fmt: skip
            return 2
    if "gloo" in impls:
        try:
            import torch.distributed as dist

            if not dist.is_gloo_available():
                raise ImportError
        except ImportError:
            print("gloo is not available in this torch: left out", file=sys.stderr)
            impls = tuple(i for i in impls if i != "gloo")
    rows: list[dict[str, Any]] = []

    def say(s: str) -> None:
        print(s, file=sys.stderr, flush=True)

    t0 = time.monotonic()
    for s in sizes:
        say(f"model of {s} GB: trainer 2 ranks ({a.trainer}) -> inference TP 2, {a.provider}")
        rows += run_size(
            a.provider,
            s,
            impls,
            a.repeats,
            a.bucket_mib << 20,
            a.depth,
            say,
            a.trainer,
            a.group_mib << 20,
            a.window,
            a.fp8,
        )
    what = " (linear weights fp8 e4m3)" if a.fp8 else ""
    print(f"trainer {a.trainer} -> inference TP 2{what} on {a.provider}")
    print(f"{'model':>6} {'impl':11} {'time s':>8} {'GB/s':>7} {'vs write_many':>14} "
          f"{'vs naive':>9} {'vs gloo':>8}")  # fmt: skip
    for r in rows:

        def f(k: str, r: dict[str, Any] = r) -> str:
            return f"{r[k]:.2f}" if k in r else "-"

        print(f"{r['model_gb']:>5}G {r['impl']:11} {r['time_s_median']:8.3f} "
              f"{r['gbps_median'] / 1e9:7.2f} {f('vs_write_many'):>14} {f('vs_naive'):>9} "
              f"{f('vs_gloo'):>8}")  # fmt: skip
    print(
        f"done in {time.monotonic() - t0:.0f} s (medians of {a.repeats}; vs X: X's time / "
        "this time, >1 is faster)"
    )
    if a.json:
        from . import schema

        info = schema.meta(["asyncfabric", "bench", "weights", *(argv or sys.argv[1:])])
        info["provider"] = a.provider
        with open(a.json, "w") as fh:
            json.dump({"meta": info, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
