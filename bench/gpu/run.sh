#!/usr/bin/env bash
# The GPU suite and benchmarks on one GPU, then one table (each row next to its reference measured in the same
# run). At most ~9 minutes on one H100/H200 including set-up. Usage, from the repository root:
#   bash bench/gpu/run.sh                 # with the torch/transformers of the current python3
#   OUT=/some/dir bash bench/gpu/run.sh   # where the logs and JSON rows go (default bench/gpu/out)
#   then: python docs/results.py add bench/gpu/out/gpu.json --name gpu   # the table on the results page
# Python packages missing on a machine without network can be given as wheels in .whl/ (installed to /tmp/site):
# bash bench/gpu/wheels.sh, on a machine with network, downloads them.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
OUT=${OUT:-bench/gpu/out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export LMREC_REPORT=0 LMREC_COMMIT=${LMREC_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
{
  date -u +"%Y-%m-%d %H:%M UTC"
  echo "commit $LMREC_COMMIT"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, transformers, accelerate; print('torch', torch.__version__, '| transformers', transformers.__version__, '| accelerate', accelerate.__version__)"
} | tee "$OUT/env.txt"
t0=$SECONDS
timeout ${GPU_TESTS_S:-150} "$PY" -m pytest tests/gpu -q -p no:cacheprovider -o addopts="" 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
echo "[gpu tests: $((SECONDS - t0)) s]"
t0=$SECONDS
timeout ${GEN_S:-200} "$PY" bench/gpu/bench_gen.py --json "$OUT/gen.json" 2>&1 | grep -v Warning | tee "$OUT/gen.log"
echo "[bench_gen: $((SECONDS - t0)) s]"
t0=$SECONDS
timeout ${LONGFORMER_S:-90} "$PY" bench/gpu/bench_longformer.py --json "$OUT/longformer.json" 2>&1 | grep -v Warning | tee "$OUT/longformer.log"
echo "[bench_longformer: $((SECONDS - t0)) s]"
t0=$SECONDS
timeout ${INFER_S:-70} "$PY" bench/gpu/bench_infer.py --json "$OUT/infer.json" 2>&1 | grep -v Warning | tee "$OUT/infer.log"
echo "[bench_infer: $((SECONDS - t0)) s]"
"$PY" bench/gpu/table.py "$OUT" --record "$OUT/gpu.json" | tee "$OUT/table.md"
