#!/usr/bin/env bash
# The main job: set up .venv, then train fp32 ResNet-18 (fast preset), quantize it every way
# (ptq-d, ptq-s, qat), export, benchmark and write runs/replicate/report.md.
# Arguments go to `quantbench replicate` (see `.venv/bin/quantbench replicate --help`), e.g.
#   ./replicate.sh --checkpoint ../shared/checkpoints/resnet18-cifar10-fp32.pth   # skip training
#   ./replicate.sh --flows eager,fx,pt2e                                           # every flow
# Without --data-dir, the offline CIFAR-10 copy in ../shared/data is unpacked into data/ and used
# if present; otherwise torchvision downloads CIFAR-10 into data/.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh runtimes,edge
args=("$@")
if [[ " $* " != *" --data-dir "* && " $* " != *" --data-root "* ]]; then
  archive=../shared/data/cifar10-jpeg.tar.gz
  if [ -f "$archive" ]; then
    [ -d data/cifar10/test ] || { mkdir -p data && tar -xzf "$archive" -C data; }
    args=(--data-dir data/cifar10 "${args[@]}")
  fi
fi
exec .venv/bin/quantbench replicate "${args[@]}"
