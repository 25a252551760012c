"""A Phi-3 model built from a config (random init, fixed seed, nothing downloaded): fused
q/k/v and gate/up projections, so tensor parallelism exercises fused column splits."""

from __future__ import annotations

from typing import Any

import torch

from asyncfabric.weights import Layout, Spec, Split
from asyncfabric.weights.rules import megatron_fused


def config(hidden: int = 64, layers: int = 2, heads: int = 4, kv: int = 2, inter: int = 128,
           vocab: int = 256) -> Any:  # fmt: skip
    from transformers import Phi3Config

    return Phi3Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
        max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip


def build(cfg: Any, seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    from transformers import Phi3ForCausalLM

    torch.manual_seed(seed)
    return Phi3ForCausalLM(cfg).to(dtype).eval()


def tp_rule(cfg: Any) -> Any:
    return megatron_fused(cfg)


def fsdp_rule(name: str, shape: tuple[int, ...]) -> Spec:
    return Split(0)


def full_params(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def assemble(
    cfg: Any, lay: Layout, shards: list[dict[str, torch.Tensor]], dtype: torch.dtype
) -> Any:
    """An inference model whose weights are assembled from every rank's shards."""
    m = build(cfg, seed=12345, dtype=dtype)  # different init: every weight must be overwritten
    state = {n: lay.assemble(n, [s[n] for s in shards]) for n in lay.params}
    m.load_state_dict(state, strict=True)
    return m


def logits(model: Any, seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (2, 16), generator=g)
    with torch.no_grad():
        return model(input_ids=ids).logits
