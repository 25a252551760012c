"""Ready-made sharding rules for ``Layout.of``, by model family."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .layout import Replicated, Spec, column, row


def megatron_fused(cfg: Any) -> Callable[[str, tuple[int, ...]], Spec]:
    """Megatron tensor parallelism for a transformers model with fused ``qkv_proj``
    and ``gate_up_proj`` (Phi-3): column-parallel q/k/v, gate/up and the vocabulary,
    row-parallel ``o_proj`` and ``down_proj``, norms replicated."""
    hd = cfg.hidden_size // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    i = cfg.intermediate_size

    def rule(name: str, shape: tuple[int, ...]) -> Spec:
        if name.endswith("qkv_proj.weight"):
            return column((q, kv, kv))
        if name.endswith("gate_up_proj.weight"):
            return column((i, i))
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            return row()
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            return column()  # vocabulary parallel
        return Replicated()  # norms

    return rule
