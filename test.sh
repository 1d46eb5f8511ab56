#!/usr/bin/env bash
# Set up .venv (with the test, comparison-runtime and ExecuTorch extras) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh test,runtimes,edge
exec .venv/bin/python -m pytest "$@"
