"""The fast path against the plain path, through the recipe and Lightning (issue 9). One section per call:

    python benchmarks/fast_path.py small   --tokenizer .gpu/tokenizer --json small.json     # train.py runs
    python benchmarks/fast_path.py lm1b    --tokenizer .gpu/tokenizer --json lm1b.json      # 1B shape
    python benchmarks/fast_path.py packing --tokenizer .gpu/tokenizer --json packing.json \
        --sft-file artifacts/data/demo_sft/train.jsonl
    python benchmarks/fast_path.py avsr    --tokenizer .gpu/tokenizer --json avsr.json      # AVSR clips/s
    python benchmarks/fast_path.py lm1b --tiny --json /tmp/lm1b_tiny.json                   # CPU check

small: `train.py experiment=lm_sft` with a random SmolLM2-135M-shaped model (576 wide, 30 layers, 9 heads,
3 KV heads, vocab 49152; real weights change nothing here), steps/s from benchmarks/step_timer.py
(after a warm-up, Lightning included: the median interval between steps, the host's pace, and the
mean over the timed span, the throughput; they part when the host runs ahead and then stalls) and GPU busy fraction
(torch profiler: union of kernel, memcpy and memset time / wall time over profiled steps; with the
kernels per step and the top kernels). plain = `trainer=gpu`;
fast = `model.kernels=fast trainer=gpu_fast` (SFT rows padded to a multiple of 64); fast+cudagraphs = fast with
`model.fast.compile_mode=reduce-overhead` (CUDA graphs of each compiled layer); "whole decoder" rows add
`model.fast.compile=model` (one graph for the decoder: two CUDA-graph replays per step).

lm1b: random Llama-3.2-1B shape (2048 wide, 16 layers, 32 heads, 8 KV heads, 8192 MLP, vocab 128256,
tied), LoRA r16 on all linear layers, bf16 weights, bf16-mixed Lightning, one fixed random batch (first
quarter of each row prompt). Rows: the bare HF+PEFT loop of objective_throughput.py (the baseline the
issue names), the recipe on the plain path, the recipe on the fast path without and with each objective
(`meap_input_only`: MEAP with `mask_in_output=false`, the `[MASK]` row out of the output vocabulary).

packing: the recipe on the fast path at 1B shape, the same examples per step (batch of --pack-batch
examples) padded to the longest (rounded to 64) or packed into rows of --pack-len; real (non-pad) tokens/s.
Data: the SFT demo file and a long-tailed synthetic length distribution (lognormal, capped at --pack-len).

avsr: the AVSR recipe (audio-visual, --avsr-batch clips of 2, 8 and 24 s, random weights): the demo shape
(Whisper tiny.en-sized encoder, ResNet-18 lips, SmolLM2-135M shape) and the paper shape (Whisper-medium-sized
encoder, Llama-3.2-1B shape); the Whisper encoder on true length, and once on its 30 s window; clips/s.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.host_profile import pyspy_prefix, summarise_samples  # noqa: E402
from benchmarks.step_timer import StepTimer, stall_stacks  # noqa: E402
from models.segments import IGNORE_INDEX  # noqa: E402

# Every shape names vocab_size (random_llama reads it): None = the tokenizer's length (SmolLM2's: 49152).
SMOLLM2 = dict(
    hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, intermediate_size=1536, vocab_size=None
)
LLAMA_1B = dict(
    hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, intermediate_size=8192, vocab_size=128256
)
TINY = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, vocab_size=None)


# ---- small model: real train.py runs ---------------------------------------------------------------
def _text(output: str | bytes | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def train_py(overrides: list[str], out: Path, timeout: int, spy: Path | None = None) -> dict:
    """One timed `train.py` run -> its StepTimer JSON as a row (an error row on failure or timeout); with
    `spy`, sampled by py-spy into that file and summarised as `host_profile`."""
    command = [*(pyspy_prefix(spy) if spy else []), sys.executable, "train.py", *overrides]
    started = time.perf_counter()
    row = {"command": "python train.py " + " ".join(overrides)}
    try:
        proc = run_in_group(command, timeout)
    except subprocess.TimeoutExpired as err:  # one slow row (a long compile) must not lose the others
        tail = "".join(_text(part) for part in (err.stdout, err.stderr))[-3000:]
        return {
            **row,
            "wall_s": time.perf_counter() - started,
            "error": f"timed out after {timeout} s\n{tail}",
        }
    row["wall_s"] = time.perf_counter() - started
    if proc.returncode != 0 or not out.exists():
        if spy is not None and not out.exists():  # py-spy may be refused (ptrace): the timing still counts
            return {**train_py(overrides, out, timeout), "py_spy_error": (proc.stdout + proc.stderr)[-1500:]}
        # the exit status too: a row killed by a signal (a crash in native code) leaves no traceback, and
        # rows 7 and 8 ended that way on the H200 with only recompile lines in their tail (2026-11-29)
        row["returncode"] = exit_status(proc.returncode)
        row["error"] = (proc.stdout + proc.stderr)[-3000:]
        return row
    row.update(json.loads(out.read_text()))
    row["recompile_reasons"] = recompile_reasons(proc.stderr)
    stalls = Path(f"{out}.stalls.txt")
    if stalls.exists():  # StepTimer(stall_trace_s=...): the stacks of the steps that stalled
        row["stall_stacks"] = stall_stacks(stalls.read_text())
    if spy is not None and spy.exists():
        row["host_profile"] = summarise_samples(spy.read_text(), top=25)
    return row


def exit_status(code: int) -> str:
    """A process's return code in words: `0`, `1`, or `-11 (SIGSEGV)` for one killed by a signal."""
    if code >= 0:
        return str(code)
    try:
        return f"{code} ({signal.Signals(-code).name})"
    except ValueError:
        return str(code)


def recompile_reasons(stderr: str, keep: int = 40) -> list[str]:
    """The `TORCH_LOGS=recompiles` lines of a row's stderr (what function recompiled and which guard
    failed), without the logger's prefix: a recompile inside the timed window is a stall, and this names
    its cause (on the H200 one padded batch recompiled the whole decoder)."""
    tag = "[__recompiles]"
    lines = [line.split(tag, 1)[1].rstrip() for line in stderr.splitlines() if tag in line]
    return [line for line in lines if line.strip()][:keep]


def run_in_group(command: list[str], timeout: int) -> subprocess.CompletedProcess:
    """`subprocess.run` in a new process group, the whole group killed on timeout: under py-spy the row's
    train.py is a grandchild, and killing only py-spy would leave it running (and holding the GPU) while
    the next rows are timed."""
    env = {**os.environ, "TORCH_LOGS": os.environ.get("TORCH_LOGS", "recompiles")}  # recompile_reasons
    with subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            raise subprocess.TimeoutExpired(command, timeout, output=stdout, stderr=stderr) from None
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def benchmark_corpus(path: Path, copies: int) -> Path:
    """The demo text repeated `copies` times: at B=32, T=256 one copy is ~4 steps per epoch, and every
    epoch boundary (sampler reset, the last short batch: another compiled shape) would sit in the timing.
    100 copies are ~430 steps per epoch, more than any row runs: with 40 the epoch ended at step 171 of 200
    and its 8-row last batch recompiled the whole decoder inside the timed window (static shapes)."""
    from data.text.demo_corpus import build_demo_text

    one = Path(build_demo_text(path.with_name("corpus_once.txt"))).read_text(encoding="utf-8")
    path.write_text("\n\n".join([one] * copies), encoding="utf-8")
    return path


def small(args) -> list[dict]:
    work = Path(tempfile.mkdtemp(prefix="fastpath_small_"))
    shape = TINY if args.tiny else SMOLLM2
    common = ["experiment=lm_sft", "backbone=tiny_llama", "logger=none", "callbacks=none"]
    common += [f"backbone.{k}={v}" for k, v in shape.items() if v is not None and k != "vocab_size"]
    if args.tokenizer:
        common.append(f"backbone.tokenizer_source={Path(args.tokenizer).resolve()}")
    # No checkpoint at epoch ends (Lightning adds one when callbacks=none): a step benchmark, not a save one.
    common += ["validate_before_training=false", "+trainer.limit_val_batches=0", "trainer.max_epochs=1000"]
    common += ["+trainer.enable_checkpointing=false"]
    text_file = benchmark_corpus(work / "corpus.txt", copies=1 if args.tiny else 100)
    gpu = not args.tiny
    plain = ["trainer=gpu"] if gpu else ["trainer=cpu"]
    fast = ["model.kernels=fast", "trainer=gpu_fast"] if gpu else ["model.kernels=fast"]
    if args.tiny:
        fast += ["model.fast.require_cuda=false", "model.fast.compile=none"]
    # full blocks only: the corpus's last, shorter block padded one batch in 430 (step 97 of row 7), and that
    # batch recompiled the decoder and re-recorded its CUDA graphs inside the timed window (12 s, 2026-11-29)
    # and drop_last: with full blocks, the epoch's last, smaller batch (19 of 32 rows) recompiled the decoder and
    # ended rows 7 and 8 on the H200 (2026-11-29, third call): one batch shape, one graph
    lm = ["data=text_lm", f"data.train_file={text_file}", "data.num_workers=0", "data.full_blocks_only=true"]
    lm += ["data.drop_last=true"]
    graphs = fast + ([] if args.tiny else ["model.fast.compile_mode=reduce-overhead"])
    whole = [] if args.tiny else ["model.fast.compile=model"]
    # two lengths (64, 128): two compiled graphs, not one per length; one batch size (a smaller last batch
    # would be a third shape)
    pad = ["data.pad_to_multiple_of=64", "data.drop_last=true"]
    big = ["data.batch_size=32", "data.max_length=256"]
    gc = ["callbacks=[none,gc_control]"]  # replaces common's callbacks=none
    flat = ["model.flat_params=true"]
    plan = [
        ("plain", "sft B=8 T<=128", plain, [], 40, 10, 0),
        ("fast", "sft B=8 T<=128", fast, pad, 300, 60, 10),
        ("fast", "lm B=32 T=256", fast, lm + big, 200, 30, 10),
        ("plain", "lm B=32 T=256", plain, lm + big, 30, 8, 5),
        ("fast+cudagraphs", "sft B=8 T<=128", graphs, pad, 400, 100, 10),
        ("fast+cudagraphs", "lm B=32 T=256", graphs, lm + big, 200, 30, 10),
        ("fast+cudagraphs, whole decoder", "sft B=8 T<=128", graphs + whole, pad, 400, 100, 10),
        ("fast+cudagraphs, whole decoder", "lm B=32 T=256", graphs + whole, lm + big, 200, 30, 10),
        # row 7 with collection every 200 steps instead of automatic (harness/gc_control.py): is a GC pause
        # what stalls it (its `gc_pauses`)?
        ("fast+cudagraphs, whole decoder, gc", "lm B=32 T=256", graphs + whole + gc, lm + big, 200, 30, 10),
        # row 6 with the trainable tensors as views of one flat buffer (recipes/flat_params.py): AdamW,
        # clipping and zero_grad see one tensor instead of 420: does the host-bound B=8 step get faster?
        ("fast+cudagraphs, whole decoder, flat", "sft B=8 T<=128", graphs + whole + flat, pad, 400, 100, 10),
    ]
    if args.tiny:
        plan = [(k, d, c, x, 6, 2, 2 if p else 0) for k, d, c, x, _, _, p in plan]
    if args.rows:  # e.g. --rows 1,2
        plan = [plan[int(i)] for i in args.rows.split(",")]
    rows = []
    for kind, data, config, extra, steps, warmup, profile in plan:
        out = work / f"row_{len(rows)}.json"  # no commas: Hydra reads them as lists
        timer = [
            "+callbacks.step_timer._target_=benchmarks.step_timer.StepTimer",
            f"+callbacks.step_timer.out={out}",
            f"+callbacks.step_timer.warmup={warmup}",
            f"+callbacks.step_timer.profile_steps={profile}",
        ]
        if not args.tiny:  # a step 1 s or longer dumps its Python stacks (the B=32 row stalled, 2026-11-29)
            timer.append("+callbacks.step_timer.stall_trace_s=1.0")
        own = {o.split("=")[0] for o in config + extra}
        base = [o for o in common if o.split("=")[0] not in own]  # a row's own callbacks=... wins
        overrides = [*base, *config, *extra, f"trainer.max_steps={steps}", *timer]
        overrides.append(f"hydra.run.dir={work / f'run_{len(rows)}'}")
        spy = work / f"row_{len(rows)}.spy.txt" if args.py_spy else None
        row = {"path": kind, "data": data, **train_py(overrides, out, timeout=args.timeout, spy=spy)}
        print(json.dumps({k: v for k, v in row.items() if k != "command"}), flush=True)
        rows.append(row)
    return rows


# ---- 1B shape through the recipe ---------------------------------------------------------------------
def random_llama(
    shape: dict, tokenizer_source: str | None, device: str, dtype: str, seed: int = 0, attn: str = "sdpa"
):
    """(model, tokenizer): random Llama of `shape` built directly on `device` (a 1B init on CPU is slow);
    `attn`: the attention implementation (sdpa, or flex_attention for packed rows)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from models.causal_lm import build_tiny_llama, resolve_dtype

    if tokenizer_source is None:  # CPU check: the tiny builder with the offline SmolLM2 tokenizer
        return build_tiny_llama(
            **{k if k != "num_layers" else "num_layers": v for k, v in shape.items() if v is not None},
            special_tokens={"eos_token": "<|im_end|>"},
            attn_implementation=attn,
        )
    from models.causal_lm import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_source)
    if shape["vocab_size"] and shape["vocab_size"] > len(tokenizer):
        # The model's rows are all tokens, as in Llama 3 (its last 256 are reserved specials): a token MEAP
        # adds gets the next id and a new row, as it would with Llama 3's own tokenizer.
        fillers = [f"<|reserved_{i}|>" for i in range(shape["vocab_size"] - len(tokenizer))]
        tokenizer.add_tokens(fillers, special_tokens=True)
    config = LlamaConfig(
        vocab_size=shape["vocab_size"] or len(tokenizer),
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"],
        num_key_value_heads=shape["num_kv_heads"],
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=True,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model = model.to(resolve_dtype(dtype))
    model.set_attn_implementation(attn)
    return model, tokenizer


def build_objectives(name: str, backbone) -> dict:
    """objective_throughput.py's objectives (the same settings), plus LeaF, which needs the teacher: `leaf`
    with its fused KL from hidden states (`leaf_compiled`: its per-chunk softmaxes compiled), `leaf_logits`
    with both models' full logits (the eighth session's row, 70.5 GiB at 1B); and `meap_input_only`."""
    if name in ("leaf", "leaf_compiled", "leaf_logits"):
        # teacher: the full-depth model; student: every other layer (as lm_leaf)
        from recipes.objectives.leaf import LeafDistillationObjective

        fused, compiled = name != "leaf_logits", name == "leaf_compiled"
        return {
            "leaf": LeafDistillationObjective(
                teacher=backbone, temperature=1.0, fused=fused, compile=compiled
            )
        }
    if name == "meap_input_only":  # `meap` with objective.meap.mask_in_output=false: Liger can take the head
        from recipes.objectives.meap import MeapObjective

        return {"meap": MeapObjective(mode="pretrain", ratio=0.15, mask_in_output=False)}
    from benchmarks import objective_throughput as ot

    return ot.build_objectives(name)


def record_fit(row: dict, recipe, loader, args, device: str, rate_key: str) -> None:
    """Fit `recipe` on `loader` (warm-up + timed steps, peak memory from zero) and put the timings in
    `row`, with the rate under `rate_key` (tokens_per_s for text rows, clips_per_s for AVSR rows)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        result = fit_recipe(recipe, loader, args.steps, args.warmup, device, Path(tmp) / "t.json")
    row.update(result)
    row[rate_key] = result.get("real_tokens_per_s")


def fixed_batches(batch: int, length: int, vocab: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (batch, length), generator=gen)
    labels = input_ids.clone()
    labels[:, : length // 4] = IGNORE_INDEX
    return {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids)}


class Repeat(torch.utils.data.IterableDataset):
    def __init__(self, batch: dict, count: int):
        self.batch, self.count = batch, count

    def __iter__(self):
        for _ in range(self.count):
            yield {k: v.clone() for k, v in self.batch.items()}


def fit_recipe(recipe, loader, steps: int, warmup: int, device: str, out: Path, **trainer_args) -> dict:
    """Fit on one device (`trainer_args` override the Trainer's, e.g. devices=2, strategy="ddp"); the
    StepTimer JSON of this process."""
    import lightning as L

    timer = StepTimer(str(out), warmup=warmup)
    trainer_args = {"devices": 1, **trainer_args}
    trainer = L.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        precision="bf16-mixed" if device == "cuda" else "32-true",
        max_steps=warmup + steps + 1,
        max_epochs=1000,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        callbacks=[timer],
        gradient_clip_val=1.0,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=50,
        **trainer_args,
    )
    trainer.fit(recipe, train_dataloaders=loader)
    return json.loads(out.read_text())


def lm_recipe(kernels: str, objective: str, args, fast_overrides=None, attn: str = "sdpa"):
    """CausalLMRecipe on a random Llama-3.2-1B shape (TINY on CPU with --tiny), LoRA r16 on all linear
    layers, AdamW; `objective` as in build_objectives ("none": CE only)."""
    from models.layer_subset import build_layer_subset
    from recipes.causal_lm import CausalLMRecipe

    device = "cpu" if args.tiny else "cuda"
    shape = TINY if args.tiny else LLAMA_1B
    backbone = partial(
        random_llama, shape, args.tokenizer, device, "fp32" if args.tiny else "bf16", attn=attn
    )
    student = backbone
    if objective.startswith("leaf"):  # LeaF student: every other layer
        student = partial(build_layer_subset, backbone=backbone, layers="::2")
    fast = {
        "require_cuda": not args.tiny,
        **({"compile": "none"} if args.tiny else {}),
        **(fast_overrides or {}),
    }
    return CausalLMRecipe(
        backbone=student,
        optimizer=partial(torch.optim.AdamW, lr=1e-4),
        lora={"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        objectives=build_objectives(objective, backbone),
        ce_weight=0.0 if objective.startswith("leaf") else 1.0,
        kernels=kernels,
        fast=fast,
    )


def recipe_vocab(recipe) -> int:
    """Token ids for the fixed batches: below the embedding rows and SmolLM2's 49152."""
    return min(recipe.llm.get_input_embeddings().weight.shape[0], 49152)


def guarded_row(row: dict, device: str, measure) -> dict:
    """Run `measure()` (builds a recipe and records its figures into `row`); an OOM or any other error
    becomes the row's `error` (one failed row must not lose the table). The recipe, local to `measure`,
    is freed before the next row. Prints the row as one JSON line."""
    try:
        measure()
    except torch.OutOfMemoryError:
        row["error"] = "OOM"
    except Exception as err:  # noqa: BLE001
        row["error"] = f"{type(err).__name__}: {err}"[:1500]
    finally:
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps(row), flush=True)
    return row


def recipe_row(
    label, kernels, objective, batch, length, args, fast_overrides=None, data=None, attn="sdpa"
) -> dict:
    device = "cpu" if args.tiny else "cuda"
    row = {"row": label, "kernels": kernels, "objective": objective, "batch": batch, "seq_len": length}

    def measure():
        recipe = lm_recipe(kernels, objective, args, fast_overrides, attn)
        if data is None:
            loader = Repeat(fixed_batches(batch, length, recipe_vocab(recipe)), args.warmup + args.steps + 2)
        else:
            loader = data
        record_fit(row, recipe, loader, args, device, "tokens_per_s")

    return guarded_row(row, device, measure)


def bare_baseline(args, batch, length) -> dict:
    """The issue's baseline: plain HF + PEFT loop (benchmarks/objective_throughput.py, `none`)."""
    from benchmarks import objective_throughput as ot

    shape = ot.TINY if args.tiny else ot.LLAMA_1B
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    row = ot.measure("none", shape, batch, length, args.steps, args.warmup, device, dtype)
    row = {"row": "bare HF+PEFT", "kernels": "bare", **row}
    print(json.dumps(row), flush=True)
    return row


def lm1b(args) -> list[dict]:
    B, T = (2, 64) if args.tiny else (8, 2048)
    long_b, long_t = (1, 256) if args.tiny else (1, 8192)
    plan = {
        "bare": lambda: bare_baseline(args, B, T),
        "plain": lambda: recipe_row("recipe plain", "plain", "none", B, T, args),
        "fast": lambda: recipe_row("recipe fast", "fast", "none", B, T, args),
        "liger": lambda: recipe_row(
            "recipe fast, liger CE", "fast", "none", B, T, args, {"fused_cross_entropy": "liger"}
        ),
        "chunked": lambda: recipe_row(  # the pure-torch loss (gradient in the forward pass, as Liger's)
            "recipe fast, chunked CE", "fast", "none", B, T, args, {"fused_cross_entropy": "chunked"}
        ),
        "chunked_eager": lambda: recipe_row(  # the same with its per-chunk softmax eager (ce_compile=false)
            "recipe fast, chunked CE, eager softmax",
            "fast",
            "none",
            B,
            T,
            args,
            {"fused_cross_entropy": "chunked", "ce_compile": False},
        ),
        "long": lambda: recipe_row(
            f"recipe fast, B={long_b} T={long_t}", "fast", "none", long_b, long_t, args
        ),
        "long_adl": lambda: recipe_row(
            f"recipe fast + adl, B={long_b} T={long_t}", "fast", "adl", long_b, long_t, args
        ),
        "long_adl_compiled": lambda: recipe_row(
            f"recipe fast + adl_compiled, B={long_b} T={long_t}", "fast", "adl_compiled", long_b, long_t, args
        ),
    }
    for objective in (
        "decorr",
        "decorr_compiled",
        "adl",
        "adl_compiled",
        "meap",
        "meap_input_only",
        "leaf",
        "leaf_compiled",
        "leaf_logits",
    ):
        plan[objective] = partial(recipe_row, f"recipe fast + {objective}", "fast", objective, B, T, args)
    default = ["bare", "plain", "fast", "liger", "chunked", "chunked_eager", "decorr", "decorr_compiled", "adl", "adl_compiled", "meap", "meap_input_only", "leaf", "leaf_compiled", "leaf_logits", "long", "long_adl", "long_adl_compiled"]  # fmt: skip
    names = args.rows.split(",") if args.rows else [n for n in default if not (args.tiny and n == "liger")]
    return [plan[name]() for name in names]


# ---- packing -----------------------------------------------------------------------------------------
def long_tailed_examples(count: int, cap: int, vocab: int, seed: int = 0) -> list[dict]:
    """Lognormal lengths (median ~cap/12, a tail to cap), the first fifth of each a prompt."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.exp(math.log(max(8, cap / 12)) + torch.randn(count, generator=gen) * 1.0)
    examples = []
    for size in sizes.clamp(8, cap).long().tolist():
        ids = torch.randint(3, vocab, (size,), generator=gen).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (size // 5) + ids[size // 5 :]})
    return examples


def packing_modes(args, row_lengths: list[int | None]) -> list[tuple[str, str, int | None]]:
    """(batch layout, attention, packed row length) per row: padded rows with SDPA; packed rows with each of
    --pack-attn (sdpa gets transformers' dense block-diagonal mask, flex_attention a block mask that skips
    the blocks across documents) at each packed row length (None: --pack-len). flex_attention has no
    backward on CPU, so the tiny CPU check packs with sdpa only."""
    attns = ["sdpa"] if args.tiny else args.pack_attn.split(",")
    packed = [("packed", attn, length) for length in row_lengths for attn in attns]
    return [("padded", "sdpa", None), *packed]


def packing(args) -> list[dict]:
    from torch.utils.data import DataLoader

    from data.text.collate import PadCollator
    from data.text.datasets import SFTDataset
    from data.text.packing import PackingCollator
    from models.causal_lm import load_tokenizer

    cap = 256 if args.tiny else args.pack_len
    per_step = 8 if args.tiny else args.pack_batch
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    else:
        from models.causal_lm import build_tiny_llama

        _, tokenizer = build_tiny_llama(special_tokens={"eos_token": "<|im_end|>"})
    plan = [  # (data, examples per step, examples, packed row lengths)
        ("long-tailed", per_step, long_tailed_examples(per_step * (args.warmup + args.steps + 2), cap, 49152),
         [None])
    ]  # fmt: skip
    if args.sft_file:  # short rows: also at more examples per step, where a 1B step stops being launch-bound
        sft = SFTDataset(args.sft_file, tokenizer, max_length=cap).examples
        sft_batches = [per_step] if args.tiny else [int(b) for b in str(args.sft_pack_batch).split(",")]
        # rows of a few short documents pay far less attention than rows of --pack-len (data.pack_length)
        extra = ["128"] if args.tiny else str(args.sft_pack_len).split(",")
        row_lengths = [None, *(int(n) for n in extra if n)]
        plan += [("sft demo", batch, sft, row_lengths) for batch in sft_batches]
    rows = []
    for name, per_step, examples, row_lengths in plan:
        lengths = [len(e["input_ids"]) for e in examples]
        for mode, attn, row_length in packing_modes(args, row_lengths):
            collate = (
                PackingCollator(tokenizer.pad_token_id, cap, pad_to_multiple_of=64, row_length=row_length)
                if mode == "packed"
                else PadCollator(tokenizer.pad_token_id, pad_to_multiple_of=64)
            )
            reps = math.ceil(per_step * (args.warmup + args.steps + 2) / len(examples))
            loader = DataLoader((examples * reps), batch_size=per_step, shuffle=False, collate_fn=collate)
            label = f"{name} {per_step}/step {mode}" + ("" if attn == "sdpa" else f" {attn}")
            label += "" if row_length is None else f" rows of {row_length}"
            row = recipe_row(label, "fast", "none", per_step, cap, args, data=loader, attn=attn)
            row.update(
                data=name,
                mode=mode,
                attn=attn,
                examples_per_step=per_step,
                pack_row_length=(row_length or cap) if mode == "packed" else None,
                mean_len=sum(lengths) / len(lengths),
                max_len=max(lengths),
            )
            rows.append(row)
    return rows


# ---- AVSR step ----------------------------------------------------------------------------------------
AVSR_SHAPES = {  # encoder (Whisper d_model, layers, heads), LLM shape
    "demo": ((384, 4, 6), SMOLLM2),  # Whisper tiny.en-sized + SmolLM2-135M shape
    "paper": ((1024, 24, 16), LLAMA_1B),  # Whisper-medium-sized + Llama-3.2-1B shape
    "tiny": ((32, 2, 2), TINY),
}
WORDS = "the a speech model reads lips and hears words in noise on every clip of this test".split()


def whisper_encoder(width: int, layers: int, heads: int, true_length: bool, device: str):
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from models.avsr.audio_encoder import WhisperAudioEncoder

    config = WhisperConfig(
        num_mel_bins=80,
        d_model=width,
        encoder_layers=layers,
        encoder_attention_heads=heads,
        encoder_ffn_dim=4 * width,
        decoder_layers=1,
        decoder_attention_heads=heads,
        decoder_ffn_dim=4 * width,
        max_source_positions=1500,
    )
    with torch.device(device):
        encoder = WhisperEncoder(config)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return WhisperAudioEncoder(encoder.to(dtype).eval(), true_length=true_length, frozen=True)


def avsr_batches(batch: int, seconds: float, count: int, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    samples, frames = int(seconds * 16000), int(seconds * 25)
    out = []
    for i in range(count):
        words = max(2, int(seconds * 2.5))
        texts = [" ".join(WORDS[(i + j + k) % len(WORDS)] for k in range(words)) for j in range(batch)]
        out.append(
            {
                "text": texts,
                "ids": [f"{i}-{j}" for j in range(batch)],
                "skipped": {"too_long": 0, "unreadable": 0},
                "audio": 0.1 * torch.randn(batch, samples, generator=gen),
                "audio_lengths": torch.full((batch,), samples),
                "video": torch.randn(batch, frames, 1, 88, 88, generator=gen),
                "video_lengths": torch.full((batch,), frames),
                "attention_mask": torch.ones(batch, 1),  # StepTimer counts one "token" per clip
            }
        )
    return out


def avsr_row(shape_name: str, seconds: float, true_length: bool, kernels: str, args) -> dict:
    from models.avsr.projector import ModalityProjector
    from models.avsr.video_encoder import ResNet18VideoEncoder
    from recipes.avsr import AVSRRecipe

    device = "cpu" if args.tiny else "cuda"
    (width, layers, heads), llm_shape = AVSR_SHAPES[shape_name]
    batch = 2 if args.tiny else args.avsr_batch
    row = {"row": f"avsr {shape_name}", "seconds": seconds, "true_length": true_length, "kernels": kernels}

    def measure():
        fast = {"require_cuda": not args.tiny, **({"compile": "none"} if args.tiny else {})}
        recipe = AVSRRecipe(
            backbone=partial(
                random_llama, llm_shape, args.tokenizer, device, "fp32" if args.tiny else "bf16"
            ),
            optimizer=partial(torch.optim.AdamW, lr=1e-4),
            prompt="Transcribe the speech from the audio and the lip movements.",
            modality="audiovisual",
            audio_encoder=partial(whisper_encoder, width, layers, heads, true_length, device),
            video_encoder=partial(ResNet18VideoEncoder, base_channels=8 if args.tiny else 64),
            audio_projector=partial(ModalityProjector, rate=4),
            video_projector=partial(ModalityProjector, rate=1, compression="avg_pool", layer_norm=True),
            lora={"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
            kernels=kernels,
            fast=fast,
        )
        data = avsr_batches(batch, seconds, args.warmup + args.steps + 2)
        loader = torch.utils.data.DataLoader(data, batch_size=None)
        record_fit(row, recipe, loader, args, device, "clips_per_s")

    return guarded_row(row, device, measure)


def avsr(args) -> list[dict]:
    """clips/s of the AVSR training step (audio-visual, B clips), true-length vs 30 s Whisper window."""
    shapes = ["tiny"] if args.tiny else ["demo", "paper"]
    seconds = (1, 2) if args.tiny else (2, 8, 24)
    plan = [(s, sec, True, "fast") for s in shapes for sec in seconds]
    plan += [(s, seconds[0], False, "fast") for s in shapes]  # the 30 s window at the shortest clip
    plan += [(s, seconds[1], True, "plain") for s in shapes]
    if args.rows:  # e.g. demo:8:1:fast
        plan = [(s, float(sec), t == "1", k) for s, sec, t, k in (r.split(":") for r in args.rows.split(","))]
    return [avsr_row(*item, args) for item in plan]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("section", choices=["small", "lm1b", "packing", "avsr"])
    parser.add_argument("--json", required=True)
    parser.add_argument("--tokenizer", default=None, help="an HF tokenizer folder (the SmolLM2 one)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (a check, not a measurement)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 8; tiny 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3; tiny 1)")
    parser.add_argument("--sft-file", default=None)
    parser.add_argument("--pack-len", type=int, default=2048)
    parser.add_argument("--pack-batch", type=int, default=32)
    parser.add_argument(
        "--pack-attn",
        default="sdpa,flex_attention",
        help="attention implementations of the packed rows, comma-separated (padded rows: sdpa; --tiny: sdpa)",
    )
    parser.add_argument(
        "--sft-pack-batch",
        default="32,256",
        help="examples per step of the SFT demo rows, comma-separated",
    )
    parser.add_argument(
        "--sft-pack-len",
        default="512",
        help="extra packed row lengths for the SFT demo rows, comma-separated, beside --pack-len ('' for none; "
        "--tiny: 128): its documents are about 100 tokens, so a row of 512 holds several and pays a quarter "
        "of the attention of a row of 2048",
    )
    parser.add_argument("--avsr-batch", type=int, default=8, help="clips per AVSR step")
    parser.add_argument(
        "--rows",
        default=None,
        help="small: row indices (0,1,..); lm1b: row names; "
        "avsr: shape:seconds:true_length:kernels (demo:8:1:fast)",
    )
    parser.add_argument("--timeout", type=int, default=240, help="seconds per train.py run")
    parser.add_argument(
        "--py-spy",
        action="store_true",
        help="small: sample each run's Python stacks (benchmarks/host_profile.py)",
    )
    args = parser.parse_args(argv)
    args.steps = args.steps or (2 if args.tiny else 8)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rows = {"small": small, "lm1b": lm1b, "packing": packing, "avsr": avsr}[args.section](args)
    env = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"environment": env, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
