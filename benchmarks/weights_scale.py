"""The at-scale model of docs/weights.md: a 1 T-parameter MoE update, 256 bf16 trainer GPUs
to 128 fp8 inference GPUs, predicted from the plan's statistics and per-op costs.

    .venv/bin/python benchmarks/weights_scale.py [--bench-json out.json]

The plan is computed for real (asyncfabric.weights.plan) on one Kimi-K2-shaped MoE layer
(384 experts of 2048 x 7168, MLA attention, hidden 7168) plus the embeddings and the head;
the layer's statistics are multiplied by the number of MoE layers (all alike). Trainer:
experts whole, expert e on trainer rank e mod 256 (expert parallel); dense weights split on
dim 0 over the 256 ranks. Inference: expert e on rank e // 3 (expert parallel 128), dense
weights split on dim 0 over 128. Bytes are counted at fp8 (1 byte a parameter).

With ``--bench-json`` (a JSON of ``asyncfabric bench weights``) it also checks the same
formula against this machine's measurement.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from asyncfabric.weights import Layout, Pieces, Split, plan

H, EXPERTS, MOE_I, VOCAB, HEADS = 7168, 384, 2048, 163840, 64
MOE_LAYERS, DENSE_LAYER_PARAMS = 60, 0.93e9  # layer 0 is dense (18432 intermediate, MLA)
TRAINERS, INFERENCE = 256, 128
NIC_GBPS = 400 / 8  # one 400 Gbps NIC per GPU (8 x 400 Gbps per 8-GPU node), GB/s
EFFICIENCY = 0.9  # of line rate reached by large RDMA writes (EFA / ConnectX-7)
CHUNK = 1 << 20  # chunk_bytes: one immediate (one NIC op) per MiB
OP_US = 1.6  # sender-side cost per op: native post + completion (docs/scale-model.md)
FILL_GBPS = 1500  # a GPU's cast bf16 -> fp8 (read 2 B, write 1 B per parameter), GB/s
DEPTH, BUCKET = 4, 32 << 20


def layer_params() -> list[tuple[str, tuple[int, ...], object, object]]:
    out: list[tuple[str, tuple[int, ...], object, object]] = []
    attn = {"q_a": (1536, H), "q_b": (HEADS * 192, 1536), "kv_a": (576, H),
            "kv_b": (HEADS * 256, 512), "o": (H, HEADS * 128), "router": (EXPERTS, H)}  # fmt: skip
    for n, s in attn.items():
        out.append((n, s, Split(0), Split(0)))
    for k in ("gate", "up"):
        out.append((f"shared.{k}", (MOE_I, H), Split(0), Split(0)))
    out.append(("shared.down", (H, MOE_I), Split(0), Split(0)))
    for e in range(EXPERTS):
        tr = tuple(((0, 0),) if r != e % TRAINERS else None for r in range(TRAINERS))
        ir = tuple(((0, 0),) if r != e // 3 else None for r in range(INFERENCE))
        for k, shape in (("gate", (MOE_I, H)), ("up", (MOE_I, H)), ("down", (H, MOE_I))):
            n = shape[0]
            t = Pieces(0, tuple(((0, n),) if x is None else x for x in tr))
            i = Pieces(0, tuple(((0, n),) if x is None else x for x in ir))
            out.append((f"e{e}.{k}", shape, t, i))
    return out


def stats() -> dict[str, float]:
    ps = layer_params()
    tl = Layout(TRAINERS, [(n, s, torch.bfloat16, t) for n, s, t, _ in ps])
    il = Layout(INFERENCE, [(n, s, torch.bfloat16, i) for n, s, _, i in ps])
    p = plan(tl, il)
    rx_bytes = [0] * INFERENCE
    rx_ops = [0] * INFERENCE
    tx_bytes = [0] * TRAINERS
    tx_ops = [0] * TRAINERS
    for m in p.moves:
        b = m.nbytes // 2  # fp8 on the wire
        ops = m.runs * max(1, -(-(m.run_bytes // 2) // CHUNK))
        rx_bytes[m.dst] += b
        rx_ops[m.dst] += ops
        tx_bytes[m.src] += b
        tx_ops[m.src] += ops
    emb = 2 * VOCAB * H  # embeddings and head, fp8, split over every rank
    dense = DENSE_LAYER_PARAMS
    return {
        "params": MOE_LAYERS * sum(math.prod(s) for _, s, _, _ in ps) + emb + dense,
        "rx_bytes_max": MOE_LAYERS * max(rx_bytes) + (emb + dense) / INFERENCE,
        "rx_ops_max": MOE_LAYERS * max(rx_ops) + (emb + dense) / INFERENCE / CHUNK,
        "tx_bytes_max": MOE_LAYERS * max(tx_bytes) + (emb + dense) / TRAINERS,
        "tx_ops_max": MOE_LAYERS * max(tx_ops) + (emb + dense) / TRAINERS / CHUNK,
        "moves_per_layer": len(p.moves),
    }


def predict(st: dict[str, float]) -> dict[str, float]:
    bw = NIC_GBPS * EFFICIENCY * 1e9
    rx = st["rx_bytes_max"] / bw
    tx = st["tx_bytes_max"] / bw + st["tx_ops_max"] * OP_US * 1e-6
    fill = DEPTH * BUCKET * 1.5 / (FILL_GBPS * 1e9)
    return {"receiver_nic_s": rx, "sender_nic_s": tx, "fill_s": fill,
            "update_s": max(rx, tx) + fill}  # fmt: skip


def check_here(path: str) -> None:
    with open(path) as fh:
        rows = json.load(fh)["rows"]
    for size in sorted({r["model_gb"] for r in rows}):
        by = {r["impl"]: r for r in rows if r["model_gb"] == size}
        if "asyncfabric" not in by or "write_many" not in by:
            continue
        wm = by["write_many"]["time_s_median"]
        staged = by["asyncfabric"]["plan_staged_bytes"] / 2  # per trainer rank
        fill = min(staged, DEPTH * BUCKET) / (COPY_HERE_GBPS * 1e9)
        # the rest of the packing runs beside the copies on the same two cores
        rest = max(0.0, staged - DEPTH * BUCKET) / (COPY_HERE_GBPS * 1e9)
        pred = wm + fill + rest
        got = by["asyncfabric"]["time_s_median"]
        print(f"here, {size} GB: write_many {wm:.3f} s + fill {fill:.3f} s + packing beside "
              f"the copies {rest:.3f} s = {pred:.3f} s predicted, {got:.3f} s measured "
              f"({got / pred:.2f}x)")  # fmt: skip


COPY_HERE_GBPS = 9.2  # numpy strided copy of bf16 row slices, measured here (docs/weights.md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench-json", action="append", default=[])
    a = ap.parse_args()
    st = stats()
    pr = predict(st)
    print(f"1 T-parameter MoE ({st['params'] / 1e12:.2f} T params), {TRAINERS} bf16 trainer GPUs "
          f"-> {INFERENCE} fp8 inference GPUs, one 400 Gbps NIC per GPU")  # fmt: skip
    print(f"  plan: {st['moves_per_layer']} moves per MoE layer; busiest receiver "
          f"{st['rx_bytes_max'] / 1e9:.2f} GB in {st['rx_ops_max']:.0f} ops; busiest trainer "
          f"{st['tx_bytes_max'] / 1e9:.2f} GB in {st['tx_ops_max']:.0f} ops")  # fmt: skip
    print(f"  receiver NIC {pr['receiver_nic_s']:.3f} s, sender NIC {pr['sender_nic_s']:.3f} s, "
          f"pipeline fill {pr['fill_s'] * 1e3:.2f} ms -> update {pr['update_s']:.2f} s "
          "(fabric-lib, published: 1.3 s)")  # fmt: skip
    for path in a.bench_json:
        check_here(path)


if __name__ == "__main__":
    main()
