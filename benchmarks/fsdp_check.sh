#!/usr/bin/env bash
# FSDP check for the lead's 2-H200 session (Lightning 2.6.6 refuses FSDP on CPU, so no CPU test exists):
#   bash benchmarks/fsdp_check.sh        (from the repo root on the GPU machine; results in $OUT)
# Trains the tiny Llama with LoRA under trainer=fsdp on 2 GPUs, checkpoints, resumes, exports the adapter,
# loads it into PEFT and compares with a DDP run of the same seed (tolerances in benchmarks/fsdp_check.py).
# Prints `FSDP CHECK: PASS` or `FSDP CHECK: FAIL (...)`; writes $OUT/fsdp_check.json and one log per run.
# Needs: .whl/ (../shared/gpu/wheels.sh) and .gpu/tokenizer, as benchmarks/gpu_session.sh.
source benchmarks/gpu_preamble.sh  # strict mode, $OUT, .whl/ wheels, GPUs listed
if [ "$(nvidia-smi -L | wc -l)" -lt 2 ]; then echo "FSDP CHECK: FAIL (needs 2 GPUs)"; exit 1; fi
python3 benchmarks/fsdp_check.py --tokenizer "$PWD/.gpu/tokenizer" --out "$OUT" 2>&1 | grep -v Warning | tee "$OUT/fsdp_check.log"
exit "${PIPESTATUS[0]}"
