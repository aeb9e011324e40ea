"""Parameter counts of Megatron-Core's GPT / MoE model, exact, and per rank of a parallel layout.

Counted module by module as megatron-core builds `GPTModel` (local or Transformer Engine spec, same numbers):

    embedding.word_embeddings.weight          [V, h]                    (V = padded vocabulary)
    embedding.position_embeddings.weight      [max_positions, h]        learned_absolute only
    per layer
      input norm weight (+ bias for LayerNorm)  h (2h)                  TE: linear_qkv.layer_norm_weight
      self_attention.linear_qkv.weight        [(n_q + 2 n_kv) d, h]     GQA: n_kv = query groups, d = kv_channels
      self_attention.linear_qkv.bias          (n_q + 2 n_kv) d          --add-qkv-bias or bias on
      self_attention.q_layernorm / k_layernorm  d each (+ d bias for LayerNorm)   --qk-layernorm
      self_attention.linear_proj.weight       [h, n_q d]   (+ h bias)
      pre-MLP norm weight (+ bias)            h (2h)                    TE dense: linear_fc1.layer_norm_weight
      dense MLP:  linear_fc1 [g f, h] (+ g f bias), linear_fc2 [h, f] (+ h bias)   g = 2 for SwiGLU, else 1
      MoE MLP:    router.weight [E, h]; E experts of (fc1 [g f_e, h], fc2 [h, f_e]) (+ biases);
                  shared expert fc1 [g f_s, h], fc2 [h, f_s] (+ biases) when --moe-shared-expert-intermediate-size
    decoder.final_layernorm                   h (2h)
    output_layer.weight                       [V, h]                    untied only (tied: the embedding)

Active parameters are what one token passes through: everything except the experts it is not routed to,
i.e. only `topk` of the E experts of each MoE layer count. The "non_embedding" variants leave out the word
embedding, the learned position embedding and the untied output layer (the usual convention).

Router expert bias (`--moe-router-enable-expert-bias`) is a buffer, not a parameter, and is not counted.
"""

from __future__ import annotations

from typing import Dict, Optional

from megatron_tst.flops import ModelShape


def _norm(size: int, normalization: str) -> int:
    return size * (2 if normalization == "LayerNorm" else 1)


def _mlp(hidden: int, ffn: int, glu: bool, bias: bool, tp: int = 1) -> int:
    """fc1 + fc2 of one MLP (one expert), this TP rank's share (fc2's bias is not sharded)."""
    fc1_out = ffn * (2 if glu else 1)
    count = fc1_out * hidden // tp + hidden * ffn // tp
    if bias:
        count += fc1_out // tp + hidden
    return count


def _layer_parts(shape: ModelShape, is_moe: bool, *, qk_layernorm: bool, normalization: str,
                 add_bias_linear: bool, add_qkv_bias: bool, tp: int = 1, ep: int = 1,
                 etp: Optional[int] = None) -> Dict[str, int]:
    """One transformer layer on one rank of a (tp, ep, etp) layout; tp = ep = 1 gives the full layer."""
    h, d = shape.hidden_size, shape.head_dim
    q, kv = shape.num_attention_heads * d, shape.query_groups * d
    etp = etp or tp
    attention = (q + 2 * kv) * h // tp + h * q // tp
    if add_bias_linear or add_qkv_bias:
        attention += (q + 2 * kv) // tp
    if add_bias_linear:
        attention += h  # linear_proj bias (replicated)
    norms = 2 * _norm(h, normalization)  # input norm + pre-MLP norm
    if qk_layernorm:
        norms += 2 * _norm(d, normalization)
    parts = dict(attention=attention, norms=norms, dense_mlp=0, router=0, shared_experts=0, experts=0,
                 experts_active=0)
    if not is_moe:
        parts["dense_mlp"] = _mlp(h, shape.ffn_hidden_size, shape.swiglu, add_bias_linear, tp)
        return parts
    expert_ffn = shape.moe_ffn_hidden_size or shape.ffn_hidden_size
    one_expert = _mlp(h, expert_ffn, shape.swiglu, add_bias_linear, etp)
    parts["router"] = shape.num_experts * h
    parts["experts"] = shape.num_experts // ep * one_expert
    parts["experts_active"] = shape.moe_router_topk * _mlp(h, expert_ffn, shape.swiglu, add_bias_linear)
    if shape.moe_shared_expert_intermediate_size:
        parts["shared_experts"] = _mlp(h, shape.moe_shared_expert_intermediate_size, shape.swiglu,
                                       add_bias_linear, tp)
    return parts


def count_parameters(
    shape: ModelShape,
    *,
    untie_embeddings_and_output_weights: bool = True,
    qk_layernorm: bool = False,
    normalization: str = "RMSNorm",
    add_bias_linear: bool = False,
    add_qkv_bias: bool = False,
    learned_position_embeddings: int = 0,
) -> Dict[str, int]:
    """Exact parameter counts of the whole model (`sum(p.numel() for p in model.parameters())` at TP=PP=EP=1).

    Args:
        shape: the model shape; `shape.vocab_size` is the padded vocabulary (what the embedding holds).
        learned_position_embeddings: rows of the learned absolute position embedding (its
            max_position_embeddings), 0 for RoPE / none.

    Returns a dict with `total`, `active` (top-k experts only), `total_non_embedding`,
    `active_non_embedding`, and the parts: `embedding` (word), `position_embedding`, `output_layer`,
    `attention`, `norms` (all norm weights, final norm included), `dense_mlp`, `router`,
    `shared_experts`, `experts` (all), `experts_active` (top-k per MoE layer), `per_layer` (list of
    per-layer totals).
    """
    h, vocab = shape.hidden_size, shape.vocab_size
    totals = dict(attention=0, norms=_norm(h, normalization), dense_mlp=0, router=0, shared_experts=0,
                  experts=0, experts_active=0)
    per_layer = []
    for is_moe in shape.moe_layer_pattern():
        parts = _layer_parts(shape, bool(is_moe), qk_layernorm=qk_layernorm, normalization=normalization,
                             add_bias_linear=add_bias_linear, add_qkv_bias=add_qkv_bias)
        for key in totals:
            totals[key] += parts[key]
        per_layer.append(sum(v for k, v in parts.items() if k != "experts_active"))
    embedding = vocab * h
    position = learned_position_embeddings * h
    output = vocab * h if untie_embeddings_and_output_weights else 0
    body = sum(v for k, v in totals.items() if k not in ("experts", "experts_active"))
    result = dict(totals)
    result.update(
        embedding=embedding, position_embedding=position, output_layer=output,
        total_non_embedding=body + totals["experts"],
        active_non_embedding=body + totals["experts_active"],
        per_layer=per_layer,
    )
    embeddings = embedding + position + output
    result["total"] = result["total_non_embedding"] + embeddings
    result["active"] = result["active_non_embedding"] + embeddings
    return result


def architecture_options(args) -> Dict[str, object]:
    """The keyword arguments of `count_parameters` / `rank_parameters` that parsed trainer arguments set."""
    return dict(
        untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
        qk_layernorm=args.qk_layernorm, normalization=args.normalization,
        add_bias_linear=not args.disable_bias_linear, add_qkv_bias=args.add_qkv_bias,
        learned_position_embeddings=(args.max_position_embeddings
                                     if args.position_embedding_type == "learned_absolute" else 0),
    )


def count_parameters_from_args(args, padded_vocab_size: int) -> Dict[str, int]:
    """`count_parameters` for parsed trainer arguments (megatron_tst.training.arguments.parse_args)."""
    from megatron_tst.training.configs import model_shape_from_args

    return count_parameters(model_shape_from_args(args, padded_vocab_size), **architecture_options(args))


def rank_parameters(
    shape: ModelShape,
    *,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: Optional[int] = None,
    pp_rank: int = 0,
    untie_embeddings_and_output_weights: bool = True,
    qk_layernorm: bool = False,
    normalization: str = "RMSNorm",
    add_bias_linear: bool = False,
    add_qkv_bias: bool = False,
    learned_position_embeddings: int = 0,
) -> Dict[str, int]:
    """Parameters held by one rank of pipeline stage `pp_rank` (layers split evenly over PP, as Megatron).

    Returns `dense` (everything but the routed experts: replicated over data parallelism) and `expert`
    (routed experts: E/EP experts, each split over expert-TP), and `total`. The vocabulary is split over
    TP (`shape.vocab_size` must be the padded size, a multiple of TP). Norm weights, q/k norms and the
    router are replicated over TP. With tied embeddings and PP > 1 the last stage holds a copy of the
    word embedding as its output weight, as Megatron does. Virtual pipeline stages do not change a
    rank's total (it still holds num_layers / PP layers).
    """
    if shape.num_layers % pp:
        raise ValueError(f"{shape.num_layers} layers are not divisible by PP={pp}")
    if shape.vocab_size % tp:
        raise ValueError(f"padded vocabulary {shape.vocab_size} is not divisible by TP={tp}")
    per_stage = shape.num_layers // pp
    pattern = shape.moe_layer_pattern()[pp_rank * per_stage:(pp_rank + 1) * per_stage]
    dense = expert = 0
    for is_moe in pattern:
        parts = _layer_parts(shape, bool(is_moe), qk_layernorm=qk_layernorm, normalization=normalization,
                             add_bias_linear=add_bias_linear, add_qkv_bias=add_qkv_bias, tp=tp, ep=ep, etp=etp)
        expert += parts["experts"]
        dense += sum(v for k, v in parts.items() if k not in ("experts", "experts_active"))
    h = shape.hidden_size
    first, last = pp_rank == 0, pp_rank == pp - 1
    if first:
        dense += shape.vocab_size * h // tp + learned_position_embeddings * h
    if last:
        dense += _norm(h, normalization)
        if untie_embeddings_and_output_weights or not first:
            dense += shape.vocab_size * h // tp
    return dict(dense=dense, expert=expert, total=dense + expert)
