#!/usr/bin/env bash
# RecFormer, the hybrid and SASRec on MovieLens-100k (leave-one-out) with a GPU budget for RecFormer
# (bench/gpu/recformer-gpu.yaml; the hybrid takes the same seed's RecFormer table, SASRec keeps RecBole's
# defaults), through `lmrec compare`, on one GPU. A finished model × seed is read back, not trained again,
# so seeds can be added over several calls on one machine:
#   bash bench/gpu/wheels.sh                 # on a machine with network: .whl/ and .data/ml-100k-loo
#   SEEDS=0 bash bench/gpu/compare.sh        # carry .whl and .data; then SEEDS=0,1,2 to add seeds
#   python docs/results.py add bench/gpu/out/compare/compare.json --name compare-gpu
# MODELS, SEEDS, DATA and OUT change what it runs; COMPARE_S (default 540) bounds its time.
# RecFormer on the pretrained all-MiniLM-L6-v2 converted to long (wheels.sh writes it, in float16: 51 MB) in
# place of the random-init backbone, into OUT/compare-minilm with bench/gpu/recformer-minilm-gpu.yaml — carry
# .data and .whl-slim (the wheels these models need; with the MiniLM, all of .whl exceeds the 64 MiB carry
# limit):
#   WHEELS=.whl-slim BACKBONE=.data/minilm-long SEEDS=0 bash bench/gpu/compare.sh
#   python docs/results.py add bench/gpu/out/compare-minilm/compare.json --name compare-gpu-minilm
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
OUT=${OUT:-bench/gpu/out}
DATA=${DATA:-.data/ml-100k-loo}
mkdir -p "$OUT"
WHEELS=${WHEELS:-.whl}
SITE=/tmp/site-$(basename "$WHEELS")  # one per wheel set: a later call with another set installs it
if compgen -G "$WHEELS/*.whl" >/dev/null && [ ! -f "$SITE/.complete" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl &&
    touch "$SITE/.complete"
fi
[ -f "$SITE/.complete" ] && export PYTHONPATH=$SITE
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export LMREC_REPORT=0 LMREC_COMMIT=${LMREC_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
if [ ! -f "$DATA/manifest.json" ]; then
  echo "no prepared dataset at $DATA: run bash bench/gpu/wheels.sh on a machine with network and carry .data" >&2
  exit 2
fi
MODELS=${MODELS:-recformer,hybrid,sasrec}
DIR=$OUT/compare YAML=bench/gpu/recformer-gpu.yaml
if [ -n "${BACKBONE:-}" ]; then
  if [ ! -f "$BACKBONE/config.json" ]; then
    echo "no backbone at $BACKBONE: bash bench/gpu/wheels.sh writes .data/minilm-long; carry .data" >&2
    exit 2
  fi
  if [[ ",$MODELS," != *",recformer,"* ]]; then
    echo "BACKBONE=$BACKBONE is RecFormer's backbone, and MODELS=$MODELS has no recformer" >&2
    exit 2
  fi
  DIR=$OUT/compare-minilm YAML=bench/gpu/recformer-minilm-gpu.yaml
fi
PRESET=(--seeds "${SEEDS:-0,1,2}")  # never empty: "${PRESET[@]}" under set -u needs bash ≥ 4.4 otherwise
[[ ",$MODELS," == *",recformer,"* ]] && PRESET+=(--preset "recformer:$YAML")
[ -n "${BACKBONE:-}" ] && PRESET+=(--set "recformer:model.backbone=$BACKBONE")
t0=$SECONDS
timeout -k 30 "${COMPARE_S:-540}" "$PY" -m lmrec.cli.main compare --data "$DATA" --models "$MODELS" \
  --output-dir "$DIR" "${PRESET[@]}" "$@" 2>&1 |
  tee -a "$DIR.log" | grep --line-buffered -v "batch/s\|Warning"
rc=${PIPESTATUS[0]}
echo "[compare: $((SECONDS - t0)) s, exit $rc]"
exit "$rc"
