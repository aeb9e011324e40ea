#!/usr/bin/env bash
# Set up .venv for megatron-tst on a CPU machine: the CPU build of torch 2.13.0 first (so that no install
# ever resolves torch to a multi-GB CUDA build), then the package with megatron-core pinned (constraints.txt).
# GPU machines: use your CUDA torch / NGC container and `pip install -e ".[gpu]"` instead.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
"${pip[@]}" torch==2.13.0
"${pip[@]}" -c constraints.txt -e ".[test,text,logging,plots,yaml]"
if .venv/bin/python -c 'import torch, sys; sys.exit(torch.version.cuda is None)'; then
  echo "warning: a CUDA build of torch is installed in .venv" >&2
fi
echo "megatron-tst installed in .venv ($(.venv/bin/python -c 'import torch, megatron.core as m; print("torch", torch.__version__, "megatron-core", m.__version__)'))"
