#!/usr/bin/env bash
# Set-up and entry points for a fresh machine. Usage:
#   bash run.sh quickstart   # creates .venv, installs lmrec, runs `lmrec quickstart` on MovieLens-100k
#   bash run.sh test         # creates .venv, installs lmrec with test extras, runs the whole test suite
set -euo pipefail
cd "$(dirname "$0")"
VENV=${LMREC_VENV:-.venv}
PY=${PYTHON:-python3}

install() {
  if [ ! -x "$VENV/bin/python" ]; then "$PY" -m venv "$VENV"; fi
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # A CPU build of torch, pinned; GPU users install their own torch build first (see README).
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  fi
  "$VENV/bin/python" -m pip install -q -e ".[dev]"
}

case "${1:-}" in
  quickstart) shift; install; "$VENV/bin/lmrec" quickstart "$@" ;;
  test) shift; install; "$VENV/bin/python" -m pytest -q "$@" ;;
  *) echo "usage: bash run.sh quickstart|test [args]" >&2; exit 2 ;;
esac
