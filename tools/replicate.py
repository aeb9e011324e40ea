"""An equal-FLOPs miniature of the TST paper's experiment on CPU: a TST run and two baselines, then a comparison of
their validation losses and of their final checkpoints downstream.

    python tools/replicate.py --out runs/replicate [--steps 150 --bag-size 4 --ratio 0.3 ...] [--force]

The three runs train the same small Llama-style model (RoPE, RMSNorm, SwiGLU, GQA, untied embeddings, no dropout)
on the demo corpus (tools/build_demo_data.py, built into --data-dir when missing) with the same steps, the
same positions per step (global batch x seq length), the same warmup-stable-decay LR schedule and the same seed:

- ``tst``: ``--tst-bag-size S --tst-sample-layout LAYOUT --tst-superposition-ratio R``;
- ``baseline`` (same stream): the same flags with ``--tst-superposition-ratio 0``: it reads the TST run's stream
  (the same windows in the same order; recovery reads them in blocks of G windows, megatron_tst/stream.py);
- ``stock`` (stock order): no ``--tst-*`` flag, plain Megatron-LM: Megatron's own shuffle of L-token samples.

Each run is ``torchrun --standalone --nproc-per-node 2 -m megatron_tst.pretrain ...`` (DP=2, gloo on CPU) writing
``--metrics-jsonl`` and a final checkpoint (``--save OUT/NAME/checkpoints``); then tools/compare_runs.py (in this
process: its reader, report and plots) gives the equal-loss speedups, the equal-FLOPs loss gaps and the plots, and
tools/evaluate.py scores the three final checkpoints on the downstream tasks (``--tasks``; default the offline
next-line cloze built from the demo corpus's held-out split, tools/build_cloze_task.py).

A run whose metrics already hold the final evaluation (at --steps), made with the same trainer flags, is
skipped unless --force; any other is started over. The defaults (4 layers, hidden 256, seq 192, global batch 16,
150 steps, s=4, r=0.3) take about 20 minutes on 2 CPU cores and keep every run within one epoch of the 1.8M-token
train split (the TST run reads s x the samples per step in its superposition phase).

Writes into --out: {tst,baseline,stock}.jsonl, their logs (*.log), wall times (*.wall.json), checkpoints, the
compare_runs plots (eval_loss_vs_{steps,flops,tokens,wall_time}.png, train_loss_vs_steps.png), downstream.{json,md}
and summary.json (configuration, commands, wall times, epochs of data, the comparisons, the phase switch, the
downstream table). Prints markdown tables. ``--publish DIR`` also copies summary.json, downstream.md and the main
plots to DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from typing import Optional

import compare_runs  # tools/ (sys.path[0] when run as a script)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PUBLISHED_PLOTS = ("eval_loss_vs_steps.png", "eval_loss_vs_tokens.png", "train_loss_vs_steps.png")


def parse_args(argv=None) -> argparse.Namespace:
    """The command line; every default is the configuration reported in the README."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/replicate", help="output directory")
    p.add_argument("--data-dir", default="data/demo", help="demo data (built there when missing)")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps of each run")
    p.add_argument("--bag-size", type=int, default=4, help="TST bag size s")
    p.add_argument("--ratio", type=float, default=0.3, help="TST superposition ratio r")
    p.add_argument("--weighting", default="uniform", choices=("uniform", "power", "exp", "first"))
    p.add_argument("--sample-layout", default="contiguous", choices=("contiguous", "segments"),
                   help="--tst-sample-layout of both runs: superposition rows of s*L contiguous tokens (the paper's) "
                        "or s unrelated samples of L tokens")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-groups", type=int, default=2, help="GQA query groups")
    p.add_argument("--ffn-hidden-size", type=int, help="default: the trainer's (SwiGLU: 2/3 of 4 x hidden)")
    p.add_argument("--seq-length", type=int, default=192,
                   help="positions per sample (divisible by s for --sample-layout segments)")
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr", type=float, default=0.0)
    p.add_argument("--warmup-fraction", type=float, default=0.1, help="of --steps (paper: 2k of 20k)")
    p.add_argument("--decay-fraction", type=float, default=0.1, help="WSD linear decay, last part of --steps")
    p.add_argument("--eval-interval", type=int, default=15)
    p.add_argument("--eval-iters", type=int, default=10, help="validation batches (a fixed set of samples)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--nproc", type=int, default=2, help="torchrun processes (data-parallel size)")
    p.add_argument("--trainer-flag", action="append", default=[],
                   help="one more trainer flag for every run, e.g. --trainer-flag=--bf16 (repeatable)")
    p.add_argument("--tasks", default="tst_demo_cloze",
                   help="lm-eval tasks for the final checkpoints (comma-separated; tools/evaluate.py); 'none' skips")
    p.add_argument("--eval-limit", type=int, help="documents per task (lm-eval --limit; default all)")
    p.add_argument("--force", action="store_true", help="rerun runs that already finished")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    p.add_argument("--publish", help="also copy summary.json and the main plots to this directory")
    args = p.parse_args(argv)
    if args.sample_layout == "segments" and args.seq_length % args.bag_size:
        p.error(f"--seq-length {args.seq_length} must be divisible by --bag-size {args.bag_size} "
                "with --sample-layout segments")
    if args.global_batch % (args.micro_batch * args.nproc):
        p.error("--global-batch must be divisible by --micro-batch x --nproc")
    return args


def common_flags(args, data_prefix: str, tokenizer: str, cache: str) -> list:
    """Trainer flags shared by both runs: model, data, schedule, seed, evaluation."""
    warmup = max(1, round(args.warmup_fraction * args.steps))
    decay = max(1, round(args.decay_fraction * args.steps))
    flags = f"""
        --num-layers {args.layers} --hidden-size {args.hidden} --num-attention-heads {args.heads}
        --group-query-attention --num-query-groups {args.kv_groups}
        --position-embedding-type rope --normalization RMSNorm --swiglu --disable-bias-linear
        --untie-embeddings-and-output-weights --attention-dropout 0.0 --hidden-dropout 0.0 --init-method-std 0.02
        --seq-length {args.seq_length} --max-position-embeddings {args.seq_length}
        --micro-batch-size {args.micro_batch} --global-batch-size {args.global_batch}
        --train-iters {args.steps} --lr {args.lr} --min-lr {args.min_lr} --lr-warmup-iters {warmup}
        --lr-decay-style WSD --lr-wsd-decay-style linear --lr-wsd-decay-iters {decay}
        --optimizer adam --adam-beta1 0.9 --adam-beta2 0.95 --weight-decay 0.1 --clip-grad 1.0 --seed {args.seed}
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model {tokenizer}
        --data-path {data_prefix} --split 949,50,1 --data-cache-path {cache} --num-workers 0
        --log-interval 1 --eval-interval {args.eval_interval} --eval-iters {args.eval_iters}
    """
    ffn = ["--ffn-hidden-size", str(args.ffn_hidden_size)] if args.ffn_hidden_size else []
    return flags.split() + ffn + [f for flag in args.trainer_flag for f in flag.split()]


RUNS = ("baseline", "tst", "stock")  # the same-stream baseline first: compare_runs compares the others with it


def labels(args) -> dict:
    """{run name: its label in tables and plots}."""
    return {"baseline": "baseline (same stream)", "tst": f"TST (s={args.bag_size}, r={args.ratio})",
            "stock": "baseline (stock order)"}


def run_commands(args) -> dict:
    """{name: argv} of the three runs: the TST run and its same-stream baseline differ only in the number of
    superposition steps (both give the bag size and layout, so both read the same data stream); the stock-order
    baseline gives no --tst-* flag. Each saves its final checkpoint."""
    data_prefix = os.path.join(args.data_dir, "demo_text_document")
    shared = common_flags(args, data_prefix, os.path.join(args.data_dir, "tokenizer"),
                          os.path.join(args.out, "cache"))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
                "-m", "megatron_tst.pretrain"]
    data = ["--tst-bag-size", str(args.bag_size), "--tst-sample-layout", args.sample_layout]
    tst = data + ["--tst-superposition-ratio", str(args.ratio), "--tst-weighting", args.weighting]
    baseline = data + ["--tst-superposition-ratio", "0"]
    extras = {"baseline": baseline, "tst": tst, "stock": []}
    return {name: launcher + shared + extras[name]
            + ["--wandb-exp-name", name, "--metrics-jsonl", os.path.join(args.out, f"{name}.jsonl"),
               "--save", checkpoint_dir(args, name), "--save-interval", str(args.steps)]
            for name in RUNS}


def checkpoint_dir(args, name: str) -> str:
    """Where run `name` saves its final checkpoint."""
    return os.path.join(args.out, name, "checkpoints")


def is_finished(path: str, steps: int) -> bool:
    """Whether the metrics file holds an evaluation at the final iteration."""
    return os.path.exists(path) and any(r.get("kind") == "eval" and r.get("iteration") == steps
                                        for r in compare_runs.read_jsonl_records(path))


def ensure_data(data_dir: str) -> None:
    """Build the demo corpus, tokenizer and indexed dataset when they are missing."""
    needed = ("demo_text_document.bin", "demo_text_document.idx", os.path.join("tokenizer", "tokenizer.json"))
    if all(os.path.exists(os.path.join(data_dir, name)) for name in needed):
        return
    print(f"building the demo data in {data_dir}", flush=True)
    subprocess.run([sys.executable, os.path.join(REPO, "tools", "build_demo_data.py"), "--out", data_dir],
                   check=True)


def run_signature(argv: list) -> list:
    """The trainer flags that decide what a run computes (not the interpreter, output or cache paths)."""
    flags = argv[argv.index("megatron_tst.pretrain") + 1:]
    return [flag for i, flag in enumerate(flags) if i == 0 or flags[i - 1] not in ("--metrics-jsonl",
                                                                                    "--data-cache-path", "--save")]


def previous_wall_time(metrics: str, wall_file: str, argv: list, steps: int) -> Optional[float]:
    """Wall time of an earlier run of the same flags that finished, or None."""
    if not (is_finished(metrics, steps) and os.path.exists(wall_file)):
        return None
    with open(wall_file) as f:
        previous = json.load(f)
    return previous["wall_s"] if previous.get("flags") == run_signature(argv) else None


def train(name: str, argv: list, out: str, steps: int, force: bool) -> float:
    """Run one training (unless the same run finished before and not --force); returns its wall time (s)."""
    metrics, log, wall_file = (os.path.join(out, f"{name}{ext}") for ext in (".jsonl", ".log", ".wall.json"))
    seconds = None if force else previous_wall_time(metrics, wall_file, argv, steps)
    if seconds is not None:
        print(f"{name}: finished before ({seconds:.0f} s), skipped (--force reruns it)", flush=True)
        return seconds
    if os.path.exists(metrics):
        os.remove(metrics)  # start over: the trainer appends
    shutil.rmtree(argv[argv.index("--save") + 1], ignore_errors=True)  # and saves anew
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    print(f"{name}: training, log in {log}", flush=True)
    start = time.time()
    with open(log, "w") as f:
        result = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    seconds = time.time() - start
    if result.returncode != 0 or not is_finished(metrics, steps):
        sys.exit(f"{name} failed (exit status {result.returncode}); see {log}")
    with open(wall_file, "w") as f:
        json.dump({"wall_s": seconds, "flags": run_signature(argv)}, f)
    print(f"{name}: done in {seconds:.0f} s", flush=True)
    return seconds


def split_statistics(data_prefix: str, seq_length: int, vocab_size: int = 8192) -> dict:
    """Samples per epoch of the train split and the unigram cross-entropy of the validation split.

    Megatron's --split 949,50,1 cuts by documents (train: the first round(0.949 n), valid: up to round(0.999 n)).
    The unigram cross-entropy (train-split token frequencies, add-0.5 smoothed, on validation tokens) is
    the loss of a model that ignores its input: the level a stalled superposition phase sits at.
    """
    import warnings

    import numpy as np

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    dataset = IndexedDataset(data_prefix, mmap=True)
    documents = len(dataset.document_indices) - 1
    ends = np.concatenate([[0], np.cumsum(dataset.sequence_lengths, dtype=np.int64)])
    train_end, valid_end = ends[int(round(0.949 * documents))], ends[int(round(0.999 * documents))]
    tokens = np.memmap(data_prefix + ".bin", dtype=dataset.index.dtype, mode="r")
    counts = np.bincount(tokens[:train_end], minlength=max(vocab_size, int(tokens.max()) + 1)) + 0.5
    unigram_ce = float(-np.log(counts / counts.sum())[tokens[train_end:valid_end]].mean())
    return {"samples_per_epoch": int((train_end - 1) // seq_length), "train_tokens": int(train_end),
            "valid_unigram_cross_entropy": unigram_ce}


def record_at(records: list, iteration) -> dict:
    """The record at ``iteration`` ({} when none); a RunLog keeps one per iteration, in order."""
    return next((r for r in records if r["iteration"] == iteration), {})


def switch_details(tst, base, switch: Optional[int]) -> Optional[dict]:
    """Losses around the phase switch (``tst`` and ``base`` are compare_runs RunLogs): eval LM loss at the
    switch and at the next eval, the train loss of the last superposition step (MCE) and of the first recovery
    steps (LM), the baseline's at the same steps."""
    if not switch:
        return None
    after = next((r["iteration"] for r in tst.evals if r["iteration"] > switch), None)

    def eval_at(run, iteration):
        return record_at(run.evals, iteration).get("eval_lm_loss")

    def train_at(run, iteration):
        return record_at(run.train, iteration).get("loss")

    recovery = [r["loss"] for r in tst.train if r["iteration"] > switch]
    return {
        "switch_iteration": switch,
        "tst_eval_lm_loss_at_switch": eval_at(tst, switch), "baseline_eval_lm_loss_at_switch": eval_at(base, switch),
        "next_eval_iteration": after,
        "tst_eval_lm_loss_next": eval_at(tst, after), "baseline_eval_lm_loss_next": eval_at(base, after),
        "tst_train_mce_loss_last_superposition_step": train_at(tst, switch),
        "tst_train_lm_loss_first_recovery_step": train_at(tst, switch + 1),
        "baseline_train_lm_loss_same_step": train_at(base, switch + 1),
        "tst_train_lm_loss_first_10_recovery_steps": [round(loss, 4) for loss in recovery[:10]],
    }


def fmt(value, digits: int = 3) -> str:
    """A number for the table, '-' when missing."""
    return "-" if value is None else f"{value:.{digits}f}"


def speedup_text(comp: dict) -> str:
    """A comparison's equal-loss speedup as a table cell."""
    if comp["equal_loss_speedup"] is not None:
        return f"{comp['equal_loss_speedup']:.2f}x"
    if comp["equal_loss_speedup_lower_bound"] is not None:
        return f">= {comp['equal_loss_speedup_lower_bound']:.2f}x"
    return "- (never reaches the reference's first eval loss)"


def markdown_table(summary: dict) -> str:
    """The results as markdown: one row per run, then the comparisons and reference losses."""
    switch = summary["switch"] or {}
    header = (f"| run | final eval LM loss | eval LM loss at the switch (it {switch.get('switch_iteration', '-')}) "
              f"| next eval (it {switch.get('next_eval_iteration', '-')}) | raw tokens | epochs of train data "
              "| wall time |")
    rows = [header, "|---|---|---|---|---|---|---|"]
    for run in summary["runs"].values():
        cells = [run["label"], fmt(run["final_eval_lm_loss"]), fmt(run.get("eval_lm_loss_at_switch")),
                 fmt(run.get("eval_lm_loss_next")), f"{run['consumed_tokens'] / 1e6:.2f}M", f"{run['epochs']:.2f}",
                 f"{run['wall_s'] / 60:.1f} min"]
        rows.append("| " + " | ".join(cells) + " |")
    rows += ["", "| comparison | equal-loss speedup (steps = FLOPs) | equal-FLOPs loss gap (reference - run, > 0: run "
             "better) |", "|---|---|---|"]
    for comp in summary["comparisons"]:
        rows.append(f"| {comp['label']} vs {comp['reference']} | {speedup_text(comp)} "
                    f"| {fmt(comp['equal_flops_loss_gap'], 4)} |")
    note = ("validation unigram cross-entropy (a model ignoring its input): "
            f"{fmt(summary['data']['valid_unigram_cross_entropy'])}")
    return "\n".join(rows) + "\n\n" + note


def main(argv=None) -> int:
    """Run the three trainings, compare them, evaluate their final checkpoints downstream, write summary.json and
    print the tables."""
    args = parse_args(argv)
    os.chdir(REPO)
    commands = run_commands(args)
    if args.dry_run:
        for name, argv_ in commands.items():
            print(f"# {name}\n{shlex.join(argv_)}\n")
        return 0
    os.makedirs(args.out, exist_ok=True)
    total_start = time.time()
    ensure_data(args.data_dir)
    train_start = time.time()
    walls = {name: train(name, argv_, args.out, args.steps, args.force) for name, argv_ in commands.items()}
    train_elapsed = time.time() - train_start  # (runs skipped now count with their recorded wall times)

    names = labels(args)
    logs = {name: compare_runs.load_run(os.path.join(args.out, f"{name}.jsonl"), names[name]) for name in commands}
    report = compare_runs.build_report(list(logs.values()))  # tst and stock, each against the same-stream baseline
    comparisons = [dict(comp, reference=names["baseline"]) for comp in report["comparisons"]]
    comparisons.append(dict(compare_runs.compare_runs(logs["stock"], logs["tst"]), reference=names["stock"]))
    compare_runs.write_plots(list(logs.values()), args.out)

    data_stats = split_statistics(os.path.join(args.data_dir, "demo_text_document"), args.seq_length)
    per_epoch = data_stats["samples_per_epoch"]
    switch = ((logs["tst"].header or {}).get("tst") or {}).get("superposition_steps")  # the last superposition step
    next_eval = next((r["iteration"] for r in logs["tst"].evals if switch and r["iteration"] > switch), None)
    runs = {}
    for (name, log), run_report in zip(logs.items(), report["runs"]):
        final_train = record_at(log.train, args.steps)
        runs[name] = {"label": log.label, "final_eval_lm_loss": run_report["final_eval_lm_loss"],
                      "eval_lm_loss_at_switch": record_at(log.evals, switch).get("eval_lm_loss"),
                      "eval_lm_loss_next": record_at(log.evals, next_eval).get("eval_lm_loss"),
                      "consumed_samples": final_train["consumed_samples"],
                      "consumed_tokens": final_train["consumed_tokens"],
                      "epochs": final_train["consumed_samples"] / per_epoch, "wall_s": walls[name],
                      "train_time_s": final_train["wall_time_s"], "flops": final_train["flops"],
                      "eval_lm_loss_curve": log.eval_curve(), "checkpoint": checkpoint_dir(args, name),
                      "command": shlex.join(["python", *commands[name][1:]])}
    downstream = evaluate_checkpoints(args)
    summary = {
        "config": {k: v for k, v in vars(args).items() if k not in ("force", "dry_run", "publish")},
        "data": data_stats, "positions_per_step": args.global_batch * args.seq_length,
        "runs": runs, "comparisons": comparisons,
        "switch": switch_details(logs["tst"], logs["baseline"], switch),
        "downstream": downstream,
        "total_wall_s": sum(walls.values()) + time.time() - total_start - train_elapsed,
    }
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if args.publish:
        os.makedirs(args.publish, exist_ok=True)
        published = PUBLISHED_PLOTS + ("summary.json",) + (("downstream.md",) if downstream else ())
        for name in published:
            shutil.copy(os.path.join(args.out, name), args.publish)
    print("\n" + markdown_table(summary))
    if downstream:
        print("\n" + downstream["markdown"])
    print(f"\nsummary and plots in {args.out} (total wall time {summary['total_wall_s'] / 60:.1f} min)")
    return 0


def evaluate_checkpoints(args) -> Optional[dict]:
    """tools/evaluate.py on the three final checkpoints, named tst, baseline (same stream) and stock (stock order)
    (--tasks; None with --tasks none): its table as JSON and markdown (also written to OUT/downstream.{json,md})."""
    if args.tasks == "none":
        return None
    import evaluate  # tools/ (sys.path[0] when run as a script)

    argv = [f"{name}={checkpoint_dir(args, name)}" for name in ("tst", "baseline", "stock")]
    argv += ["--tasks", args.tasks, "--out", os.path.join(args.out, "downstream"), "--data-dir", args.data_dir]
    if args.eval_limit:
        argv += ["--limit", str(args.eval_limit)]
    return evaluate.main(argv, return_table=True)


if __name__ == "__main__":
    sys.exit(main())
