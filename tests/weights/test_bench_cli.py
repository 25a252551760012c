"""``asyncfabric bench weights``: bad arguments are one-line usage errors (the benchmark
itself is run by hand, under flock; it takes minutes)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from asyncfabric.bench.weights import main  # noqa: E402


def test_unknown_size_and_impl_are_usage_errors(capsys):
    assert main(["--sizes", "3"]) == 2
    assert "sizes are [0.5, 2.0, 4.0] GB" in capsys.readouterr().err
    assert main(["--impls", "nccl"]) == 2


def test_layouts_are_the_documented_sizes():
    pytest.importorskip("transformers")
    from asyncfabric.bench.weights import layouts
    from asyncfabric.weights import plan

    tl, il = layouts(0.5)
    st = plan(tl, il).stats()
    model = sum(p.numel(r) * p.itemsize for p in tl.params.values() for r in range(2))
    assert 0.45e9 < model < 0.55e9
    assert 0.2 < st["staged_bytes"] / st["bytes"] < 0.35  # row-parallel slices are packed


def test_fp8_option_runs_asyncfabric_and_write_many_only(capsys):
    assert main(["--fp8", "--impls", "naive"]) == 2
    assert "--fp8 runs the impls asyncfabric and write_many only" in capsys.readouterr().err


def test_fp8_layouts_quantize_the_linear_weights():
    pytest.importorskip("transformers")
    import torch

    from asyncfabric.bench.weights import layouts
    from asyncfabric.weights import plan

    tl, il = layouts(0.5, fp8=True)
    assert il.fp8 and all(n.endswith("proj.weight") for n in il.fp8)
    assert all(il.params[n].dtype == torch.float8_e4m3fn for n in il.fp8)
    st = plan(tl, il, cast=True).stats()
    assert st["bytes"] < plan(*layouts(0.5)).stats()["bytes"]
