"""The native counter table (libfabric core, C) and the Python one (transport.counters)
give the same answers for the same sequence of arrivals, arms, takes and disarms."""

from __future__ import annotations

import random

import pytest

from asyncfabric.transport import CounterReady, CounterTable, registry


def _native():
    lf = registry.backends()["libfabric"]
    if "shm" not in lf.providers():
        pytest.skip("libfabric's shm provider is not usable here")
    return lf.open("shm", domains=1, node=None, ctrl_max=256, cuda="staged")


@pytest.mark.parametrize("seed", range(8))
def test_same_sequence_same_answers(seed):
    rng = random.Random(seed)
    t = _native()
    py = CounterTable()
    try:
        imms = [rng.randrange(1 << 32) for _ in range(6)]
        for step in range(3000):
            imm = rng.choice(imms)
            op = rng.random()
            if op < 0.45:
                n = rng.randint(1, 5)
                t.counter_give(imm, n)  # arrivals
                ready_py = py.give(imm, n)
                evs = [e for e in t.drain() if isinstance(e, CounterReady)]
                assert [e.imm for e in evs] == ([imm] if ready_py else []), step
            elif op < 0.8:
                want = rng.randint(1, 12)
                assert t.counter_arm(imm, want) == py.arm(imm, want), step
            else:
                t.counter_disarm(imm)
                py.disarm(imm)
            assert t.counter_avail(imm) == py.avail(imm), step
            assert t.counters_live() == py.live(), step
    finally:
        t.close()
