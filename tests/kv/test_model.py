"""End to end with a real model: prefill here, KV through asyncfabric (shm) into a
decode process's paged cache, greedy decoding there; tokens identical to generate()."""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp

import pytest

pytest.importorskip("transformers")
import torch  # noqa: E402

import asyncfabric as af  # noqa: E402
from asyncfabric.kv import KVPrefill  # noqa: E402
from asyncfabric.testing import kv_model as km  # noqa: E402

pytestmark = pytest.mark.asyncio

PROMPTS = [1, 3, 4, 5, 17, 33, 64]  # lengths, several not a multiple of the 4-token block


def _decode(blocks: int, model_kw: dict, layout_kw: dict):
    """A decode process (seed 0, 4-token blocks) and our end of its pipe."""
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=km.decode_process,
                       args=(there, 0, blocks, 4, model_kw, layout_kw))  # fmt: skip
    proc.start()
    return proc, here


@pytest.mark.parametrize(
    "model_kw,layout_kw",
    [
        ({"kv_heads": 2}, {}),  # GQA, vLLM flash layout
        ({"kv_heads": 4}, {"order": "block_first"}),  # MHA, FlashInfer layout
        ({"kv_heads": 1}, {"tensors": "per_layer_kv"}),  # MQA, K and V tensors per layer
    ],
)
async def test_tokens_identical_to_generate(model_kw, layout_kw):
    torch.set_num_threads(1)
    model = km.tiny_llama(0, **model_kw)
    new = 8
    prompts = [km.np_prompt(i, n) for i, n in enumerate(PROMPTS)]
    prompts.append(prompts[-1][:40] + km.np_prompt(99, 9))  # prefix hit on the decode side
    want = [km.reference(model, p, new) for p in prompts]

    proc, here = _decode(256, model_kw, layout_kw)
    try:
        addr = await asyncio.get_running_loop().run_in_executor(None, here.recv)
        async with af.Engine("shm") as eng:
            async with KVPrefill(eng, km.layout_for(model, 64, 4)) as pre:
                link = await pre.connect(addr)
                # concurrent requests, every other one pipelined layer by layer
                reqs = [
                    await km.prefill(pre, link, model, f"r{i}", p, new, pipeline=i % 2 == 0)
                    for i, p in enumerate(prompts[:-1])
                ]
                got = await asyncio.gather(*(r.result(60) for r in reqs))
                last = await km.prefill(pre, link, model, "hit", prompts[-1], new)
                assert last.hits == 10  # 40 shared tokens = 10 full blocks not written
                got.append(await last.result(60))
                assert pre.pool.in_use == 0
        toks = [json.loads(g)["tokens"] for g in got]
        for p, w, t in zip(prompts, want, toks):
            assert t == w, f"prompt of {len(p)} tokens: decode {t} != generate {w}"
        here.send("stop")
        assert here.recv() == 0  # the decode side released every block
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()


async def test_push_to_a_decode_side_that_died_fails_the_request():
    """The decode side granted blocks, then died before the pages were written: the
    push raises RequestFailed (not a raw transport error), and so does result()."""
    import os
    import signal
    import time

    from asyncfabric.kv import RequestFailed

    model = km.tiny_llama(0)
    proc, here = _decode(64, {}, {})
    try:
        addr = await asyncio.get_running_loop().run_in_executor(None, here.recv)
        async with af.Engine("shm") as eng:
            async with KVPrefill(eng, km.layout_for(model, 64, 4)) as pre:
                link = await pre.connect(addr)
                req = await pre.submit(link, "r0", 33)
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(10)
                t0 = time.monotonic()
                with pytest.raises(RequestFailed, match="decode side died") as info:
                    await req.push()
                assert time.monotonic() - t0 < 3.0
                assert isinstance(info.value.__cause__, af.TransferError)
                with pytest.raises(RequestFailed, match="decode side died"):
                    await req.result(5)
                assert pre.pool.in_use == 0  # the request's blocks went back
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(10)
