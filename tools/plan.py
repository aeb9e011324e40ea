"""Plan a run without GPUs: sizes, FLOPs, tokens, steps, memory per GPU and wall time of a recipe + layout.

    python tools/plan.py --recipe 10b-a1b [--nodes 4] [--gpus-per-node 8] [trainer flags ...]
                         [--tokens-per-second X | --mfu F] [--gpu-memory-gb 80] [--json]

Any trainer flag may follow (layout, batch, steps, TST settings...): the planner runs the trainer's own
parser (`megatron_tst.training.arguments.parse_args`, recipe < command line, world size = nodes x GPUs per
node) and Megatron-Core's `TransformerConfig` checks, so a layout the planner accepts is one the trainer
accepts, and one it refuses is refused with the trainer's reason (exit status 2, no traceback).
No data and no tokenizer files are read: the planner adds `--mock-data --tokenizer-type NullTokenizer
--vocab-size V` with V the recipe's tokenizer vocabulary (give `--vocab-size` to plan for another one; a
`--tokenizer-type/--tokenizer-model` on the command line is loaded instead). The vocabulary is padded as
the trainer pads it (multiple of --make-vocab-size-divisible-by x TP).

What it prints
- parameters: total and active (one token's path: top-k of the experts), with and without the embeddings
  (word embedding + untied output layer), from megatron_tst/params.py (exact for Megatron's modules).
- FLOPs per step: megatron_tst.flops.training_flops_per_step (Megatron-LM's formula); the same in both
  phases, since a superposition step runs the same L positions.
- per phase: steps, positions per step (global batch x seq length), raw tokens per step (superposition:
  s x positions), and totals.
- memory per GPU on the busiest pipeline stage (GiB = 2^30 bytes), see below.
- wall time: `--tokens-per-second X` is the throughput PER GPU in model positions per second (the same
  in both phases: a superposition step costs what a baseline step costs; it just eats s x the raw tokens);
  or `--mfu F` with `--peak-tflops-per-gpu` (default 989, H100/H200 bf16 dense): step time =
  FLOPs per step / (F x peak x GPUs).

Memory model (approximate; real runs add CUDA context, NCCL and allocator overhead, typically 2-6 GiB)
- weights: 2 bytes per parameter held by the rank (bf16/fp16; 4 for fp32). The rank holds its stage's
  layers with linear weights split over TP, experts split E/EP per rank and over expert-TP, norms and
  router replicated, vocabulary split over TP, embedding on the first stage, output layer on the last.
- gradients: Megatron's main-grad buffer, fp32 (4 bytes; bf16 runs accumulate in fp32).
- optimizer: fp32 master weights (bf16/fp16 only) + Adam m and v = 12 bytes per parameter (8 for fp32
  training); with --use-distributed-optimizer divided by the data-parallel size (x CP) for non-expert
  parameters and by the expert-data-parallel size (world / (PP x EP x expert-TP)) for experts.
- activations, per layer and per position held by the rank (b = 2 bytes; h hidden, q = heads x d,
  kv = groups x d, f ffn, t = TP, SP = sequence parallelism; "h-wide" terms are divided by t only under SP):
  attention  b * [2h (norm input, qkv input) / t_SP + (2q + 2kv) / t (Q, K, V, attention output)
             + (q + kv) / t with qk-layernorm (their inputs)]
  dense MLP  b * [2h (norm input, fc1 input) / t_SP + (g f + f) / t (fc1 output, activation output)],
             g = 2 for SwiGLU, 1 otherwise
  MoE MLP    b * 2h / t_SP + 8E / t_SP (fp32 router logits and probabilities)
             + b * k * etp_g / t_SP * [2h (expert input; expert output, kept for the weighted combine)
                                       + (g + 1) f_e / etp (fc1 and activation outputs, split over expert-TP)]
             (balanced routing: each rank's experts process k copies of each position the rank routes;
             under SP the expert-TP group all-gathers its tokens first: etp_g = expert-TP with SP, else 1)
  This is Korthikanti et al.'s sbh(34 + 5as/h) (Megatron's activation formula) rewritten for GQA, SwiGLU
  and MoE, with flash / fused attention (no s^2 terms: the attention core keeps Q, K, V, O and the row
  log-sum-exp) and no dropout (no masks). Selective recomputation ("core_attn") saves nothing more under
  flash attention and is not modelled; full recomputation keeps only each layer's input (b h / t_SP) plus
  one recomputed block (--recompute-num-layers layers) of one micro batch.
  Positions per micro batch on a rank: micro batch x seq length / CP. In flight on pipeline stage r
  (Megatron's 1F1B): min(PP - r, microbatches) micro batches of num_layers/PP layers; interleaved:
  min(2 (PP - r - 1) + (VPP - 1) PP + 1, microbatches x VPP) chunks of num_layers/(PP VPP) layers.
- logits (last stage, one micro batch at a time): b V/t (bf16 logits) + 4 V/t (fp32 softmax kept by the
  (multi-hot) cross-entropy) bytes per position: at 128k-152k vocabularies this is often the largest term.
  With `--cross-entropy-loss-fusion --cross-entropy-fusion-impl linear` (the fused output layer and loss) no
  logits are kept: one chunk of C positions at a time (C = megatron_tst.mce.default_chunk_size, 128 MiB of fp32
  logits shard) holds C (4 + b) V/t (fp32 logits, then the gradient in the GEMM dtype) + 2 C b h (gathered rows and
  their gradient), plus per position (9 + 12 s) (loss, loss weights, target indices and weights of the s targets)
  + 4 h / t_SP (the fp32 hidden gradient computed in the forward: the model's eager gradients), plus the fp32
  weight-gradient accumulator 4 V/t h and, with bf16/fp16 GEMM operands, the fp32 result of one row block of its
  GEMM, min(4 V/t h, 128 MiB).
- superposition input (first stage, superposition phase only, transient): the embedding rows of the s x L
  raw tokens (b s h per position) plus the fp32 bag sums (4 h).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from typing import Dict, List, Optional

from megatron_tst.training.metrics import PEAK_BF16_TFLOPS

GIB = float(2 ** 30)
DEFAULT_PEAK_TFLOPS = PEAK_BF16_TFLOPS["H100"]  # H100 / H200 SXM, bf16 dense


class PlanError(Exception):
    """A layout or setting that cannot run: the message says why."""


def planner_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plan.py", allow_abbrev=False,
        description="Plan a megatron-tst run: parameters, FLOPs, tokens, steps, memory per GPU, time. "
                    "Unknown flags are trainer flags (recipe overrides).",
        epilog="Trainer flags: python -m megatron_tst.pretrain --help. Formulas and assumptions: this file's "
               "docstring.")
    parser.add_argument("--recipe", help="270m | 600m | 3b | 10b-a1b (megatron_tst/recipes.py)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--tokens-per-second", type=float,
                        help="throughput per GPU in model positions (tokens of the model's sequence) per second")
    parser.add_argument("--mfu", type=float, help="model FLOPs utilisation in (0, 1], instead of --tokens-per-second")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0,
                        help="GPU memory in GiB for the fit warning (H100 80, H200 141)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


# ------------------------------------------------------------------------------------------------ parsing


def _trainer_error(err: SystemExit, stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        if ": error: " in line:
            return line.split(": error: ", 1)[1]
    return lines[-1] if lines else f"the trainer's parser exited with status {err.code}"


def trainer_args(recipe: Optional[str], trainer_argv: List[str], world_size: int):
    """The trainer's parsed arguments for this plan (and the tokenizer vocabulary size)."""
    from megatron_tst import recipes
    from megatron_tst.training import arguments

    prefix: List[str] = []
    vocab = None
    if recipe is not None:
        try:
            vocab = recipes.get(recipe).vocab_size
        except ValueError as err:
            raise PlanError(str(err)) from None
        prefix += ["--recipe", recipe]
    prefix += ["--mock-data", "--tokenizer-type", "NullTokenizer"]
    if vocab is not None:
        prefix += ["--vocab-size", str(vocab)]
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(io.StringIO()):
            args = arguments.parse_args(prefix + list(trainer_argv), world_size=world_size)
    except SystemExit as err:
        raise PlanError(_trainer_error(err, captured.getvalue())) from None
    except ValueError as err:
        raise PlanError(str(err)) from None
    if args.tokenizer_type == "NullTokenizer":
        vocab = args.vocab_size
    else:
        from megatron_tst.training.tokenizer import build_tokenizer

        try:
            vocab = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size).vocab_size
        except Exception as err:  # a missing library or a bad file: say it, no traceback
            raise PlanError(f"cannot load the tokenizer: {err}") from None
    return args, int(vocab)


def check_with_megatron(args) -> None:
    """Megatron-Core's own TransformerConfig checks (what the trainer builds), as a PlanError."""
    from megatron_tst.training import configs

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            configs.transformer_config_from_args(args)
    except (ValueError, AssertionError, TypeError) as err:
        raise PlanError(f"Megatron-Core refuses this configuration: {err}") from None


# --------------------------------------------------------------------------------------------- the plan


def _microbatches_in_flight(pp: int, vpp: Optional[int], stage: int, microbatches: int) -> float:
    """Layer-passes of activations held on pipeline stage `stage`, in units of 'all layers of the stage'."""
    if pp == 1:
        return 1.0
    if not vpp:
        return float(min(pp - stage, microbatches))
    chunks = min(2 * (pp - stage - 1) + (vpp - 1) * pp + 1, microbatches * vpp)
    return chunks / vpp


def activation_bytes_per_position(args, shape, layer_is_moe: bool) -> Dict[str, float]:
    """Bytes kept for backward per position held by the rank, one layer (see the module docstring)."""
    b = 2 if (args.bf16 or args.fp16) else 4
    t = args.tensor_model_parallel_size
    t_sp = t if args.sequence_parallel else 1
    h, d = shape.hidden_size, shape.head_dim
    q, kv = shape.num_attention_heads * d, shape.query_groups * d
    g = 2 if shape.swiglu else 1
    attention = b * (2 * h / t_sp + (2 * q + 2 * kv) / t)
    if args.qk_layernorm:
        attention += b * (q + kv) / t
    if not layer_is_moe:
        mlp = b * (2 * h / t_sp + (g + 1) * shape.ffn_hidden_size / t)
    else:
        etp = args.expert_tensor_parallel_size or t
        gather = etp if args.sequence_parallel else 1
        f_e = shape.moe_ffn_hidden_size or shape.ffn_hidden_size
        k = shape.moe_router_topk
        copies = k * gather / t_sp  # routed token copies this rank's experts process, per position
        mlp = b * 2 * h / t_sp + 8 * shape.num_experts / t_sp + b * copies * (2 * h + (g + 1) * f_e / etp)
        if shape.moe_shared_expert_intermediate_size:
            mlp += b * (g + 1) * shape.moe_shared_expert_intermediate_size / t
    return dict(attention=attention, mlp=mlp, layer_input=b * h / t_sp)


def loss_bytes(args, shape, padded_vocab: int, positions: float, b: int, bag: int = 1) -> float:
    """Bytes the output layer + loss hold for one micro batch of `positions` (see "logits" in the docstring)."""
    from megatron_tst.mce import CHUNK_LOGITS_BYTES, default_chunk_size
    from megatron_tst.training.arguments import linear_loss_fusion

    tp = args.tensor_model_parallel_size
    t_sp = tp if args.sequence_parallel else 1
    vocab_local = padded_vocab / tp
    if not linear_loss_fusion(args):
        return positions * ((b + 4) * vocab_local + 2 * b * shape.hidden_size / t_sp)
    chunk = default_chunk_size(int(vocab_local), int(positions))
    return (chunk * ((4 + b) * vocab_local + 2 * b * shape.hidden_size)  # one chunk's logits, gathered rows
            + positions * ((9 + 12 * bag) + 4 * shape.hidden_size / t_sp)  # per-position stats, fp32 hidden grad
            + 4 * vocab_local * shape.hidden_size  # the float32 weight-gradient accumulator
            # with half-precision GEMM operands: the float32 result of one row block of its GEMM
            + (min(4 * vocab_local * shape.hidden_size, CHUNK_LOGITS_BYTES) if b != 4 else 0))


def memory_per_gpu(args, shape, padded_vocab: int, superposition: bool = True) -> Dict[str, object]:
    from megatron_tst.params import architecture_options, rank_parameters

    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    ep = args.expert_model_parallel_size
    etp = args.expert_tensor_parallel_size or tp
    dp = args.data_parallel_size
    vpp = args.virtual_pipeline_model_parallel_size
    microbatches = args.global_batch_size // (args.micro_batch_size * dp)
    half = args.bf16 or args.fp16
    b = 2 if half else 4
    weight_bytes = 2 if half else 4
    grad_bytes = 4 if (args.accumulate_allreduce_grads_in_fp32 or not half) else 2
    optim_bytes = 12 if half else 8
    dense_shards = dp * cp if args.use_distributed_optimizer else 1
    expert_shards = args.world_size // (pp * ep * etp) if args.use_distributed_optimizer else 1
    positions = args.micro_batch_size * args.seq_length / cp  # per micro batch on this rank (before SP)
    layers_per_stage = shape.num_layers // pp
    pattern = shape.moe_layer_pattern()
    s = args.tst_bag_size if superposition and getattr(args, "tst", None) is not None else None

    stages = []
    for stage in range(pp):
        counts = rank_parameters(shape, tp=tp, pp=pp, ep=ep, etp=etp, pp_rank=stage, **architecture_options(args))
        params_on_rank = counts["dense"] + counts["expert"]
        weights = weight_bytes * params_on_rank
        grads = grad_bytes * params_on_rank
        optimizer = optim_bytes * (counts["dense"] / dense_shards + counts["expert"] / expert_shards)

        stage_layers = pattern[stage * layers_per_stage:(stage + 1) * layers_per_stage]
        per_layer = [activation_bytes_per_position(args, shape, bool(m)) for m in stage_layers]
        full = sum(a["attention"] + a["mlp"] for a in per_layer)  # all layers of the stage, per position
        if args.recompute_granularity == "full":
            n = args.recompute_num_layers or 1
            if args.recompute_method == "block":
                kept = sum(a["layer_input"] if i < n else a["attention"] + a["mlp"]
                           for i, a in enumerate(per_layer))
                transient = 0.0
            else:  # uniform: the input of every layer kept (an upper bound for groups of n), n layers recomputed
                kept = sum(a["layer_input"] for a in per_layer)
                transient = max(a["attention"] + a["mlp"] for a in per_layer) * min(n, len(per_layer))
        else:
            kept, transient = full, 0.0
        in_flight = _microbatches_in_flight(pp, vpp, stage, microbatches)
        activations = positions * (kept * in_flight + transient)
        logits = 0.0
        if stage == pp - 1:
            logits = loss_bytes(args, shape, padded_vocab, positions, b, bag=s or 1)
        superposition_input = 0.0
        if stage == 0 and s:
            superposition_input = positions * (b * s * shape.hidden_size + 4 * shape.hidden_size)
        total = weights + grads + optimizer + activations + logits
        stages.append(dict(
            pipeline_stage=stage, params_on_gpu=params_on_rank, weights=weights, gradients=grads,
            optimizer=optimizer, activations=activations, logits=logits,
            superposition_input=superposition_input, total=total,
            total_superposition_phase=total + superposition_input,
        ))
    worst = max(stages, key=lambda st: st["total_superposition_phase"])
    result = {k: (v / GIB if k not in ("pipeline_stage", "params_on_gpu") else v) for k, v in worst.items()}
    result["microbatches_per_step"] = microbatches
    result["micro_batches_in_flight"] = _microbatches_in_flight(pp, vpp, worst["pipeline_stage"], microbatches)
    return result


def plan(recipe: Optional[str], trainer_argv: List[str], nodes: int = 1, gpus_per_node: int = 8,
         tokens_per_second: Optional[float] = None, mfu: Optional[float] = None,
         gpu_memory_gb: float = 80.0) -> Dict[str, object]:
    """The plan as a dict; raises PlanError for settings that cannot run."""
    if nodes < 1 or gpus_per_node < 1:
        raise PlanError("--nodes and --gpus-per-node must be >= 1")
    if tokens_per_second is not None and tokens_per_second <= 0:
        raise PlanError("--tokens-per-second must be > 0")
    if mfu is not None and not 0 < mfu <= 1:
        raise PlanError("--mfu must be in (0, 1]")
    world = nodes * gpus_per_node
    args, vocab = trainer_args(recipe, trainer_argv, world)
    check_with_megatron(args)

    from megatron_tst.flops import training_flops_per_step
    from megatron_tst.params import count_parameters_from_args
    from megatron_tst.training.configs import model_shape_from_args
    from megatron_tst.training.tokenizer import vocab_size_with_padding

    padded = vocab_size_with_padding(vocab, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size)
    shape = model_shape_from_args(args, padded)
    counts = count_parameters_from_args(args, padded)
    flops = training_flops_per_step(shape, args.seq_length, args.global_batch_size)

    tst = args.tst
    bag = tst.bag_size if tst is not None else 1
    sup_steps = args.tst_superposition_steps if tst is not None else 0
    rec_steps = args.train_iters - sup_steps
    positions = args.global_batch_size * args.seq_length
    tokens_per_step = {"superposition": positions * bag if sup_steps else 0, "recovery": positions}
    tokens_total = {"superposition": tokens_per_step["superposition"] * sup_steps,
                    "recovery": positions * rec_steps}
    tokens_total["total"] = tokens_total["superposition"] + tokens_total["recovery"]

    memory = memory_per_gpu(args, shape, padded, superposition=sup_steps > 0)

    time = None
    peak = args.peak_tflops_per_gpu or DEFAULT_PEAK_TFLOPS
    if tokens_per_second is not None:
        step_seconds = positions / (tokens_per_second * world)
        time = dict(basis="tokens_per_second_per_gpu", tokens_per_second_per_gpu=tokens_per_second,
                    mfu=flops / step_seconds / world / (peak * 1e12))
    elif mfu is not None:
        step_seconds = flops / (mfu * peak * 1e12 * world)
        time = dict(basis="mfu", mfu=mfu, tokens_per_second_per_gpu=positions / step_seconds / world)
    if time is not None:
        time.update(peak_tflops_per_gpu=peak, step_seconds=step_seconds,
                    hours={"superposition": step_seconds * sup_steps / 3600,
                           "recovery": step_seconds * rec_steps / 3600,
                           "total": step_seconds * args.train_iters / 3600},
                    gpu_hours=step_seconds * args.train_iters * world / 3600)

    warnings = []
    if tst is None or sup_steps == 0:
        warnings.append("no superposition steps: this is a baseline (plain next-token prediction) run")
    decay = args.lr_wsd_decay_iters if args.lr_decay_style == "WSD" else None
    if decay is not None and decay != args.train_iters // 10:
        warnings.append(f"--lr-wsd-decay-iters {decay} is {100 * decay / args.train_iters:.1f}% of --train-iters "
                        f"{args.train_iters} (the paper decays over the last 10%: {args.train_iters // 10})")
    if decay is not None and sup_steps > args.lr_decay_iters - decay:
        warnings.append("the superposition phase reaches into the LR decay (the paper keeps it at peak LR)")
    warmup = args.lr_warmup_iters
    if sup_steps and warmup > sup_steps:
        warnings.append(f"the LR warmup ({warmup} steps) outlasts the superposition phase ({sup_steps} steps)")
    if memory["total_superposition_phase"] > gpu_memory_gb:
        warnings.append(f"estimated {memory['total_superposition_phase']:.1f} GiB per GPU exceeds "
                        f"--gpu-memory-gb {gpu_memory_gb:g}: lower --micro-batch-size, raise TP/PP/EP, or "
                        "use --recompute-granularity full")
    elif memory["total_superposition_phase"] > 0.9 * gpu_memory_gb:
        warnings.append(f"estimated {memory['total_superposition_phase']:.1f} GiB per GPU is within 10% of "
                        f"{gpu_memory_gb:g} GiB: little room for framework overhead")
    if args.context_parallel_size > 1:
        warnings.append("context parallelism needs Transformer Engine on the cluster")
    if args.num_experts and not args.moe_grouped_gemm:
        warnings.append("MoE without --moe-grouped-gemm: add it on GPUs with Transformer Engine (much faster)")

    layout = dict(
        world_size=args.world_size, tensor_model_parallel=args.tensor_model_parallel_size,
        pipeline_model_parallel=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel=args.virtual_pipeline_model_parallel_size,
        context_parallel=args.context_parallel_size, expert_model_parallel=args.expert_model_parallel_size,
        expert_tensor_parallel=args.expert_tensor_parallel_size or args.tensor_model_parallel_size,
        data_parallel=args.data_parallel_size, sequence_parallel=args.sequence_parallel,
        micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
        microbatches_per_step=memory["microbatches_per_step"],
        distributed_optimizer=args.use_distributed_optimizer,
        dtype="bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        recompute=args.recompute_granularity,
    )
    return dict(
        recipe=recipe, nodes=nodes, gpus_per_node=gpus_per_node, layout=layout,
        vocab_size=vocab, padded_vocab_size=padded, seq_length=args.seq_length,
        tst=(dict(bag_size=tst.bag_size, superposition_ratio=tst.superposition_ratio,
                  superposition_iters=tst.superposition_iters, weighting=tst.weighting) if tst else None),
        total_params=counts["total"], active_params=counts["active"],
        total_params_non_embedding=counts["total_non_embedding"],
        active_params_non_embedding=counts["active_non_embedding"],
        embedding_params=counts["embedding"] + counts["position_embedding"] + counts["output_layer"],
        params_breakdown={k: v for k, v in counts.items() if k != "per_layer"},
        flops_per_step=flops, flops_total=flops * args.train_iters,
        positions_per_step=positions, tokens_per_step=tokens_per_step,
        steps={"superposition": sup_steps, "recovery": rec_steps, "total": args.train_iters},
        tokens_total=tokens_total,
        memory_gb_per_gpu=memory, time=time, warnings=warnings,
    )


# --------------------------------------------------------------------------------------------- printing


def _si(x: float, unit: str = "") -> str:
    for factor, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g}{prefix}{unit}"
    return f"{x:.3g}{unit}"


def _count(x: int) -> str:
    for factor, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3f}{suffix} ({x:,})"
    return f"{x:,}"


def format_plan(p: Dict[str, object]) -> str:
    lay, mem, steps = p["layout"], p["memory_gb_per_gpu"], p["steps"]
    tps, tot = p["tokens_per_step"], p["tokens_total"]
    lines = [f"plan: recipe {p['recipe'] or '(none)'} on {p['nodes']} node(s) x {p['gpus_per_node']} GPUs"]
    par = (f"  layout: TP {lay['tensor_model_parallel']} PP {lay['pipeline_model_parallel']}"
           + (f" (VPP {lay['virtual_pipeline_model_parallel']})" if lay["virtual_pipeline_model_parallel"] else "")
           + f" CP {lay['context_parallel']} EP {lay['expert_model_parallel']}"
           + (f" (expert-TP {lay['expert_tensor_parallel']})" if lay["expert_model_parallel"] > 1 else "")
           + f" DP {lay['data_parallel']}, SP {'on' if lay['sequence_parallel'] else 'off'}, "
           f"micro batch {lay['micro_batch_size']} x {lay['microbatches_per_step']} micro batches x DP = "
           f"global batch {lay['global_batch_size']}, {lay['dtype']}, distributed optimizer "
           f"{'on' if lay['distributed_optimizer'] else 'off'}"
           + (f", recompute {lay['recompute']}" if lay["recompute"] else ""))
    lines.append(par)
    lines.append(f"  vocabulary {p['vocab_size']:,} (padded {p['padded_vocab_size']:,}), seq length {p['seq_length']}")
    if p["tst"]:
        t = p["tst"]
        lines.append(f"  TST: s={t['bag_size']}, "
                     + (f"r={t['superposition_ratio']}" if t["superposition_ratio"] is not None
                        else f"{t['superposition_iters']} superposition iters")
                     + f", weighting {t['weighting']}")
    lines.append("  parameters             total                      active (top-k experts)")
    lines.append(f"    with embeddings      {_count(p['total_params']):<27}{_count(p['active_params'])}")
    lines.append(f"    without embeddings   {_count(p['total_params_non_embedding']):<27}"
                 f"{_count(p['active_params_non_embedding'])}")
    lines.append(f"    embeddings (input + output) {_count(p['embedding_params'])}")
    lines.append(f"  FLOPs per step {_si(p['flops_per_step'], 'FLOP')} (both phases), "
                 f"total {_si(p['flops_total'], 'FLOP')}")
    lines.append("  phase            steps     positions/step   raw tokens/step   raw tokens")
    sup_positions = _si(p['positions_per_step'] if steps['superposition'] else 0)
    lines.append(f"    superposition  {steps['superposition']:<9} {sup_positions:<16} "
                 f"{_si(tps['superposition']):<17} {_si(tot['superposition'])}")
    lines.append(f"    recovery       {steps['recovery']:<9} {_si(p['positions_per_step']):<16} "
                 f"{_si(tps['recovery']):<17} {_si(tot['recovery'])}")
    lines.append(f"    total          {steps['total']:<9} {'':<16} {'':<17} {_si(tot['total'])}")
    lines.append(f"  memory per GPU (GiB, pipeline stage {mem['pipeline_stage']}, "
                 f"{mem['params_on_gpu'] / 1e6:.1f}M parameters on it, {mem['micro_batches_in_flight']:g} "
                 "micro batch(es) of activations in flight):")
    lines.append(f"    weights {mem['weights']:.2f} + gradients {mem['gradients']:.2f} + optimizer "
                 f"{mem['optimizer']:.2f} + activations {mem['activations']:.2f} + logits {mem['logits']:.2f} "
                 f"= {mem['total']:.2f}; superposition phase +{mem['superposition_input']:.2f} transient input "
                 f"= {mem['total_superposition_phase']:.2f}")
    if p["time"]:
        tm = p["time"]
        lines.append(f"  time at {tm['tokens_per_second_per_gpu']:,.0f} positions/s/GPU (MFU {tm['mfu']:.1%} of "
                     f"{tm['peak_tflops_per_gpu']:g} TFLOP/s): {tm['step_seconds']:.2f} s/step, "
                     f"{tm['hours']['superposition']:.1f} h superposition + {tm['hours']['recovery']:.1f} h "
                     f"recovery = {tm['hours']['total']:.1f} h, {tm['gpu_hours']:,.0f} GPU-hours")
    for w in p["warnings"]:
        lines.append(f"  warning: {w}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = planner_parser()
    ours, trainer_argv = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        result = plan(ours.recipe, trainer_argv, nodes=ours.nodes, gpus_per_node=ours.gpus_per_node,
                      tokens_per_second=ours.tokens_per_second, mfu=ours.mfu, gpu_memory_gb=ours.gpu_memory_gb)
    except PlanError as err:
        print(f"plan.py: error: {err}", file=sys.stderr)
        return 2
    if ours.json:
        print(json.dumps(result, indent=1, sort_keys=True, default=lambda o: None if o is None else str(o)))
    else:
        print(format_plan(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
