#!/usr/bin/env bash
# Set up a virtual environment for megatron-tst on a CPU machine (Python 3.11 here; 3.12 in NGC containers).
#   tools/install.sh                 .venv          megatron-core 0.19.2 (the newest supported; the demo's)
#   tools/install.sh --mcore 0.17.1  .venv-mcore017 megatron-core 0.17.1 (the oldest supported)
#   tools/install.sh --venv-of V     print the venv directory of megatron-core V, install nothing
# The CPU build of torch 2.13.0 goes in first (so that no install ever resolves torch to a multi-GB CUDA build).
# megatron-core 0.17-0.19 declare Python >= 3.12 but ship cp311 wheels that work with the CPU torch, their
# `megatron.training` (Megatron-LM's loop) included: installed with --no-deps --ignore-requires-python, then their
# pure-Python requirements (packaging, numpy) and triton (imported by some of their modules). transformers is
# Megatron's tokenizers' backend (HuggingFaceTokenizer, GPT2BPETokenizer); it does not touch torch.
# GPU machines: use your NGC container (megatron-core and Transformer Engine installed) and `pip install -e .`.
set -euo pipefail
cd "$(dirname "$0")/.."
mcore=0.19.2
case "${1:-}" in
  --mcore) mcore=${2:?--mcore needs a version: 0.17.1 or 0.19.2} ;;
  --venv-of) mcore=${2:?--venv-of needs a version}; print_only=1 ;;
  "") ;;
  *) echo "usage: tools/install.sh [--mcore 0.17.1|0.19.2] [--venv-of VERSION]" >&2; exit 2 ;;
esac
case "$mcore" in
  0.19.2) venv=.venv ;;
  0.17.1) venv=.venv-mcore017 ;;
  *) echo "tools/install.sh: megatron-core $mcore is not one of the tested versions (0.17.1, 0.19.2)" >&2; exit 2 ;;
esac
if [[ -n "${print_only:-}" ]]; then echo "$venv"; exit 0; fi

python=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
# The CPU build of torch 2.13.0, first: from the local wheels when pip's --find-links has it (this machine and
# CI), else from PyTorch's CPU index (plain PyPI's Linux torch is the CUDA build, several GB); then its
# dependencies, which the installed torch 2.13.0+cpu already satisfies as a requirement.
# (No `pip list | grep -q` here: under pipefail grep's early exit breaks pip's pipe and the check fails at random.)
has_cpu_torch() {
  [[ $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null) == 2.13.0+cpu ]]
}
if ! has_cpu_torch; then
  "${pip[@]}" --no-deps --no-index torch==2.13.0 2>/dev/null || true
  if ! has_cpu_torch; then
    "${pip[@]}" --no-deps --force-reinstall --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
  fi
fi
"${pip[@]}" torch==2.13.0 triton
"${pip[@]}" --no-deps --ignore-requires-python "megatron-core==$mcore"
# megatron-tst itself (its requirement megatron-core is met above), then Megatron's pure-Python requirements and
# our extras by name (lm-eval: downstream evaluation, tools/evaluate.py) (constraints.txt keeps torch at the CPU build); typing_extensions stands in for Python
# 3.12's typing.override (megatron_tst/platform/megatron_lm.py).
"${pip[@]}" --no-deps -e .
"${pip[@]}" -c constraints.txt "packaging>=24.2" numpy psutil typing_extensions transformers tokenizers \
    sentencepiece tensorboard matplotlib pyyaml pytest pytest-randomly ruff lm-eval==0.4.13
if "$venv/bin/python" -c 'import torch, sys; sys.exit(torch.version.cuda is None)'; then
  echo "warning: a CUDA build of torch is installed in $venv" >&2
fi
echo "megatron-tst installed in $venv ($("$venv/bin/python" -c 'import megatron_tst, torch, megatron.core as m; print("torch", torch.__version__, "megatron-core", m.__version__)' 2>/dev/null))"
