#!/usr/bin/env bash
# Paired baseline / TST miniature on one GPU: a ~125M-parameter Llama-style model (12 layers, hidden 768,
# GQA 12/4, SwiGLU ffn 3072, RoPE, RMSNorm, untied; the demo tokenizer's 8192 ids), bf16, the same steps and
# the same positions per step (512 x 8) in both runs, the same data stream (contiguous windows; the baseline
# has --tst-superposition-ratio 0), s=4, r=0.3. tools/replicate.py does the runs and the comparison.
#
#   tools/gpu_miniature.sh                      # the GPU miniature (one H200: a few minutes, < 10 in all)
#   SIZE=tiny tools/gpu_miniature.sh            # a tiny CPU version (2 gloo processes) that tests the script
#   LAYOUT=segments OUT=runs/gpu-seg tools/gpu_miniature.sh [more replicate.py flags]
#
# Needs megatron-core importable (see README "GPU") and the demo data in data/demo (tools/build_demo_data.py;
# carry it to a machine without network). 200 steps keep the TST run (1.9x the baseline's raw tokens) inside one
# epoch of the 1.82M-token train split, so both runs read the same stream without repeats.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-runs/gpu-miniature}
LAYOUT=${LAYOUT:-contiguous}
if [ "${SIZE:-125m}" = tiny ]; then
    SHAPE=(--layers 2 --hidden 64 --heads 4 --kv-groups 2 --ffn-hidden-size 128 --seq-length 30
           --global-batch 4 --micro-batch 2 --steps 6 --eval-interval 3 --eval-iters 1 --nproc 2)
else
    SHAPE=(--layers 12 --hidden 768 --heads 12 --kv-groups 4 --ffn-hidden-size 3072 --seq-length 512
           --global-batch 8 --micro-batch 8 --steps 200 --eval-interval 20 --eval-iters 10 --nproc 1
           --lr 1e-3 --trainer-flag=--bf16)
fi
exec "$PYTHON" tools/replicate.py --out "$OUT" --sample-layout "$LAYOUT" --bag-size 4 --ratio 0.3 "${SHAPE[@]}" "$@"
