"""A small Llama tensor-parallel over 2 processes, its all-reduces through all_reduce (shm).

The split forward equals HF's; quant=None decodes the tokens of the unsplit model and,
bit for bit, of the same split summed in one process; int8 keeps the next-token choice of
the exact run on at least 95 % of teacher-forced steps (docs/collectives.md,
*Tensor-parallel decoding*, says why free-running agreement is not the criterion).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
import torch

pytest.importorskip("transformers")

from asyncfabric.bench.tp_llama import (  # noqa: E402
    Shard,
    Spec,
    build_model,
    check_against_hf,
    local_decode,
    prompt_ids,
    tp_check,
)

SMALL = Spec(
    hidden=128, layers=2, heads=8, kv_heads=4, intermediate=256, vocab=1024, prompt=8, tokens=128
)


def test_split_forward_equals_hf():
    model = build_model(SMALL)
    prompt = prompt_ids(SMALL)
    assert check_against_hf(model, prompt) < 1e-4
    with torch.no_grad():
        ref = model(prompt[None]).logits[0, -1]
        for world in (2, 4):
            # decode's first step is the prefill's last position
            _, logits = asyncio.run(local_decode(model, world, prompt, 1))
            assert (logits[0] - ref).abs().max() < 1e-4, world


def test_split_must_divide_heads():
    with pytest.raises(ValueError, match="must divide"):
        Shard(build_model(SMALL), 0, 3)  # 8 heads


def test_tensor_parallel_decoding_two_processes():
    d = tp_check(SMALL, world=2, provider="shm")
    assert d["hf_max_logit_diff_1rank"] < 1e-4
    # quant=None: the fp32 sum in rank order, so the same bits as one process summing the
    # same partials, and the unsplit model's tokens up to fp32 reassociation
    assert d["exact_equals_local_sum"], d["tokens"]
    assert d["exact_logits_equal_local_sum"]
    assert d["exact_vs_hf_agreement"] >= 0.95, d["tokens"]
    assert d["exact_vs_hf_max_logit_diff"] < 1e-4
    q = d["int8"]
    assert q["forced_top1"] >= 0.95, q
    assert 0 < q["kl_mean"] < 1e-3, q  # above 0: the int8 path really quantized


def test_trained_model_decoding_agrees_free_running():
    """The same small model after 80 training steps on a synthetic Markov chain (its
    predictions confident, as trained models' are): int8 free-running greedy decoding
    keeps the exact run's tokens on >= 95 % of 128 (the issue's criterion)."""
    d = tp_check(replace(SMALL, train_steps=80), world=2, provider="shm")
    assert d["exact_equals_local_sum"], d["tokens"]
    assert d["exact_top1_prob_median"] > 0.3, d  # not the flat random-weight model
    q = d["int8"]
    assert q["agreement"] >= 0.95, (q, d["tokens"])
    assert q["forced_top1"] >= 0.95, q
    assert 0 < q["kl_mean"] < 1e-3, q


def test_accuracy_command(tmp_path, capsys):
    """`asyncfabric bench allreduce --accuracy`: the error table's rows, on real engines."""
    import json

    from asyncfabric.bench.allreduce import main

    out = tmp_path / "acc.json"
    args = ["--accuracy", "--ranks", "2", "--n", "4096", "--prompt", "8", "--hidden", "128"]
    assert main(args + ["--layers", "1", "--json", str(out)]) == 0
    rows = {r["data"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"normal", "heavy-tailed", "llama-o", "llama-down"}
    for name, r in rows.items():
        # at 2 ranks a ring's bf16 sum is one rounding of the fp32 sum, like af's
        assert r["bf16"] == r["af-bf16"], name
        assert 0 < r["af-bf16"]["rel_rms"] < 4e-3, name
        # int8 is coarser than bf16, within the page's measured range
        assert r["af-bf16"]["rel_rms"] < r["int8"]["rel_rms"] < 0.02, name
    assert "| llama-down | 2 |" in capsys.readouterr().out
