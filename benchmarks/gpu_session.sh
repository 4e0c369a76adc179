#!/bin/bash
# On the device machine (it reaches no package registry): install the wheels carried in
# .whl/ (made here by `bash benchmarks/gpu_wheels.sh`) into /tmp/site, make the checkout
# importable as installed (kernels/ is the package prada_kernels), then run the stages.
#   bash benchmarks/gpu_session.sh env correct      # see python -m benchmarks.tools.gpu_session --help
#   bash benchmarks/gpu_session.sh peers --deadline-s 200   # the second command (benchmarks/NOTES.md)
# PYTHON=... picks the interpreter (default python3, the one holding PyTorch there).
# A rehearsal on another machine (tests/test_bench_tools.py --gpu-rehearsal): GPU_SESSION_SITE=DIR
# instead of /tmp/site, GPU_SESSION_NO_WHEELS=1 to keep that machine's packages (the wheels are
# for the GPU machine's Python 3.12).
set -uo pipefail
export GPU_SESSION_T0=${GPU_SESSION_T0:-$(date +%s)}  # the stages' deadline counts from here
cd "$(dirname "$0")/.."
site=${GPU_SESSION_SITE:-/tmp/site}
mkdir -p "$site"
if [ -n "${GPU_SESSION_NO_WHEELS:-}" ]; then
  echo "GPU_SESSION_NO_WHEELS: .whl/ not installed, this machine's packages in use" >&2
elif compgen -G ".whl/*.whl" >/dev/null; then
  # the same wheels already there (an earlier call on this still-warm machine): not again
  stamp="$site/.wheels-$(cat .whl/*.whl | md5sum | cut -c1-16)"
  if [ -f "$stamp" ]; then
    echo "wheels already installed in $site" >&2
  else
    "${PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" .whl/*.whl 2>&1 | tail -3 && touch "$stamp"
    echo "wheels installed: $(( $(date +%s) - GPU_SESSION_T0 )) s after the start" >&2
  fi
else
  echo "no .whl/: deepspeed, liger-kernel, trl, cut-cross-entropy and pytest-benchmark may be missing" >&2
fi
ln -sfn "$PWD/kernels" "$site/prada_kernels"  # what `pip install -e .` maps; no install needed
export PYTHONPATH=$PWD:$site
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
"${PYTHON:-python3}" -c "import prada_kernels.fused_linear_distill, prada_fast" || { echo "cannot import the project" >&2; exit 2; }
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader 2>/dev/null
exec "${PYTHON:-python3}" -m benchmarks.tools.gpu_session "$@"
