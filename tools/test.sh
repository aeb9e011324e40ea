#!/usr/bin/env bash
# The test suite on every tested megatron-core: 0.17.1 (.venv-mcore017) then 0.19.2 (.venv).
# Installs a missing venv first (tools/install.sh). Arguments go to pytest (e.g. -k, -m unit, a test file).
#   tools/test.sh                 both versions
#   MCORE=0.17.1 tools/test.sh    one version
#   tools/test.sh --shuffled      the unit and parallel tests once more in a random order (pytest-randomly), on
#                                 megatron-core 0.19.2 only; prints the seed; RANDOMLY_SEED=N replays an order
# Tests that cross versions (a checkpoint written on one version resumed on the other) find the other venv's python
# through MEGATRON_TST_PYTHON_0_17 / MEGATRON_TST_PYTHON_0_19.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
versions=${MCORE:-0.17.1 0.19.2}
shuffle=()
if [[ ${1:-} == --shuffled ]]; then
  shift
  seed=${RANDOMLY_SEED:-$(( (RANDOM << 15) | RANDOM ))}
  versions=0.19.2
  shuffle=(-p randomly "--randomly-seed=$seed" -m "unit or parallel")
  echo "shuffled order: --randomly-seed=$seed (replay: RANDOMLY_SEED=$seed tools/test.sh --shuffled)"
fi
for v in 0.17.1 0.19.2; do
  venv=$(tools/install.sh --venv-of "$v") || exit 2
  [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import megatron.training, megatron_tst, pytest_randomly, ruff, transformers' 2>/dev/null \
    || tools/install.sh --mcore "$v" || exit 2
done
MEGATRON_TST_PYTHON_0_17="$PWD/$(tools/install.sh --venv-of 0.17.1)/bin/python"
MEGATRON_TST_PYTHON_0_19="$PWD/$(tools/install.sh --venv-of 0.19.2)/bin/python"
export MEGATRON_TST_PYTHON_0_17 MEGATRON_TST_PYTHON_0_19
status=0
for v in $versions; do
  venv=$(tools/install.sh --venv-of "$v") || exit 2
  echo "=== megatron-core $v: $venv/bin/python -m pytest -q ${shuffle[*]} $* ==="
  "$venv/bin/python" -m pytest -q "${shuffle[@]}" "$@" || status=1
done
exit $status
