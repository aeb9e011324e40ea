"""TST's command-line flags (Megatron-LM's `extra_args_provider`) and what TST itself refuses.

Every Megatron-LM flag keeps Megatron-LM's meaning: `megatron_tst.pretrain` parses and validates the command line
with Megatron-LM's own parser (`megatron.training.arguments`), plus these flags:

    --tst-bag-size s                 tokens averaged into one position (paper: 4..8; 16 at 10B-A1B)
    --tst-superposition-ratio r      the first floor(r x train iterations) steps superpose (paper: 0.2..0.4)
    --tst-superposition-iters N      or exactly N superposition steps
    --tst-weighting W                within-bag target weights of the MCE: uniform (default) | power | exp | first
    --tst-sample-layout L            contiguous (default: windows of s x L tokens, the paper's) | segments
    --metrics-jsonl FILE             per-interval train and per-evaluation records (`megatron_tst.loop.logging`)
    --record-data-stream DIR         every training micro-batch's sample and token ids, per rank (tests, audits)
    --recipe NAME, --config FILE     model flags from `megatron_tst.recipes` / a YAML file of flags, placed before
                                     the command line's (`megatron_tst.loop.argv`)

`check_arguments(args)` refuses, after Megatron-LM's validation and before any model or dataset is built, what a
TST run cannot do, each with its reason (the README lists them); `TST_REFUSALS` holds them.
"""

from __future__ import annotations

from typing import List

from megatron_tst.config import SAMPLE_LAYOUTS, TSTConfig
from megatron_tst.mce import WEIGHTINGS


def add_arguments(parser):
    """Megatron-LM's `extra_args_provider`: the TST flags, the 'linear' loss fusion value (`add_tst_arguments`), and
    on CPU the defaults of what cannot run there (`platform.cpu.cpu_argument_defaults`)."""
    from megatron_tst.platform import cpu

    add_tst_arguments(parser)
    cpu.cpu_argument_defaults(parser)
    return parser


def add_tst_arguments(parser):
    """The TST flags and the 'linear' value of --cross-entropy-fusion-impl, and nothing else: Megatron-LM's defaults
    stay those of a GPU run (tools/plan.py plans GPU runs with this provider)."""
    from megatron_tst.platform import megatron_lm

    group = parser.add_argument_group(title="token superposition (megatron-tst)")
    group.add_argument("--tst-bag-size", type=int, default=None,
                       help="s: contiguous tokens whose embeddings are averaged into one position")
    group.add_argument("--tst-superposition-ratio", type=float, default=None,
                       help="r: the first floor(r x train iterations) steps are superposition steps")
    group.add_argument("--tst-superposition-iters", type=int, default=None,
                       help="the number of superposition steps (instead of --tst-superposition-ratio)")
    group.add_argument("--tst-weighting", choices=WEIGHTINGS, default=None,
                       help="within-bag target weighting of the multi-hot cross-entropy (default uniform)")
    group.add_argument("--tst-sample-layout", choices=SAMPLE_LAYOUTS, default=None,
                       help="contiguous (default): a superposition sample is one window of s x --seq-length "
                            "tokens (the paper's); segments: s of Megatron's stock samples")
    group.add_argument("--metrics-jsonl", default=None, help="write train/eval records (JSON lines) to this file")
    group.add_argument("--record-data-stream", default=None,
                       help="write each training micro-batch's sample and token ids to DIR/rank<r>.jsonl")
    group.add_argument("--recipe", default=None,
                       help="a model recipe of megatron_tst.recipes (270m, 600m, 3b, 10b-a1b); its flags come "
                            "before --config's and the command line's")
    group.add_argument("--config", default=None,
                       help="a YAML file of flags (keys are flag names); before the command line's flags")
    megatron_lm.accept_linear_loss_fusion(parser)
    return parser


# (condition on args, what, why): refused with --tst-* flags.
TST_REFUSALS = (
    (lambda a: a.dataloader_type not in (None, "single"), "--dataloader-type {dataloader_type}",
     "the phase of a sample follows from its index in Megatron's 'single' sampler (the run's consumed samples); "
     "a shuffling or external loader would mix phases and repeat or skip tokens"),
    (lambda a: a.reset_position_ids or a.reset_attention_mask, "--reset-position-ids / --reset-attention-mask",
     "bags span document boundaries; per-document positions and masks inside a superposed position are undefined"),
    (lambda a: getattr(a, "fim_data", False), "--fim-data",
     "superposition windows are cut from Megatron's GPTDataset; fill-in-the-middle rearranges its samples"),
    (lambda a: getattr(a, "phase_transition_iterations", None), "--phase-transition-iterations",
     "multi-phase data restarts the sample count per phase; TST's phases follow the run's sample count"),
    (lambda a: getattr(a, "overlap_moe_expert_parallel_comm", False), "--overlap-moe-expert-parallel-comm",
     "its schedule plans are built for stock batches; a superposition step has bags and next-bag targets"),
    (lambda a: getattr(a, "position_embedding_type", None) == "mrope", "--position-embedding-type mrope",
     "multimodal positions of superposed inputs are not defined"),
)

# (condition on args, what, why): refused in every run of this entry point (its forward step and datasets are
# pretraining's; use Megatron-LM's own scripts for these).
ENTRY_REFUSALS = (
    (lambda a: getattr(a, "sft", False), "--sft",
     "megatron_tst.pretrain pretrains; supervised fine-tuning's packed sequences are pretrain_gpt.py's / "
     "train_sft's"),
    (lambda a: getattr(a, "hybrid_context_parallel", False) or getattr(a, "dataloader_inter_document_masking",
                                                                        False),
     "--hybrid-context-parallel / --dataloader-inter-document-masking",
     "packed-sequence batches (cu_seqlens) are not TST's sample stream"),
    (lambda a: getattr(a, "logits_load_dir", None), "--logits-load-dir",
     "offline distillation's loss is pretrain_gpt.py's, not TST's"),
    (lambda a: getattr(a, "use_legacy_models", False), "--use-legacy-models",
     "megatron_tst.pretrain builds Megatron-Core's GPTModel; Megatron-LM's legacy GPT model (0.17's "
     "--use-legacy-models) is pretrain_gpt.py's"),
    (lambda a: getattr(a, "mtp_num_layers", None), "--mtp-num-layers",
     "megatron_tst builds no multi-token-prediction block (TST_SPEC 6: MTP with superposition is undefined); "
     "train an MTP baseline with pretrain_gpt.py"),
)


def refusals(args) -> List[str]:
    """The refusals that apply to `args`, one line each ("FLAG: why")."""
    tst = TSTConfig.from_args(args) is not None
    lines = []
    for condition, what, why in ENTRY_REFUSALS + (TST_REFUSALS if tst else ()):
        if condition(args):
            lines.append(f"{what.format(**vars(args))}: {why}")
    return lines


def check_arguments(args) -> None:
    """TST's checks of Megatron-LM's validated `args`, before heavy work. Raises ValueError with every reason."""
    tst = TSTConfig.from_args(args)
    lines = refusals(args)
    if tst is not None:
        try:
            tst.check_layout(args.seq_length, tensor_parallel_size=args.tensor_model_parallel_size,
                             sequence_parallel=args.sequence_parallel, context_parallel_size=args.context_parallel_size)
        except ValueError as err:
            lines.append(str(err))
    if lines:
        raise ValueError("megatron-tst cannot run this command line:\n  " + "\n  ".join(lines))
