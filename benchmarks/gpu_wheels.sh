#!/bin/bash
# Fills .whl/ with what a GPU machine without a package index lacks (its Python 3.12 has
# torch, triton, transformers, numpy and pytest, not these): deepspeed, datasets,
# liger-kernel, pytest-benchmark and their pure-Python dependencies, plus Apple's Cut
# Cross-Entropy, a peer in the benchmarks, and TRL with accelerate (benchmarks/peers.py's peer
# trainer). Versions: those installed here where they are.
# Carry .whl/ with the checkout and install it there with
#   pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl   (benchmarks/gpu_session.sh does)
#   bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
mkdir -p .whl
pin() {  # NAME -> NAME==VERSION installed here, or NAME
  python3 -c "import importlib.metadata as m, sys
try: print(f'{sys.argv[1]}=={m.version(sys.argv[1])}')
except m.PackageNotFoundError: print(sys.argv[1])" "$1"
}
plat=(--only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform any)
pkgs=()
for p in hjson pydantic pydantic-core annotated-types typing-inspection liger-kernel datasets dill \
         multiprocess pytest-benchmark py-cpuinfo cut-cross-entropy trl accelerate; do
  pkgs+=("$(pin "$p")")
done
python3 -m pip download -q --no-deps "${plat[@]}" -d .whl "${pkgs[@]}"
# DeepSpeed ships only a source archive: a pure-Python wheel (its ops compile at run time).
ls .whl/deepspeed-*.whl >/dev/null 2>&1 || \
  DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps "$(pin deepspeed)" -w .whl
du -sh .whl && ls .whl
