#!/usr/bin/env bash
# The fast-path table (issue 9) on the lent H200, from the repo root there (benchmarks/RESULTS.md):
#   bash benchmarks/gpu_fastpath.sh            # results -> $OUT/{small,lm1b,packing,avsr}.json + logs
#   DDP_S=500 SMALL_S=0 LM1B_S=0 PACK_S=0 AVSR_S=0 bash benchmarks/gpu_fastpath.sh   # DDP scaling -> $OUT/ddp.json
# Needs: .whl/ (../shared/gpu/wheels.sh hydra-core omegaconf ... liger-kernel==0.8.5), .gpu/tokenizer (the
# SmolLM2 tokenizer, save_pretrained) and .gpu/demo_sft_train.jsonl (artifacts/data/demo_sft/train.jsonl).
# Time limits per section (s): SMALL_S / LM1B_S / PACK_S / AVSR_S (0 skips one); rows: SMALL_ROWS=1,2 LM1B_ROWS=fast,adl;
# SMALL_TIMEOUT: seconds per train.py row (default 240; the whole-decoder compile at B=32, T=256 needs more);
# SMALL_PYSPY=1: sample each row's Python stacks with py-spy (in .whl) -> "host_profile" in its row.
# DDP_S (default 0: skipped; needs 2+ GPUs): benchmarks/ddp_scaling.py over DDP_DEVICES (default 1,2, or 1,2,4
# with 4+ GPUs), DDP_TIMEOUT seconds per device count (default 300).
# The whole table needs about 15 minutes of device time (three 10-minute calls at most: one section each).
set -uo pipefail
OUT=${OUT:-/tmp/out}
WHL=${WHL:-.whl}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ -d "$WHL" ]; then  # the lent machine: its image lacks hydra & co. (elsewhere: the project's venv)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # NVLink multicast stays off
nvidia-smi -L
run() {  # section, time limit (s), script and its args
  timeout "$2" $PY "${@:3}" --tokenizer "${TOKENIZER:-.gpu/tokenizer}" --json "$OUT/$1.json" 2>&1 \
    | grep -v -i -E '^[^{].*warn' > "$OUT/$1.log"  # warning lines go, row lines (JSON) stay whatever they quote
  grep '^{' "$OUT/$1.log" | $PY -c 'import json,sys
for l in sys.stdin:
    r=json.loads(l); b=r.get("busy") or {}
    print({k: (round(v,3) if isinstance(v,float) else v[-400:] if k=="error" else v) for k,v in r.items() if k in ("row","path","data","devices","world_size","tokens_per_s_total","speedup","efficiency","target","meets_target","steps_per_s_median","steps_per_s_mean","cudagraphs_recorded_while_timed","tokens_per_s","real_tokens_per_s","peak_mem_gib","first_loss","clips_per_s","seconds","true_length","kernels","error")} | ({"busy": round(b["gpu_busy_fraction"],3), "kernels_per_step": b.get("kernels_per_step")} if b else {}) | ({"stalls": g["stalls"], "stall_ms": round(g["stall_ms_total"])} if (g := r.get("gaps")) else {}))'
}
FP=benchmarks/fast_path.py
[ "${SMALL_S:-300}" -gt 0 ] && run small "${SMALL_S:-300}" $FP small ${SMALL_ROWS:+--rows $SMALL_ROWS} ${SMALL_TIMEOUT:+--timeout $SMALL_TIMEOUT} ${SMALL_PYSPY:+--py-spy}
[ "${LM1B_S:-400}" -gt 0 ] && run lm1b "${LM1B_S:-400}" $FP lm1b ${LM1B_ROWS:+--rows $LM1B_ROWS}
[ "${PACK_S:-200}" -gt 0 ] && run packing "${PACK_S:-200}" $FP packing --sft-file "${SFT_FILE:-.gpu/demo_sft_train.jsonl}"
[ "${AVSR_S:-300}" -gt 0 ] && run avsr "${AVSR_S:-300}" $FP avsr ${AVSR_ROWS:+--rows $AVSR_ROWS}
if [ "${DDP_S:-0}" -gt 0 ]; then
  [ "$(nvidia-smi -L | wc -l)" -ge 4 ] && DEVICES=1,2,4 || DEVICES=1,2
  run ddp "$DDP_S" benchmarks/ddp_scaling.py --devices "${DDP_DEVICES:-$DEVICES}" ${DDP_TIMEOUT:+--timeout $DDP_TIMEOUT}
  grep '^DDP SCALING' "$OUT/ddp.log"
fi
