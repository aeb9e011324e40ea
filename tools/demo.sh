#!/usr/bin/env bash
# The main job on a fresh CPU machine, in one command: install, build the demo data, and run a short TST
# pretraining across 2 processes (data parallel, gloo) through both phases, with evaluation and a checkpoint.
#
#   tools/demo.sh                  # about 10 minutes on 2 busy cores (the first time also installs and builds data)
#   RUN_DIR=runs/demo2 ITERS=60 tools/demo.sh
#   INSTALL=0 tools/demo.sh        # keep .venv as it is (no tools/install.sh)
#
# What it runs is an ordinary Megatron-LM pretrain_gpt.py command line plus --tst-*, launched by torchrun and
# printed before it starts. Megatron-LM's full log (its argument dump, warnings) goes to RUN_DIR/train.log; the
# terminal shows its iteration and validation lines and errors. The summary at the end is read from the metrics
# file (tools/compare_runs.py's reader) and says where the metrics, TensorBoard events and checkpoint are.
# Rerunning with the same RUN_DIR resumes from the checkpoint (a finished run only evaluates again).
set -euo pipefail
cd "$(dirname "$0")/.."

RUN_DIR=${RUN_DIR:-runs/demo}
ITERS=${ITERS:-150}
DATA_DIR=${DATA_DIR:-data/demo}
start=$(date +%s)

if [[ "${INSTALL:-1}" != 0 ]]; then
  tools/install.sh
fi
.venv/bin/python tools/build_demo_data.py --out "$DATA_DIR"
mkdir -p "$RUN_DIR"

# A 4-layer Llama-style model (GQA, RoPE, RMSNorm, SwiGLU, untied embeddings), sequence 256, global batch 16;
# a warm-up then a constant LR then a linear cool-down (WSD) over ITERS steps, one schedule across both phases.
MODEL_ARGS=(--num-layers 4 --hidden-size 256 --num-attention-heads 8 --group-query-attention --num-query-groups 4
            --seq-length 256 --max-position-embeddings 256 --position-embedding-type rope --normalization RMSNorm
            --swiglu --disable-bias-linear --untie-embeddings-and-output-weights --attention-dropout 0.0
            --hidden-dropout 0.0)
TRAINING_ARGS=(--micro-batch-size 4 --global-batch-size 16 --train-iters "$ITERS" --lr 3e-3 --min-lr 3e-4
               --lr-decay-style WSD --lr-wsd-decay-style linear --lr-wsd-decay-iters $((ITERS / 10))
               --lr-warmup-iters $((ITERS / 10)) --weight-decay 0.1 --adam-beta2 0.95 --clip-grad 1.0 --seed 1234)
# Token superposition: bags of 4 tokens for the first 30 % of the steps, then ordinary next-token training.
TST_ARGS=(--tst-bag-size 4 --tst-superposition-ratio 0.3)
DATA_ARGS=(--data-path "$DATA_DIR/demo_text_document" --split "98,2,0" --tokenizer-type HuggingFaceTokenizer
           --tokenizer-model "$DATA_DIR/tokenizer" --data-cache-path "$RUN_DIR/cache" --num-workers 0)
CHECKPOINT_ARGS=(--save "$RUN_DIR/checkpoints" --load "$RUN_DIR/checkpoints" --save-interval "$ITERS")
# Validation every ITERS/5 steps: the first falls in the superposition phase (30 % of ITERS), the rest in recovery.
LOGGING_ARGS=(--log-interval 10 --eval-interval $((ITERS / 5)) --eval-iters 4
              --metrics-jsonl "$RUN_DIR/metrics.jsonl" --tensorboard-dir "$RUN_DIR/tensorboard")

COMMAND=(.venv/bin/torchrun --standalone --nproc-per-node 2 -m megatron_tst.pretrain
         "${MODEL_ARGS[@]}" "${TRAINING_ARGS[@]}" "${TST_ARGS[@]}" "${DATA_ARGS[@]}" "${CHECKPOINT_ARGS[@]}"
         "${LOGGING_ARGS[@]}")
echo "+ ${COMMAND[*]}"
echo "  (Megatron-LM's full log: $RUN_DIR/train.log; shown here: its iteration and validation lines, errors)"
echo "=== $(date '+%F %T') ${COMMAND[*]}" >> "$RUN_DIR/train.log"
# One OpenMP thread per process (2 processes on 2 cores); the tokenizer is the local directory, no hub look-ups.
# Shown: iteration and validation lines, TST's plan, errors, the checkpoint save (not the argument dump's lines).
SHOW=' iteration +[0-9]+/ +[0-9]+ \||validation loss at|^TST:|^error|Error|Traceback|saved checkpoint|exiting'
ARGUMENT_DUMP='^ +[A-Za-z0-9_]+ \.{3,} '
set +e
OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 "${COMMAND[@]}" 2>&1 | tee -a "$RUN_DIR/train.log" \
  | grep --line-buffered -E "$SHOW" | grep --line-buffered -v -E "$ARGUMENT_DUMP" \
  | sed -u -E 's/^.+( \[[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9:.]+\] iteration )/\1/'  # another rank's unfinished print
status=${PIPESTATUS[0]}
set -e
if [[ "$status" != 0 ]]; then
  echo "training failed (exit status $status); the end of $RUN_DIR/train.log:" >&2
  tail -n 40 "$RUN_DIR/train.log" >&2
  exit "$status"
fi

# compare_runs' reader: a rerun resumes and appends to metrics.jsonl; it keeps the latest record per step.
.venv/bin/python - "$RUN_DIR" "$(( $(date +%s) - start ))" <<'EOF'
import os
import sys

sys.path.insert(0, "tools")
from compare_runs import load_run

run, seconds = sys.argv[1], int(sys.argv[2])
log = load_run(os.path.join(run, "metrics.jsonl"))
evals, train, tst = log.evals, log.train, log.header["tst"]
steps, last = tst["superposition_steps"], train[-1]
print("\n=== demo summary ===")
print(f"phases: superposition for iterations 1..{steps} (bags of {tst['bag_size']} tokens), "
      f"recovery for {steps + 1}..{last['iteration']}")
for r in evals:
    print(f"  validation LM loss at iteration {r['iteration']:4d} ({r['phase']:13s}): {r['eval_lm_loss']:.3f}")
print(f"consumed {last['consumed_tokens']:,} raw tokens ({last['consumed_samples']:,} samples of "
      f"{log.header['args']['seq_length']} tokens) in {last['iteration']} steps")
print(f"metrics:     {run}/metrics.jsonl   (python tools/compare_runs.py BASELINE.jsonl {run}/metrics.jsonl --out DIR)")
print(f"tensorboard: {run}/tensorboard   (Megatron-LM's scalars and TST's: phase_is_superposition, "
      "consumed_tokens, ...)")
print(f"checkpoint:  {run}/checkpoints   (Megatron-LM torch_dist checkpoint; rerun the command to resume)")
print(f"downstream:  .venv/bin/python tools/evaluate.py demo={run}/checkpoints --tasks tst_demo_cloze   "
      "(lm-eval's Megatron-LM backend; add NAME=DIR of other runs to compare)")
print(f"log:         {run}/train.log")
print(f"wall time:   {seconds // 60} min {seconds % 60} s")
EOF
