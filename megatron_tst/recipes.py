"""Model recipes: the paper's four models as Megatron-LM flags (`--recipe NAME`).

    python -m megatron_tst.pretrain --recipe 3b --data-path ... --tokenizer-type HuggingFaceTokenizer \\
        --tokenizer-model /models/llama3 [any flag: overrides the recipe]
    python -m megatron_tst.recipes [NAME]         # prints the flags (and a description)
    python tools/plan.py --recipe 3b [...]        # checks, sizes, FLOPs, memory and time of a recipe + layout

A recipe is a list of Megatron-LM flags (with Megatron-LM's meanings: each is a flag of Megatron-LM's own parser
in 0.17 and 0.19, and every recipe passes its `validate_args`, tests/test_recipes_and_plan.py) plus TST's, that
`megatron_tst.loop.argv.expand` puts *before* the config file and the command line, so anything given there wins
(argparse keeps the last value of a flag). Switch flags (`--bf16`, `--sequence-parallel`,
`--use-distributed-optimizer`, ...) cannot be switched off again from the command line: recipes therefore hold only
switches that are part of the model or that every GPU run wants.

What a recipe holds: the architecture (TST_SPEC.md section 5), the paper's TST settings, optimizer and
schedule, sequence length and batch, and a parallel layout for 8-GPU H100/H200 nodes (`LAYOUT` below).
What it does not hold (cluster-specific): data (`--data-path`), tokenizer (`--tokenizer-type`,
`--tokenizer-model`: the model's vocabulary comes from the tokenizer, padded to a multiple of
`--make-vocab-size-divisible-by` x TP; each recipe picks the divisor that pads its vocabulary alike at every TP
it allows, see `tp_invariant_vocab_divisor`),
checkpoint directories, logging, intervals.

Shared choices and why:
- Sequence length must be divisible by TP under sequence parallelism and by 2 x CP (and by the bag size s
  only with `--tst-sample-layout segments`, whose rows are s baseline samples). The dense recipes use
  2016 = 6 x 336 = 2^5 x 63 positions, chosen when s = 6 had to divide it: within 1.6 % of the usual 2048, and
  divisible by every power-of-two TP up to 32 and 2 x CP up to 32; `--seq-length 2048` works too.
  2016 x 1024 sequences = 2.06M tokens (positions) per step,
  the paper's "about 2M". The MoE recipe keeps 8192 (divisible by 16): 8192 x 1024 = 8.4M ("8M").
- WSD schedule as in the paper: 2,000 warmup steps, linear decay over the last 10 % of `--train-iters`
  (`--lr-wsd-decay-iters`), to `--min-lr` = 0.1 x lr (the paper does not give the final LR; SmolLM3, whose
  3B recipe the paper's settings match, decays to 0: `--min-lr 0`). A `--train-iters` given on the command
  line or in a config file moves the decay with it (10 % of the new length) unless `--lr-wsd-decay-iters` is
  given too (tools/plan.py warns when it is not 10 %).
- AdamW (0.9, 0.95) from the paper; weight decay 0.1, eps 1e-8, gradient clipping 1.0 are not given by the
  paper: SmolLM3's values (weight decay 0.1, clipping 1), also TorchTitan's defaults, which the paper used.
- No dropout (Megatron's default is 0.1), init std 0.02, bf16, distributed optimizer.
- Bias-free Llama-style blocks: RMSNorm, SwiGLU, RoPE, GQA (`--group-query-attention`: without it Megatron-LM
  ignores `--num-query-groups`), untied input/output embeddings. `--max-position-embeddings` = the sequence length
  (Megatron-LM requires it; with RoPE it only bounds the rotary table).
- A baseline of the same recipe: `--tst-superposition-ratio 0` (zero superposition steps: plain next-token
  prediction throughout, same data and schedule).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Dict, List, Tuple, Union

Value = Union[str, int, float, bool]

# Llama-style dense and MoE blocks, as the paper's models (SmolLM2/3 and Qwen3 families) are built.
_LLAMA_BLOCK: Dict[str, Value] = {
    "position-embedding-type": "rope",
    "normalization": "RMSNorm",
    "swiglu": True,
    "disable-bias-linear": True,
    "untie-embeddings-and-output-weights": True,
    "group-query-attention": True,
    "attention-dropout": 0.0,
    "hidden-dropout": 0.0,
    "init-method-std": 0.02,
    # replaced per recipe by tp_invariant_vocab_divisor(): the same padded vocabulary at every TP the recipe
    # allows (Megatron pads to a multiple of this x TP), so checkpoints reshard across TP sizes
    "make-vocab-size-divisible-by": 128,
}

_OPTIMIZER: Dict[str, Value] = {
    "optimizer": "adam",  # AdamW (decoupled weight decay), as Megatron's "adam"
    "adam-beta1": 0.9,
    "adam-beta2": 0.95,
    "adam-eps": 1e-8,
    "weight-decay": 0.1,
    "clip-grad": 1.0,
    "lr-decay-style": "WSD",
    "lr-wsd-decay-style": "linear",
    "lr-warmup-iters": 2000,
}

# Every GPU run wants these; --sequence-parallel is a no-op at TP=1 (Megatron-LM turns it off), so a
# command-line --tensor-model-parallel-size > 1 gets sequence parallelism without another flag.
_GPU_RUN: Dict[str, Value] = {
    "bf16": True,
    "use-distributed-optimizer": True,
    "sequence-parallel": True,
    # validation every 1,000 steps on 10 global batches (Megatron-LM 0.19 needs --eval-interval: its validation
    # sample count divides --train-iters by it, also with --eval-iters 0)
    "eval-interval": 1000,
    "eval-iters": 10,
}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One model of the paper as trainer flags.

    Attributes:
        name: the `--recipe` value.
        summary: one line.
        tokenizer: the tokenizer the recipe expects (the model's vocabulary comes from it).
        vocab_size: that tokenizer's vocabulary as the paper's model config has it (used by tools/plan.py
            and the tests through `--tokenizer-type NullTokenizer --vocab-size`; never passed to the trainer).
        settings: flag name (without `--`) -> value; True for a switch.
        paper: what the paper reports for this model (TST_SPEC.md section 4).
        notes: deviations and open choices.
    """

    name: str
    summary: str
    tokenizer: str
    vocab_size: int
    settings: Dict[str, Value]
    paper: str
    notes: Tuple[str, ...] = ()

    def flags(self) -> List[str]:
        argv: List[str] = []
        for key, value in self.settings.items():
            if value is True:
                argv.append("--" + key)
            elif value is False or value is None:
                continue
            else:
                argv += ["--" + key, _format(value)]
        return argv

    def layout(self) -> Dict[str, Value]:
        """The suggested parallel layout (a subset of `settings`)."""
        keys = ("tensor-model-parallel-size", "pipeline-model-parallel-size", "expert-model-parallel-size",
                "context-parallel-size", "micro-batch-size", "global-batch-size")
        return {k: self.settings[k] for k in keys if k in self.settings}


def _format(value: Value) -> str:
    if isinstance(value, float):
        return repr(value) if value != int(value) or abs(value) < 1 else f"{value:g}"
    return str(value)


def _dense(*, hidden, layers, heads, groups, ffn, rotary_base, norm_eps, lr, micro_batch, train_iters=20000,
           seq_length=2016, global_batch=1024, tp=1, pp=1) -> Dict[str, Value]:
    return {
        # model
        "num-layers": layers, "hidden-size": hidden, "ffn-hidden-size": ffn,
        "num-attention-heads": heads, "num-query-groups": groups,
        **_LLAMA_BLOCK,
        "rotary-base": rotary_base, "norm-epsilon": norm_eps,
        # data shape and schedule
        "seq-length": seq_length, "max-position-embeddings": seq_length, "global-batch-size": global_batch,
        "train-iters": train_iters, "lr-wsd-decay-iters": train_iters // 10,
        "lr": lr, "min-lr": lr / 10,
        **_OPTIMIZER,
        # token superposition: the paper's dense setting
        "tst-bag-size": 6, "tst-superposition-ratio": 0.3, "tst-weighting": "uniform",
        # layout for 8-GPU H100/H200 nodes
        "tensor-model-parallel-size": tp, "pipeline-model-parallel-size": pp, "micro-batch-size": micro_batch,
        **_GPU_RUN,
    }


_LLAMA3_TOKENIZER = ("Llama 3 tokenizer, 128,256 ids (e.g. meta-llama/Meta-Llama-3-8B's tokenizer.json, "
                     "--tokenizer-type HuggingFaceTokenizer); padded alike at every TP the recipe allows")

RECIPES: Dict[str, Recipe] = {}


def tensor_parallel_sizes(settings: Dict[str, Value], largest: int = 8) -> List[int]:
    """The TP sizes 1..largest a recipe's attention allows: they divide the heads, and the query groups divide
    TP or TP divides them (Megatron-Core replicates KV heads when there are fewer groups than TP ranks)."""
    heads = int(settings["num-attention-heads"])
    groups = int(settings.get("num-query-groups", heads))
    return [tp for tp in range(1, largest + 1) if heads % tp == 0 and (groups % tp == 0 or tp % groups == 0)]


def tp_invariant_vocab_divisor(vocab_size: int, tp_sizes: List[int], align: int = 64, largest: int = 4096) -> int:
    """A `--make-vocab-size-divisible-by` d (a multiple of `align`) under which Megatron's padding
    (`vocab_size` rounded up to a multiple of d x TP) gives one size for every TP in `tp_sizes`, so a checkpoint
    reshards across them. Of those, the one that pads least (then the smallest d). Raises ValueError if none."""
    def padded(d: int, tp: int) -> int:
        return -(-vocab_size // (d * tp)) * d * tp

    candidates = [(padded(d, 1), d % 128 != 0, d) for d in range(align, largest + 1, align)
                  if len({padded(d, tp) for tp in tp_sizes}) == 1]
    if not candidates:
        raise ValueError(f"no --make-vocab-size-divisible-by <= {largest} pads {vocab_size} alike for TP {tp_sizes}")
    return min(candidates)[2]


def _register(recipe: Recipe) -> None:
    divisor = tp_invariant_vocab_divisor(recipe.vocab_size, tensor_parallel_sizes(recipe.settings))
    RECIPES[recipe.name] = dataclasses.replace(
        recipe, settings={**recipe.settings, "make-vocab-size-divisible-by": divisor})


_register(Recipe(
    name="270m",
    summary="270M dense: SmolLM2-135M shape with untied embeddings and the Llama 3 tokenizer",
    tokenizer=_LLAMA3_TOKENIZER,
    vocab_size=128256,
    settings=_dense(hidden=576, layers=30, heads=9, groups=3, ffn=1536, rotary_base=100000, norm_eps=1e-5,
                    lr=2e-3, micro_batch=16),
    paper="20k steps: baseline 3.212, TST (s=6, r=0.3) 3.142; 100k steps: 3.092 vs 3.048",
    notes=("TP must divide 9 heads and 3 query groups: TP is 1 or 3 (3 is pointless at this size); "
           "data parallelism only.",
           "For the paper's 100k-step run: --train-iters 100000 --lr-wsd-decay-iters 10000."),
))

_register(Recipe(
    name="600m",
    summary="600M dense: SmolLM2-360M shape with untied embeddings and the Llama 3 tokenizer",
    tokenizer=_LLAMA3_TOKENIZER,
    vocab_size=128256,
    settings=_dense(hidden=960, layers=32, heads=15, groups=5, ffn=2560, rotary_base=100000, norm_eps=1e-5,
                    lr=1e-3, micro_batch=8),
    paper="20k steps: baseline 3.019, TST (s=6, r=0.3) 2.943",
    notes=("TP must divide 15 heads and 5 query groups: TP is 1 or 5; data parallelism only.",),
))

_register(Recipe(
    name="3b",
    summary="3B dense: SmolLM3-3B shape with untied embeddings and the Llama 3 tokenizer",
    tokenizer=_LLAMA3_TOKENIZER,
    vocab_size=128256,
    settings=_dense(hidden=2048, layers=36, heads=16, groups=4, ffn=11008, rotary_base=50000, norm_eps=1e-6,
                    lr=2e-4, micro_batch=2),
    paper="20k steps: baseline 2.808, TST (s=6, r=0.3) 2.676 = the baseline's loss at 36k steps (1.8x)",
    notes=("SmolLM3 drops RoPE in every 4th layer (NoPE); Megatron has no per-layer flag for that, so all "
           "layers use RoPE here. The spec gives no RoPE base for 3B: SmolLM3 pretrained at 4k positions with "
           "a small base and raised it (1.5M, 5M) only for its context extension; 5e4 is our choice.",
           "TP=1 fits an 80 GB GPU at micro batch 2 (tools/plan.py); TP=2/4 (with sequence parallelism, "
           "automatic) if you need larger micro batches or have smaller GPUs."),
))

_register(Recipe(
    name="10b-a1b",
    summary="10B-A1B MoE (Qwen3-MoE family): 128 experts, top-8, ~1B active parameters",
    tokenizer=("Qwen3 tokenizer (e.g. Qwen/Qwen3-30B-A3B's tokenizer.json, --tokenizer-type "
               "HuggingFaceTokenizer); the paper's config pads it to 151,936 rows, Megatron pads the "
               "tokenizer's ~151.7k ids to the next multiple of 128 x TP instead (a few hundred rows fewer)"),
    vocab_size=151936,
    settings={
        # model
        "num-layers": 32, "hidden-size": 1536, "num-attention-heads": 24, "num-query-groups": 4,
        "kv-channels": 128, "qk-layernorm": True,
        **_LLAMA_BLOCK,
        "rotary-base": 50000, "norm-epsilon": 1e-6,
        # mixture of experts: every layer, no shared expert, Qwen3-style softmax top-k router (probabilities
        # renormalised over the chosen k, Megatron's default without --moe-router-pre-softmax)
        "num-experts": 128, "moe-router-topk": 8, "moe-ffn-hidden-size": 512, "moe-layer-freq": 1,
        "moe-router-load-balancing-type": "aux_loss", "moe-aux-loss-coeff": 1e-3, "moe-router-dtype": "fp32",
        "moe-token-dispatcher-type": "alltoall",
        # data shape and schedule: the paper's TST run is 49,983 steps (the baseline 125k)
        "seq-length": 8192, "max-position-embeddings": 8192, "global-batch-size": 1024,
        "train-iters": 49983, "lr-wsd-decay-iters": 4998,
        "lr": 3e-4, "min-lr": 3e-5,
        **_OPTIMIZER,
        # token superposition: s = 16, r = 0.25. The paper does not say which within-bag weighting its s = 16
        # run used; uniform is its default (stated for s <= 8), while power-law 1/i is reported better and
        # more stable for s >= 8: consider --tst-weighting power.
        "tst-bag-size": 16, "tst-superposition-ratio": 0.25, "tst-weighting": "uniform",
        # layout for 8-GPU H100/H200 nodes: experts over the 8 GPUs of a node, everything else data-parallel
        "tensor-model-parallel-size": 1, "pipeline-model-parallel-size": 1, "expert-model-parallel-size": 8,
        "micro-batch-size": 1,
        **_GPU_RUN,
    },
    paper=("125k baseline steps: 2.252; TST 49,983 steps of which 12,483 superposition (s=16): 2.236, "
           "4,768 vs 12,311 B200-hours (2.5x)"),
    notes=("Within-bag weighting: the paper does not say which one its s = 16 run used; the recipe keeps the "
           "default uniform, while power-law 1/i is reported better and more stable for s >= 8 "
           "(--tst-weighting power).",
           "r = 0.25 gives floor(0.25 x 49,983) = 12,495 superposition steps, the paper's 12,483 is r = 0.2497 "
           "(0.1 % apart). The paper's baseline: --train-iters 125000 --lr-wsd-decay-iters 12500 "
           "--tst-superposition-ratio 0.",
           "On GPUs with Transformer Engine add --moe-grouped-gemm (grouped expert GEMMs, much faster; not in "
           "the recipe because the local spec needs the grouped_gemm package and a switch cannot be undone).",
           "The Qwen3 load-balancing loss is global-batch; --moe-router-load-balancing-type global_aux_loss "
           "(Megatron-Core 0.17 and 0.19 have it) is the closer match; the recipe keeps the per-micro-batch "
           "aux_loss, which the paper does not contradict.",
           "EP must divide 128 experts and the data-parallel ranks (world size / PP); with EP=8 the world size "
           "must be a multiple of 8."),
))


def names() -> List[str]:
    return list(RECIPES)


def get(name: str) -> Recipe:
    """The recipe called `name` (case-insensitive, `_` = `-`). Unknown: ValueError listing the names."""
    key = str(name).strip().lower().replace("_", "-")
    if key not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}: known recipes are {', '.join(RECIPES)}")
    return RECIPES[key]


def recipe_flags(name: str) -> List[str]:
    """The recipe's Megatron-LM flags, to be placed before any other flags."""
    return get(name).flags()


def describe(name: str) -> str:
    """A readable description: model, tokenizer, TST settings, layout, paper result, notes, flags."""
    recipe = get(name)
    s = recipe.settings
    lines = [f"{recipe.name}: {recipe.summary}", f"  tokenizer: {recipe.tokenizer}"]
    shape = (f"  model: {s['num-layers']} layers, hidden {s['hidden-size']}, heads {s['num-attention-heads']} / "
             f"{s['num-query-groups']} query groups")
    if "kv-channels" in s:
        shape += f", head dim {s['kv-channels']}"
    if "num-experts" in s:
        shape += (f", {s['num-experts']} experts top-{s['moe-router-topk']} of ffn {s['moe-ffn-hidden-size']}"
                  + (", qk-layernorm" if s.get("qk-layernorm") else ""))
    else:
        shape += f", ffn {s['ffn-hidden-size']}"
    lines.append(shape + f", rope base {s['rotary-base']:g}")
    lines.append(f"  TST: s={s['tst-bag-size']}, r={s['tst-superposition-ratio']}, weighting {s['tst-weighting']}")
    lines.append(f"  schedule: {s['train-iters']} steps, seq {s['seq-length']} x batch {s['global-batch-size']}, "
                 f"lr {s['lr']:g} (WSD: warmup {s['lr-warmup-iters']}, decay {s['lr-wsd-decay-iters']})")
    lines.append("  layout (8-GPU nodes): " + ", ".join(f"{k} {v}" for k, v in recipe.layout().items()))
    lines.append(f"  paper: {recipe.paper}")
    lines += [f"  note: {n}" for n in recipe.notes]
    lines.append("  flags: " + " ".join(recipe.flags()))
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        for name in argv or names():
            print(describe(name) + "\n")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
