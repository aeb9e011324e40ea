"""Model FLOPs per training step, counted as Megatron-LM counts them.

Megatron-LM saves `num_floating_point_operations_so_far` in its checkpoints and reports TFLOP/s/GPU from
the same formula (megatron/training/training.py `num_floating_point_operations`, BSHD path, GPT with
GQA, SwiGLU and MoE); this module reproduces it so that the counter continues across Megatron-LM and
megatron-tst checkpoints. A superposition step costs the same FLOPs as a baseline step of the same number
of positions (the bag averaging adds s*h additions per position, negligible), so every step is counted
with `seq_length` positions.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What FLOPs and parameter counts depend on (Megatron-LM flag names in brackets)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    vocab_size: int  # padded
    num_query_groups: Optional[int] = None  # [--num-query-groups]; None: multi-head attention
    kv_channels: Optional[int] = None  # default hidden / heads
    swiglu: bool = False
    num_experts: Optional[int] = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: Optional[int] = None
    moe_shared_expert_intermediate_size: Optional[int] = None
    moe_layer_freq: Union[int, Sequence[int]] = 1

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    def moe_layer_pattern(self) -> list:
        """1 for each MoE layer, 0 for each dense layer."""
        if not self.num_experts:
            return [0] * self.num_layers
        if isinstance(self.moe_layer_freq, int):
            return [1 if i % self.moe_layer_freq == 0 else 0 for i in range(self.num_layers)]
        pattern = list(self.moe_layer_freq)
        if len(pattern) != self.num_layers:
            raise ValueError(f"--moe-layer-freq pattern has {len(pattern)} entries for {self.num_layers} layers")
        return pattern


def training_flops_per_step(shape: ModelShape, seq_length: int, global_batch_size: int) -> float:
    """Forward + backward FLOPs of one step of `global_batch_size` sequences of `seq_length` positions."""
    moe_layers = sum(shape.moe_layer_pattern())
    dense_layers = shape.num_layers - moe_layers
    routed = shape.moe_router_topk if shape.num_experts else 0
    moe_ffn = shape.moe_ffn_hidden_size or shape.ffn_hidden_size
    shared_ffn = shape.moe_shared_expert_intermediate_size or 0
    ffn_factor = 3 if shape.swiglu else 2
    fwd_bwd, fma = 3, 2
    q_size = shape.head_dim * shape.num_attention_heads
    kv_size = shape.head_dim * shape.query_groups
    attention_linear = fwd_bwd * fma * (shape.hidden_size * (q_size + 2 * kv_size) + q_size * shape.hidden_size)
    attention_core = fwd_bwd * fma * q_size / 2 * 2  # causal mask halves QK^T and (QK^T)V
    tokens = global_batch_size * seq_length
    per_token = (
        fwd_bwd * fma * shape.hidden_size * (
            shape.ffn_hidden_size * ffn_factor * dense_layers
            + moe_ffn * routed * ffn_factor * moe_layers
            + shared_ffn * ffn_factor * moe_layers
        )
        + attention_linear * shape.num_layers
        + fwd_bwd * fma * shape.hidden_size * shape.vocab_size  # logits
    )
    return tokens * per_token + global_batch_size * seq_length * seq_length * attention_core * shape.num_layers
