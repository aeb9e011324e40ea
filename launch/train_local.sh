#!/usr/bin/env bash
# Token-Superposition Training on one machine: the same trainer arguments as launch/train_dense.sbatch
# (argument groups and environment knobs in launch/common.sh), launched with
# `torchrun --standalone --nproc-per-node $NPROC_PER_NODE` (default: the GPUs nvidia-smi sees, 1 on CPU).
#
#   DATA_PATH=/data/fineweb_text_document TOKENIZER_MODEL=/models/tok launch/train_local.sh [extra trainer flags...]
#   RECIPE=3b TP=2 CKPT_DIR=/ckpt/tst-3b launch/train_local.sh --lr 2e-4     # DATA_PATH etc. as above
#   # CPU smoke test in the project venv (. .venv/bin/activate): mock data, 2 gloo ranks, the 270m recipe shrunk
#   # by trailing flags to a tiny model (NullTokenizer: mock data needs a tokenizer too; s=4 divides 64)
#   GPUS_PER_NODE=0 NPROC_PER_NODE=2 MOCK_DATA=1 TRAIN_ITERS=20 CKPT_DIR=/tmp/tst-smoke \
#       EXTRA_ARGS="--distributed-backend gloo" launch/train_local.sh \
#       --tokenizer-type NullTokenizer --vocab-size 257 --num-layers 2 --hidden-size 64 --num-attention-heads 4 \
#       --num-query-groups 2 --ffn-hidden-size 128 --seq-length 64 --max-position-embeddings 64 \
#       --micro-batch-size 2 --global-batch-size 4 --tst-bag-size 4 --lr-warmup-iters 1 --num-workers 0 --eval-iters 0
#
# --save and --load share CKPT_DIR, so re-running the same command resumes. SIGTERM reaches the ranks through
# torchrun, and Megatron-LM saves on it (--exit-signal-handler --exit-signal SIGTERM here) after the current step,
# within torchrun's grace period; there is no requeue here.
set -euo pipefail

LAUNCH_DIR=${LAUNCH_DIR:-$(dirname "${BASH_SOURCE[0]}")}
# shellcheck source=common.sh
source "$LAUNCH_DIR/common.sh"

: "${RECIPE:=270m}"

tst_build_args "$@"
# Per-script additions to the groups go here, e.g.  TRAINING_ARGS+=(--lr-warmup-iters 100)
tst_local_run
