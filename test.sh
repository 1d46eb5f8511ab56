#!/usr/bin/env bash
# Set up .venv (with the test, comparison-runtime, ExecuTorch, Optuna search and timm extras) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh test,runtimes,edge,search,timm
exec .venv/bin/python -m pytest "$@"
