"""Weight updates over real engines (shm and tcp): a Phi-3 model's weights, trainer sharded
2 ways (dim 0) to tensor-parallel inference 2 and 4 ways. Every inference shard must be
bitwise the reference shard, and the model assembled from them must give the trainer
model's logits."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import anyio
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import asyncfabric as af  # noqa: E402
from asyncfabric.testing.peer import PeerProcess  # noqa: E402
from asyncfabric.weights import (  # noqa: E402
    Layout,
    Receiver,
    ReceiverFailed,
    ReceiverInfo,
    Sender,
    UpdateError,
    fleet,
    imms,
)

from . import _model as M  # noqa: E402

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]

TIMEOUT = 20.0


@contextlib.asynccontextmanager
async def engines(n: int, provider: str, kw: dict) -> Any:
    async with contextlib.AsyncExitStack() as st:
        yield [await st.enter_async_context(af.Engine(provider, **kw)) for _ in range(n)]


class Setup:
    """Trainer ranks and receivers in one process, each on its own engine."""

    def __init__(self, cfg: Any, tl: Layout, full: dict, teng: list, cast: bool = False,
                 bucket_bytes: int = 1 << 16) -> None:  # fmt: skip
        self.cfg, self.tl, self.cast = cfg, tl, cast
        self.bufs = [tl.alloc(r) for r in range(tl.world)]
        for r, b in enumerate(self.bufs):
            tl.fill(b, r, full)
        self.senders = [
            Sender(e, tl, r, self.bufs[r], cast=cast, bucket_bytes=bucket_bytes, depth=2)
            for r, e in enumerate(teng)
        ]
        self.receivers: list[Receiver] = []

    def add_receivers(self, il: Layout, reng: list, first_index: int = 0) -> list[Receiver]:
        rxs = [Receiver(e, il, r, self.tl, index=first_index + r, cast=self.cast)
               for r, e in enumerate(reng)]  # fmt: skip
        self.receivers += rxs
        return rxs

    async def start(self, rxs: list[Receiver]) -> None:
        for rx in rxs:
            await rx.start([s.info for s in self.senders])

    async def update(self, version: int, rxs: list[Receiver] | None = None,
                     amax: dict[str, float] | None = None) -> None:  # fmt: skip
        rxs = self.receivers if rxs is None else rxs
        infos = [rx.info for rx in rxs]
        async with anyio.create_task_group() as tg:
            for s in self.senders:
                tg.start_soon(lambda s=s: s.update(version, infos, timeout=TIMEOUT, amax=amax))
            for rx in rxs:
                tg.start_soon(lambda rx=rx: rx.wait_version(version, timeout=TIMEOUT))

    def trainer_full(self) -> dict[str, torch.Tensor]:
        views = [self.tl.views(b, r) for r, b in enumerate(self.bufs)]
        return {n: self.tl.assemble(n, [v[n] for v in views]) for n in self.tl.params}


def check_bitwise(il: Layout, rxs: list[Receiver], full: dict[str, torch.Tensor]) -> None:
    for rx in rxs:
        want = il.alloc(rx.rank)
        il.fill(want, rx.rank, full)
        assert torch.equal(rx.buffer, want), f"inference rank {rx.rank}: shards differ"


@pytest.mark.parametrize("iw", [2, 4])
async def test_update_is_bitwise_and_logits_match(provider, kw, iw):
    cfg = M.config()
    model = M.build(cfg, dtype=torch.bfloat16)
    full = M.full_params(model)
    tl = Layout.of(full, 2, M.fsdp_rule)
    il = Layout.of(full, iw, M.tp_rule(cfg))
    async with engines(2, provider, kw) as teng, engines(iw, provider, kw) as reng:
        s = Setup(cfg, tl, full, teng)
        rxs = s.add_receivers(il, reng)
        await s.start(rxs)
        await s.update(1)
        assert all(rx.version == 1 for rx in rxs)
        check_bitwise(il, rxs, full)
        inf = M.assemble(cfg, il, [rx.params() for rx in rxs], torch.bfloat16)
        assert torch.equal(M.logits(inf), M.logits(model))
        # the next step's weights (a "training step" in place): version 2 lands the same way
        for b in s.bufs:
            v = b.view(torch.bfloat16)
            v.mul_(1.5).add_(0.25)
        full2 = s.trainer_full()
        await s.update(2)
        check_bitwise(il, rxs, full2)


async def test_update_staged_through_host_mirrors(provider, kw):
    """The GPU path on shm without FI_HMEM, on CPU: every tensor the sender and receivers
    register is staged through a host mirror (the staged wrapper's test switch), so every
    write_many of an update is a staged batch, as with CUDA tensors."""
    cfg = M.config()
    model = M.build(cfg, dtype=torch.bfloat16)
    full = M.full_params(model)
    tl = Layout.of(full, 2, M.fsdp_rule)
    il = Layout.of(full, 2, M.tp_rule(cfg))
    async with engines(2, provider, kw) as teng, engines(2, provider, kw) as reng:
        for e in (*teng, *reng):
            e.transport.stage_host_tensors = True
        s = Setup(cfg, tl, full, teng)
        rxs = s.add_receivers(il, reng)
        assert s.senders[0]._region.staged and rxs[0]._regions[0].staged
        await s.start(rxs)
        with anyio.fail_after(60):
            await s.update(1)
        assert s.senders[0]._stage_regions and all(
            r.staged for x in s.senders for r in x._stage_regions
        )
        check_bitwise(il, rxs, full)
        for b in s.bufs:
            b.view(torch.bfloat16).mul_(-0.5)
        full2 = s.trainer_full()
        with anyio.fail_after(60):
            await s.update(2)
        check_bitwise(il, rxs, full2)


async def test_cast_fp32_trainer_to_bf16_inference(provider, kw):
    cfg = M.config()
    model = M.build(cfg, dtype=torch.float32)
    full = M.full_params(model)
    tl = Layout.of(full, 2, M.fsdp_rule)
    il = Layout.of(full, 2, M.tp_rule(cfg), dtype=torch.bfloat16)
    async with engines(2, provider, kw) as teng, engines(2, provider, kw) as reng:
        s = Setup(cfg, tl, full, teng, cast=True)
        rxs = s.add_receivers(il, reng)
        await s.start(rxs)
        await s.update(1)
        ref = {n: t.to(torch.bfloat16) for n, t in full.items()}
        check_bitwise(il, rxs, ref)
        inf = M.assemble(cfg, il, [rx.params() for rx in rxs], torch.bfloat16)
        assert torch.equal(M.logits(inf), M.logits(model.to(torch.bfloat16)))


FP8 = torch.float8_e4m3fn


def fp8_linear(name: str, shape: tuple[int, ...]) -> torch.dtype:
    """Inference dtypes: the decoder's linear weights in fp8, the rest bf16."""
    return FP8 if name.endswith("proj.weight") else torch.bfloat16


def fp8_reference(il: Layout, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """In one process, from the full tensors: scale = amax / 448 (fp32), (x / scale) -> e4m3
    (the division in fp32); bf16 for the others."""
    out = {}
    for n, x in full.items():
        if il.params[n].dtype == FP8:
            scale = x.abs().max().float() / 448
            out[n] = (x.float() / scale).to(FP8)
            out[n + "_scale"] = scale
        else:
            out[n] = x.to(torch.bfloat16)
    return out


def global_amax(s: Setup, names: tuple[str, ...]) -> dict[str, float]:
    """What the trainer ranks' all-reduce (max) of their local amaxes gives."""
    a = torch.stack([tx.local_amax(names) for tx in s.senders]).amax(0)
    return dict(zip(names, a.tolist()))


@pytest.mark.parametrize("src_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("iw", [2, 4])
async def test_fp8_cast_with_per_tensor_scales(provider, kw, iw, src_dtype):
    cfg = M.config()
    model = M.build(cfg, dtype=src_dtype)
    full = M.full_params(model)
    tl = Layout.of(full, 2, M.fsdp_rule)
    il = Layout.of(full, iw, M.tp_rule(cfg), dtype=fp8_linear)
    assert len(il.fp8) == 4 * cfg.num_hidden_layers  # qkv, o (row), gate_up, down (row)
    async with engines(2, provider, kw) as teng, engines(iw, provider, kw) as reng:
        s = Setup(cfg, tl, full, teng, cast=True)
        rxs = s.add_receivers(il, reng)
        await s.start(rxs)
        # the scale needs the full tensor's amax: with two trainer ranks it must be given
        with pytest.raises(ValueError, match="amax of the full tensor"):
            await s.senders[0].update(1, [rx.info for rx in rxs], timeout=TIMEOUT)
        with pytest.raises(ValueError, match="no entry for fp8 parameter"):
            await s.senders[0].update(1, [rx.info for rx in rxs], timeout=TIMEOUT, amax={})
        await s.update(1, amax=global_amax(s, il.fp8))
        ref = fp8_reference(il, full)
        check_bitwise(il, rxs, ref)
        for rx in rxs:
            for n in il.fp8:
                assert torch.equal(rx.params()[n + "_scale"], ref[n + "_scale"])
        # dequantized, every weight is within e4m3's rounding of the trainer's
        for n in il.fp8:
            shards = [r.params()[n].float() * r.params()[n + "_scale"] for r in rxs]
            err = (il.assemble(n, shards) - full[n].float()).abs()
            assert float(err.max()) <= float(full[n].abs().max()) / 16
        # a training step: new amaxes, new scales, version 2 lands the same way
        for r, b in enumerate(s.bufs):
            for t in tl.views(b, r).values():
                t.mul_(1.5).add_(0.25)
        full2 = s.trainer_full()
        await s.update(2, amax=global_amax(s, il.fp8))
        check_bitwise(il, rxs, fp8_reference(il, full2))


async def test_fp8_one_trainer_rank_needs_no_amax(provider, kw):
    cfg = M.config()
    full = M.full_params(M.build(cfg, dtype=torch.bfloat16))
    tl = Layout.of(full, 1, M.fsdp_rule)
    il = Layout.of(full, 2, M.tp_rule(cfg), dtype=fp8_linear)
    async with engines(1, provider, kw) as teng, engines(2, provider, kw) as reng:
        s = Setup(cfg, tl, full, teng, cast=True)
        rxs = s.add_receivers(il, reng)
        await s.start(rxs)
        await s.update(1)
        check_bitwise(il, rxs, fp8_reference(il, full))


async def test_update_lands_while_readers_keep_reading_the_served_version(provider, kw):
    cfg = M.config()
    full = M.full_params(M.build(cfg, dtype=torch.bfloat16))
    tl = Layout.of(full, 2, M.fsdp_rule)
    il = Layout.of(full, 2, M.tp_rule(cfg))
    async with engines(2, provider, kw) as teng, engines(2, provider, kw) as reng:
        s = Setup(cfg, tl, full, teng)
        rxs = s.add_receivers(il, reng)
        await s.start(rxs)
        await s.update(1)
        v1 = [rx.buffer.clone() for rx in rxs]
        for b in s.bufs:
            b.view(torch.bfloat16).neg_()
        full2 = s.trainer_full()
        reads = 0
        stop = anyio.Event()

        async def reader(i: int) -> None:
            nonlocal reads
            async with rxs[i].reading() as params:
                held = rxs[i].buffer
                while not stop.is_set():
                    # the served version never changes under a reader
                    assert torch.equal(held, v1[i])
                    assert params is rxs[i].params() or rxs[i].version == 2
                    reads += 1
                    await anyio.sleep(0)
                assert torch.equal(held, v1[i])  # still intact after the flip

        async with anyio.create_task_group() as tg:
            tg.start_soon(reader, 0)
            tg.start_soon(reader, 1)
            await anyio.sleep(0.01)
            await s.update(2)
            assert all(rx.version == 2 for rx in rxs)
            check_bitwise(il, rxs, full2)
            stop.set()
        assert reads > 2
        # the readers left: version 1's buffer is free, so update 3 can land in it
        for b in s.bufs:
            b.view(torch.bfloat16).mul_(2)
        full3 = s.trainer_full()
        await s.update(3)
        check_bitwise(il, rxs, full3)


async def test_receiver_joins_between_updates_through_the_group(provider, kw):
    cfg = M.config()
    full = M.full_params(M.build(cfg, dtype=torch.bfloat16))
    tl = Layout.of(full, 2, M.fsdp_rule)
    il2 = Layout.of(full, 2, M.tp_rule(cfg))
    il4 = Layout.of(full, 4, M.tp_rule(cfg))
    async with (
        contextlib.AsyncExitStack() as st,
        engines(2, provider, kw) as teng,
        engines(6, provider, kw) as reng,
    ):
        store = await af.store.serve("127.0.0.1:0", secret=os.urandom(16).hex())
        st.push_async_callback(store.aclose)

        async def join(name: str, eng: af.Engine, meta: dict) -> Any:
            g = await af.join(store, group="rl-weights", name=name, engine=eng, meta=meta)
            st.push_async_callback(g.leave)
            return g

        s = Setup(cfg, tl, full, teng)
        fleets = []
        for tx, e in zip(s.senders, teng):
            g = await join(tx.name, e, fleet.sender_meta(tx))
            await fleet.publish_sender(g, tx)
            fleets.append(fleet.Fleet(g, [il2, il4]))

        rx_groups: dict[str, Any] = {}

        async def join_receivers(rxs: list[Receiver]) -> None:
            for rx in rxs:
                g = rx_groups[rx.name] = await join(rx.name, rx.engine, fleet.receiver_meta(rx))
                await fleet.publish_receiver(g, rx)
                await rx.start(await fleet.Fleet(g, []).senders())

        async def members(n: int) -> None:
            with anyio.fail_after(10):
                for f in fleets:
                    while len([m for m in f.group.members.values()
                               if m.meta.get("role") == "receiver"]) != n:  # fmt: skip
                        await anyio.sleep(0.01)

        async def update(version: int, rxs: list[Receiver]) -> None:
            async with anyio.create_task_group() as tg:
                for tx, f in zip(s.senders, fleets):
                    infos = await f.receivers()
                    tg.start_soon(lambda tx=tx, i=infos: tx.update(version, i, timeout=TIMEOUT))
                for rx in rxs:
                    tg.start_soon(lambda rx=rx: rx.wait_version(version, timeout=TIMEOUT))

        first = s.add_receivers(il2, reng[:2])
        await join_receivers(first)
        await members(2)
        await update(1, first)
        check_bitwise(il2, first, full)
        bound = s.senders[0]._binding
        # unchanged membership: the binding (and the plan) are reused
        for b in s.bufs:
            b.view(torch.bfloat16).add_(1)
        full2 = s.trainer_full()
        await update(2, first)
        assert s.senders[0]._binding is bound
        check_bitwise(il2, first, full2)
        # a tensor-parallel-4 replica joins between updates: it gets the next one
        late = s.add_receivers(il4, reng[2:], first_index=2)
        await join_receivers(late)
        await members(6)
        for b in s.bufs:
            b.view(torch.bfloat16).mul_(-1)
        full3 = s.trainer_full()
        await update(3, first + late)
        assert s.senders[0]._binding is not bound
        check_bitwise(il2, first, full3)
        check_bitwise(il4, late, full3)
        inf = M.assemble(cfg, il4, [rx.params() for rx in late], torch.bfloat16)
        ref = M.build(cfg, dtype=torch.bfloat16)
        ref.load_state_dict(full3)
        assert torch.equal(M.logits(inf), M.logits(ref))
        # the TP-4 replica leaves: the next update goes to the others alone
        for rx in late:
            await rx_groups[rx.name].leave()
        await members(2)
        for b in s.bufs:
            b.view(torch.bfloat16).add_(2)
        full4 = s.trainer_full()
        await update(4, first)
        assert [r.name for r in s.senders[0]._binding.receivers] == [r.name for r in first]
        check_bitwise(il2, first, full4)


async def test_slow_or_dead_receiver_fails_alone(provider, kw):
    cfg = M.config()
    full = M.full_params(M.build(cfg, dtype=torch.bfloat16))
    tl = Layout.of(full, 1, M.fsdp_rule)
    il = Layout.of(full, 1, M.tp_rule(cfg))
    kw = dict(kw, peer_timeout=2.0)
    async with (
        engines(1, provider, kw) as teng,
        engines(2, provider, kw) as reng,
        PeerProcess(provider, **kw) as peer,
    ):
        s = Setup(cfg, tl, full, teng)
        tx = s.senders[0]
        good, slow = (Receiver(e, il, 0, tl, index=i, name=n)
                      for i, (e, n) in enumerate(zip(reng, ["good", "slow"])))  # fmt: skip
        # "dead": a receiver in another process, killed after update 1 (acks by hand)
        bufs = [await peer.alloc(il.nbytes(0)) for _ in range(2)]
        dead = ReceiverInfo("dead", 2, 0, il, tuple(af.Descriptor.from_bytes(b) for _, b in bufs))
        src, _ = await peer.alloc(8)
        ack = bytes(tx.info.ack)
        infos = [good.info, slow.info, dead]
        for rx in (good, slow):
            await rx.start([tx.info])
        await peer.call("write", src, ack, 0, 0, 8, imms.ack(0, 2, None))

        async def update(version: int, rxs: list[Receiver], infos: list, timeout: float) -> Any:
            async with anyio.create_task_group() as tg:
                for rx in rxs:
                    tg.start_soon(lambda rx=rx: rx.wait_version(version, timeout=TIMEOUT))
                try:
                    await tx.update(version, infos, timeout=timeout)
                except UpdateError as exc:
                    return exc
            return None

        assert await update(1, [good, slow], infos, TIMEOUT) is None
        await peer.wait(imms.data(0, 1), good.expected)  # dead got all of update 1
        await peer.call("write", src, ack, 0, 0, 8, imms.ack(0, 2, 1))
        await anyio.sleep(0.2)
        peer.kill()
        # dead is gone: writes to it fail within the peer timeout, the others land
        t0 = anyio.current_time()
        e = await update(2, [good], infos, TIMEOUT)
        assert anyio.current_time() - t0 < 2.0 + 3.0
        assert e is not None and set(e.failures) == {"dead"}, e
        assert set(e.completed) == {"good", "slow"}
        assert "dead" in str(e) and good.version == 2
        check_bitwise(il, [good], full)


async def test_slow_receiver_is_left_out_alone(provider, kw):
    cfg = M.config()
    full = M.full_params(M.build(cfg, dtype=torch.bfloat16))
    tl = Layout.of(full, 1, M.fsdp_rule)
    il = Layout.of(full, 1, M.tp_rule(cfg))
    async with engines(1, provider, kw) as teng, engines(2, provider, kw) as reng:
        s = Setup(cfg, tl, full, teng)
        tx = s.senders[0]
        good, slow = (Receiver(e, il, 0, tl, index=i, name=n)
                      for i, (e, n) in enumerate(zip(reng, ["good", "slow"])))  # fmt: skip
        infos = [good.info, slow.info]
        for rx in (good, slow):
            await rx.start([tx.info])

        async def update(version: int, rxs: list[Receiver], timeout: float) -> Any:
            async with anyio.create_task_group() as tg:
                for rx in rxs:
                    tg.start_soon(lambda rx=rx: rx.wait_version(version, timeout=TIMEOUT))
                try:
                    await tx.update(version, infos, timeout=timeout)
                except UpdateError as exc:
                    return exc
            return None

        assert await update(1, [good, slow], TIMEOUT) is None
        # version 2 is written to both, but slow never serves it (it does not wait for
        # it), so its spare buffer is never freed: update 3 leaves it out after the
        # timeout, good still gets it
        assert await update(2, [good], TIMEOUT) is None
        for b in s.bufs:
            b.view(torch.bfloat16).add_(3)
        t0 = anyio.current_time()
        e = await update(3, [good], 1.0)
        assert anyio.current_time() - t0 < 1.0 + 3.0
        assert e is not None and set(e.failures) == {"slow"} and e.completed == ("good",)
        assert isinstance(e.failures["slow"], ReceiverFailed)
        assert "did not free its spare buffer" in str(e.failures["slow"])
        check_bitwise(il, [good], s.trainer_full())
        assert slow.version == 1


async def test_receiver_times_out_when_no_update_comes(provider, kw):
    cfg = M.config()
    full = M.full_params(M.build(cfg, dtype=torch.bfloat16))
    tl = Layout.of(full, 1, M.fsdp_rule)
    il = Layout.of(full, 1, M.tp_rule(cfg))
    async with engines(1, provider, kw) as reng:
        rx = Receiver(reng[0], il, 0, tl, index=0)
        with pytest.raises(ReceiverFailed, match="update 1 did not land within 0.2 s.*0 of"):
            await rx.wait_version(1, timeout=0.2)
        assert rx.version is None


@pytest.mark.parametrize("provider", ["shm"])
async def test_100m_parameter_model(provider, kw):
    # about 106 M parameters (bf16, 212 MB): the proof at the smallest model size
    cfg = M.config(hidden=768, layers=9, heads=12, kv=4, inter=2048, vocab=32064)
    model = M.build(cfg, dtype=torch.bfloat16)
    full = M.full_params(model)
    assert sum(t.numel() for t in full.values()) > 100e6
    tl = Layout.of(full, 2, M.fsdp_rule)
    il = Layout.of(full, 4, M.tp_rule(cfg))
    async with engines(2, provider, kw) as teng, engines(4, provider, kw) as reng:
        s = Setup(cfg, tl, full, teng, bucket_bytes=8 << 20)
        rxs = s.add_receivers(il, reng)
        await s.start(rxs)
        await s.update(1)
        check_bitwise(il, rxs, full)
        inf = M.assemble(cfg, il, [rx.params() for rx in rxs], torch.bfloat16)
        assert torch.equal(M.logits(inf), M.logits(model))
