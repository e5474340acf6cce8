# Sourced first by benchmarks/gpu_session.sh and benchmarks/fsdp_check.sh, from the repo root on the lent
# GPU machine: strict mode, $OUT (default /tmp/out), the wheels of .whl/ (../shared/gpu/wheels.sh) installed
# into /tmp/site on PYTHONPATH (the calling script exits 1 when that fails), quiet offline run settings,
# and the GPUs listed.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
nvidia-smi -L
