"""Parameter counts of Megatron-Core's GPT / MoE model from Megatron-LM's arguments: exact, and per rank of a layout.

Megatron-LM has no function that returns these (`megatron.training.theoretical_memory_usage` prints rounded totals
that leave out biases, q/k norms and learned position embeddings, and in 0.17 ignores expert parallelism), so
tools/plan.py counts here, module by module as megatron-core builds `GPTModel` (local or Transformer Engine spec,
same numbers; tests/test_recipes_and_plan.py compares with built models):

    embedding.word_embeddings.weight          [V, h]                    (V = padded vocabulary)
    embedding.position_embeddings.weight      [max_positions, h]        learned_absolute only
    per layer
      input norm weight (+ bias for LayerNorm)  h (2h)                  TE: linear_qkv.layer_norm_weight
      self_attention.linear_qkv.weight        [(n_q (1 + gate) + 2 n_kv) d, h]   GQA: n_kv = query groups,
                                                                        d = kv_channels, gate: --attention-output-gate
      self_attention.linear_qkv.bias          its rows                  --add-qkv-bias or bias on
      self_attention.q_layernorm / k_layernorm  d each (+ d bias for LayerNorm)   --qk-layernorm
      self_attention.linear_proj.weight       [h, n_q d]   (+ h bias)
      multi-latent attention (--multi-latent-attention) instead: q [n (d_qk + d_pe), h] or, with --q-lora-rank r_q,
                                              q_down [r_q, h] + q_up [n (d_qk + d_pe), r_q]; kv_down [r_kv + d_pe, h],
                                              kv_up [n (d_qk + d_v), r_kv]; proj [h, n d_v] (+ h bias); q/kv norms
                                              r_q and r_kv with --qk-layernorm (counted from megatron-core's
                                              MultiLatentAttention; MLA needs Transformer Engine: no CPU build
                                              checks it, tests/test_real_configs.py checks DeepSeek-V3's 671B)
      pre-MLP norm weight (+ bias)            h (2h)                    TE dense: linear_fc1.layer_norm_weight
      dense MLP:  linear_fc1 [g f, h] (+ g f bias), linear_fc2 [h, f] (+ h bias)   g = 2 for SwiGLU, else 1
      MoE MLP:    router.weight [E, h] (+ E bias); E experts of (fc1 [g f_e, h], fc2 [h, f_e]) (+ biases);
                  shared expert fc1 [g f_s, h], fc2 [h, f_s] (+ biases) (+ gate [1, h] with --moe-shared-expert-gate)
    decoder.final_layernorm                   h (2h)
    output_layer.weight                       [V, h]                    untied only (tied: the embedding)

Active parameters are what one token passes through: everything except the experts it is not routed to, i.e. only
`topk` of the E experts of each MoE layer count. The "non_embedding" variants leave out the word embedding, the
learned position embedding and the untied output layer (the usual convention). The router's expert bias
(`--moe-router-enable-expert-bias`) is a buffer, not a parameter.

Per rank (`rank_parameters`): linear weights split over TP (the MLA down projections are replicated, as Transformer
Engine's spec builds them), experts E/EP per rank and split over expert-TP, norms and router replicated, vocabulary
split over TP, the embedding on the first pipeline stage and the output layer on the last (tied: a copy there).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Union


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What parameter counts depend on (Megatron-LM argument names; `ModelShape.from_args` reads them)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    vocab_size: int  # padded (what the embedding holds)
    num_query_groups: Optional[int] = None  # None: multi-head attention
    kv_channels: Optional[int] = None  # default hidden / heads
    swiglu: bool = False
    num_experts: Optional[int] = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: Optional[int] = None
    moe_shared_expert_intermediate_size: Optional[int] = None
    moe_shared_expert_gate: bool = False
    moe_layer_freq: Union[int, Sequence[int]] = 1
    normalization: str = "RMSNorm"
    qk_layernorm: bool = False
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    attention_output_gate: bool = False
    untie_embeddings_and_output_weights: bool = True
    learned_position_embeddings: int = 0  # rows of the learned absolute position embedding, 0 for RoPE / none
    # multi-latent attention: (q_lora_rank or None, kv_lora_rank, qk_head_dim, qk_pos_emb_head_dim, v_head_dim)
    mla: Optional[tuple] = None

    @classmethod
    def from_args(cls, args, padded_vocab_size: int) -> "ModelShape":
        """The shape of the model Megatron-LM builds from its validated `args` (`core_transformer_config_from_args`:
        query groups only with --group-query-attention)."""
        mla = None
        if getattr(args, "multi_latent_attention", False):
            mla = (args.q_lora_rank, args.kv_lora_rank, args.qk_head_dim, args.qk_pos_emb_head_dim, args.v_head_dim)
        return cls(
            num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
            ffn_hidden_size=args.ffn_hidden_size, vocab_size=padded_vocab_size,
            num_query_groups=args.num_query_groups if args.group_query_attention else None,
            kv_channels=args.kv_channels, swiglu=bool(args.swiglu), num_experts=args.num_experts,
            moe_router_topk=args.moe_router_topk, moe_ffn_hidden_size=args.moe_ffn_hidden_size,
            moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
            moe_shared_expert_gate=bool(getattr(args, "moe_shared_expert_gate", False)),
            moe_layer_freq=args.moe_layer_freq, normalization=args.normalization, qk_layernorm=bool(args.qk_layernorm),
            add_bias_linear=bool(args.add_bias_linear), add_qkv_bias=bool(args.add_qkv_bias),
            attention_output_gate=bool(getattr(args, "attention_output_gate", False)),
            untie_embeddings_and_output_weights=bool(args.untie_embeddings_and_output_weights),
            learned_position_embeddings=(args.max_position_embeddings
                                         if args.position_embedding_type == "learned_absolute" else 0),
            mla=mla)

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    def moe_layer_pattern(self) -> List[int]:
        """1 for each MoE layer, 0 for each dense layer (Megatron's --moe-layer-freq: every k-th layer, or a list)."""
        if not self.num_experts:
            return [0] * self.num_layers
        if isinstance(self.moe_layer_freq, int):
            return [1 if i % self.moe_layer_freq == 0 else 0 for i in range(self.num_layers)]
        pattern = list(self.moe_layer_freq)
        if len(pattern) != self.num_layers:
            raise ValueError(f"--moe-layer-freq pattern has {len(pattern)} entries for {self.num_layers} layers")
        return pattern


def _norm(size: int, normalization: str) -> int:
    return size * (2 if normalization == "LayerNorm" else 1)


def _mlp(hidden: int, ffn: int, glu: bool, bias: bool, tp: int = 1) -> int:
    """fc1 + fc2 of one MLP (one expert), this TP rank's share (fc2's bias is not sharded)."""
    fc1_out = ffn * (2 if glu else 1)
    count = fc1_out * hidden // tp + hidden * ffn // tp
    if bias:
        count += fc1_out // tp + hidden
    return count


def _attention(shape: ModelShape, tp: int) -> Dict[str, int]:
    """(TP-split linear weights and biases, replicated norms) of one attention block on one TP rank."""
    h, n = shape.hidden_size, shape.num_attention_heads
    if shape.mla is not None:
        q_lora, kv_lora, qk, pe, v = shape.mla
        linear = replicated = 0
        if q_lora is None:
            linear += n * (qk + pe) * h // tp
        else:
            replicated += q_lora * h  # q_down: duplicated over TP (TE spec)
            linear += n * (qk + pe) * q_lora // tp
        replicated += (kv_lora + pe) * h  # kv_down: duplicated over TP
        linear += n * (qk + v) * kv_lora // tp + h * n * v // tp
        if shape.add_bias_linear:
            replicated += h  # linear_proj bias
        norms = 0
        if shape.qk_layernorm:
            norms = _norm(kv_lora, shape.normalization) + (_norm(q_lora, shape.normalization) if q_lora else 0)
        return dict(attention=linear + replicated, norms=norms)
    d = shape.head_dim
    q, kv = n * d, shape.query_groups * d
    rows = q * (2 if shape.attention_output_gate else 1) + 2 * kv
    attention = rows * h // tp + h * q // tp
    if shape.add_bias_linear or shape.add_qkv_bias:
        attention += rows // tp
    if shape.add_bias_linear:
        attention += h  # linear_proj bias (replicated)
    norms = 2 * _norm(d, shape.normalization) if shape.qk_layernorm else 0
    return dict(attention=attention, norms=norms)


def _layer_parts(shape: ModelShape, is_moe: bool, *, tp: int = 1, ep: int = 1,
                 etp: Optional[int] = None) -> Dict[str, int]:
    """One transformer layer on one rank of a (tp, ep, etp) layout; tp = ep = 1 gives the full layer."""
    h = shape.hidden_size
    etp = etp or tp
    attention = _attention(shape, tp)
    parts = dict(attention=attention["attention"], norms=2 * _norm(h, shape.normalization) + attention["norms"],
                 dense_mlp=0, router=0, shared_experts=0, experts=0, experts_active=0)
    if not is_moe:
        parts["dense_mlp"] = _mlp(h, shape.ffn_hidden_size, shape.swiglu, shape.add_bias_linear, tp)
        return parts
    expert_ffn = shape.moe_ffn_hidden_size or shape.ffn_hidden_size
    parts["router"] = shape.num_experts * h + (shape.num_experts if shape.add_bias_linear else 0)
    parts["experts"] = shape.num_experts // ep * _mlp(h, expert_ffn, shape.swiglu, shape.add_bias_linear, etp)
    parts["experts_active"] = shape.moe_router_topk * _mlp(h, expert_ffn, shape.swiglu, shape.add_bias_linear)
    if shape.moe_shared_expert_intermediate_size:
        parts["shared_experts"] = _mlp(h, shape.moe_shared_expert_intermediate_size, shape.swiglu,
                                       shape.add_bias_linear, tp) + (h if shape.moe_shared_expert_gate else 0)
    return parts


def count_parameters(shape: ModelShape) -> Dict[str, object]:
    """Exact parameter counts of the whole model (`sum(p.numel() for p in model.parameters())` at TP=PP=EP=1).

    Returns a dict with `total`, `active` (top-k experts only), `total_non_embedding`, `active_non_embedding`, and
    the parts: `embedding` (word), `position_embedding`, `output_layer`, `attention`, `norms` (all norm weights, final
    norm included), `dense_mlp`, `router`, `shared_experts`, `experts` (all), `experts_active` (top-k per MoE layer),
    `per_layer` (list of per-layer totals). Raises ValueError for a --moe-layer-freq list of the wrong length.
    """
    h, vocab = shape.hidden_size, shape.vocab_size
    totals = dict(attention=0, norms=_norm(h, shape.normalization), dense_mlp=0, router=0, shared_experts=0,
                  experts=0, experts_active=0)
    per_layer = []
    for is_moe in shape.moe_layer_pattern():
        parts = _layer_parts(shape, bool(is_moe))
        for key in totals:
            totals[key] += parts[key]
        per_layer.append(sum(v for k, v in parts.items() if k != "experts_active"))
    embedding = vocab * h
    position = shape.learned_position_embeddings * h
    output = vocab * h if shape.untie_embeddings_and_output_weights else 0
    body = sum(v for k, v in totals.items() if k not in ("experts", "experts_active"))
    result: Dict[str, object] = dict(totals)
    result.update(embedding=embedding, position_embedding=position, output_layer=output,
                  total_non_embedding=body + totals["experts"], active_non_embedding=body + totals["experts_active"],
                  per_layer=per_layer)
    embeddings = embedding + position + output
    result["total"] = result["total_non_embedding"] + embeddings
    result["active"] = result["active_non_embedding"] + embeddings
    return result


def rank_parameters(shape: ModelShape, layers: Sequence[int], *, tp: int = 1, ep: int = 1, etp: Optional[int] = None,
                    first_stage: bool = True, last_stage: bool = True) -> Dict[str, int]:
    """Parameters held by one rank whose pipeline stage holds the transformer layers `layers` (indices; Megatron's
    `get_transformer_layer_offset` / `get_num_layers_to_build` say which, tools/plan.py asks them).

    Returns `dense` (everything but the routed experts: replicated over data parallelism), `expert` (routed experts:
    E/EP experts, each split over expert-TP) and `total`. The vocabulary is split over TP (`shape.vocab_size` is the
    padded size, a multiple of TP). With tied embeddings and more than one stage the last stage holds a copy of the
    word embedding as its output weight, as Megatron does. Raises ValueError if the padded vocabulary is not
    divisible by TP.
    """
    if shape.vocab_size % tp:
        raise ValueError(f"padded vocabulary {shape.vocab_size} is not divisible by TP={tp}")
    pattern = shape.moe_layer_pattern()
    dense = expert = 0
    for index in layers:
        parts = _layer_parts(shape, bool(pattern[index]), tp=tp, ep=ep, etp=etp)
        expert += parts["experts"]
        dense += sum(v for k, v in parts.items() if k not in ("experts", "experts_active"))
    h = shape.hidden_size
    if first_stage:
        dense += shape.vocab_size * h // tp + shape.learned_position_embeddings * h
    if last_stage:
        dense += _norm(h, shape.normalization)
        if shape.untie_embeddings_and_output_weights or not first_stage:
            dense += shape.vocab_size * h // tp
    return dict(dense=dense, expert=expert, total=dense + expert)
