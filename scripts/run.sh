#!/usr/bin/env bash
# One entry point for set-up and the two main jobs:
#   bash scripts/run.sh demo    # create .venv if needed, then train the CPU demo
#   bash scripts/run.sh test    # create .venv if needed, then run the test suite
#   bash scripts/run.sh docs    # add the docs extra to .venv, then build the site strictly into site/
# Anything after the job name is passed on (to `geobp demo`, to pytest, or to `mkdocs build`).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GEOBP_VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.geobp-installed"

setup() {
  if [[ -f "$STAMP" && "$STAMP" -nt pyproject.toml && "$STAMP" -nt scripts/constraints.txt ]]; then
    return
  fi
  echo ">> creating $VENV and installing geobp (first run takes a few minutes)" >&2
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch/torchvision first: pinned to the builds available on these machines
  "$VENV/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1
  # the rest with tested versions pinned (pyproject keeps broad ranges for users)
  "$VENV/bin/python" -m pip install -q -c scripts/constraints.txt -e '.[test]'
  touch "$STAMP"
}

# the documentation tools (the `docs` extra, pinned like the rest), once per change of the pins
setup_docs() {
  setup
  local stamp="$VENV/.geobp-docs-installed"
  if [[ -f "$stamp" && "$stamp" -nt pyproject.toml && "$stamp" -nt scripts/constraints.txt ]]; then
    return
  fi
  echo ">> installing the docs extra into $VENV" >&2
  "$VENV/bin/python" -m pip install -q -c scripts/constraints.txt -e '.[docs]'
  touch "$stamp"
}

job=${1:-}
shift || true
case "$job" in
  demo) setup; exec "$VENV/bin/geobp" demo "$@" ;;
  test) setup; exec "$VENV/bin/python" -m pytest "$@" ;;
  # --strict: a broken link or anchor, or a reference to a class that no longer exists, fails
  docs) setup_docs; exec "$VENV/bin/mkdocs" build --strict -d site "$@" ;;
  setup) setup ;;
  *) echo "usage: bash scripts/run.sh {demo|test|docs|setup} [args...]" >&2; exit 2 ;;
esac
