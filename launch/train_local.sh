#!/usr/bin/env bash
# Token-Superposition Training on one machine: the same trainer arguments as launch/train_dense.sbatch
# (argument groups and environment knobs in launch/common.sh), launched with
# `torchrun --standalone --nproc-per-node $NPROC_PER_NODE` (default: the GPUs nvidia-smi sees, 1 on CPU).
#
#   DATA_PATH=/data/fineweb_text_document TOKENIZER_MODEL=/models/tok launch/train_local.sh [extra trainer flags...]
#   RECIPE=3b TP=2 CKPT_DIR=/ckpt/tst-3b launch/train_local.sh --lr 2e-4
#   MOCK_DATA=1 NPROC_PER_NODE=2 TRAIN_ITERS=20 EXTRA_ARGS="--distributed-backend gloo" launch/train_local.sh
#
# --save and --load share CKPT_DIR, so re-running the same command resumes. SIGTERM/SIGINT reach the ranks
# through torchrun (the trainer saves on SIGTERM with --exit-signal-handler, within torchrun's 30 s grace);
# there is no requeue here.
set -euo pipefail

LAUNCH_DIR=${LAUNCH_DIR:-$(dirname "${BASH_SOURCE[0]}")}
# shellcheck source=common.sh
source "$LAUNCH_DIR/common.sh"

: "${RECIPE:=270m}"

tst_build_args "$@"
# Per-script additions to the groups go here, e.g.  TRAINING_ARGS+=(--lr-warmup-iters 100)
tst_local_run
