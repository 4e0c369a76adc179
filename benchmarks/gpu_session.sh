#!/bin/bash
# On the device machine (it reaches no package registry): install the wheels carried in
# .whl/ (made here by `bash benchmarks/gpu_wheels.sh`) into /tmp/site, then run the stages.
#   bash benchmarks/gpu_session.sh env correct      # see python -m benchmarks.gpu_session --help
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl 2>&1 | tail -3
  export PYTHONPATH=$PWD:/tmp/site
else
  echo "no .whl/: deepspeed, liger-kernel, cut-cross-entropy and pytest-benchmark may be missing" >&2
  export PYTHONPATH=$PWD
fi
export TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader 2>/dev/null
exec python3 -m benchmarks.gpu_session "$@"
