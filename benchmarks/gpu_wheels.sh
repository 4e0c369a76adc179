#!/bin/bash
# Fills .whl/ with what the device machine lacks: the shared set (deepspeed, datasets,
# liger-kernel, pytest-benchmark and their pure-Python dependencies), plus Apple's Cut
# Cross-Entropy, a peer in the benchmarks. Carry .whl with the call (run's `carry`).
#   bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
mkdir -p "$(git rev-parse --git-dir)/info"  # the shared script appends /.whl/ to its exclude file
bash ../shared/tools/device-wheels.sh
ls .whl/cut_cross_entropy-*.whl >/dev/null 2>&1 || \
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform any -d .whl cut-cross-entropy
du -sh .whl && ls .whl
