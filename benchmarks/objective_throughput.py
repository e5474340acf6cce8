"""Training throughput and peak memory of each sink-mitigating objective, as a ratio to plain CE.

    python benchmarks/objective_throughput.py --json artifacts/bench/objectives.json          # H200
    python benchmarks/objective_throughput.py --tiny --json /tmp/objectives_tiny.json         # CPU check

Model: random-weight Llama-3.2-1B shape (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192,
vocab 128256, rope theta 500000, tied embeddings), LoRA r16 on all linear layers (peft), bf16, SDPA.
A step is what `recipes/causal_lm.py` does, minus Lightning: `ObjectiveSet.transform_batch`, one forward
(hidden states / query-key capture only when an objective needs them), the objective losses, backward,
AdamW step. Warm-up steps are excluded; CUDA is synchronised around every timed step.

Rows (same run, so the ratios compare like with like):
- none, decorr (input side, layers 1..L-1), adl (all layers, 64 rows), meap (pre-training mode, 15%;
  SFT mode appends rows, which changes the work, not the cost of masking) at B x T (default 8 x 2048);
- none and adl at --long-batch x --long-seq (default 1 x 8192).
Each row builds a fresh model with the same seed. A row that runs out of memory is reported as OOM.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from models.causal_lm import resolve_dtype  # noqa: E402
from models.lora import apply_lora  # noqa: E402
from models.segments import IGNORE_INDEX  # noqa: E402
from recipes.objectives.adl import AttentionDiversityObjective  # noqa: E402
from recipes.objectives.compose import ObjectiveSet, total_loss  # noqa: E402
from recipes.objectives.decorr import BosDecorrelationObjective  # noqa: E402
from recipes.objectives.meap import MeapObjective, grow_embeddings  # noqa: E402

LLAMA_1B = dict(
    hidden_size=2048,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=8192,
    vocab_size=128256,
    rope_theta=500000.0,
)
TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=512,
    rope_theta=500000.0,
)


def build_objectives(name: str) -> dict:
    if name == "none":
        return {}
    if name in ("decorr", "decorr_compiled"):  # decorr_compiled: the loss fused by torch.compile
        return {
            "decorr": BosDecorrelationObjective(
                weight=1.0e4, tokens="input_side", compile=name == "decorr_compiled"
            )
        }
    if name in ("adl", "adl_compiled"):  # adl_compiled: the recomputed rows fused by torch.compile
        return {"adl": AttentionDiversityObjective(weight=1.0, num_rows=64, compile=name == "adl_compiled")}
    if name == "meap":
        return {"meap": MeapObjective(mode="pretrain", ratio=0.15)}
    raise ValueError(f"unknown objective {name!r}")


def build_model(
    shape: dict, max_len: int, objectives: dict, device: torch.device, dtype: torch.dtype, seed: int
):
    """Random Llama with LoRA r16 on all linear layers; MEAP's [MASK] row appended and kept trainable."""
    config = LlamaConfig(
        **{k: v for k, v in shape.items() if k != "rope_theta"},
        rope_parameters={"rope_type": "default", "rope_theta": shape["rope_theta"]},
        max_position_embeddings=max_len,
        tie_word_embeddings=True,
        use_cache=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model = model.to(dtype)
    model.set_attn_implementation("sdpa")
    extra_tokens = []
    for objective in objectives.values():
        if isinstance(objective, MeapObjective):  # what MeapObjective.setup does, without a tokenizer
            grow_embeddings(model, shape["vocab_size"] + 1)
            objective.mask_token_id = shape["vocab_size"]
            extra_tokens.append(objective.mask_token_id)
    model = apply_lora(
        model,
        r=16,
        alpha=32,
        dropout=0.0,
        target_modules="all-linear",
        trainable_token_indices=extra_tokens or None,
    )
    model.train()
    return model


def make_batch(batch: int, length: int, vocab: int, device: torch.device, seed: int) -> dict:
    """Random tokens; the first quarter of each row is a prompt (labels -100), the rest are targets."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (batch, length), generator=gen)
    labels = input_ids.clone()
    labels[:, : length // 4] = IGNORE_INDEX
    return {
        "input_ids": input_ids.to(device),
        "labels": labels.to(device),
        "attention_mask": torch.ones(batch, length, dtype=torch.long, device=device),
    }


def train_step(model, optimizer, objectives: ObjectiveSet, batch: dict, step: int) -> float:
    optimizer.zero_grad(set_to_none=True)
    batch = objectives.transform_batch(batch, step, seed=0)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    outputs, ctx = objectives.forward(model, inputs, batch, step)
    total, _ = total_loss(outputs.loss, objectives.losses(ctx))
    total.backward()
    optimizer.step()
    return float(total.detach())


def measure(
    name: str,
    shape: dict,
    batch_size: int,
    length: int,
    steps: int,
    warmup: int,
    device: torch.device,
    dtype: torch.dtype,
) -> dict:
    """tokens/s and peak memory of `steps` timed training steps after `warmup` untimed ones."""
    row = {"objective": name, "batch": batch_size, "seq_len": length}
    model = optimizer = None
    try:
        objectives = build_objectives(name)
        model = build_model(shape, length, objectives, device, dtype, seed=0)
        objective_set = ObjectiveSet(objectives)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        batch = make_batch(batch_size, length, shape["vocab_size"], device, seed=1)
        for step in range(warmup):
            train_step(model, optimizer, objective_set, batch, step)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elapsed, loss = 0.0, float("nan")
        for step in range(warmup, warmup + steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            loss = train_step(model, optimizer, objective_set, batch, step)
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed += time.perf_counter() - start
        row.update(
            tokens_per_s=batch_size * length * steps / elapsed,
            step_s=elapsed / steps,
            loss=loss,
            peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        )
    except torch.OutOfMemoryError:
        row.update(tokens_per_s=None, step_s=None, loss=None, peak_mem_gib=None, error="OOM")
    finally:
        del model, optimizer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def add_ratios(rows: list[dict]) -> None:
    """Each row's tokens/s and peak memory relative to `none` at the same shape."""
    baselines = {(r["batch"], r["seq_len"]): r for r in rows if r["objective"] == "none"}
    for row in rows:
        base = baselines.get((row["batch"], row["seq_len"]))
        ok = base and row.get("tokens_per_s") and base.get("tokens_per_s")
        row["speed_ratio"] = row["tokens_per_s"] / base["tokens_per_s"] if ok else None
        mem_ok = ok and row.get("peak_mem_gib") and base.get("peak_mem_gib")
        row["memory_ratio"] = row["peak_mem_gib"] / base["peak_mem_gib"] if mem_ok else None


def markdown(rows: list[dict]) -> str:
    def fmt(value, spec, suffix=""):
        return "-" if value is None else format(value, spec) + suffix

    lines = [
        "| objective | B x T | tokens/s | vs none | peak mem (GiB) | mem vs none |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        speed = r.get("error") or fmt(r.get("tokens_per_s"), ",.0f")
        lines.append(
            f"| {r['objective']} | {r['batch']} x {r['seq_len']} | {speed} | "
            f"{fmt(r.get('speed_ratio'), '.3f', 'x')} | {fmt(r.get('peak_mem_gib'), '.1f')} | "
            f"{fmt(r.get('memory_ratio'), '.2f', 'x')} |"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU check): B=2, T=64, long T=256")
    parser.add_argument("--batch-size", type=int, default=None, help="default 8 (tiny: 2)")
    parser.add_argument("--seq-len", type=int, default=None, help="default 2048 (tiny: 64)")
    parser.add_argument("--long-batch", type=int, default=1)
    parser.add_argument("--long-seq", type=int, default=None, help="default 8192 (tiny: 256); 0 = skip")
    parser.add_argument("--steps", type=int, default=None, help="timed steps, default 10 (tiny: 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps, default 3 (tiny: 1)")
    parser.add_argument("--objectives", default="none,decorr,adl,meap")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="measure every row this many times, interleaved, and keep the fastest (GPU clocks "
        "and allocator state drift; interleaving keeps the ratios fair)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="bf16 (default on CUDA) | fp32 (default on CPU)")
    parser.add_argument("--json", required=True, help="where to write the results")
    args = parser.parse_args(argv)
    tiny = args.tiny
    args.batch_size = args.batch_size or (2 if tiny else 8)
    args.seq_len = args.seq_len or (64 if tiny else 2048)
    args.long_seq = (256 if tiny else 8192) if args.long_seq is None else args.long_seq
    args.steps = args.steps or (2 if tiny else 10)
    args.warmup = (1 if tiny else 3) if args.warmup is None else args.warmup
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype)
    shape = TINY if args.tiny else LLAMA_1B
    names = [n.strip() for n in args.objectives.split(",") if n.strip()]
    if "none" not in names:
        names.insert(0, "none")
    plan = [(n, args.batch_size, args.seq_len) for n in names]
    if args.long_seq:
        plan += [(n, args.long_batch, args.long_seq) for n in ("none", "adl")]
    best: dict[tuple, dict] = {}
    for _ in range(max(1, args.repeats)):
        for name, batch, length in plan:
            row = measure(name, shape, batch, length, args.steps, args.warmup, device, dtype)
            key = (name, batch, length)
            if key not in best or (row.get("tokens_per_s") or 0) > (best[key].get("tokens_per_s") or 0):
                best[key] = row
    rows = [best[key] for key in plan]
    add_ratios(rows)
    table = markdown(rows)
    print(table)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": args.dtype,
        "tiny": args.tiny,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "command": " ".join(sys.argv),
    }
    Path(args.json).write_text(json.dumps({"environment": env, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
