"""Downstream evaluation of Megatron-LM checkpoints with lm-evaluation-harness's Megatron-LM backend, side by side.

    python tools/evaluate.py tst=runs/tst/checkpoints baseline=runs/base/checkpoints --tasks hellaswag,arc_easy,piqa
    python tools/evaluate.py tst=... baseline=... --tasks tst_demo_cloze --data-dir data/demo   # offline, on CPU

Each NAME=DIR is a Megatron-LM checkpoint directory (`--save` of a run: its tracker and iter_* directories; TST's
checkpoints are Megatron-LM's). For each, in a fresh process:

    torchrun --standalone --nproc-per-node N -m lm_eval run --model megatron_lm \\
        --model_args load=DIR,tokenizer_type=...,tokenizer_model=...,seq_length=...,devices=N,... \\
        --tasks TASKS --batch_size B --output_path OUT/NAME [--include_path ...] [--limit ...]

that is lm-eval 0.4.13's own backend (lm_eval/models/megatron_lm.py: `--use-checkpoint-args`, distributed
checkpoints, TP/EP/DP; it needs $MEGATRON_PATH, set here to the directory that holds the importable `megatron`
package when unset). On a machine without CUDA the same command line runs through
`megatron_tst.platform.lm_eval` (the CPU stand-ins the backend needs there). The tokenizer and the sequence length
default to the checkpoint's own (its saved arguments); --model-args adds backend arguments (e.g.
`tensor_model_parallel_size=2`). Every checkpoint is checked (whole, allow-listed pickles) before any process
starts.

The table: one row per task and metric, each run's score with lm-eval's standard error, and the difference of the
first run to each other one (with the standard error of the difference, sqrt(se1^2 + se2^2), the runs being
scored on the same documents). Printed, and written to OUT.json / OUT.md (--out, a path prefix).

`tst_demo_cloze` (tools/build_cloze_task.py) is built from --data-dir when it is asked for and missing, and its
directory added to lm-eval's --include_path.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shlex
import subprocess
import sys
import time
from typing import Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # megatron_tst from a checkout without an install too
CLOZE_TASK = "tst_demo_cloze"


class EvaluateError(Exception):
    """Bad input: the message names the argument or file and the way forward."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="NAME=DIR", help="checkpoint directories (the first is compared with "
                                                               "each other)")
    p.add_argument("--tasks", required=True, help="lm-eval tasks, comma-separated (e.g. hellaswag,arc_easy,piqa)")
    p.add_argument("--include-path", action="append", default=[], help="more lm-eval task directories")
    p.add_argument("--limit", type=float, help="documents per task (lm-eval --limit)")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per evaluation (the backend's devices)")
    p.add_argument("--tokenizer-type", help="default: the checkpoint's")
    p.add_argument("--tokenizer-model", help="default: the checkpoint's")
    p.add_argument("--seq-length", type=int, help="default: the checkpoint's")
    p.add_argument("--model-args", default="", help="more backend arguments, k=v,k=v")
    p.add_argument("--data-dir", default="data/demo", help=f"demo data, for the {CLOZE_TASK} task")
    p.add_argument("--out", default="runs/evaluate/downstream", help="output prefix: OUT.json, OUT.md, OUT/NAME/")
    p.add_argument("--dry-run", action="store_true", help="print the lm-eval command lines and exit")
    return p.parse_args(argv)


def named_runs(specs: Sequence[str]) -> dict:
    """{name: checkpoint root} of NAME=DIR arguments. Raises EvaluateError on a malformed or repeated one."""
    runs = {}
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not sep or not name or not directory:
            raise EvaluateError(f"{spec!r}: give each checkpoint as NAME=DIR (e.g. tst=runs/tst/checkpoints)")
        if name in runs:
            raise EvaluateError(f"the name {name!r} is given twice")
        runs[name] = directory
    return runs


def checkpoint_settings(root: str) -> dict:
    """The checked checkpoint Megatron-LM would load from `root` and its saved settings the backend needs:
    {"directory", "iteration", "tokenizer_type", "tokenizer_model", "vocab_file", "merge_file", "seq_length"}.
    Raises EvaluateError: no checkpoint there, or a damaged one / one with a pickle outside the allow-list."""
    from argparse import Namespace

    from megatron_tst.loop import checkpoint_checks
    from megatron_tst.platform.mcore_compat import read_common_state

    if not os.path.isdir(root):
        raise EvaluateError(f"{root}: no such directory (give the --save directory of a run)")
    try:
        target = checkpoint_checks.checkpoint_to_load(Namespace(load=root, finetune=False, ckpt_step=None))
        if target is None:
            raise EvaluateError(f"{root} holds no checkpoint ({checkpoint_checks.TRACKER} is missing)")
        checkpoint_checks.check_checkpoint(target)
        saved = read_common_state(target.directory).get("args")
    except checkpoint_checks.CheckpointError as err:
        raise EvaluateError(str(err)) from None
    return {"directory": target.directory, "iteration": target.iteration,
            **{key: getattr(saved, key, None) for key in ("tokenizer_type", "tokenizer_model", "vocab_file",
                                                          "merge_file", "seq_length")}}


def model_args(root: str, settings: dict, args) -> str:
    """The backend's --model_args for checkpoint root `root`."""
    values = {"load": root, "tokenizer_type": args.tokenizer_type or settings["tokenizer_type"],
              "tokenizer_model": args.tokenizer_model or settings["tokenizer_model"],
              "vocab_file": settings["vocab_file"], "merge_file": settings["merge_file"],
              "seq_length": args.seq_length or settings["seq_length"], "devices": args.nproc,
              "micro_batch_size": args.batch_size}
    text = ",".join(f"{key}={value}" for key, value in values.items() if value is not None)
    return text + ("," + args.model_args if args.model_args else "")


def lm_eval_command(root: str, settings: dict, args, out_dir: str, include: Sequence[str]) -> list:
    """The torchrun command line of one evaluation (lm-eval itself with CUDA; with the CPU stand-ins without)."""
    import torch

    module = "lm_eval" if torch.cuda.is_available() else "megatron_tst.platform.lm_eval"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
            "-m", module, "run", "--model", "megatron_lm", "--model_args", model_args(root, settings, args),
            "--tasks", args.tasks, "--batch_size", str(args.batch_size), "--output_path", out_dir]
    for path in include:
        argv += ["--include_path", path]
    if args.limit is not None:
        argv += ["--limit", f"{args.limit:g}"]
    if args.num_fewshot is not None:
        argv += ["--num_fewshot", str(args.num_fewshot)]
    return argv


def megatron_path() -> str:
    """The directory holding the importable `megatron` package (the backend puts $MEGATRON_PATH on sys.path)."""
    import megatron.core

    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(megatron.core.__file__))))


def run_one(name: str, argv: list, out_dir: str) -> dict:
    """Run one evaluation; returns lm-eval's results JSON. Raises EvaluateError (with the log's path) on failure."""
    os.makedirs(out_dir, exist_ok=True)
    log = os.path.join(out_dir, "lm_eval.log")
    env = dict(os.environ)
    env.setdefault("MEGATRON_PATH", megatron_path())
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    started = time.time()
    print(f"{name}: lm-eval, log in {log}", flush=True)
    with open(log, "w") as f:
        f.write(shlex.join(argv) + "\n")
        f.flush()
        result = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    files = sorted(glob.glob(os.path.join(out_dir, "**", "results_*.json"), recursive=True), key=os.path.getmtime)
    if result.returncode != 0 or not files or os.path.getmtime(files[-1]) < started:
        raise EvaluateError(f"{name}: lm-eval failed (exit status {result.returncode}); see {log}")
    with open(files[-1]) as f:
        results = json.load(f)
    print(f"{name}: done in {time.time() - started:.0f} s", flush=True)
    return results


def scores(results: dict) -> dict:
    """{(task, metric): (score, stderr or None)} of an lm-eval results JSON (filter "none" or the first)."""
    out = {}
    for task, values in results.get("results", {}).items():
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            if (task, metric) in out and filt != "none":
                continue
            stderr = values.get(f"{metric}_stderr,{filt}")
            out[task, metric] = (float(value), float(stderr) if isinstance(stderr, (int, float)) else None)
    return out


def side_by_side(per_run: dict) -> dict:
    """The table of `per_run` ({name: scores(...)}): {"runs": [names], "rows": [{"task", "metric", "scores":
    {name: [score, stderr]}, "differences": {other: [first - other, stderr of the difference]}}]}."""
    names = list(per_run)
    keys = sorted({key for run in per_run.values() for key in run})
    rows = []
    for task, metric in keys:
        row = {"task": task, "metric": metric,
               "scores": {name: list(per_run[name].get((task, metric), (None, None))) for name in names},
               "differences": {}}
        first, first_se = row["scores"][names[0]]
        for other in names[1:]:
            score, se = row["scores"][other]
            if first is None or score is None:
                row["differences"][other] = [None, None]
                continue
            both = None if first_se is None or se is None else math.sqrt(first_se ** 2 + se ** 2)
            row["differences"][other] = [first - score, both]
        rows.append(row)
    return {"runs": names, "rows": rows}


def _cell(score, stderr) -> str:
    if score is None:
        return "-"
    return f"{score:.4f}" + ("" if stderr is None else f" ± {stderr:.4f}")


def markdown(table: dict) -> str:
    """The table as markdown (module docstring)."""
    names = table["runs"]
    header = ["task", "metric", *names, *(f"{names[0]} - {other}" for other in names[1:])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table["rows"]:
        cells = [row["task"], row["metric"], *(_cell(*row["scores"][name]) for name in names),
                 *(_cell(*row["differences"][other]) for other in names[1:])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None, return_table: bool = False):
    """Evaluate, print and write the table. Returns the exit status, or with `return_table` the table (with its
    markdown under "markdown"). Bad input: a message naming the argument or file, status 2."""
    args = parse_args(argv)
    try:
        runs = named_runs(args.runs)
        settings = {name: checkpoint_settings(root) for name, root in runs.items()}
        include = [os.path.abspath(p) for p in args.include_path]
        if CLOZE_TASK in args.tasks.split(","):
            include.append(os.path.abspath(cloze_task_dir(args.data_dir)))
    except EvaluateError as err:
        print(f"error: {err}", file=sys.stderr)
        if return_table:
            raise
        return 2
    out_dirs = {name: os.path.abspath(os.path.join(args.out, name)) for name in runs}
    commands = {name: lm_eval_command(os.path.abspath(root), settings[name], args, out_dirs[name], include)
                for name, root in runs.items()}
    if args.dry_run:
        for name, command in commands.items():
            print(f"# {name}: {settings[name]['directory']}\n{shlex.join(command)}\n")
        return 0
    try:
        per_run = {name: scores(run_one(name, command, out_dirs[name])) for name, command in commands.items()}
    except EvaluateError as err:
        print(f"error: {err}", file=sys.stderr)
        if return_table:
            raise
        return 1
    table = side_by_side(per_run)
    table["checkpoints"] = {name: {"directory": s["directory"], "iteration": s["iteration"]}
                            for name, s in settings.items()}
    table["commands"] = {name: shlex.join(command) for name, command in commands.items()}
    table["markdown"] = markdown(table)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(table, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write(table["markdown"] + "\n")
    print("\n" + table["markdown"] + f"\n\n(written to {args.out}.json and {args.out}.md)")
    return table if return_table else 0


def cloze_task_dir(data_dir: str) -> str:
    """DATA_DIR/cloze with the offline task, built when missing (tools/build_cloze_task.py)."""
    import build_cloze_task  # tools/

    directory = os.path.join(data_dir, "cloze")
    if not os.path.exists(os.path.join(directory, f"{CLOZE_TASK}.yaml")):
        try:
            build_cloze_task.build(data_dir)
        except (FileNotFoundError, ValueError) as err:
            raise EvaluateError(f"the {CLOZE_TASK} task: {err}") from None
    return directory


if __name__ == "__main__":
    sys.exit(main())
