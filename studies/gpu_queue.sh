#!/usr/bin/env bash
# This session's GPU queue on a 4-GPU machine (docs/results.md), in back-to-back device calls that stage
# the real weights part by part (each call carries what its phase names; see studies/gpu_env.sh):
#   phase 1  carry .whl .gpu .debs .stage/whisper/part01   -> fast-path benchmark (GPU 3), ASR corpus build
#   phase 2  carry .stage/smollm2/part00                    -> (staging)
#   phase 3  carry .stage/smollm2/part01                    -> SmolLM2 installed: study 1 (GPU 0), study 5 (GPU 1)
#   phase 4  carry .stage/whisper/part00                    -> Whisper installed: study 2 (GPUs 1,2), FSDP check (GPUs 2,3)
#   phase 5  (nothing)                                      -> wait up to WAIT_S, then pack results into $OUT
# Long jobs start with setsid, so they outlive the call that started them while the machine stays held.
# Carry .gpu in EVERY phase: a carried path left out of a later call is removed there (seen 2026-11-28), so
# phase 1 also copies it to /tmp/unsink/gpu and the jobs read it from there. A 4-GPU machine drew device
# budget about 2.3x faster than wall time: prefer one GPU with UNSINK_ARMS_PER_GPU=4 (docs/results.md).
set -uo pipefail
phase=$1
S=/tmp/unsink
mkdir -p $S/logs
source studies/gpu_env.sh
start() {  # name, command...: a detached job with its own log and exit-code file
  local name=$1; shift
  setsid nohup bash -c "$* ; echo \$? > $S/logs/$name.rc" > "$S/logs/$name.log" 2>&1 < /dev/null &
  echo "[queue] started $name"
}
mkdir -p $S/gpu && cp -r .gpu/. $S/gpu/ 2>/dev/null
export TOKENIZER=$S/gpu/tokenizer SFT_FILE=$S/gpu/demo_sft_train.jsonl
case $phase in
1)
  nvidia-smi -L
  start bench_small "CUDA_VISIBLE_DEVICES=3 SMALL_S=420 LM1B_S=0 PACK_S=0 OUT=$S/bench bash benchmarks/gpu_fastpath.sh; \
    CUDA_VISIBLE_DEVICES=3 SMALL_S=0 LM1B_S=0 PACK_S=200 OUT=$S/bench_pack bash benchmarks/gpu_fastpath.sh"
  cat > $S/asr_corpus.py <<'PY'
import sys
sys.path.insert(0, ".")
import studies.asr_downsampling as study
from data.avsr.asr_corpus import ensure_asr_corpus
args = study.parse_args([])
ensure_asr_corpus(study.corpus_root(args), workers=12, **study.corpus_params(args))
PY
  start asr_corpus "python3 $S/asr_corpus.py"
  ;;
2)
  mkdir -p artifacts/data && tar xzf $S/gpu/pd_text.tgz -C artifacts/data && ls artifacts/data/pd_text
  ;;
3)
  start study1 "CUDA_VISIBLE_DEVICES=0 UNSINK_ARMS_PER_GPU=4 python3 studies/decorr_text.py --out $S/decorr_text"
  start study5 "CUDA_VISIBLE_DEVICES=1 UNSINK_ARMS_PER_GPU=2 python3 studies/adl_robustness.py --out $S/adl_robustness"
  ;;
4)
  start study2 "CUDA_VISIBLE_DEVICES=1,2 python3 studies/asr_downsampling.py --out $S/asr_downsampling --seeds 0 --arms-per-gpu 2"
  start fsdp "CUDA_VISIBLE_DEVICES=2,3 OUT=$S/fsdp bash benchmarks/fsdp_check.sh"
  ;;
5)
  deadline=$((SECONDS + ${WAIT_S:-500}))
  while [ $SECONDS -lt $deadline ]; do
    running=$(for f in $S/logs/*.log; do n=$(basename $f .log); [ -f $S/logs/$n.rc ] || echo $n; done)
    [ -z "$running" ] && break
    sleep 10
  done
  echo "[queue] still running: ${running:-none}"
  for f in $S/logs/*.rc; do echo "[queue] $(basename $f .rc) exit $(cat $f)"; done
  nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv
  cd $S && tar czf $OUT/results.tgz --exclude='*.ckpt' --exclude='adapter' --exclude='*.safetensors' \
    --exclude='corpus' --exclude='wandb' logs bench bench_pack fsdp decorr_text adl_robustness asr_downsampling 2>/dev/null
  ls -la $OUT
  ;;
esac
for f in $S/logs/*.log; do echo "---- $(basename $f) (tail)"; tail -n 4 "$f"; done
