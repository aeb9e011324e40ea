"""Plan a megatron-tst run without GPUs: does Megatron-LM and TST accept it, and what does it cost?

    python tools/plan.py [any command line `python -m megatron_tst.pretrain` takes] [--nodes N] [--gpus-per-node G]
                         [--json] [--gpu-memory-gb 80] [--tokens-per-second X | --mfu F] [--peak-tflops-per-gpu P]

e.g. `python tools/plan.py --recipe 600m --nodes 1 --gpus-per-node 8`, or a Megatron-LM launch script's
`pretrain_gpt.py` flags plus `--tst-bag-size 4 --tst-superposition-ratio 0.3`.

What it checks, for world size N x G, in this order (each failure: exit status 2, the reason on stderr, no traceback):
1. `--recipe` / `--config` expand as in the trainer (`megatron_tst.loop.argv.expand`);
2. Megatron-LM's own parser and validation: `megatron.training.arguments.parse_args` with TST's flags
   (`megatron_tst.loop.arguments.add_tst_arguments`: the trainer's provider without its CPU defaults, since this
   plans a GPU run) and `validate_args` with `pretrain_gpt.py`'s defaults, with WORLD_SIZE = N x G, RANK 0 and
   CUDA_DEVICE_MAX_CONNECTIONS=1 (as Megatron-LM's example scripts export it; a value already in the environment
   is kept, e.g. for Megatron-FSDP runs), then Megatron's num-microbatches calculator (what Megatron-LM's
   `set_global_variables` sets up next: batch-size ramp-up / step schedule, divisibility); then what Megatron-Core
   checks later, when the run starts its process groups and builds the model: the expert layout
   (`initialize_model_parallel`) and `TransformerConfig` (e.g. heads divisible by TP; kernels that need CUDA, Apex
   or Transformer Engine are switched off for this check);
3. TST's checks, as `megatron_tst.pretrain.start_run` runs them before heavy work: the refusals
   (`megatron_tst.loop.arguments.check_arguments`, with TSTConfig's layout checks) and the superposition step count
   (`megatron_tst.stream.SamplePlan`). The data files and a resume's checkpoint are not looked at.
Messages: "Megatron-LM refuses ..." / "Megatron-LM's parser refuses ..." (its assertion or argparse message),
"Megatron-Core refuses ..." (its later checks), or "megatron-tst cannot run ..." (TST's reasons).

The vocabulary: a NullTokenizer's is Megatron's own (`build_tokenizer`); other tokenizers are loaded only from local
files (never downloaded); a tokenizer the planner cannot load needs `--vocab-size N` (planned as the tokenizer's
size); a recipe without tokenizer flags is planned with the recipe's tokenizer vocabulary. The vocabulary is padded
as Megatron pads it (multiple of --make-vocab-size-divisible-by x TP).

What it prints
- layout: TP / PP (VPP) / CP / EP (expert-TP) / DP, micro batches per step;
- phases: superposition steps and samples (`SamplePlan`), recovery steps; positions (model tokens) and raw tokens
  (superposition: s per position) per step at the run's last global batch (with a ramp-up or step schedule: the
  largest it reaches), and per phase;
- parameters: total and active (top-k experts), with and without embeddings (`megatron_tst.params`, exact for
  Megatron-Core's GPT layers; Megatron-LM has no function that returns them);
- FLOPs: `megatron.training.training.num_floating_point_operations` (Megatron-LM's own count; a superposition step
  costs what a recovery step of the same positions costs: the bag means add s x h additions per position);
- memory per GPU on the busiest pipeline stage (GiB = 2^30 bytes), the model below, with Megatron-LM's own
  `theoretical_memory_usage` figures beside it for comparison (they assume bf16 with fp32 main grads, leave out
  biases, q/k norms and the logits' fp32 softmax, treat MoE activations as a dense FFN, and 0.17's ignore EP);
- with `--tokens-per-second X` (per GPU, model positions) or `--mfu F`: wall time per phase and GPU-hours.

Memory model (approximate; real runs add CUDA context, NCCL and allocator overhead, typically 2-6 GiB)
- weights: 2 bytes per parameter held by the rank (bf16/fp16; 4 for fp32); which parameters a rank holds:
  `megatron_tst.params.rank_parameters` for the layers Megatron-Core puts on each pipeline stage
  (`get_transformer_layer_offset` / `get_num_layers_to_build`, uneven and virtual stages included);
- gradients: Megatron's main-grad buffer, fp32 (4 bytes; 2 with --grad-reduce-in-bf16 in bf16 runs);
- optimizer: fp32 master weights (bf16/fp16 only) + Adam m and v = 12 bytes per parameter (8 for fp32 training);
  with --use-distributed-optimizer divided by the data-parallel size (x CP) for non-expert parameters and by the
  expert-data-parallel size (world / (PP x EP x expert-TP)) for experts;
- activations, per layer and per position held by the rank (b = 2 bytes; h hidden, q = heads x d, kv = groups x d,
  f ffn, t = TP, SP = sequence parallelism; "h-wide" terms are divided by t only under SP):
  attention  b * [2h (norm input, qkv input) / t_SP + (2q + 2kv) / t (Q, K, V, attention output)
             + (q + kv) / t with qk-layernorm (their inputs)]
  dense MLP  b * [2h (norm input, fc1 input) / t_SP + (g f + f) / t (fc1 output, activation output)],
             g = 2 for SwiGLU, 1 otherwise
  MoE MLP    b * 2h / t_SP + 8E / t_SP (fp32 router logits and probabilities)
             + b * k * etp_g / t_SP * [2h (expert input; expert output, kept for the weighted combine)
                                       + (g + 1) f_e / etp (fc1 and activation outputs, split over expert-TP)]
             (balanced routing; under SP the expert-TP group all-gathers its tokens first: etp_g = expert-TP with
             SP, else 1); a shared expert adds b (g + 1) f_s / t
  (Korthikanti et al.'s sbh(34 + 5as/h) rewritten for GQA, SwiGLU and MoE, with flash / fused attention: no s^2
  terms, and no dropout masks; multi-latent attention is counted with q = n (d_qk + d_pe), kv = n (d_qk + d_v) / 2.)
  Selective recomputation is not modelled (an upper bound); full recomputation keeps only each layer's input
  (b h / t_SP) plus one recomputed block (--recompute-num-layers layers) of one micro batch.
  Positions per micro batch on a rank: micro batch x seq length / CP. In flight on pipeline stage r (Megatron's
  1F1B): min(PP - r, micro batches) micro batches; interleaved: min(2 (PP - r - 1) + (VPP - 1) PP + 1,
  micro batches x VPP) chunks of one VPP-th of the stage's layers.
- logits (last stage, one micro batch at a time): b V/t (bf16 logits) + 4 V/t (fp32 softmax kept by the (multi-hot)
  cross-entropy) bytes per position. With `--cross-entropy-loss-fusion --cross-entropy-fusion-impl linear` (the
  fused output layer and loss, `megatron_tst.model`) no logits are kept: one chunk of C positions at a time
  (C = megatron_tst.mce.default_chunk_size, CHUNK_LOGITS_BYTES of fp32 logits shard) holds C (4 + b) V/t (fp32
  logits, then the gradient in the GEMM dtype) + 2 C b h (gathered rows and their gradient), plus per position
  (9 + 12 s) (loss, loss weights, target indices and weights of the s targets) + 4 h / t_SP (the fp32 hidden
  gradient computed in the forward), plus the fp32 weight-gradient accumulator 4 V/t h and, with bf16/fp16 GEMM
  operands, the fp32 result of one row block of its GEMM, min(4 V/t h, CHUNK_LOGITS_BYTES).
- superposition input (first stage, superposition phase only, transient): the embedding rows of the s x L raw tokens
  (b s h per position) plus the fp32 bag sums (4 h).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import io
import json
import os
import re
import sys
import traceback
import warnings
from typing import Dict, List, Optional, Sequence

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # `python tools/plan.py` from a checkout without an installed megatron_tst
    sys.path.insert(0, _ROOT)

GIB = float(2 ** 30)
DEFAULT_PEAK_TFLOPS = 989.0  # H100 / H200 SXM, bf16 dense


class PlanError(Exception):
    """A command line that cannot run, or cannot be planned. `source`: "megatron-lm" (its parser or validation
    refused it), "megatron-tst" (a TST refusal or TST setting) or "planner" (what the planner needs, e.g. a
    tokenizer it cannot load)."""

    def __init__(self, message: str, source: str = "planner"):
        super().__init__(message)
        self.source = source


def planner_parser() -> argparse.ArgumentParser:
    """The planner's own flags; every other flag is the trainer's."""
    parser = argparse.ArgumentParser(
        prog="plan.py", allow_abbrev=False,
        description="Plan a megatron-tst run: Megatron-LM's and TST's checks, parameters, FLOPs, tokens per phase, "
                    "memory per GPU, time. Every flag the planner does not know is the trainer's.",
        epilog="Trainer flags: Megatron-LM's (pretrain_gpt.py) and TST's (python -m megatron_tst.pretrain --help). "
               "Formulas and assumptions: this file's docstring.")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--tokens-per-second", type=float,
                        help="throughput per GPU in model positions (tokens of the model's sequence) per second")
    parser.add_argument("--mfu", type=float, help="model FLOPs utilisation in (0, 1], instead of --tokens-per-second")
    parser.add_argument("--peak-tflops-per-gpu", type=float, default=DEFAULT_PEAK_TFLOPS,
                        help="peak dense TFLOP/s of one GPU for --mfu (default 989: H100/H200 bf16)")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0,
                        help="GPU memory in GiB for the fit warning (H100 80, H200 141)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


# ------------------------------------------------------------------------------------------ Megatron-LM's checks


@contextlib.contextmanager
def planning_environment(world_size: int, argv: Sequence[str]):
    """Within: `sys.argv` = argv (Megatron-LM's parser reads it), WORLD_SIZE / RANK / LOCAL_RANK of rank 0 of
    `world_size`, CUDA_DEVICE_MAX_CONNECTIONS=1 unless the environment sets it; all restored on exit."""
    saved_env = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "CUDA_DEVICE_MAX_CONNECTIONS")}
    saved_argv = sys.argv
    os.environ.update(WORLD_SIZE=str(world_size), RANK="0", LOCAL_RANK="0")
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    sys.argv = ["pretrain_gpt.py"] + list(argv)
    try:
        yield
    finally:
        sys.argv = saved_argv
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _argparse_error(stderr: str, code) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        if ": error: " in line:
            return line.split(": error: ", 1)[1]
    return lines[-1] if lines else f"the parser exited with status {code}"


def _failure(err: BaseException) -> str:
    """An assertion's or exception's message; a bare `assert` is named by its source line."""
    message = str(err).strip()
    if message:
        return message
    frames = traceback.extract_tb(err.__traceback__)
    where = frames[-1] if frames else None
    return f"{type(err).__name__} at {where.line.strip()!r} ({os.path.basename(where.filename)}:{where.lineno})" \
        if where else type(err).__name__


def _install_stand_ins() -> None:
    """What Megatron-LM's validation needs on a machine without CUDA (`platform.cpu`: the device's architecture for
    the CUDA_DEVICE_MAX_CONNECTIONS rule, Hopper's); nothing on a machine with CUDA."""
    from megatron_tst.platform import cpu, megatron_lm

    megatron_lm.prepare_import()
    cpu.install_loop_stand_ins()


def init_microbatch_calculator(args) -> None:
    """Megatron's num-microbatches calculator for validated `args`, as this release's `set_global_variables` sets it
    up (0.17: rampup_batch_size; 0.19: step_batch_size_schedule and seq_length)."""
    from megatron.core import num_microbatches_calculator as calculator

    candidates = dict(rank=args.rank, rampup_batch_size=getattr(args, "rampup_batch_size", None),
                      global_batch_size=args.global_batch_size, micro_batch_size=args.micro_batch_size,
                      data_parallel_size=args.data_parallel_size * getattr(args, "gtp_weight_remat_size", 1),
                      decrease_batch_size_if_needed=args.decrease_batch_size_if_needed,
                      step_batch_size_schedule=getattr(args, "step_batch_size_schedule", None),
                      seq_length=args.seq_length)
    accepted = inspect.signature(calculator.init_num_microbatches_calculator).parameters
    if "step_batch_size_schedule" in accepted:  # 0.19's set_global_variables passes no (deprecated) ramp-up
        del candidates["rampup_batch_size"]
    calculator.destroy_num_microbatches_calculator()
    calculator.init_num_microbatches_calculator(**{k: v for k, v in candidates.items() if k in accepted})


def megatron_args(argv: Sequence[str], world_size: int):
    """Megatron-LM's parsed and validated arguments for the (expanded) trainer command line `argv` at `world_size`,
    with Megatron's num-microbatches calculator initialised (the caller destroys it). Megatron-LM's warnings are in
    `args.planner_warnings`. Raises PlanError("megatron-lm") with Megatron-LM's message when it refuses."""
    from megatron_tst.loop.arguments import add_tst_arguments
    from megatron_tst.platform import cpu
    from megatron_tst.pretrain import ARGS_DEFAULTS

    _install_stand_ins()
    from megatron.training import arguments as megatron_arguments

    parse_args = getattr(megatron_arguments.parse_args, "__wrapped_by_megatron_tst__", megatron_arguments.parse_args)
    stderr, stdout = io.StringIO(), io.StringIO()
    with planning_environment(world_size, argv), cpu.device_capability_stand_in(), \
            warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(stderr), \
            contextlib.redirect_stdout(stdout):
        warnings.simplefilter("always")
        try:
            args = parse_args(extra_args_provider=add_tst_arguments)
        except SystemExit as err:
            message = _argparse_error(stderr.getvalue(), err.code)
            raise PlanError(f"Megatron-LM's parser refuses the command line: {message}", "megatron-lm") from None
        if getattr(args, "yaml_cfg", None) is not None:
            raise PlanError("tools/plan.py does not plan --yaml-cfg runs (Megatron-LM's experimental YAML "
                            "configuration): give the flags on the command line or in --config", "planner")
        if getattr(args, "use_checkpoint_args", False):
            raise PlanError("tools/plan.py does not read checkpoints: --use-checkpoint-args takes the model's flags "
                            "from --load; give them on the command line to plan", "planner")
        try:
            megatron_arguments.validate_args(args, dict(ARGS_DEFAULTS))
            init_microbatch_calculator(args)
        except (AssertionError, ValueError, TypeError, RuntimeError, KeyError, AttributeError,
                NotImplementedError, ImportError) as err:
            raise PlanError(f"Megatron-LM refuses the command line: {_failure(err)}", "megatron-lm") from None
    seen = []
    for w in caught:
        text = str(w.message).strip()
        if text and text not in seen:
            seen.append(text)
    args.planner_warnings = seen
    return args


def parallel_state_checks(args) -> None:
    """What Megatron-Core checks after the validation, when the run starts its process groups and builds its MoE
    layers, for `args`' layout (Megatron-LM's `validate_args` lets them pass): the world size divisible by
    expert-TP x EP x PP (core/parallel_state.py `initialize_model_parallel`), the experts by EP (core/transformer/moe
    `MoELayer`). Raises PlanError("megatron-lm") with Megatron-Core's message."""
    etp = args.expert_tensor_parallel_size or args.tensor_model_parallel_size
    expert_grid = etp * args.expert_model_parallel_size * args.pipeline_model_parallel_size
    if args.world_size % expert_grid:
        raise PlanError(f"Megatron-Core refuses the layout (initialize_model_parallel): world_size "
                        f"({args.world_size}) is not divisible by expert_tensor_model_pipeline_parallel size "
                        f"({expert_grid})", "megatron-lm")
    if args.num_experts and args.num_experts % args.expert_model_parallel_size:
        raise PlanError(f"Megatron-Core refuses the layout (MoELayer): --num-experts {args.num_experts} is not "
                        f"divisible by --expert-model-parallel-size {args.expert_model_parallel_size}", "megatron-lm")


def tst_checks(args):
    """TST's checks of validated `args`, as `megatron_tst.pretrain.start_run` runs them before heavy work (refusals,
    layout, superposition steps; the microbatch calculator initialised). Returns (TSTConfig or None, SamplePlan).
    Raises PlanError("megatron-tst") with TST's reason."""
    from megatron_tst.config import TSTConfig
    from megatron_tst.loop import arguments as tst_arguments
    from megatron_tst.stream import SamplePlan

    try:
        tst_arguments.check_arguments(args)
        tst = TSTConfig.from_args(args)
        with contextlib.redirect_stdout(io.StringIO()):
            sample_plan = SamplePlan.from_megatron(args, tst)
    except ValueError as err:
        message = str(err)
        if not message.startswith("megatron-tst"):
            message = f"megatron-tst cannot run this command line: {message}"
        raise PlanError(message, "megatron-tst") from None
    return tst, sample_plan


# ---------------------------------------------------------------------------------------------- vocabulary


def _given(argv: Sequence[str], flag: str) -> bool:
    return any(token == flag or token.startswith(flag + "=") for token in argv)


_TOKENIZER_FILES = {
    "GPT2BPETokenizer": (("vocab_file", "merge_file"), "--vocab-file and --merge-file (GPT-2's vocab.json and "
                                                       "merges.txt; GPT-2's BPE has 50,257 ids)"),
    "BertWordPieceLowerCase": (("vocab_file",), "--vocab-file"),
    "BertWordPieceCase": (("vocab_file",), "--vocab-file"),
    "HuggingFaceTokenizer": (("tokenizer_model",), "--tokenizer-model as a local tokenizer directory or file (the "
                                                   "planner does not download hub ids)"),
    "SentencePieceTokenizer": (("tokenizer_model",), "--tokenizer-model (a SentencePiece .model file)"),
    "GPTSentencePieceTokenizer": (("tokenizer_model",), "--tokenizer-model (a SentencePiece .model file)"),
    "Llama2Tokenizer": (("tokenizer_model",), "--tokenizer-model (Llama 2's tokenizer.model)"),
    "TikTokenizer": (("tokenizer_model",), "--tokenizer-model (a tiktoken vocabulary .json file)"),
}


def vocabulary(args, argv: Sequence[str], recipe) -> Dict[str, object]:
    """The tokenizer's vocabulary size and Megatron's padded size for validated `args` (sets
    `args.padded_vocab_size`). Returns {"vocab_size", "padded_vocab_size", "source"}. Raises PlanError("planner")
    naming what is needed when the tokenizer cannot be loaded and no --vocab-size is given."""
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer, vocab_size_with_padding

    kind = args.tokenizer_type
    files, needs = _TOKENIZER_FILES.get(kind, ((), None))
    local = bool(files) and all(getattr(args, f, None) and os.path.exists(getattr(args, f)) for f in files)
    if kind in ("NullTokenizer",) or local:
        probe = copy.copy(args)
        probe.padded_vocab_size = None
        offline = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                tokenizer = build_tokenizer(probe)
        except Exception as err:  # a bad file or a missing library: say it, no traceback
            raise PlanError(f"cannot load the tokenizer (--tokenizer-type {kind}): {_failure(err)}") from None
        finally:
            for key, value in offline.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        size, source = int(tokenizer.vocab_size), f"{kind} (loaded)"
    elif args.vocab_size is not None and _given(argv, "--vocab-size"):
        size, source = int(args.vocab_size), f"--vocab-size (the {kind} files were not loaded)"
    elif recipe is not None and not _given(argv, "--tokenizer-type"):
        size = recipe.vocab_size
        source = (f"the {recipe.name} recipe's tokenizer; the run needs --tokenizer-type and --tokenizer-model: "
                  f"{recipe.tokenizer}")
    else:
        what = needs or "its files"
        raise PlanError(f"cannot load the tokenizer: --tokenizer-type {kind} needs {what}; give them, or plan with "
                        f"--vocab-size N (the tokenizer's number of ids)")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        padded = vocab_size_with_padding(size, args, logging_enabled=False)
    args.padded_vocab_size = padded
    return {"vocab_size": size, "padded_vocab_size": padded, "source": source}


# ------------------------------------------------------------------------------------------- model layout


# Failures of the TransformerConfig check that say this machine lacks a library or a GPU, not that the
# configuration is wrong: the plan goes on and warns.
_ENVIRONMENT_FAILURE = re.compile(r"transformer.engine|\bTE\b|apex|install|CUDA|not available", re.IGNORECASE)


def transformer_config(args):
    """Megatron-Core's TransformerConfig for `args` as the trainer's model provider builds it
    (`core_transformer_config_from_args`; its `__post_init__` checks what Megatron-LM's `validate_args` leaves to the
    model build, e.g. heads divisible by TP). The kernels that need CUDA, Apex or Transformer Engine (fusions, FP8,
    TP communication overlap) are switched off for the check, so that it means the same on any machine: they change
    no shape.
    Returns (config or None, warning or None). Raises PlanError("megatron-lm") when Megatron-Core refuses the
    configuration itself."""
    from megatron.training.arguments import core_transformer_config_from_args

    from megatron_tst.platform.cpu import CPU_ARGUMENT_DEFAULTS

    probe = copy.copy(args)
    off = dict(CPU_ARGUMENT_DEFAULTS, moe_permute_fusion=False, moe_router_fusion=False, tp_comm_overlap=False,
               fp8=None, fp4=None, fp8_param_gather=False, moe_router_padding_for_fp8=False,
               moe_router_padding_for_quantization=False)
    for name, value in off.items():
        if hasattr(probe, name):
            setattr(probe, name, value)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return core_transformer_config_from_args(probe), None
    except Exception as err:  # noqa: BLE001 (sorted below: a refusal, or this machine)
        message = _failure(err)
        if isinstance(err, (AssertionError, ValueError)) and not _ENVIRONMENT_FAILURE.search(message):
            raise PlanError(f"Megatron-Core refuses the configuration (TransformerConfig): {message}",
                            "megatron-lm") from None
        return None, f"Megatron-Core's TransformerConfig cannot be built here ({message})"


def stage_layers(args, config) -> (List[List[int]], Optional[str]):
    """The transformer-layer indices of each pipeline stage (all its virtual stages), as Megatron-Core places them
    (`get_transformer_layer_offset` / `get_num_layers_to_build` on `config`, or its --pipeline-model-parallel-layout).
    Returns (layers per stage, None), or an even split and the reason when that cannot be asked here."""
    pp = args.pipeline_model_parallel_size
    vpp = args.virtual_pipeline_model_parallel_size
    try:
        if config is None:
            raise RuntimeError("no TransformerConfig")
        from megatron.core.transformer.transformer_block import get_num_layers_to_build
        from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

        layout = getattr(config, "pipeline_model_parallel_layout", None)
        if layout is not None:  # --pipeline-model-parallel-layout: Megatron-Core's parsed layout, read directly
            return _layout_layers(layout), None  # (its methods ask the parallel state for the rank)
        stages = []
        with contextlib.redirect_stdout(io.StringIO()):
            for rank in range(pp):
                layers: List[int] = []
                for vp in (range(vpp) if vpp else [None]):
                    offset = get_transformer_layer_offset(config, vp_stage=vp, pp_rank=rank)
                    layers += range(offset, offset + get_num_layers_to_build(config, vp_stage=vp, pp_rank=rank))
                stages.append(layers)
        return stages, None
    except Exception as err:  # noqa: BLE001 (the plan goes on with an even split and says why)
        per = -(-args.num_layers // pp)
        stages = [list(range(r * per, min(args.num_layers, (r + 1) * per))) for r in range(pp)]
        return stages, f"Megatron-Core's layer placement could not be asked ({_failure(err)}): layers split " \
                       "evenly over the pipeline stages"


def _layout_layers(layout) -> List[List[int]]:
    """Decoder-layer indices per pipeline rank of a PipelineParallelLayerLayout (`layout.layout[pp_rank][vp_stage]`
    lists each stage's layer types; layers are numbered virtual stage by virtual stage, rank by rank, as its
    `get_layer_offset`)."""
    from megatron.core.transformer.enums import LayerType

    grid = layout.layout
    pp, vpp = len(grid), len(grid[0])
    stages: List[List[int]] = [[] for _ in range(pp)]
    index = 0
    for vp in range(vpp):
        for rank in range(pp):
            count = grid[rank][vp].count(LayerType.decoder)
            stages[rank] += range(index, index + count)
            index += count
    return stages


# ------------------------------------------------------------------------------------------------- memory


def _microbatches_in_flight(pp: int, vpp: Optional[int], stage: int, microbatches: int) -> float:
    """Activations held on pipeline stage `stage`, in units of 'all layers of the stage for one micro batch'."""
    if pp == 1:
        return 1.0
    if not vpp:
        return float(min(pp - stage, microbatches))
    chunks = min(2 * (pp - stage - 1) + (vpp - 1) * pp + 1, microbatches * vpp)
    return chunks / vpp


def activation_bytes_per_position(args, shape, layer_is_moe: bool) -> Dict[str, float]:
    """Bytes kept for backward per position held by the rank, one layer (the module docstring's model)."""
    b = 2 if (args.bf16 or args.fp16) else 4
    t = args.tensor_model_parallel_size
    t_sp = t if args.sequence_parallel else 1
    h = shape.hidden_size
    if shape.mla is not None:
        _, _, qk, pe, v = shape.mla
        q, kv = shape.num_attention_heads * (qk + pe), shape.num_attention_heads * (qk + v) / 2
    else:
        q, kv = shape.num_attention_heads * shape.head_dim, shape.query_groups * shape.head_dim
    g = 2 if shape.swiglu else 1
    attention = b * (2 * h / t_sp + (2 * q + 2 * kv) / t)
    if shape.qk_layernorm:
        attention += b * (q + kv) / t
    if not layer_is_moe:
        mlp = b * (2 * h / t_sp + (g + 1) * shape.ffn_hidden_size / t)
    else:
        etp = args.expert_tensor_parallel_size or t
        gather = etp if args.sequence_parallel else 1
        f_e = shape.moe_ffn_hidden_size or shape.ffn_hidden_size
        copies = shape.moe_router_topk * gather / t_sp  # routed token copies this rank's experts process
        mlp = b * 2 * h / t_sp + 8 * shape.num_experts / t_sp + b * copies * (2 * h + (g + 1) * f_e / etp)
        if shape.moe_shared_expert_intermediate_size:
            mlp += b * (g + 1) * shape.moe_shared_expert_intermediate_size / t
    return dict(attention=attention, mlp=mlp, layer_input=b * h / t_sp)


def linear_loss_fusion(args) -> bool:
    """Megatron-LM's switch for the fused output layer + loss (`megatron_tst.model.linear_loss_fusion_enabled`)."""
    return bool(getattr(args, "cross_entropy_loss_fusion", False)) and \
        getattr(args, "cross_entropy_fusion_impl", None) == "linear"


def loss_bytes(args, shape, positions: float, b: int, bag: int = 1) -> float:
    """Bytes the output layer + loss hold for one micro batch of `positions` (the docstring's "logits")."""
    from megatron_tst.mce import CHUNK_LOGITS_BYTES, default_chunk_size

    tp = args.tensor_model_parallel_size
    t_sp = tp if args.sequence_parallel else 1
    vocab_local = shape.vocab_size / tp
    h = shape.hidden_size
    if not linear_loss_fusion(args):
        return positions * ((b + 4) * vocab_local + 2 * b * h / t_sp)
    chunk = default_chunk_size(int(vocab_local), int(positions))
    return (chunk * ((4 + b) * vocab_local + 2 * b * h)  # one chunk's logits, gathered rows
            + positions * ((9 + 12 * bag) + 4 * h / t_sp)  # per-position statistics, fp32 hidden gradient
            + 4 * vocab_local * h  # the float32 weight-gradient accumulator
            + (min(4 * vocab_local * h, CHUNK_LOGITS_BYTES) if b != 4 else 0))  # one row block of its GEMM (half)


def memory_per_gpu(args, shape, stages: List[List[int]], bag: Optional[int], global_batch: int) -> Dict[str, object]:
    """The memory model of the module docstring on every pipeline stage at a step of `global_batch` samples; the
    busiest stage's figures in GiB."""
    from megatron_tst.params import rank_parameters

    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    ep = args.expert_model_parallel_size
    etp = args.expert_tensor_parallel_size or tp
    dp = args.data_parallel_size
    vpp = args.virtual_pipeline_model_parallel_size
    microbatches = max(1, global_batch // (args.micro_batch_size * dp))
    half = args.bf16 or args.fp16
    b = 2 if half else 4
    grad_bytes = 2 if (half and getattr(args, "grad_reduce_in_bf16", False)) else 4
    optim_bytes = 12 if half else 8
    dense_shards = dp * cp if args.use_distributed_optimizer else 1
    expert_shards = args.world_size // (pp * ep * etp) if args.use_distributed_optimizer else 1
    positions = args.micro_batch_size * args.seq_length / cp
    pattern = shape.moe_layer_pattern()
    results = []
    for stage, layers in enumerate(stages):
        counts = rank_parameters(shape, layers, tp=tp, ep=ep, etp=etp, first_stage=stage == 0,
                                 last_stage=stage == pp - 1)
        held = counts["dense"] + counts["expert"]
        weights, grads = b * held, grad_bytes * held
        optimizer = optim_bytes * (counts["dense"] / dense_shards + counts["expert"] / expert_shards)
        per_layer = [activation_bytes_per_position(args, shape, bool(pattern[i])) for i in layers]
        full = sum(a["attention"] + a["mlp"] for a in per_layer)
        transient = 0.0
        kept = full
        if args.recompute_granularity == "full" and per_layer:
            n = args.recompute_num_layers or 1
            if args.recompute_method == "block":
                kept = sum(a["layer_input"] if i < n else a["attention"] + a["mlp"] for i, a in enumerate(per_layer))
            else:  # uniform: every layer's input kept (an upper bound for groups of n), n layers recomputed
                kept = sum(a["layer_input"] for a in per_layer)
                transient = max(a["attention"] + a["mlp"] for a in per_layer) * min(n, len(per_layer))
        in_flight = _microbatches_in_flight(pp, vpp, stage, microbatches)
        activations = positions * (kept * in_flight + transient)
        logits = loss_bytes(args, shape, positions, b, bag=bag or 1) if stage == pp - 1 else 0.0
        superposition_input = positions * (b * bag * shape.hidden_size + 4 * shape.hidden_size) \
            if (stage == 0 and bag) else 0.0
        total = weights + grads + optimizer + activations + logits
        results.append(dict(pipeline_stage=stage, layers=len(layers), params_on_gpu=held, weights=weights,
                            gradients=grads, optimizer=optimizer, activations=activations, logits=logits,
                            superposition_input=superposition_input, total=total,
                            total_superposition_phase=total + superposition_input,
                            micro_batches_in_flight=in_flight))
    worst = max(results, key=lambda st: st["total_superposition_phase"])
    keep = ("pipeline_stage", "layers", "params_on_gpu", "micro_batches_in_flight")
    result = {k: (v if k in keep else v / GIB) for k, v in worst.items()}
    result["microbatches_per_step"] = microbatches
    return result


def megatron_memory_estimate(args, microbatches: int) -> Optional[Dict[str, float]]:
    """Megatron-LM's own `theoretical_memory_usage.report_theoretical_memory` (what it prints at the start of a run)
    in GiB, or None where it has no estimate (hybrid models) or fails."""
    try:
        from megatron.training.theoretical_memory_usage import report_theoretical_memory

        with contextlib.redirect_stdout(io.StringIO()):
            result = report_theoretical_memory(copy.copy(args), num_microbatches=microbatches)
    except Exception:  # noqa: BLE001 (a comparison figure only)
        return None
    if not result:
        return None
    weights_and_optimizer, activations, total = (x * 2 ** 20 / GIB for x in result)
    return dict(weights_and_optimizer=weights_and_optimizer, activations=activations, total=total)


# ---------------------------------------------------------------------------------------------------- plan


def plan(trainer_argv: Sequence[str], nodes: int = 1, gpus_per_node: int = 8,
         tokens_per_second: Optional[float] = None, mfu: Optional[float] = None,
         peak_tflops_per_gpu: float = DEFAULT_PEAK_TFLOPS, gpu_memory_gb: float = 80.0) -> Dict[str, object]:
    """The plan of the trainer command line `trainer_argv` on `nodes` x `gpus_per_node` GPUs, as a dict (the keys
    `format_plan` prints). Raises PlanError for command lines that cannot run or cannot be planned."""
    if nodes < 1 or gpus_per_node < 1:
        raise PlanError("--nodes and --gpus-per-node must be >= 1")
    if tokens_per_second is not None and tokens_per_second <= 0:
        raise PlanError("--tokens-per-second must be > 0")
    if mfu is not None and not 0 < mfu <= 1:
        raise PlanError("--mfu must be in (0, 1]")
    world = nodes * gpus_per_node
    from megatron_tst.loop.argv import expand

    try:
        argv = expand(list(trainer_argv))
    except SystemExit as err:
        raise PlanError(str(err.code), "megatron-tst") from None
    args = megatron_args(argv, world)
    from megatron.core import num_microbatches_calculator as calculator

    try:
        parallel_state_checks(args)
    except PlanError:
        calculator.destroy_num_microbatches_calculator()
        raise

    try:
        tst, sample_plan = tst_checks(args)
        with contextlib.redirect_stdout(io.StringIO()):
            total_steps = args.train_iters or _train_iters(args)
            first_batch, last_batch = (_global_batch_at(calculator, consumed)
                                       for consumed in (0, max(0, sample_plan.total_samples - 1)))
    finally:
        calculator.destroy_num_microbatches_calculator()
    config, config_note = transformer_config(args)
    recipe = None
    recipe_name = getattr(args, "recipe", None)
    if recipe_name:
        from megatron_tst import recipes

        recipe = recipes.get(recipe_name)
    vocab = vocabulary(args, argv, recipe)

    from megatron.training.training import num_floating_point_operations

    from megatron_tst.params import ModelShape, count_parameters

    shape = ModelShape.from_args(args, args.padded_vocab_size)
    counts = count_parameters(shape)
    flops_per_sample = num_floating_point_operations(copy.copy(args), 1)
    batch = last_batch  # per-step figures at the run's last (largest) global batch
    flops_per_step = num_floating_point_operations(copy.copy(args), batch)
    stages, layer_note = stage_layers(args, config)

    bag = tst.bag_size if tst is not None else 1
    sup_steps = sample_plan.superposition_steps
    sup_samples = sample_plan.superposition_samples
    total_samples = sample_plan.total_samples
    L = args.seq_length
    positions_per_step = batch * L
    samples = {"superposition": sup_samples, "recovery": total_samples - sup_samples, "total": total_samples}
    tokens_per_step = {"superposition": positions_per_step * bag if sup_steps else 0, "recovery": positions_per_step}
    positions_total = {k: v * L for k, v in samples.items()}
    tokens_total = {"superposition": sup_samples * bag * L, "recovery": (total_samples - sup_samples) * L}
    tokens_total["total"] = tokens_total["superposition"] + tokens_total["recovery"]
    flops_total = flops_per_sample * total_samples

    memory = memory_per_gpu(args, shape, stages, bag if sup_steps else None, batch)
    megatron_memory = megatron_memory_estimate(args, memory["microbatches_per_step"])

    time = None
    if tokens_per_second is not None or mfu is not None:
        if tokens_per_second is not None:
            step_seconds = positions_per_step / (tokens_per_second * world)
            time = dict(basis="tokens_per_second_per_gpu", tokens_per_second_per_gpu=tokens_per_second,
                        mfu=flops_per_step / step_seconds / world / (peak_tflops_per_gpu * 1e12))
        else:
            step_seconds = flops_per_step / (mfu * peak_tflops_per_gpu * 1e12 * world)
            time = dict(basis="mfu", mfu=mfu, tokens_per_second_per_gpu=positions_per_step / step_seconds / world)
        sample_seconds = step_seconds / batch
        time.update(peak_tflops_per_gpu=peak_tflops_per_gpu, step_seconds=step_seconds,
                    hours={"superposition": sample_seconds * sup_samples / 3600,
                           "recovery": sample_seconds * samples["recovery"] / 3600,
                           "total": sample_seconds * total_samples / 3600},
                    gpu_hours=sample_seconds * total_samples * world / 3600)

    warnings_ = []
    if tst is None:
        warnings_.append("no --tst-* flags: a plain Megatron-LM run through megatron_tst.pretrain")
    elif sup_steps == 0:
        warnings_.append("no superposition steps: a same-stream baseline (plain next-token prediction) run")
    for note in (config_note, layer_note):
        if note:
            warnings_.append(note)
    decay = args.lr_wsd_decay_iters if args.lr_decay_style == "WSD" else None
    if decay is not None and args.train_iters and decay != args.train_iters // 10:
        warnings_.append(f"--lr-wsd-decay-iters {decay} is {100 * decay / args.train_iters:.1f}% of --train-iters "
                         f"{args.train_iters} (the paper decays over the last 10%: {args.train_iters // 10})")
    if decay is not None and sup_steps > (args.lr_decay_iters or total_steps) - decay:  # Megatron: train iters
        warnings_.append("the superposition phase reaches into the LR decay (the paper keeps it at peak LR)")
    if sup_steps and args.lr_warmup_iters and args.lr_warmup_iters > sup_steps:
        warnings_.append(f"the LR warmup ({args.lr_warmup_iters} steps) outlasts the superposition phase "
                         f"({sup_steps} steps)")
    busiest = memory["total_superposition_phase"]
    if busiest > gpu_memory_gb:
        warnings_.append(f"estimated {busiest:.1f} GiB per GPU exceeds --gpu-memory-gb {gpu_memory_gb:g}: lower "
                         "--micro-batch-size, raise TP/PP/EP, use --recompute-granularity full, or (large "
                         "vocabularies) --cross-entropy-loss-fusion --cross-entropy-fusion-impl linear")
    elif busiest > 0.9 * gpu_memory_gb:
        warnings_.append(f"estimated {busiest:.1f} GiB per GPU is within 10% of {gpu_memory_gb:g} GiB: little room "
                         "for framework overhead")
    if getattr(args, "rampup_batch_size", None) and hasattr(args, "step_batch_size_schedule"):
        warnings_.append("--rampup-batch-size is ignored by this Megatron-LM release (it has "
                         "--step-batch-size-schedule): the run, like this plan, keeps the global batch constant")
    if args.num_experts and not args.moe_grouped_gemm:
        warnings_.append("MoE without --moe-grouped-gemm: add it on GPUs with Transformer Engine (much faster)")
    if args.recompute_granularity == "selective":
        warnings_.append("selective recomputation is not modelled: the activation estimate is an upper bound")

    layout = dict(
        world_size=args.world_size, tensor_model_parallel=args.tensor_model_parallel_size,
        pipeline_model_parallel=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel=args.virtual_pipeline_model_parallel_size,
        context_parallel=args.context_parallel_size, expert_model_parallel=args.expert_model_parallel_size,
        expert_tensor_parallel=args.expert_tensor_parallel_size or args.tensor_model_parallel_size,
        data_parallel=args.data_parallel_size, sequence_parallel=bool(args.sequence_parallel),
        micro_batch_size=args.micro_batch_size, global_batch_size=batch, first_global_batch_size=first_batch,
        microbatches_per_step=memory["microbatches_per_step"],
        layers_per_stage=[len(s) for s in stages],
        distributed_optimizer=bool(args.use_distributed_optimizer),
        dtype="bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        recompute=args.recompute_granularity,
    )
    embedding = counts["embedding"] + counts["position_embedding"] + counts["output_layer"]
    return dict(
        command_line=list(argv), recipe=recipe_name, nodes=nodes, gpus_per_node=gpus_per_node, layout=layout,
        vocab_size=vocab["vocab_size"], padded_vocab_size=vocab["padded_vocab_size"], vocab_source=vocab["source"],
        seq_length=L,
        tst=(dict(bag_size=tst.bag_size, superposition_ratio=tst.superposition_ratio,
                  superposition_iters=tst.superposition_iters, weighting=tst.weighting,
                  sample_layout=tst.sample_layout) if tst else None),
        total_params=counts["total"], active_params=counts["active"],
        total_params_non_embedding=counts["total_non_embedding"],
        active_params_non_embedding=counts["active_non_embedding"], embedding_params=embedding,
        params_breakdown={k: v for k, v in counts.items() if k != "per_layer"},
        flops_per_step=flops_per_step, flops_total=flops_total,
        positions_per_step=positions_per_step, tokens_per_step=tokens_per_step,
        steps={"superposition": sup_steps, "recovery": total_steps - sup_steps, "total": total_steps},
        samples=samples, positions_total=positions_total, tokens_total=tokens_total,
        memory_gb_per_gpu=memory, megatron_lm_memory_estimate_gb=megatron_memory, time=time, warnings=warnings_,
        megatron_lm_warnings=args.planner_warnings,
    )


def _global_batch_at(calculator, consumed_samples: int) -> int:
    """The global batch size of the step that starts after `consumed_samples` (Megatron's num-microbatches
    calculator: a batch-size ramp-up or step schedule changes it over the run)."""
    calculator.update_num_microbatches(consumed_samples, consistency_check=False)
    batch = calculator.get_current_global_batch_size()
    calculator.update_num_microbatches(0, consistency_check=False)
    return batch


def _train_iters(args) -> int:
    from megatron_tst.stream import _train_iters_of_samples

    return _train_iters_of_samples(args)


# -------------------------------------------------------------------------------------------------- printing


def _si(x: float, unit: str = "") -> str:
    for factor, prefix in ((1e24, "Y"), (1e21, "Z"), (1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"),
                           (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g}{prefix}{unit}"
    return f"{x:.3g}{unit}"


def _count(x: int) -> str:
    for factor, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3f}{suffix} ({x:,})"
    return f"{x:,}"


def format_plan(p: Dict[str, object]) -> str:
    """The plan as text."""
    lay, mem, steps = p["layout"], p["memory_gb_per_gpu"], p["steps"]
    tps, tot, samples = p["tokens_per_step"], p["tokens_total"], p["samples"]
    lines = [f"plan: {'recipe ' + p['recipe'] if p['recipe'] else 'command line'} on {p['nodes']} node(s) x "
             f"{p['gpus_per_node']} GPUs: accepted by Megatron-LM's validation and TST's checks"]
    lines.append(
        f"  layout: TP {lay['tensor_model_parallel']} PP {lay['pipeline_model_parallel']}"
        + (f" (VPP {lay['virtual_pipeline_model_parallel']})" if lay["virtual_pipeline_model_parallel"] else "")
        + f" CP {lay['context_parallel']} EP {lay['expert_model_parallel']}"
        + (f" (expert-TP {lay['expert_tensor_parallel']})" if lay["expert_model_parallel"] > 1 else "")
        + f" DP {lay['data_parallel']}, SP {'on' if lay['sequence_parallel'] else 'off'}; micro batch "
        f"{lay['micro_batch_size']} x {lay['microbatches_per_step']} micro batches x DP = global batch "
        f"{lay['global_batch_size']}"
        + (f" (ramped up from {lay['first_global_batch_size']})"
           if lay["first_global_batch_size"] != lay["global_batch_size"] else "")
        + f"; {lay['dtype']}, distributed optimizer "
        f"{'on' if lay['distributed_optimizer'] else 'off'}"
        + (f", recompute {lay['recompute']}" if lay["recompute"] else "")
        + (f"; layers per stage {lay['layers_per_stage']}" if lay["pipeline_model_parallel"] > 1 else ""))
    lines.append(f"  vocabulary {p['vocab_size']:,} (padded {p['padded_vocab_size']:,}), seq length {p['seq_length']}")
    lines.append(f"  vocabulary from: {p['vocab_source']}")
    if p["tst"]:
        t = p["tst"]
        lines.append(f"  TST: s={t['bag_size']}, "
                     + (f"r={t['superposition_ratio']}" if t["superposition_ratio"] is not None
                        else f"{t['superposition_iters']} superposition iters")
                     + f", weighting {t['weighting']}, {t['sample_layout']} samples")
    lines.append("  parameters             total                         active (top-k experts)")
    lines.append(f"    with embeddings      {_count(p['total_params']):<30}{_count(p['active_params'])}")
    lines.append(f"    without embeddings   {_count(p['total_params_non_embedding']):<30}"
                 f"{_count(p['active_params_non_embedding'])}")
    lines.append(f"    embeddings (input + output) {_count(p['embedding_params'])}")
    lines.append(f"  FLOPs per step {_si(p['flops_per_step'], 'FLOP')} (Megatron-LM's count, both phases), "
                 f"total {_si(p['flops_total'], 'FLOP')}")
    lines.append("  phase            steps     samples       positions/step   raw tokens/step   raw tokens")
    lines.append(f"    superposition  {steps['superposition']:<9} {samples['superposition']:<13} "
                 f"{_si(p['positions_per_step'] if steps['superposition'] else 0):<16} "
                 f"{_si(tps['superposition']):<17} {_si(tot['superposition'])}")
    lines.append(f"    recovery       {steps['recovery']:<9} {samples['recovery']:<13} "
                 f"{_si(p['positions_per_step']):<16} {_si(tps['recovery']):<17} {_si(tot['recovery'])}")
    lines.append(f"    total          {steps['total']:<9} {samples['total']:<13} {'':<16} {'':<17} "
                 f"{_si(tot['total'])}")
    lines.append(f"  memory per GPU (GiB, pipeline stage {mem['pipeline_stage']}: {mem['layers']} layers, "
                 f"{mem['params_on_gpu'] / 1e6:.1f}M parameters, {mem['micro_batches_in_flight']:g} micro batch(es) "
                 "of activations in flight):")
    lines.append(f"    weights {mem['weights']:.2f} + gradients {mem['gradients']:.2f} + optimizer "
                 f"{mem['optimizer']:.2f} + activations {mem['activations']:.2f} + logits {mem['logits']:.2f} "
                 f"= {mem['total']:.2f}; superposition phase +{mem['superposition_input']:.2f} transient input "
                 f"= {mem['total_superposition_phase']:.2f}")
    megatron = p["megatron_lm_memory_estimate_gb"]
    if megatron:
        lines.append(f"    Megatron-LM's theoretical_memory_usage: weights and optimizer "
                     f"{megatron['weights_and_optimizer']:.2f} + activations {megatron['activations']:.2f} = "
                     f"{megatron['total']:.2f} (its model: see tools/plan.py)")
    if p["time"]:
        tm = p["time"]
        lines.append(f"  time at {tm['tokens_per_second_per_gpu']:,.0f} positions/s/GPU (MFU {tm['mfu']:.1%} of "
                     f"{tm['peak_tflops_per_gpu']:g} TFLOP/s): {tm['step_seconds']:.2f} s/step, "
                     f"{tm['hours']['superposition']:.1f} h superposition + {tm['hours']['recovery']:.1f} h "
                     f"recovery = {tm['hours']['total']:.1f} h, {tm['gpu_hours']:,.0f} GPU-hours")
    for w in p["warnings"]:
        lines.append(f"  warning: {w}")
    for w in p["megatron_lm_warnings"]:
        lines.append(f"  Megatron-LM: {w}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print the plan of the command line (`--json`: one JSON object); 2 with the reason on stderr when it cannot
    run or cannot be planned."""
    import logging

    warnings.simplefilter("ignore")  # import-time notices (no Apex / TE here); Megatron-LM's validation warnings
    logging.getLogger("megatron").setLevel(logging.WARNING)  # are collected and printed with the plan
    ours, trainer_argv = planner_parser().parse_known_args(list(sys.argv[1:] if argv is None else argv))
    try:
        result = plan(trainer_argv, nodes=ours.nodes, gpus_per_node=ours.gpus_per_node,
                      tokens_per_second=ours.tokens_per_second, mfu=ours.mfu,
                      peak_tflops_per_gpu=ours.peak_tflops_per_gpu, gpu_memory_gb=ours.gpu_memory_gb)
    except PlanError as err:
        print(f"plan.py: error: {err}", file=sys.stderr)
        return 2
    if ours.json:
        print(json.dumps(result, indent=1, sort_keys=True, default=str))
    else:
        print(format_plan(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
