"""The benchmark runner: row schema, suite selection, peer skipping, a quick end-to-end run.

Nothing here asserts anything about speed: only that the runner measures what
it says, with rows in the documented shape.
"""

from __future__ import annotations

import csv
import json

import pytest

from asyncfabric.backends.libfabric import LibfabricBackend
from asyncfabric.bench import cli, peers, schema, suites

HAVE_SHM = "shm" in LibfabricBackend().providers()
needs_shm = pytest.mark.skipif(not HAVE_SHM, reason="libfabric shm provider not available")


def _row(**kw):
    base = dict(
        suite="write", impl="asyncfabric", backend="libfabric", provider="shm", size_bytes=1024,
        iters=10, times_ns=[1_000_000, 2_000_000, 3_000_000], bytes_per_rep=10240, ops_per_rep=10,
    )  # fmt: skip
    base.update(kw)
    return schema.make_row(**base)


def test_row_has_every_field_and_validates():
    r = _row()
    assert set(schema.FIELD_NAMES) <= set(r)
    schema.validate_row(r)
    # median of 10240 B over 1, 2, 3 ms
    assert r["gbps"] == pytest.approx(10240 / 2e-3 / 1e9)
    assert r["ops_per_s"] == pytest.approx(10 / 2e-3)
    assert r["repeats"] == 3


def test_bad_rows_are_refused():
    with pytest.raises(ValueError, match="impl"):
        _row(impl="mpi")
    with pytest.raises(ValueError, match="no timed repeats"):
        _row(times_ns=[])
    r = _row()
    del r["gbps"]
    with pytest.raises(ValueError, match="gbps"):
        schema.validate_row(r)
    r = _row()
    r["iters"] = "ten"
    with pytest.raises(ValueError, match="iters"):
        schema.validate_row(r)


def test_ratio_vs_raw_throughput_and_latency():
    af = _row(times_ns=[2_000_000])
    raw = _row(impl="raw", times_ns=[1_000_000])
    pa = _row(suite="pingpong", times_ns=[1], rtts_ns=[4000, 4000])
    pr = _row(suite="pingpong", impl="raw", times_ns=[1], rtts_ns=[1000, 1000])
    rows = [af, raw, pa, pr]
    schema.add_ratios(rows)
    assert af["ratio_vs_raw"] == pytest.approx(0.5)
    assert raw["ratio_vs_raw"] is None
    assert pa["ratio_vs_raw"] == pytest.approx(0.25)


def test_suite_selection():
    assert suites.select(["all"]) == list(suites.ORDER)
    assert suites.select(["scale", "write", "write"]) == ["write", "scale"]
    with pytest.raises(ValueError, match="unknown suite 'nope'"):
        suites.select(["nope"])
    with pytest.raises(ValueError):
        suites.select([])
    assert cli.main(["nope"]) == 2


def test_default_grids_cover_the_issue():
    w = {p.size for p in suites.points("write", quick=False)}
    assert min(w) == 8 and max(w) == 256 << 20 and {1 << 20, 64 << 20} <= w
    paged = suites.points("paged", quick=False)
    assert {p.size for p in paged} == {1 << 10, 4 << 10, 16 << 10, 64 << 10}
    assert all(p.pages == 10000 for p in paged)
    sc = {(p.peers, p.counters) for p in suites.points("scale", quick=False)}
    assert (1, 1) in sc and (64, 10000) in sc
    assert {p.domains for p in suites.points("domains", quick=False)} == {1, 2, 4}
    # every stream point divides evenly over its receivers
    for name in ("fanout", "scale"):
        for p in suites.points(name, quick=False) + suites.points(name, quick=True):
            assert p.iters % p.peers == 0


def test_sizes_and_iters_overrides():
    pts = suites.points("write", quick=True, sizes=[8, 4096], iters=7)
    assert [p.size for p in pts] == [8, 4096] and all(p.iters == 7 for p in pts)


def test_missing_peer_is_skipped_with_a_message(monkeypatch):
    monkeypatch.setitem(peers._MODULES, "zmq", "no_such_module_for_asyncfabric_tests")
    ok, why = peers.availability(("zmq",))
    assert ok == []
    assert "zmq skipped" in why["zmq"] and "pip install" in why["zmq"]


@needs_shm
def test_quick_run_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(peers._MODULES, "zmq", "no_such_module_for_asyncfabric_tests")
    js, cs = tmp_path / "out.json", tmp_path / "out.csv"
    rc = cli.main(
        ["scale", "--quick", "--no-progress", "--impls", "asyncfabric,raw,zmq",
         "--json", str(js), "--csv", str(cs)]
    )  # fmt: skip
    assert rc == 0
    doc = schema.read_json(js)
    rows = doc["rows"]
    assert {r["impl"] for r in rows} == {"asyncfabric", "raw"}
    assert len(rows) == 2 * len(suites.points("scale", quick=True))
    for r in rows:
        schema.validate_row(r)
        assert r["suite"] == "scale" and r["provider"] == "shm"
        assert r["gbps"] > 0 and r["ops_per_s"] > 0 and r["lat_p99_us"] >= r["lat_p50_us"] > 0
    assert all(r["ratio_vs_raw"] > 0 for r in rows if r["impl"] == "asyncfabric")
    assert [s["impl"] for s in doc["skipped"]] == ["zmq"]
    out = capsys.readouterr()
    assert "zmq skipped" in out.err + out.out
    with open(cs) as f:
        got = list(csv.DictReader(f))
    assert len(got) == len(rows) and list(got[0]) == list(schema.FIELD_NAMES)

    from asyncfabric.bench import plot

    made = plot.plot(js, tmp_path / "plots")
    assert made and all(p.stat().st_size > 0 for p in made)
    json.loads(js.read_text())  # still plain JSON


@needs_shm
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_run_suite_api(anyio_backend):
    import asyncfabric.bench as bench

    rows = await bench.run_suite("pingpong", provider="shm", quick=True, sizes=[8], iters=20)
    assert {r["impl"] for r in rows} == {"asyncfabric", "raw"}
    for r in rows:
        schema.validate_row(r)
        assert r["suite"] == "pingpong" and r["iters"] == 20 and r["lat_p50_us"] > 0


def test_device_option_parses():
    from asyncfabric.bench.devices import Devices, parse_device, resolve

    assert parse_device("cpu") == Devices("cpu", "cpu") and not parse_device("cpu").cuda
    assert resolve(parse_device("cuda"), 2) == Devices("cuda:0", "cuda:1")
    assert resolve(parse_device("cuda"), 1) == Devices("cuda:0", "cuda:0")
    assert parse_device("cuda:1") == Devices("cuda:1", "cuda:1")
    assert parse_device("cuda:0, cuda:1") == Devices("cuda:0", "cuda:1")
    assert parse_device("cuda:0,cuda:1").label("nvlink") == "cuda:0->cuda:1 nvlink"
    for bad in ("gpu", "cuda:x", "cuda:0,cuda:1,cpu", "cuda0"):
        with pytest.raises(ValueError, match="--device"):
            parse_device(bad)
    assert cli._parser().parse_args(["write", "--device", "cuda:0,cuda:1"]).device == (
        "cuda:0,cuda:1"
    )
    assert cli.main(["write", "--device", "gpu0"]) == 2


def _no_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return True
    return not torch.cuda.is_available()


@needs_shm
@pytest.mark.skipif(
    not _no_cuda(), reason="checks the skip path, which needs a machine without CUDA"
)
def test_device_cuda_skips_cleanly_without_cuda(tmp_path, capsys):
    js = tmp_path / "out.json"
    rc = cli.main(
        ["write", "pingpong", "--quick", "--no-progress", "--device", "cuda:0,cuda:1",
         "--provider", "shm", "--json", str(js)]
    )  # fmt: skip
    assert rc == 0
    doc = schema.read_json(js)
    assert doc["rows"] == []
    reasons = {s["impl"]: s["reason"] for s in doc["skipped"]}
    assert "no CUDA device visible" in reasons["device"] or "needs torch" in reasons["device"]
    assert "raw" in reasons  # the raw C loop is host-only: named, not silently dropped
    assert "skipped" in capsys.readouterr().err
