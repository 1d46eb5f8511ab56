#!/usr/bin/env bash
# Set up .venv (with the test and optional-runtime extras) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh test,runtimes
exec .venv/bin/python -m pytest "$@"
