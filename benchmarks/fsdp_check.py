"""FSDP check on 2 GPUs (Lightning 2.6.6 runs FSDP on GPUs only): train, checkpoint, resume, export an
adapter, load it into PEFT, and compare with a DDP run of the same seed.

    python benchmarks/fsdp_check.py --tokenizer .gpu/tokenizer --out $OUT      (benchmarks/fsdp_check.sh)

Runs (tiny Llama, LoRA, fixture SFT data, fp32 so that DDP and FSDP can be compared tightly):
  ddp:        trainer=ddp, 4 steps
  fsdp:       trainer=fsdp, 4 steps, interrupted by the requeue signal (SIGUSR1 at step 1: checkpoint at the end
              of step 2, exit), then relaunched in the same folder: `ckpt_path=auto` resumes mid-epoch at step 2
  fsdp_bf16:  trainer=fsdp at bf16-mixed, 4 steps: runs and exports (no comparison)
  fsdp_sinks: trainer=fsdp with the sink-diagnostics callback on: informational (not part of PASS)
PASS: every run exits 0 within its timeout (the interrupted one with the requeue exit code 3); the FSDP resume continued from step 2; train/loss of FSDP and DDP
agree within LOSS_TOL at every step; the LoRA tensors of the two adapters agree within WEIGHT_TOL; both load
into PEFT and give logits that agree within LOGIT_TOL and differ from the base model's.
Writes <out>/fsdp_check.json and the logs; prints one line `FSDP CHECK: PASS` or `FSDP CHECK: FAIL (...)`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
LOSS_TOL, WEIGHT_TOL, LOGIT_TOL = 1e-4, 1e-4, 1e-3
REQUEUE_EXIT_CODE = 3  # harness/requeue.py


def common(tokenizer: str) -> list[str]:
    return [
        "experiment=lm_sft",
        "debug=smoke",
        "logger=csv",
        f"backbone.tokenizer_source={tokenizer}",
        f"data.train_file={FIXTURES / 'tiny_sft.jsonl'}",
        f"data.val_file={FIXTURES / 'tiny_sft_val.jsonl'}",
        "data.prepare=null",
        "data.batch_size=2",
        "data.eval_batch_size=2",
        "peft.dropout=0.0",
        "scheduler=none",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "trainer.limit_train_batches=null",
        "validate_before_training=false",
    ]


def run(name: str, args: list[str], work: Path, out: Path, timeout: int = 600) -> dict:
    cmd = [sys.executable, "train.py", *args, f"hydra.run.dir={work / name}"]
    start = time.time()
    try:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        rc, text = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        rc, text = "timeout", f"{err.stdout or ''}{err.stderr or ''}"
    log = out / f"{name}.log"
    with open(log, "a") as handle:
        handle.write(f"$ {' '.join(cmd)}\n{text}\n")
    print(f"{name}: rc={rc} in {time.time() - start:.0f} s (log: {log})", flush=True)
    return {"rc": rc, "seconds": round(time.time() - start, 1), "output": text}


def losses(run_dir: Path) -> list[float]:
    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def lora_tensors(adapter: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter / "adapter_model.safetensors"))


def peft_logits(adapter: Path | None, tokenizer: str):
    import torch
    from peft import PeftModel

    sys.path.insert(0, str(REPO))
    from models.causal_lm import build_tiny_llama

    base, tok = build_tiny_llama(tokenizer_source=tokenizer, special_tokens={"eos_token": "<|im_end|>"})
    model = base if adapter is None else PeftModel.from_pretrained(base, str(adapter))
    ids = tok(["Describe a river in one short sentence."], return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**ids).logits.float()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True, help="HF tokenizer folder (.gpu/tokenizer)")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    parser.add_argument("--work", default="/tmp/fsdp_check")
    parser.add_argument("--ddp", default="ddp", help="trainer group of the reference run")
    parser.add_argument(
        "--fsdp", default="fsdp", help="trainer group under test (ddp_cpu: CPU plumbing check)"
    )
    args = parser.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    base = common(str(Path(args.tokenizer).resolve()))
    quiet = ["callbacks.sink_diagnostics=null"]
    fsdp_4 = [f"trainer={args.fsdp}", "trainer.max_steps=4"]
    signal_at_1 = ["+callbacks.fault._target_=tests.fault_injection.SignalAtStep", "+callbacks.fault.step=1"]
    runs = {
        "ddp": run("ddp", [*base, *quiet, f"trainer={args.ddp}", "trainer.max_steps=4"], work, out),
        # the requeue signal at step 1: checkpoint (hpc_ckpt_1.ckpt, step 2) at the end of the step, exit
        "fsdp_part1": run("fsdp", [*base, *quiet, *fsdp_4, *signal_at_1], work, out),
    }
    runs["fsdp_part2"] = run("fsdp", [*base, *quiet, *fsdp_4], work, out)  # same folder: ckpt_path=auto
    runs["fsdp_bf16"] = run(
        "fsdp_bf16",
        [*base, *quiet, f"trainer={args.fsdp}", "trainer.max_steps=4", "trainer.precision=bf16-mixed"],
        work,
        out,
    )
    runs["fsdp_sinks"] = run(
        "fsdp_sinks", [*base, f"trainer={args.fsdp}", "trainer.max_steps=2"], work, out, timeout=300
    )

    failures, report = [], {"tolerances": {"loss": LOSS_TOL, "weight": WEIGHT_TOL, "logit": LOGIT_TOL}}
    for name, result in runs.items():
        report[f"{name}_rc"], report[f"{name}_seconds"] = result["rc"], result["seconds"]
        expected = REQUEUE_EXIT_CODE if name == "fsdp_part1" else 0
        if result["rc"] != expected and name != "fsdp_sinks":
            failures.append(f"{name} exited {result['rc']}")
    report["fsdp_resumed_from_step_2"] = "(step 2)" in runs["fsdp_part2"]["output"]
    if not report["fsdp_resumed_from_step_2"]:
        failures.append("the second FSDP launch did not resume from step 2")
    report["sink_callback_under_fsdp"] = (
        "ok" if runs["fsdp_sinks"]["rc"] == 0 else f"rc={runs['fsdp_sinks']['rc']}"
    )
    try:
        ddp_loss, fsdp_loss = losses(work / "ddp"), losses(work / "fsdp")
        report["ddp_losses"], report["fsdp_losses"] = ddp_loss, fsdp_loss
        diff = max((abs(a - b) for a, b in zip(ddp_loss, fsdp_loss)), default=float("inf"))
        report["loss_max_abs_diff"] = diff
        if len(ddp_loss) != 4 or len(fsdp_loss) != 4 or not diff <= LOSS_TOL:
            failures.append(
                f"loss curves differ (max |diff| {diff:.3g}, lengths {len(ddp_loss)}/{len(fsdp_loss)})"
            )
        ddp_w, fsdp_w = lora_tensors(work / "ddp" / "adapter"), lora_tensors(work / "fsdp" / "adapter")
        report["adapter_tensors"] = len(ddp_w)
        if set(ddp_w) != set(fsdp_w) or not ddp_w:
            failures.append("adapters hold different tensors")
        else:
            wdiff = max(float((ddp_w[k].float() - fsdp_w[k].float()).abs().max()) for k in ddp_w)
            report["adapter_max_abs_diff"] = wdiff
            if not wdiff <= WEIGHT_TOL:
                failures.append(f"adapter weights differ by {wdiff:.3g}")
        plain = peft_logits(None, args.tokenizer)
        ddp_logits = peft_logits(work / "ddp" / "adapter", args.tokenizer)
        fsdp_logits = peft_logits(work / "fsdp" / "adapter", args.tokenizer)
        ldiff = float((ddp_logits - fsdp_logits).abs().max())
        moved = float((fsdp_logits - plain).abs().max())
        report["peft_logits_max_abs_diff"], report["adapter_effect_on_logits"] = ldiff, moved
        if not ldiff <= LOGIT_TOL or not moved > 0:
            failures.append(f"PEFT logits: DDP vs FSDP {ldiff:.3g}, adapter effect {moved:.3g}")
        report["bf16_adapter_written"] = (
            work / "fsdp_bf16" / "adapter" / "adapter_model.safetensors"
        ).exists()
        if not report["bf16_adapter_written"]:
            failures.append("bf16-mixed FSDP run wrote no adapter")
    except Exception as err:  # noqa: BLE001  (a missing file is a failure of the check, reported as such)
        failures.append(f"{type(err).__name__}: {err}")
    report["pass"], report["failures"] = not failures, failures
    (out / "fsdp_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print("FSDP CHECK: PASS" if not failures else f"FSDP CHECK: FAIL ({'; '.join(failures)})", flush=True)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
