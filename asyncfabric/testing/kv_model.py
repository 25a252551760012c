"""A small Llama-family model (random weights, fixed seed) served disaggregated over
asyncfabric.kv: the decode worker process and the prefill steps the tests, the
example and the GPU script share. Needs torch and transformers."""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

import numpy as np

import asyncfabric as af
from asyncfabric.kv import KVDecode, KVLayout, KVPrefill, PrefillRequest, block_hashes
from asyncfabric.kv.hf import dynamic_cache, layer_kv, store_layer

VOCAB = 256


def tiny_llama(seed: int = 0, *, layers: int = 3, heads: int = 4, kv_heads: int = 2,
               head_dim: int = 16, device: str = "cpu") -> Any:  # fmt: skip
    """A LlamaForCausalLM from a config, random weights from ``seed`` (GQA when
    ``kv_heads < heads``), float32, eval mode. Nothing is downloaded."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=heads * head_dim, intermediate_size=4 * heads * head_dim,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, max_position_embeddings=2048, eos_token_id=None, bos_token_id=None,
        pad_token_id=None, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    m = LlamaForCausalLM(cfg).to(device).eval()
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    return m


def layout_for(model: Any, blocks: int, block_tokens: int = 4, **kw: Any) -> KVLayout:
    c = model.config
    return KVLayout(
        layers=c.num_hidden_layers, blocks=blocks, block_tokens=block_tokens,
        kv_heads=c.num_key_value_heads, head_dim=c.head_dim, dtype="float32", **kw,
    )  # fmt: skip


def reference(model: Any, prompt: list[int], new: int) -> list[int]:
    """Single-process greedy ``generate()``: what disaggregated decoding must equal."""
    import torch

    ids = torch.tensor([prompt], device=model.device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False)  # fmt: skip
    return [int(t) for t in out[0, len(prompt) :]]


def _cache_kw(model: Any) -> str:
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def greedy_from(model: Any, dc: Any, first: int, new: int) -> list[int]:
    """Greedy decoding from a rebuilt cache, ``first`` being the prefill's token."""
    import torch

    out, tok = [first], first
    with torch.no_grad():
        for _ in range(new - 1):
            ids = torch.tensor([[tok]], device=model.device)
            logits = model(input_ids=ids, use_cache=True, **{_cache_kw(model): dc}).logits
            tok = int(logits[0, -1].argmax())
            out.append(tok)
    return out


async def prefill(
    pre: KVPrefill, link: Any, model: Any, rid: str, prompt: list[int], new: int,
    *, pipeline: bool = True,
) -> PrefillRequest:  # fmt: skip
    """Run the prompt through ``model`` and push its KV: layer by layer while the
    forward pass goes on (``pipeline``), or all after it. Then note the first token."""
    import torch
    from transformers import DynamicCache

    req = await pre.submit(link, rid, len(prompt), prefix=block_hashes(prompt, pre.layout.block_tokens),
                           meta=json.dumps({"new": new}).encode())  # fmt: skip
    loop = asyncio.get_running_loop()
    dc = DynamicCache()
    hooks = []

    def ready(layer: int) -> None:
        k, v = layer_kv(dc, layer)
        store_layer(pre.cache, layer, req.blocks, k, v)
        if pipeline:
            loop.call_soon_threadsafe(req.post, layer)

    for i, blk in enumerate(model.model.layers):
        hooks.append(blk.register_forward_hook(lambda *_a, i=i: ready(i)))

    def forward() -> int:
        with torch.no_grad():
            ids = torch.tensor([prompt], device=model.device)
            out = model(input_ids=ids, use_cache=True, **{_cache_kw(model): dc})
        tok = int(out.logits[0, -1].argmax())  # (on CUDA this waits for the forward)
        req.prefill_end = time.monotonic()  # type: ignore[attr-defined]
        return tok

    try:
        first = await loop.run_in_executor(None, forward)
    finally:
        for h in hooks:
            h.remove()
    await asyncio.sleep(0)  # let the last call_soon_threadsafe post run
    await req.push()
    await req.note(json.dumps({"first": first}).encode())
    return req


async def serve_decode(dec: KVDecode, model: Any, stop: asyncio.Event) -> None:
    """Take requests, wait for their KV, decode greedily, finish with the tokens."""

    async def one(r: Any) -> None:
        try:
            await r.wait()
            kv_at = time.monotonic()  # the KV is complete (system-wide clock)
            first = json.loads(await r.note())["first"]
            new = json.loads(r.meta)["new"]
            dc = dynamic_cache(dec.cache, r.blocks, r.tokens)
            toks = greedy_from(model, dc, first, new)
            out = {"tokens": toks, "pid": os.getpid(), "kv_at": kv_at}
            await r.finish(json.dumps(out).encode())
        except af.AsyncFabricError:
            await r.abort("decode failed")

    tasks = set()
    while not stop.is_set():
        try:
            r = await dec.next_request(timeout=0.2)
        except asyncio.TimeoutError:
            continue
        t = asyncio.ensure_future(one(r))
        tasks.add(t)
        t.add_done_callback(tasks.discard)


def decode_process(conn: Any, seed: int, blocks: int, block_tokens: int, model_kw: dict,
                   layout_kw: dict, device: str = "cpu") -> None:  # fmt: skip
    """A decode worker process: sends its engine's address on ``conn``, serves until
    ``conn`` says stop (or closes)."""

    async def main() -> None:
        import torch

        torch.set_num_threads(1)
        model = tiny_llama(seed, device=device, **model_kw)
        async with af.Engine("shm") as eng:
            lay = layout_for(model, blocks, block_tokens, **layout_kw)
            async with KVDecode(eng, lay, device=device) as dec:
                stop = asyncio.Event()
                loop = asyncio.get_running_loop()
                loop.add_reader(conn.fileno(), stop.set)
                conn.send(eng.address)
                await serve_decode(dec, model, stop)
                loop.remove_reader(conn.fileno())
                conn.send(dec.pool.in_use)

    asyncio.run(main())


def np_prompt(seed: int, n: int) -> list[int]:
    return [int(x) for x in np.random.default_rng(seed).integers(1, VOCAB, n)]


# ---------------------------------------------------------------- a KV-only decode member


def kv_layout(blocks: int = 256) -> KVLayout:
    """A small layout for members that only move KV (no model)."""
    return KVLayout(layers=4, blocks=blocks, block_tokens=16, kv_heads=2, head_dim=32,
                    dtype="float16")  # fmt: skip


def decode_member_process(conn: Any, store_url: str, secret: str, group: str, name: str,
                          decode_s: float = 0.1) -> None:  # fmt: skip
    """A decode member: joins ``group`` (meta role=decode), serves requests (waits for
    the KV, "decodes" for ``decode_s``, answers with its name) until ``conn`` says
    ``"leave"``: then it drains, leaves and reports how many requests it served."""
    os.environ["ASYNCFABRIC_STORE_SECRET"] = secret

    async def main() -> None:
        async with af.Engine("shm") as eng:
            async with KVDecode(eng, kv_layout()) as dec:
                g = await af.join(store_url, group=group, name=name, engine=eng,
                                  meta={"role": "decode"}, ttl=2.0)  # fmt: skip
                served = 0

                async def one(r: Any) -> None:
                    nonlocal served
                    try:
                        await r.wait()
                        await asyncio.sleep(decode_s)
                        await r.finish(name.encode())
                        served += 1
                    except af.AsyncFabricError:
                        await r.abort("decode failed")

                stop = asyncio.Event()
                loop = asyncio.get_running_loop()
                loop.add_reader(conn.fileno(), stop.set)
                conn.send("joined")
                tasks: set[asyncio.Task[None]] = set()
                while not stop.is_set():
                    try:
                        r = await dec.next_request(timeout=0.05)
                    except asyncio.TimeoutError:
                        continue
                    t = asyncio.ensure_future(one(r))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                loop.remove_reader(conn.fileno())
                conn.recv()
                await dec.drain(timeout=30)  # refuse new requests, finish the ones in flight
                if tasks:
                    await asyncio.gather(*tasks)
                await g.leave()
                conn.send(("left", served, dec.pool.in_use))

    asyncio.run(main())
