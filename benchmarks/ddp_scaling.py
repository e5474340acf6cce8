"""DDP scaling of the 1B-shape recipe on the fast path (issue 9): total tokens/s on N GPUs against one GPU,
both measured in the same invocation. Targets: >= 1.9x on 2 GPUs, >= 3.7x on 4.

    python benchmarks/ddp_scaling.py --tokenizer .gpu/tokenizer --json ddp.json                   # 1,2 GPUs
    python benchmarks/ddp_scaling.py --tokenizer .gpu/tokenizer --devices 1,2,4 --json ddp.json   # 4 GPUs
    python benchmarks/ddp_scaling.py --tiny --json /tmp/ddp_tiny.json     # CPU check (gloo, 1 and 2 ranks)

Each N runs as its own process tree (this script with `--worker --world N`, in a new session, killed whole
after --timeout): the row `fast_path.py lm1b --rows fast` builds (`CausalLMRecipe(kernels="fast")`, random
Llama-3.2-1B shape, LoRA r16 on all linear layers, bf16-mixed, gradient clipping 1.0, no logger or
progress bar), fit by `Trainer(devices=N, strategy="ddp")`, whose launcher re-runs that command line for
ranks 1..N-1. Weak scaling: every rank trains on its own fixed batch (B=8, T=2048, seed 1 + rank: rank 0's
is lm1b's), so total tokens/s = B*T*N x rank 0's mean steps/s over its timed span (the throughput, stalls
included; the gradient all-reduce keeps the ranks in step). speedup = total tokens/s / the 1-device row's (a plain single-device fit, no DDP),
efficiency = speedup / N. Every rank writes its StepTimer JSON: peak memory per GPU, first loss per rank
(rank 0's equals lm1b's `recipe fast` first loss; other ranks differ: distinct batches). The worker sets
NCCL_ENV for every rank: NVLink multicast stays off on the lent machines.
--tiny: TINY shape, B=2, T=64, on CPU processes (gloo, one thread each): checks the plumbing, not speed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.fast_path import Repeat, fit_recipe, fixed_batches, lm_recipe, recipe_vocab  # noqa: E402

TARGETS = {2: 1.9, 4: 3.7}  # speedup over one GPU (issue 9)
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def strategy(world: int) -> str:
    """DDP for several devices; one device is the plain single-device fit the speedup is measured against."""
    return "ddp" if world > 1 else "auto"


def batch_shape(tiny: bool) -> tuple[int, int]:
    return (2, 64) if tiny else (8, 2048)


# ---- rows -------------------------------------------------------------------------------------------
def summarise(ranks: list[dict], batch: int, length: int) -> dict:
    """One row from the ranks' StepTimer JSONs (rank 0 first; each with world_size)."""
    first, mems = ranks[0], [r.get("peak_mem_gib") for r in ranks]
    return {
        "device": first.get("device"),
        "world_size": first["world_size"],
        "batch_per_rank": batch,
        "seq_len": length,
        "steps": first["steps"],
        "steps_per_s_median": first["steps_per_s_median"],
        "steps_per_s_mean": first["steps_per_s_mean"],
        "tokens_per_s_total": batch * length * first["world_size"] * first["steps_per_s_mean"],
        "peak_mem_gib": None if None in mems else max(mems),
        "peak_mem_gib_per_rank": mems,
        "first_loss": first["first_loss"],
        "first_loss_per_rank": [r["first_loss"] for r in ranks],
    }


def add_speedups(rows: list[dict]) -> list[dict]:
    """speedup over the 1-device row of the same run, efficiency = speedup / devices, the target check."""
    base = next((r["tokens_per_s_total"] for r in rows if r["devices"] == 1 and "error" not in r), None)
    for row in rows:
        total, target = row.get("tokens_per_s_total"), TARGETS.get(row["devices"])
        speedup = total / base if base and total is not None and "error" not in row else None
        row["speedup"] = speedup
        row["efficiency"] = None if speedup is None else speedup / row["devices"]
        row["target"] = target
        row["meets_target"] = None if target is None or speedup is None else speedup >= target
    return rows


# ---- one N: the worker (every rank runs it) ------------------------------------------------------------
class RankBatches(torch.utils.data.IterableDataset):
    """`count` copies of this rank's fixed batch (rank read when iterated: the process group exists)."""

    def __init__(self, batch: int, length: int, vocab: int, count: int):
        self.batch, self.length, self.vocab, self.count = batch, length, vocab, count

    def __iter__(self):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        yield from Repeat(fixed_batches(self.batch, self.length, self.vocab, seed=1 + rank), self.count)


def worker(args) -> None:
    os.environ.update(NCCL_ENV)  # before any process group; Lightning's children inherit it
    local_rank = int(os.environ.get("LOCAL_RANK", 0))  # set by Lightning's launcher for ranks 1..N-1
    if args.tiny:
        torch.set_num_threads(1)  # N processes share the CPU
    else:
        torch.cuda.set_device(local_rank)  # build the model on this rank's GPU (not all on GPU 0)
    recipe = lm_recipe("fast", "none", args)
    batch, length = batch_shape(args.tiny)
    loader = RankBatches(batch, length, recipe_vocab(recipe), args.warmup + args.steps + 2)
    out = Path(args.out) / f"rank{local_rank}.json"
    device = "cpu" if args.tiny else "cuda"
    result = fit_recipe(
        recipe,
        loader,
        args.steps,
        args.warmup,
        device,
        out,
        devices=args.world,
        strategy=strategy(args.world),
    )
    name = "cpu" if args.tiny else torch.cuda.get_device_name()
    result.update(
        world_size=torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
        rank=torch.distributed.get_rank() if torch.distributed.is_initialized() else 0,
        device=name,
    )
    out.write_text(json.dumps(result, indent=2))


# ---- the driver: one process tree per N ------------------------------------------------------------------
def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def launch(devices: int, args, work: Path) -> dict:
    """Run N = `devices` ranks; the row, or the tail of the log when it failed or timed out."""
    out = work / f"devices{devices}"
    out.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        f"--world={devices}",
        f"--out={out}",
    ]
    command += [f"--steps={args.steps}", f"--warmup={args.warmup}"]
    command += ["--tiny"] if args.tiny else [f"--tokenizer={Path(args.tokenizer).resolve()}"]
    started = time.perf_counter()
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**os.environ, **NCCL_ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # one process group: the ranks Lightning starts are in it too
    )
    status = "exit"
    try:
        log = proc.communicate(timeout=args.timeout)[0]  # returns once every rank closed the pipe
    except subprocess.TimeoutExpired:
        kill_group(proc.pid)
        log, status = proc.communicate()[0], f"timed out after {args.timeout} s, exit"
    finally:
        kill_group(proc.pid)  # a rank left behind (or the driver itself is being stopped)
    (out / "log.txt").write_text(log)
    row = {"devices": devices, "wall_s": round(time.perf_counter() - started, 1)}
    ranks = {int(p.stem[4:]): json.loads(p.read_text()) for p in out.glob("rank*.json")}
    ranks = [ranks.get(rank, {}) for rank in range(devices)]
    if proc.returncode != 0 or any("world_size" not in r or "steps_per_s_mean" not in r for r in ranks):
        row["error"] = f"{status} {proc.returncode}: {log[-3000:]}"
        return row
    row.update(summarise(ranks, *batch_shape(args.tiny)))
    if row["world_size"] != devices:
        row["error"] = f"world size {row['world_size']}, asked for {devices}"
    return row


def scaling(args) -> list[dict]:
    work = Path(args.work or tempfile.mkdtemp(prefix="ddp_scaling_"))
    available = os.cpu_count() if args.tiny else torch.cuda.device_count()
    # `timeout` (gpu_fastpath.sh) stops the driver with SIGTERM: exit through launch's `finally`, which
    # kills the ranks (they run in a session of their own, out of reach of the signal)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    rows = []
    for devices in (int(n) for n in args.devices.split(",")):
        if devices > available:
            row = {"devices": devices, "error": f"needs {devices} devices, this machine has {available}"}
        else:
            row = launch(devices, args, work)
        rows.append(row)
        add_speedups(rows)
        print(json.dumps(row), flush=True)
        write(args, rows)  # after every N: a later timeout keeps the rows so far
    for row in rows:
        if row["target"] is not None:
            verdict = (
                "no result" if row["meets_target"] is None else "met" if row["meets_target"] else "not met"
            )
            speedup = f"{row['speedup']:.2f}x" if row["speedup"] is not None else "-"
            print(f"DDP SCALING: {row['devices']} devices {speedup} (target {row['target']}x: {verdict})")
    return rows


def write(args, rows: list[dict]) -> None:
    env = {  # no CUDA context in the driver (the rows name their device): GPU 0's memory stays the ranks'
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"environment": env, "rows": rows}, indent=2))


def main(argv=None) -> list[dict] | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="1,2", help="device counts, one run each (the first: 1)")
    parser.add_argument("--json", help="where the rows go (driver)")
    parser.add_argument("--tokenizer", default=None, help="an HF tokenizer folder (the SmolLM2 one)")
    parser.add_argument("--tiny", action="store_true", help="TINY shape on CPU processes (a plumbing check)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; tiny 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5; tiny 1)")
    parser.add_argument("--timeout", type=int, default=None, help="seconds per N (default 300; tiny 180)")
    parser.add_argument(
        "--work", default=None, help="folder for the rank JSONs and logs (default: a temp one)"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = args.steps or (2 if args.tiny else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    args.timeout = args.timeout or (180 if args.tiny else 300)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.worker:
        return worker(args)
    if not args.json or not (args.tiny or args.tokenizer):
        parser.error("the driver needs --json, and --tokenizer unless --tiny")
    return scaling(args)


if __name__ == "__main__":
    main()
