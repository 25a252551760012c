"""The scale model (asyncfabric.bench.model): predictions from fixed costs, computed by
hand from the equations of docs/scale-model.md, and a quick measurement on shm."""

from __future__ import annotations

import json
import math

import pytest

from asyncfabric.backends.libfabric import LibfabricBackend
from asyncfabric.bench import model
from asyncfabric.bench.model import FABRICS, Costs, Fabric, predict, predict_cell

KiB, MiB = 1 << 10, 1 << 20
HAVE_SHM = "shm" in set(LibfabricBackend().providers())


def costs(**kw: float) -> Costs:
    base: dict = dict(
        provider="test", py_call_ns=0.0, py_batch_ns=0.0, py_wait_ns=0.0, post_ns=1.0,
        complete_ns=0.0, count_ns=1.0, copy_gbps=10.0, inject_bytes=4096, chunk_bytes=MiB,
    )  # fmt: skip
    base.update(kw)
    return Costs(**base)


def test_huge_cost_per_op_binds_the_sender_cpu():
    c = costs(post_ns=1e6)  # 1 ms to post a piece
    cell = predict_cell(c, FABRICS["efa-p5"], 1, 1, 64 * KiB)
    # one piece, completion-tracked on EFA (no inject): 1e6 + 0 ns a message, one worker
    assert cell.pieces == 1 and cell.tracked
    assert cell.send_ns == pytest.approx(1e6)
    assert cell.binding == "send"
    assert cell.gbps_gpu == pytest.approx(65536 / 1e6)  # bytes per ns = GB/s
    assert cell.gbps_node == pytest.approx(8 * 65536 / 1e6)
    assert cell.gbps_nic == pytest.approx(65536 / 1e6 / 4)
    assert cell.line_frac == pytest.approx(8 * 65536 / 1e6 / 400)


def test_tiny_cost_binds_the_nics_in_use():
    c = costs()
    f = FABRICS["efa-p5"]
    # a single write of one piece goes over its worker's first NIC only: 12.5 GB/s
    one = predict_cell(c, f, 1, 1, 64 * KiB)
    assert (one.binding, one.nics_used) == ("nic", 1)
    assert one.gbps_gpu == pytest.approx(100 / 8)
    assert one.gbps_node == pytest.approx(100.0)
    # a batch stripes its entries over all four: 50 GB/s, under PCIe's 54
    batched = predict_cell(c, f, 1, 16, 64 * KiB)
    assert (batched.binding, batched.nics_used) == ("nic", 4)
    assert batched.gbps_node == pytest.approx(400.0)
    assert batched.line_frac == pytest.approx(1.0)
    # 16 MiB is 16 pieces: striped over the four NICs even as one write
    big = predict_cell(c, f, 1, 1, 16 * MiB)
    assert (big.pieces, big.nics_used, big.binding) == (16, 4, "nic")
    # four workers, one NIC each, single writes: all four NICs again
    four = predict_cell(c, f, 4, 1, 64 * KiB)
    assert (four.nics_used, four.binding) == (4, "nic")
    cx7 = predict_cell(c, FABRICS["cx7"], 1, 1, 16 * MiB)
    assert (cx7.binding, cx7.gbps_gpu, cx7.gbps_nic) == ("nic", 50.0, 50.0)


def test_pcie_binds_behind_a_fast_nic():
    f = Fabric("fat", gpus=2, nics_per_gpu=1, nic_gbps=100.0, pcie_gbps=54.0, inject_bytes=0)
    cell = predict_cell(costs(), f, 1, 64, MiB)
    assert cell.binding == "pcie"
    assert cell.gbps_node == pytest.approx(108.0)


def test_python_under_one_gil_binds_many_workers():
    c = costs(py_call_ns=1000.0, py_batch_ns=1000.0, post_ns=1.0, complete_ns=1.0)
    cell = predict_cell(c, FABRICS["efa-p5"], 8, 1, 4 * KiB)
    # each worker: 1000 + 1 + 1 ns a message; the eight together: 8 x 4096 / 1002
    assert cell.limits_gbps["send"] == pytest.approx(8 * 4096 / 1002)
    # but their Python runs one thread at a time: 4096 B per 1000 ns
    assert cell.limits_gbps["gil"] == pytest.approx(4.096)
    assert cell.binding == "gil"
    assert predict_cell(c, FABRICS["efa-p5"], 8, 1, 4 * KiB, gil=False).binding == "py"
    # batching (write_many: py_batch_ns a call) divides the Python per message by B
    b64 = predict_cell(c, FABRICS["efa-p5"], 8, 64, 4 * KiB)
    assert b64.limits_gbps["gil"] == pytest.approx(64 * 4096 / 1000)


def test_batches_use_py_batch_and_waits_add_py_wait():
    c = costs(py_call_ns=3000.0, py_batch_ns=6000.0, py_wait_ns=2000.0, complete_ns=200.0)
    f = FABRICS["cx7"]
    single = predict_cell(c, f, 1, 1, 64 * KiB)
    assert single.send_ns == pytest.approx(3000 + 2000 + 1 + 200)
    batched = predict_cell(c, f, 1, 16, 64 * KiB)
    assert batched.send_ns == pytest.approx((6000 + 2000) / 16 + 1 + 200)


def test_huge_receiver_cost_binds_the_receiver():
    c = costs(count_ns=1e5)
    cell = predict_cell(c, FABRICS["cx7"], 1, 64, 16 * MiB)
    # 16 pieces of 1 MiB, 16 immediates counted: 1.6e6 ns a message
    assert cell.recv_ns == pytest.approx(16 * 1e5)
    assert cell.binding == "recv"
    assert cell.gbps_gpu == pytest.approx(16 * MiB / 1.6e6)


def test_shm_here_adds_both_sides_and_the_copies():
    c = costs(py_call_ns=1000.0, post_ns=100.0, count_ns=100.0, copy_gbps=10.0)
    f = FABRICS["shm-here"]
    cell = predict_cell(c, f, 1, 1, 4 * KiB)  # injected: copied in, then out
    send = 1000 + 100 + 4096 / 10
    recv = 100 + 4096 / 10
    assert not cell.tracked
    assert cell.binding == "cpu"
    assert cell.gbps_gpu == pytest.approx(4096 / (send + recv))
    # tracked: the receiver's CMA copy at its own rate, plus its fixed cost a piece
    c2 = costs(
        post_ns=100.0, complete_ns=300.0, count_ns=100.0, copy_gbps=10.0, tracked_bytes=4104,
        big_bytes=65536, recv_tracked_ns=2100.0, recv_big_ns=2100.0 + (65536 - 4104) / 5.0,
    )  # fmt: skip
    assert c2.cma_gbps == pytest.approx(5.0)
    assert c2.shm_piece_ns == pytest.approx(2100 - 100 - 4104 / 5.0)
    cell = predict_cell(c2, f, 1, 16, 64 * KiB)
    send = 0 + 100 + 300
    recv = 100 + 65536 / 5.0 + c2.shm_piece_ns
    assert cell.gbps_gpu == pytest.approx(65536 / (send + recv))


def test_workers_design_one_python_thread_and_rotation():
    c = costs(py_call_ns=3000.0, post_ns=100.0, complete_ns=300.0, reap_ns=50.0)
    f = FABRICS["efa-p5"]
    cell = predict_cell(c, f, 4, 1, 64 * KiB, design="workers")
    # the one Python thread calls and posts: 3000 + (100 + 300 - 50) ns a message
    assert cell.limits_gbps["py"] == pytest.approx(65536 / 3350)
    # four workers reap (50 ns a piece) and count (1 ns) in parallel
    assert cell.limits_gbps["send"] == pytest.approx(4 * 65536 / 50)
    assert cell.limits_gbps["recv"] == pytest.approx(4 * 65536 / 1)
    assert "gil" not in cell.limits_gbps
    assert cell.binding == "py"
    # W > 1 rotates each write's first piece over the domains: all four NICs
    tiny = costs()
    assert predict_cell(tiny, f, 4, 1, 64 * KiB, design="workers").nics_used == 4
    assert predict_cell(tiny, f, 1, 1, 64 * KiB, design="workers").nics_used == 1
    # a worker owns one domain at least: eight workers run as four on efa, one on cx7
    assert predict_cell(tiny, f, 8, 1, MiB, design="workers").workers_eff == 4
    assert predict_cell(tiny, FABRICS["cx7"], 8, 1, MiB, design="workers").workers_eff == 1
    # the engines design on the same costs: each worker makes its own calls
    eng = predict_cell(c, f, 4, 1, 64 * KiB)
    assert eng.limits_gbps["send"] == pytest.approx(4 * 65536 / (3000 + 100 + 300))
    assert eng.limits_gbps["gil"] == pytest.approx(65536 / 3000)


def test_scale_native_multiplies_the_native_terms():
    c = model.scale_native(costs(py_call_ns=7.0, post_ns=2.0, complete_ns=3.0, count_ns=5.0), 4)
    assert (c.py_call_ns, c.post_ns, c.complete_ns, c.count_ns) == (7.0, 8.0, 12.0, 20.0)


def test_predict_grid_and_json_round_trip(tmp_path):
    c = costs(py_call_ns=3000.0)
    cells = predict(c, fabric="efa-p5", workers=[1, 4], batch=[1, 64], sizes=[4 * KiB, MiB])
    assert len(cells) == 2 * 2 * 2
    assert {x.binding for x in cells} <= set(model.LIMITS) | {"py"}
    assert Costs.from_json(json.loads(json.dumps(c.to_json()))) == c
    path = tmp_path / "m.json"
    out = tmp_path / "out.json"
    path.write_text(json.dumps({"costs": c.to_json()}))
    argv = ["--from-json", str(path), "--no-check", "--workers", "1,4", "--batch", "1,16",
            "--json", str(out)]  # fmt: skip
    assert model.main(argv) == 0
    doc = json.loads(out.read_text())
    # (efa-p5, cx7) x two designs + shm-here, each W x B x sizes
    assert len(doc["predictions"]) == 5 * 2 * 2 * 4
    assert doc["costs"]["py_call_ns"] == 3000.0


@pytest.mark.skipif(not HAVE_SHM, reason="no shm provider")
def test_measure_quick_gives_positive_finite_costs():
    c = model.measure("shm", quick=True)
    for name in ("py_call_ns", "py_batch_ns", "post_ns", "complete_ns", "count_ns", "copy_gbps"):
        v = getattr(c, name)
        assert math.isfinite(v) and v > 0, (name, v)
    assert math.isfinite(c.py_wait_ns) and c.py_wait_ns >= 0
    assert c.inject_bytes > 0 and c.tracked_bytes > c.inject_bytes
    assert Costs.from_json(json.loads(json.dumps(c.to_json()))) == c


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SHM, reason="no shm provider")
def test_check_measures_every_cell():
    c = model.measure("shm", quick=True)
    rows = model.check(c, quick=True)
    assert [r.size for r in rows] == [4 * KiB, 64 * KiB, 64 * KiB]
    for r in rows:
        for g in (r.predicted_gbps, r.default_gbps, r.polling_gbps, r.raw_gbps):
            assert math.isfinite(g) and g > 0
