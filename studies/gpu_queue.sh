#!/usr/bin/env bash
# The GPU queue on ONE lent H200 (docs/results.md), in back-to-back device calls that stage the real
# SmolLM2 weights part by part (each call carries what its phase names; see studies/gpu_env.sh):
#   phase 1  carry .whl .gpu .stage/smollm2/part00  -> fast-path benchmark, SmolLM2 shape (foreground;
#            default rows 7,8,6: the whole decoder as one CUDA graph at B=32, T=256 (8: scheduled GC) and B=8, each step over
#            1 s dumping its Python stacks, py-spy sampling the host side (SMALL_PYSPY= turns it off);
#            SMALL_ROWS=0,3 for the plain rows they compare with)
#   phase 2  carry .stage/smollm2/part01 + ONE .gpu2 file -> SmolLM2 installed, that file unpacked (a second call with
#            the other file starts more studies); studies start detached, then wait like phase 3
#   phase 3  (nothing)                               -> wait up to WAIT_S, then pack results into $OUT
#   phase stage  carry .stage/whisper/part00 .debs, then .stage/whisper/part01 (two calls: Whisper tiny.en and
#            flite for study 2, beside the SmolLM2 phases; each call only stages, in seconds)
#   phase corpus carry .whl .debs -> study 2's corpus builds detached on every core (minutes) while later calls
#            stage; phase 2's study 2 jobs wait for it. Results over 15 MB come back as results.tgz.partNN (cat).
# .gpu: tokenizer/ + demo_sft_train.jsonl (benchmarks); .gpu2 (carry its files one by one: with the repository
# and part01 the whole folder is over 64 MiB; phase 2 unpacks whichever came): pd_text.tgz (artifacts/data/pd_text) and
# meap_data.tgz (`studies/meap_passkey.py --prepare-only`'s data/ folder: its haystacks need Debian text).
# Build them here (they are git-ignored):
#   mkdir -p .gpu2 && tar czf .gpu2/pd_text.tgz -C artifacts/data pd_text      # after one data=pd_text run
#   python studies/meap_passkey.py --out /tmp/meap --prepare-only && tar czf .gpu2/meap_data.tgz -C /tmp/meap data
# STUDIES="2v": five x4 baselines of study 2 side by side for 1,000 steps (audio time masking on/off x the
# corpus's own 16,000 clips / 48,000 with gcide sentences for training; and the projector alone, LoRA frozen),
# each in $S/asr_x4_<variant>.
# STUDIES picks what phase 2 starts (default "3 5b", the queue's next items): 1 decorr_text, 5 adl_robustness
# (sharing study 1's baseline arm), 5b adl_robustness at lower weights with its own baseline, 4 leaf_vs_kd,
# 4b leaf_vs_kd with confounding distractors and stage 1 on the KD student, demo (`make demo`'s command, into
# $S/demo_gpu), 3 meap_passkey (MEAP_ARGS adds
# arguments, e.g. "--seeds 0,1"), 2 asr_downsampling (at the study's val-tuned defaults, 1,000 steps, seeds
# ASR_SEEDS (0), one loss arm per weight in ASR_WEIGHTS ("1 10"), into $S/${ASR_DIR:-asr_gcide}; needs the `stage`
# calls, and `corpus` first saves minutes; ASR_ARGS replaces its arguments), 2s (the same with the loss on sink
# tokens only, from step 400, seeds SINKS_SEEDS (0), weights SINKS_WEIGHTS (10), into $S/asr_gcide_sinks_late,
# baseline arms reused from the archive SINKS_REUSE where the command matches),
# 2L (the x4 baseline alone for 4,000 steps, into $S/asr_gcide_long), 2u (the x4 baseline with Whisper unfrozen at
# 1/20 of the learning rate, into $S/asr_gcide_unfrozen); CHAIN=1 runs
# them one after another in one job (memory-heavy studies: 3 and 4 side by side ran out of memory). Every call ends by packing what exists, so a machine
# taken back mid-run still returns each arm's CSV log and sink measurements of the calls before.
# Long jobs start with setsid, so they outlive the call that started them while the machine stays held
# (it goes back 30 s after a call ends: send the next call at once). Lesson of 2026-11-28: a 4-GPU
# machine drew device time 2.3x faster than wall time; one GPU runs several launch-bound arms at once.
set -uo pipefail
phase=$1
S=/tmp/unsink
OUT=${OUT:-/tmp/out}
mkdir -p $S/logs "$OUT"
source studies/gpu_env.sh
start() {  # name, command...: a detached job with its own log and exit-code file
  local name=$1; shift
  rm -f "$S/logs/$name.rc"  # a finished earlier run of the same job must not end wait_jobs at once
  setsid nohup bash -c "$* ; echo \$? > $S/logs/$name.rc" > "$S/logs/$name.log" 2>&1 < /dev/null &
  echo "[queue] started $name"
}
collect() {  # every arm's logs, sinks and reports so far -> $OUT/results.tgz
  for f in $S/logs/*.log; do [ -f "$f" ] && { echo "---- $(basename $f) (tail)"; tail -n 5 "$f"; }; done
  nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader
  # weights stay on the machine (*.pt: an AVSR arm's projector file is 5 MB, five of them put the archive
  # over the 16 MiB a returned file may be); an archive still over 15 MB comes back in parts (cat to join)
  (cd $S && tar czf "$OUT/results.tgz" --exclude='*.ckpt' --exclude='adapter' --exclude='*.safetensors' \
    --exclude='*.pt' --exclude='data' --exclude='wandb' --exclude='merged' --exclude='student_model' \
    logs $(ls -d decorr_text adl_robustness adl_robustness_low leaf_vs_kd leaf_vs_kd_b meap_passkey asr_downsampling* asr_x4_* \
      asr_gcide* demo* \
      2>/dev/null))
  if [ "$(stat -c %s "$OUT/results.tgz")" -gt 15000000 ]; then
    split -b 15000000 -d "$OUT/results.tgz" "$OUT/results.tgz.part" && rm "$OUT/results.tgz"
  fi
  ls -la "$OUT"
}
wait_jobs() {  # up to $1 seconds, or until every started job has an exit code
  local deadline=$((SECONDS + $1)) running=""
  while [ $SECONDS -lt $deadline ]; do
    running=$(for f in $S/logs/*.log; do n=$(basename $f .log); [ -f $S/logs/$n.rc ] || echo $n; done)
    [ -z "$running" ] && break
    sleep 10
  done
  echo "[queue] still running: ${running:-none}"
  for f in $S/logs/*.rc; do [ -f "$f" ] && echo "[queue] $(basename $f .rc) exit $(cat $f)"; done
}
[ -d .gpu ] && mkdir -p $S/gpu && cp -r .gpu/. $S/gpu/
export TOKENIZER=$S/gpu/tokenizer SFT_FILE=$S/gpu/demo_sft_train.jsonl
# any phase unpacks the .gpu2 files it carries (they stay in /tmp for the later calls on the same machine)
[ -f .gpu2/pd_text.tgz ] && mkdir -p artifacts/data && tar xzf .gpu2/pd_text.tgz -C artifacts/data && ls artifacts/data/pd_text
[ -f .gpu2/meap_data.tgz ] && mkdir -p $S/meap_passkey && tar xzf .gpu2/meap_data.tgz -C $S/meap_passkey
case $phase in
1)
  nvidia-smi -L
  SMALL_S=${SMALL_S:-560} SMALL_ROWS=${SMALL_ROWS:-7,8,6} SMALL_TIMEOUT=${SMALL_TIMEOUT:-300} SMALL_PYSPY=${SMALL_PYSPY-1} LM1B_S=0 PACK_S=0 \
    AVSR_S=0 OUT=$OUT/bench bash benchmarks/gpu_fastpath.sh
  ;;
2)
  export UNSINK_ARMS_PER_GPU=8  # every arm of a study at once on the one GPU (launch-bound models)
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # less fragmentation with several arms per GPU
  chain=""
  # study 2's jobs start once the corpus job (phase `corpus`) has an exit code; without one they build it
  wait_corpus="while [ -f $S/logs/corpus.log ] && [ ! -f $S/logs/corpus.rc ]; do sleep 5; done;"
  asr="$wait_corpus python3 studies/asr_downsampling.py"  # study 2 (2, 2s, 2L): its arms' common settings follow
  asr_arms="--steps 1000 --val-every 250 --arms-per-gpu 8 --override model.kernels=fast"
  for study in ${STUDIES:-3 5b}; do
    case $study in
      1) cmd="python3 studies/decorr_text.py --weights ${DECORR_WEIGHTS:-10,100} --out $S/decorr_text" ;;
      5) cmd="python3 studies/adl_robustness.py --out $S/adl_robustness --baseline-from $S/decorr_text/baseline" ;;
      5b) cmd="python3 studies/adl_robustness.py --weights ${ADL_WEIGHTS:-0.1,0.3} --out $S/adl_robustness_low" ;;
      4) cmd="python3 studies/leaf_vs_kd.py --out $S/leaf_vs_kd --micro-batch 32" ;;
      4b) cmd="python3 studies/leaf_vs_kd.py --out $S/leaf_vs_kd_b --distractors same-item --stage1-student kd --micro-batch 32" ;;
      3) cmd="python3 studies/meap_passkey.py --out $S/meap_passkey --micro-batch 8 ${MEAP_ARGS:-}" ;;
      2)  # the study at its val-tuned defaults (48,000 clips with gcide's sentences, no time masking), after the
        # corpus job of phase `corpus` if one was started; seeds ASR_SEEDS, one loss arm per weight in ASR_WEIGHTS
        # (the report picks the weight by val WER at x32)
        cmd="$asr --out $S/${ASR_DIR:-asr_gcide} ${ASR_ARGS:---seeds ${ASR_SEEDS:-0} \
          --decorr-weight ${ASR_WEIGHTS:-1 10} $asr_arms}" ;;
      2s)  # the eighth session's follow-up (docs/results.md): the loss on sink tokens only (cosine to BOS above
        # 0.8 in some layer, the intermediate-sink metric's threshold: what the paper means to remove; at 0.5 about
        # half the audio tokens would count, their mean cosine is 0.50) and switched on at step 400, after the
        # baseline's x4 transition
        # baseline (CE) arms already trained with the same command are taken from SINKS_REUSE (default: the
        # ninth session's archive, which holds seed 1's; studies/arm_archive.py), so only the loss arms train
        cmd="$asr --out $S/asr_gcide_sinks_late --seeds ${SINKS_SEEDS:-0} --decorr-weight ${SINKS_WEIGHTS:-10} \
          $asr_arms --loss-override objective.decorr.tokens=sinks --loss-override objective.decorr.sink_threshold=0.8 \
          --loss-override objective.decorr.start_step=400 \
          --reuse-arms-from ${SINKS_REUSE:-docs/results_2026-11-29f/asr_gcide}" ;;
      2L)  # does the x4 baseline reach 15% with more steps? Its val WER was still falling at step 999 (49.8 ->
        # 37.2 -> 34.9% at 499 / 749 / 999 in the tuning run): one arm, 4,000 steps, val every 500
        cmd="$asr --out $S/asr_gcide_long --seeds 0 --only x4_base_s0 --steps 4000 --val-every 500 \
          --override model.kernels=fast" ;;
      2u)  # the x4 baseline with Whisper unfrozen at 1/20 of the adapters' learning rate (val only: can the
        # pipeline reach 15% when the encoder adapts to flite's voices? Whisper's own decoder makes 18.4%)
        cmd="$asr --out $S/asr_gcide_unfrozen --seeds 0 --only x4_base_s0 $asr_arms \
          --override audio_encoder.frozen=false --override 'model.lr_scale={model.encoders.audio:0.05}'" ;;
      demo)  # `make demo`'s command on the GPU (its ${if_gpu:...} branch: 12,000 clips, 1,500 steps, the fast
        # LLM path): does it transcribe? CSV logs only: the GPU image has no wandb (the ninth session's first try
        # stopped there). A new folder: the ninth session's 3,000-clip run (memorised 81 built-in sentences:
        # the Debian text was unpacked under /tmp/debroot, which the synthetic corpus did not look in) is in $S/demo
        cmd="python3 train.py experiment=avsr_decorr hydra.run.dir=$S/demo_gpu logger=csv" ;;
      2v)  # the x4 baseline tuned on val: 2x2 of audio time masking (on/off) and training text (own 16,000
        # clips / 48,000 with gcide's sentences for training only), plus the projector alone; corpora built first.
        # Run 2026-11-29 (docs/results.md); gcide_nomask won and is now the study's default, so each variant
        # names both settings here
        x4="--only x4_base_s0 --seeds 0 --steps 1000 --val-every 250 --override model.kernels=fast"
        own="--num-train 16000 --train-sources none"
        gc="--num-train 48000 --train-sources gcide"
        mask="--override data.audio_time_mask_window=6400" nomask="--override data.audio_time_mask_window=0"
        arms=""
        frozen="--override 'model.trainable.freeze=[lora_]'"  # projector only: the LLM cannot learn the sentences
        for v in "plain:$own $mask" "nomask:$own $nomask" "gcide:$gc $mask" "gcide_nomask:$gc $nomask" \
          "frozen_llm:$own $mask $frozen"; do
          arms="$arms python3 studies/asr_downsampling.py --out $S/asr_x4_${v%%:*} $x4 ${v#*:} &"
        done
        cmd="python3 -m data.avsr.asr_corpus --num-train 16000 --workers 6 & python3 -m data.avsr.asr_corpus \
          --num-train 48000 --train-sources gcide --out artifacts/data/asr_corpus_gcide --workers 10 & wait;$arms wait" ;;
      *) echo "[queue] unknown study $study"; continue ;;
    esac
    # CHAIN=1: one job runs the studies one after another (memory-heavy arms: studies 3 and 4 together
    # ran out of memory on one H200); otherwise each study is its own job, all at once.
    if [ "${CHAIN:-0}" = 1 ]; then chain="${chain:+$chain ; }$cmd"; else start "study$study" "$cmd"; fi
  done
  [ -n "$chain" ] && start chain "$chain"
  wait_jobs "${WAIT_S:-480}"
  collect
  ;;
3)
  wait_jobs "${WAIT_S:-540}"
  collect
  ;;
corpus)  # carry .whl .debs: study 2's corpus (48,000 train clips, gcide's sentences) builds on every core while
  # the next calls stage the weights (it took 311 s with 10 processes beside a second build)
  start corpus "python3 -m data.avsr.asr_corpus --num-train 48000 --train-sources gcide \
    --out artifacts/data/asr_corpus_gcide --workers $(nproc)"
  # meanwhile, the CUDA branch of the non-finite guard's sync-free skip (pytest comes in .whl), seconds
  python3 -m pytest -q tests/test_nonfinite_guard.py -k device_skip 2>&1 | tail -n 3
  ;;
stage)  # gpu_env.sh above has copied the carried parts and installed what is complete
  ls /tmp/stage/*/ 2>/dev/null; command -v flite || echo "[queue] flite not unpacked (carry .debs)"
  ;;
*)
  echo "[queue] unknown phase $phase (1, 2, 3, corpus or stage)"; exit 2
  ;;
esac
