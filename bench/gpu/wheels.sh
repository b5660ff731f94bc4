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
for d in /.whl/ /.data/; do grep -qx "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
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
[ -f .data/ml-100k-loo/manifest.json ] || "$PY" -m lmrec.cli.main data prepare ml-100k .data/ml-100k-loo
