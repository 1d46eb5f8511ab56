#!/usr/bin/env bash
# Create .venv at the repository root (once) and install quantbench into it with the given
# extras. Re-running is cheap: it reinstalls only when pyproject.toml or the extras change.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($py --version)" >&2
  "$py" -m venv .venv
fi
stamp=".venv/.quantbench-installed-$( (cat pyproject.toml; echo "$extras") | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing quantbench${extras:+[$extras]} into .venv (torch takes a minute or two)" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
  rm -f .venv/.quantbench-installed-*
  touch "$stamp"
fi
