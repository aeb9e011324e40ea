#!/usr/bin/env bash
# The main job on a fresh CPU machine, in one command: install, build the demo data, and run a short TST
# pretraining across 2 processes (data parallel, gloo) through both phases, with evaluation and a checkpoint.
#
#   tools/demo.sh                  # about 5-8 minutes on 2 cores
#   RUN_DIR=runs/demo2 ITERS=60 tools/demo.sh
#
# What it runs is an ordinary trainer command line (Megatron-LM flag names plus --tst-*), printed before it
# starts; the summary at the end says where the metrics, TensorBoard events and checkpoint are.
set -euo pipefail
cd "$(dirname "$0")/.."

RUN_DIR=${RUN_DIR:-runs/demo}
ITERS=${ITERS:-150}
DATA_DIR=${DATA_DIR:-data/demo}

tools/install.sh
.venv/bin/python tools/build_demo_data.py --out "$DATA_DIR"
mkdir -p "$RUN_DIR"

MODEL_ARGS=(--num-layers 4 --hidden-size 256 --num-attention-heads 8 --group-query-attention --num-query-groups 4
            --seq-length 256 --position-embedding-type rope --normalization RMSNorm --swiglu --disable-bias-linear
            --untie-embeddings-and-output-weights --attention-dropout 0.0 --hidden-dropout 0.0)
TRAINING_ARGS=(--micro-batch-size 4 --global-batch-size 16 --train-iters "$ITERS" --lr 3e-3 --min-lr 3e-4
               --lr-decay-style WSD --lr-wsd-decay-style linear --lr-wsd-decay-iters $((ITERS / 10))
               --lr-warmup-iters $((ITERS / 10)) --weight-decay 0.1 --adam-beta2 0.95 --clip-grad 1.0 --seed 1234)
TST_ARGS=(--tst-bag-size 4 --tst-superposition-ratio 0.3)
DATA_ARGS=(--data-path "$DATA_DIR/demo_text_document" --split "98,2,0" --tokenizer-type HuggingFaceTokenizer
           --tokenizer-model "$DATA_DIR/tokenizer.json" --data-cache-path "$RUN_DIR/cache" --num-workers 0)
CHECKPOINT_ARGS=(--save "$RUN_DIR/checkpoints" --load "$RUN_DIR/checkpoints" --save-interval "$ITERS")
LOGGING_ARGS=(--log-interval 10 --eval-interval $((ITERS / 5)) --eval-iters 4 --metrics-jsonl "$RUN_DIR/metrics.jsonl"
              --tensorboard-dir "$RUN_DIR/tensorboard")

COMMAND=(.venv/bin/torchrun --standalone --nproc-per-node 2 -m megatron_tst.pretrain
         "${MODEL_ARGS[@]}" "${TRAINING_ARGS[@]}" "${TST_ARGS[@]}" "${DATA_ARGS[@]}" "${CHECKPOINT_ARGS[@]}"
         "${LOGGING_ARGS[@]}")
echo "+ ${COMMAND[*]}"
OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore "${COMMAND[@]}" 2>&1 | grep -v -e "^\s*warnings.warn" -e "UserWarning" \
    -e "return func(\*args" -e "checkpoint.load_state_dict(" | tee "$RUN_DIR/train.log"

# compare_runs' reader: a rerun resumes and appends to metrics.jsonl; it keeps the latest record per step.
.venv/bin/python - "$RUN_DIR" <<'EOF'
import os, sys
sys.path.insert(0, "tools")
from compare_runs import load_run
run = sys.argv[1]
log = load_run(os.path.join(run, "metrics.jsonl"))
evals, train, tst = log.evals, log.train, log.header["tst"]
steps = tst["superposition_steps"]
print("\n=== demo summary ===")
print(f"phases: superposition for iterations 1..{steps} (bags of {tst['bag_size']}), "
      f"recovery for {steps + 1}..{train[-1]['iteration']}")
for r in evals:
    extra = f", MCE {r['eval_mce_loss']:.3f}" if r.get("eval_mce_loss") is not None else ""
    print(f"  validation at iteration {r['iteration']:4d} ({r['phase']}): LM loss {r['eval_lm_loss']:.3f}{extra}")
last = train[-1]
print(f"consumed {last['consumed_samples']} samples = {last['consumed_tokens']} raw tokens in {last['iteration']} steps")
print(f"metrics:     {run}/metrics.jsonl   (tools/compare_runs.py reads it)")
print(f"tensorboard: {run}/tensorboard")
print(f"checkpoint:  {run}/checkpoints (Megatron-LM torch_dist layout; rerun the command to resume)")
print(f"log:         {run}/train.log")
EOF
