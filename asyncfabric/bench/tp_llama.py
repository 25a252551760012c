"""A small Llama run tensor-parallel, its all-reduces through ``asyncfabric.collectives``.

Used by ``asyncfabric bench allreduce --accuracy`` (docs/collectives.md, *Error measured*)
and tests/test_collectives_tp_llama.py. Nothing is downloaded: the model is a
``transformers`` ``LlamaForCausalLM`` built from a config with random weights under a fixed
seed, so every process builds the same one.

Megatron-style split of each decoder layer over P ranks (:class:`Shard`): rank r keeps its
slice of the attention heads (column-parallel q/k/v, KV heads split the same way) and of
the MLP's intermediate features (column-parallel gate/up); o_proj and down_proj are
row-parallel, so each rank's output is a *partial* sum of the full projection, and one
all-reduce after each makes it whole. Embeddings, norms and the LM head are replicated.

The forward is a short re-implementation of Llama's (RMSNorm, rotary embeddings, causal
attention with a KV cache and grouped KV heads, SwiGLU MLP) on the HF module's weights:
the HF modules cannot run a slice of heads. With one rank it equals HF's logits
(:func:`check_against_hf`, tested).

The reduction is a callable (:data:`Reduce`): :func:`af_reduce` is the real all-reduce
over a group view; :class:`LocalSum` runs P shards as tasks of one event loop and sums
their partials in rank order in fp32, the order and rounding of ``all_reduce(quant=None)``
on fp32 tensors, so the two give the same bits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

Reduce = Callable[[torch.Tensor], Awaitable[torch.Tensor]]


@dataclass(frozen=True)
class Spec:
    """The model and the decoding run (picklable: it travels to spawned ranks)."""

    hidden: int = 512
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    intermediate: int = 1408
    vocab: int = 8192
    seed: int = 0
    prompt: int = 16  # prompt tokens (random ids, seeded)
    tokens: int = 64  # greedily decoded tokens
    threads: int = 1  # torch threads per process: the same on every side, so the same bits
    block: int = 32  # values per int8 scale
    # > 0: train that many steps on :class:`Chain` first (a model with real margins);
    # ``weights``: where tp_check saved the trained weights, so ranks need not train
    train_steps: int = 0
    weights: str = ""


class Chain:
    """A synthetic language for :func:`train`: a Markov chain on ``states`` token ids of
    the vocab, each followed by one of 3 successors with probabilities 0.6, 0.3 and 0.1
    (fixed seed). The best possible next-token loss is their entropy, 0.898 nats."""

    def __init__(self, vocab: int, states: int = 256, seed: int = 1234) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randperm(vocab, generator=g)[: min(states, vocab)]
        self.succ = torch.randint(0, len(self.ids), (len(self.ids), 3), generator=g)
        self.p = torch.tensor([0.6, 0.3, 0.1])

    def sample(self, n: int, length: int, g: torch.Generator) -> torch.Tensor:
        """``n`` sequences of ``length`` token ids, each from a random state."""
        st = torch.randint(0, len(self.ids), (n,), generator=g)
        out = [st]
        for _ in range(length - 1):
            k = torch.multinomial(self.p, n, replacement=True, generator=g)
            st = self.succ[st, k]
            out.append(st)
        return self.ids[torch.stack(out, 1)]


def train(model: Any, chain: Chain, steps: int, seed: int) -> list[float]:
    """``steps`` AdamW steps (lr 3e-3) of next-token loss on the chain's sequences, batch
    16 x 32 tokens; returns the losses. Deterministic for a seed and thread count."""
    g = torch.Generator().manual_seed(seed + 99)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        x = chain.sample(16, 33, g)
        logits = model(x[:, :-1]).logits
        loss: Any = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def build_model(spec: Spec, *, init: float | None = None, tied: bool = False) -> Any:
    """The HF ``LlamaForCausalLM`` of ``spec``, fp32, random weights under ``spec.seed``
    (then, with ``spec.train_steps``, trained on :class:`Chain`, or loaded from
    ``spec.weights``). ``init``: the config's ``initializer_range`` (None: HF's default);
    ``tied``: the LM head tied to the embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=max(256, spec.prompt + spec.tokens),
        tie_word_embeddings=tied,
        initializer_range=LlamaConfig().initializer_range if init is None else init,
    )
    torch.manual_seed(spec.seed)
    model: Any = LlamaForCausalLM(cfg)
    model = model.float()
    if spec.train_steps and spec.weights:
        model.load_state_dict(torch.load(spec.weights))
    elif spec.train_steps:
        train(model, Chain(spec.vocab), spec.train_steps, spec.seed)
    return model.eval()


def prompt_ids(spec: Spec) -> torch.Tensor:
    """The prompt: random ids, or (a trained model) a walk of its chain."""
    g = torch.Generator().manual_seed(spec.seed + 1)
    if spec.train_steps:
        return Chain(spec.vocab).sample(1, spec.prompt, g)[0]
    return torch.randint(0, spec.vocab, (spec.prompt,), generator=g)


def _rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Shard:
    """Rank ``rank`` of ``world``'s slice of ``model`` (an HF ``LlamaForCausalLM``)."""

    def __init__(self, model: Any, rank: int, world: int) -> None:
        cfg = model.config
        heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
        if heads % world or kv % world or cfg.intermediate_size % world:
            raise ValueError(
                f"{world} ranks must divide the heads ({heads}), the KV heads ({kv}) and the "
                f"intermediate size ({cfg.intermediate_size}); pick a world size that does"
            )
        self.d = cfg.hidden_size // heads
        self.hp, self.kvp = heads // world, kv // world
        self.eps = cfg.rms_norm_eps
        theta = float(getattr(cfg, "rope_theta", None) or 10000.0)
        self.inv_freq = 1.0 / theta ** (torch.arange(0, self.d, 2, dtype=torch.float32) / self.d)
        q0, q1 = rank * self.hp * self.d, (rank + 1) * self.hp * self.d
        k0, k1 = rank * self.kvp * self.d, (rank + 1) * self.kvp * self.d
        ip = cfg.intermediate_size // world
        i0, i1 = rank * ip, (rank + 1) * ip
        m = model.model
        self.embed = m.embed_tokens.weight.detach()
        self.norm = m.norm.weight.detach()
        self.head = model.lm_head.weight.detach()
        self.layers: list[dict[str, torch.Tensor]] = []
        for layer in m.layers:
            a, f = layer.self_attn, layer.mlp
            self.layers.append(
                {
                    "in_norm": layer.input_layernorm.weight.detach(),
                    "post_norm": layer.post_attention_layernorm.weight.detach(),
                    # column-parallel: this rank's output rows; row-parallel: its input columns
                    "q": a.q_proj.weight.detach()[q0:q1].contiguous(),
                    "k": a.k_proj.weight.detach()[k0:k1].contiguous(),
                    "v": a.v_proj.weight.detach()[k0:k1].contiguous(),
                    "o": a.o_proj.weight.detach()[:, q0:q1].contiguous(),
                    "gate": f.gate_proj.weight.detach()[i0:i1].contiguous(),
                    "up": f.up_proj.weight.detach()[i0:i1].contiguous(),
                    "down": f.down_proj.weight.detach()[:, i0:i1].contiguous(),
                }
            )

    def new_cache(self) -> list[list[torch.Tensor]]:
        return [[] for _ in self.layers]

    async def forward(
        self, ids: torch.Tensor, start: int, cache: list[list[torch.Tensor]], reduce: Reduce
    ) -> torch.Tensor:
        """Logits (T, vocab) of the T tokens ``ids`` at positions ``start``.., extending
        ``cache`` (this rank's keys and values). Two ``reduce`` calls a layer."""
        t = ids.shape[0]
        pos = torch.arange(start, start + t, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        total = start + t
        # query i (position start+i) sees keys 0..start+i
        mask = torch.arange(total)[None, :] > (torch.arange(t)[:, None] + start)
        h = self.embed[ids]
        for w, kv in zip(self.layers, cache):
            x = _rmsnorm(h, w["in_norm"], self.eps)
            q = (x @ w["q"].T).view(t, self.hp, self.d).transpose(0, 1)
            k = (x @ w["k"].T).view(t, self.kvp, self.d).transpose(0, 1)
            v = (x @ w["v"].T).view(t, self.kvp, self.d).transpose(0, 1)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            if kv:
                k, v = torch.cat((kv[0], k), dim=1), torch.cat((kv[1], v), dim=1)
            kv[:] = [k, v]
            rep = self.hp // self.kvp  # query head i uses KV head i // rep
            k, v = k.repeat_interleave(rep, dim=0), v.repeat_interleave(rep, dim=0)
            s = (q @ k.transpose(1, 2)) * self.d**-0.5
            p = s.masked_fill(mask, float("-inf")).softmax(-1)
            attn = (p @ v).transpose(0, 1).reshape(t, self.hp * self.d)
            h = h + await reduce(attn @ w["o"].T)
            x = _rmsnorm(h, w["post_norm"], self.eps)
            a = torch.nn.functional.silu(x @ w["gate"].T) * (x @ w["up"].T)
            h = h + await reduce(a @ w["down"].T)
        logits: torch.Tensor = _rmsnorm(h, self.norm, self.eps) @ self.head.T
        return logits


async def decode(
    shard: Shard,
    reduce: Reduce,
    prompt: torch.Tensor,
    n: int,
    forced: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding of ``n`` tokens after ``prompt``: (argmax token of every step, the
    logits of every step (n, vocab)). With ``forced`` the step after step i is fed
    ``forced[i]`` instead of the argmax (teacher forcing: every step sees the same context
    as the run that produced ``forced``)."""
    cache = shard.new_cache()
    logits = (await shard.forward(prompt, 0, cache, reduce))[-1]
    toks, outs = [], []
    pos = prompt.shape[0]
    for i in range(n):
        tok = int(logits.argmax())
        toks.append(tok)
        outs.append(logits)
        if i == n - 1:
            break
        feed = tok if forced is None else int(forced[i])
        logits = (await shard.forward(torch.tensor([feed]), pos, cache, reduce))[-1]
        pos += 1
    return torch.tensor(toks), torch.stack(outs)


class LocalSum:
    """P shards in one event loop, their partials summed in rank order in fp32.

    ``reducer(r)`` is rank r's :data:`Reduce`. ``record``: a list that receives, per
    reduction, the P partials (for the error study). ``part``: what a partial becomes on
    the way (default: ``x.float()``); ``total``: what the fp32 sum becomes after it
    (default: itself); both for emulating a wire format."""

    def __init__(
        self,
        world: int,
        record: list[list[torch.Tensor]] | None = None,
        part: Callable[[torch.Tensor], torch.Tensor] | None = None,
        total: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.world = world
        self.record = record
        self.part, self.total = part, total
        self._calls: dict[int, tuple[list[torch.Tensor | None], asyncio.Future[torch.Tensor]]] = {}
        self._count = [0] * world

    def reducer(self, rank: int) -> Reduce:
        async def reduce(x: torch.Tensor) -> torch.Tensor:
            k = self._count[rank]
            self._count[rank] += 1
            if k not in self._calls:
                self._calls[k] = ([None] * self.world, asyncio.get_running_loop().create_future())
            parts, fut = self._calls[k]
            parts[rank] = x.float() if self.part is None else self.part(x)
            if all(p is not None for p in parts):
                ps = [p for p in parts if p is not None]
                acc = ps[0].clone()
                for p in ps[1:]:
                    acc += p  # ((x0 + x1) + x2) + ...: all_reduce's order
                if self.record is not None:
                    self.record.append([p.clone() for p in ps])
                fut.set_result(acc if self.total is None else self.total(acc))
                del self._calls[k]
            return (await fut).clone()

        return reduce


async def local_decode(
    model: Any, world: int, prompt: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank 0's :func:`decode` of ``world`` shards in this process (:class:`LocalSum`)."""
    ls = LocalSum(world)
    shards = [Shard(model, r, world) for r in range(world)]
    res = await asyncio.gather(*(decode(shards[r], ls.reducer(r), prompt, n) for r in range(world)))
    return res[0]


def hf_greedy(model: Any, prompt: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: HF's own forward with its KV cache, greedy, in one process."""
    import inspect

    # transformers 5 renamed past_key_values to cache (the old name warns)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        out = model(prompt[None], use_cache=True)
        logits, past = out.logits[0, -1], getattr(out, name)
        toks, outs = [], []
        for i in range(n):
            tok = int(logits.argmax())
            toks.append(tok)
            outs.append(logits)
            if i == n - 1:
                break
            out = model(torch.tensor([[tok]]), use_cache=True, **{name: past})
            logits, past = out.logits[0, -1], getattr(out, name)
    return torch.tensor(toks), torch.stack(outs)


def check_against_hf(model: Any, prompt: torch.Tensor) -> float:
    """Max |logit difference| of one unsplit shard against HF's forward on ``prompt``."""

    async def ident(x: torch.Tensor) -> torch.Tensor:
        return x

    with torch.no_grad():
        ref = model(prompt[None]).logits[0]
        got = asyncio.run(
            Shard(model, 0, 1).forward(prompt, 0, [[] for _ in model.model.layers], ident)
        )
    return float((got - ref).abs().max())


def af_reduce(view: Any, path: str | None, block: int = 32, timeout: float = 60.0) -> Reduce:
    """The real all-reduce over ``view`` of fp32 partials. ``path``: None (exact fp32),
    ``"int8"`` (``quant="int8"`` on the fp32 tensor) or ``"bf16"`` (the partials rounded to
    bf16, reduced as bf16 with ``quant=None``: a plain 16-bit all-reduce)."""
    from asyncfabric.collectives import all_reduce

    async def reduce(x: torch.Tensor) -> torch.Tensor:
        if path == "bf16":
            b = x.bfloat16()
            await all_reduce(b, view, timeout=timeout)
            return b.float()
        x = x.contiguous()
        await all_reduce(x, view, quant=path, block=block, timeout=timeout)
        return x

    return reduce


PATHS = ("int8", "bf16")  # compared with the exact run (quant=None on fp32)


async def tp_rank(view: Any, spec_d: dict[str, Any]) -> dict[str, Any]:
    """One rank of the tensor-parallel check (a ``spawn_views`` target): the exact run,
    then every path of :data:`PATHS` free-running and teacher-forced on the exact run's
    tokens. Rank 0 returns tokens and logits (numpy); the others ``{}``."""
    spec = Spec(**spec_d)
    torch.set_num_threads(spec.threads)
    # in a thread: building the model takes seconds, and a loop blocked that long could
    # not renew this member's lease in the group
    model = await asyncio.to_thread(build_model, spec)
    shard = Shard(model, view.rank, view.size)
    prompt = prompt_ids(spec)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        exact, out["exact_logits"] = await decode(shard, af_reduce(view, None), prompt, spec.tokens)
        out["exact"] = exact
        for path in PATHS:
            out[path], _ = await decode(
                shard, af_reduce(view, path, spec.block), prompt, spec.tokens
            )
            out[f"{path}_forced"], out[f"{path}_forced_logits"] = await decode(
                shard, af_reduce(view, path, spec.block), prompt, spec.tokens, forced=exact
            )
    # numpy: torch tensors would travel as shared-memory handles of a process that exits
    return {} if view.rank else {k: v.numpy() for k, v in out.items()}


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, in nats (in fp64: the values are near fp32's rounding)."""
    lp, lq = p_logits.double().log_softmax(-1), q_logits.double().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def tp_check(spec: Spec, world: int = 2, provider: str = "shm") -> dict[str, Any]:
    """Run :func:`tp_rank` on ``world`` processes and compare: the numbers of
    docs/collectives.md, *Tensor-parallel decoding*.

    ``agreement``: the fraction of the decoded tokens equal to the exact run's, position
    by position, free-running (after a first difference the contexts differ, so later
    tokens mostly differ too). ``forced_top1``: the same with every step fed the exact
    run's tokens (only the reduction differs). ``kl_mean``: KL(exact || path) of the
    next-token distributions of the teacher-forced steps, mean over steps, nats."""
    import tempfile

    from asyncfabric.testing.ranks import spawn_views

    threads = torch.get_num_threads()
    torch.set_num_threads(spec.threads)  # the ranks' count: the same bits from every matmul
    tmp = tempfile.TemporaryDirectory(prefix="tp_llama_")
    try:
        model = build_model(spec)
        if spec.train_steps and not spec.weights:  # train once, here; the ranks load it
            path = f"{tmp.name}/weights.pt"
            torch.save(model.state_dict(), path)
            spec = replace(spec, weights=path)
        res = spawn_views(world, tp_rank, (asdict(spec),), provider=provider, ttl=30.0)
        bad = [r for r in res if r[0] != "ok"]
        if bad:
            raise RuntimeError(f"tensor-parallel ranks failed: {bad}")
        r = {k: torch.from_numpy(v) for k, v in res[0][1].items()}
        prompt = prompt_ids(spec)
        one_rank = check_against_hf(model, prompt)
        with torch.no_grad():
            hf_tok, hf_logits = hf_greedy(model, prompt, spec.tokens)
            local_tok, local_logits = asyncio.run(local_decode(model, world, prompt, spec.tokens))
    finally:
        torch.set_num_threads(threads)
        tmp.cleanup()
    exact = r["exact"]
    top2 = r["exact_logits"].topk(2, -1).values
    p1 = r["exact_logits"].softmax(-1).max(-1).values
    d: dict[str, Any] = {
        "spec": {**asdict(spec), "weights": ""},
        "world": world,
        "provider": provider,
        "hf_max_logit_diff_1rank": one_rank,
        "exact_vs_hf_agreement": float((exact == hf_tok).float().mean()),
        "exact_vs_hf_max_logit_diff": float((r["exact_logits"] - hf_logits).abs().max()),
        "exact_equals_local_sum": bool(torch.equal(exact, local_tok)),
        # the same bits: the all-reduce's sum is the documented fp32 sum in rank order
        "exact_logits_equal_local_sum": bool(torch.equal(r["exact_logits"], local_logits)),
        "exact_top2_gap_min": float((top2[:, 0] - top2[:, 1]).min()),
        "exact_top2_gap_median": float((top2[:, 0] - top2[:, 1]).median()),
        "exact_top1_prob_median": float(p1.median()),
        "tokens": {"hf": hf_tok.tolist(), "exact": exact.tolist()},
    }
    for path in PATHS:
        diverge = (exact != r[path]).nonzero()
        k = kl(r["exact_logits"], r[f"{path}_forced_logits"])
        d[path] = {
            "agreement": float((exact == r[path]).float().mean()),
            "first_divergence": int(diverge[0]) if len(diverge) else None,
            "forced_top1": float((r[f"{path}_forced"] == exact).float().mean()),
            "kl_mean": float(k.mean()),
            "kl_max": float(k.max()),
        }
        d["tokens"][path] = r[path].tolist()
    return d
