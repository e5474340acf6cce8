"""Study 3: does MEAP-SFT improve pass-key retrieval over plain SFT at matched compute? (issue 8)

    python studies/meap_passkey.py --out outputs/studies/meap_passkey            # one H200: trainer=gpu, bf16
    python studies/meap_passkey.py --out outputs/studies/meap_passkey --micro-batch 16  # 4 x 16 rows a step
    python studies/meap_passkey.py --out /tmp/meap_smoke --smoke                 # tiny model, CPU, a minute

1. Data (built once under <out>/data, so the GPU machine needs no Debian text): the retrieval SFT set
   (data/text/retrieval_sft.py, 12k train / 300 val rows) and the pass-key trials (studies/eval_passkey.py:
   200 per length at 256, 1024 and 2048 tokens, seeded, shared by every model).
2. Arms (studies/arms.py, one train.py per GPU, resumable): `sft` (plain CE) and `meap` (CE with MEAP-SFT
   masked copies). Matched compute: every row whose answer exceeds `min_answer_tokens` gets a full-length
   copy, so a MEAP batch holds `ratio` times the tokens of a plain one (ratio measured on the tokenised
   training set, <out>/data/budget.json); the MEAP arm keeps the batch size and runs steps / ratio steps,
   so both arms train on the same number of tokens. `--micro-batch m`: batch/m micro-batches of m rows
   per optimizer step (studies.arms.batch_overrides; the same rows per step, less memory: the SFT arm
   needs ~81 GiB at 64 rows x 1024 tokens). MEAP copies are appended per micro-batch, so the token ratio
   holds; both arms' CE is a per-micro-batch token mean, averaged over the micro-batches of a step.
3. Probe: greedy decoding of every trial for the untouched base model and each arm, in the chat format
   (primary) and raw text; exact match of the key; 95% Wilson intervals; MEAP - SFT as a paired
   difference over the same trials. Results per model in <out>/eval/, the table in <out>/report.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from studies.arms import Arm, arm_results, batch_overrides, run_arms  # noqa: E402
from studies.eval_generate import (  # noqa: E402
    load_base,
    load_trained,
    paired_difference,
    pick_device,
    wilson_interval,
)
from studies.eval_passkey import (  # noqa: E402
    FORMATS,
    build_trials,
    evaluate_passkey,
    haystack_pieces,
    load_jsonl,
    save_jsonl,
)

PRIMARY_FORMAT = "chat"
GOAL_LENGTH, GOAL_POINTS = 1024, 5.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="study folder (rerun to resume)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, CPU, a few steps")
    parser.add_argument("--prepare-only", action="store_true", help="build <out>/data and stop")
    parser.add_argument("--steps", type=int, default=None, help="steps of the plain-SFT arm (250)")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per optimizer step (64)")
    parser.add_argument(
        "--micro-batch", type=int, default=None, help="rows per forward (default: the batch size)"
    )
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds")
    parser.add_argument("--lengths", default=None, help="probe lengths in tokens (256,1024,2048)")
    parser.add_argument("--trials", type=int, default=None, help="trials per length (200)")
    parser.add_argument("--min-answer-tokens", type=int, default=16, help="MEAP: rows longer get a copy")
    parser.add_argument("--eval-batch-size", type=int, default=None, help="probe batch (32)")
    parser.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for both arms")
    args = parser.parse_args(argv)
    defaults = (
        {"steps": 4, "batch_size": 4, "lengths": "64,128", "trials": 6, "eval_batch_size": 8}
        if args.smoke
        else {
            "steps": 250,
            "batch_size": 64,
            "lengths": "256,1024,2048",
            "trials": 200,
            "eval_batch_size": 32,
        }
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.lengths = [int(x) for x in str(args.lengths).split(",")]
    args.seeds = [int(x) for x in str(args.seeds).split(",")]
    try:
        batch_overrides(args.batch_size, args.micro_batch)
    except ValueError as error:
        parser.error(f"--micro-batch: {error}")
    return args


# ---- 1. data ----------------------------------------------------------------------------------------
def prepare_data(args, tokenizer) -> dict:
    """SFT rows, probe trials and the token budget under <out>/data (each built once)."""
    from data.text.retrieval_sft import build_retrieval_sft

    data_dir = Path(args.out) / "data"
    sizes = {"num_train": 48, "num_val": 8, "max_quotes": 3} if args.smoke else {}
    build_retrieval_sft(data_dir / "sft", **sizes)
    trials_path = data_dir / "passkey_trials.jsonl"
    if not trials_path.exists():
        pieces = haystack_pieces(smoke=args.smoke)
        save_jsonl(build_trials(tokenizer, args.lengths, args.trials, seed=0, pieces=pieces), trials_path)
    budget_path = data_dir / "budget.json"
    if not budget_path.exists():
        budget = meap_token_ratio(data_dir / "sft" / "train.jsonl", tokenizer, args)
        budget_path.write_text(json.dumps(budget, indent=2) + "\n")
    return json.loads(budget_path.read_text())


def meap_token_ratio(train_file: Path, tokenizer, args) -> dict:
    """Tokens of a MEAP epoch / tokens of a plain epoch: each row with more than `min_answer_tokens`
    target tokens (after truncation, as MeapObjective counts them) is trained twice at full length."""
    from data.text.sft import IGNORE_INDEX, to_messages, tokenize_chat

    max_length = 128 if args.smoke else 1024
    plain = copies = eligible = rows = 0
    for line in train_file.read_text(encoding="utf-8").splitlines():
        example = tokenize_chat(tokenizer, to_messages(json.loads(line)), max_length)
        tokens = len(example.input_ids)
        plain += tokens
        rows += 1
        if sum(label != IGNORE_INDEX for label in example.labels) > args.min_answer_tokens:
            copies += tokens
            eligible += 1
    return {
        "rows": rows,
        "rows_with_copy": eligible,
        "tokens_plain_epoch": plain,
        "tokens_meap_epoch": plain + copies,
        "ratio": (plain + copies) / plain,
        "max_length": max_length,
        "min_answer_tokens": args.min_answer_tokens,
    }


# ---- 2. arms ----------------------------------------------------------------------------------------
def make_arms(args, budget: dict) -> list[Arm]:
    sft_dir = Path(args.out).resolve() / "data" / "sft"
    meap_steps = max(1, round(args.steps / budget["ratio"]))
    common = [
        f"data.prepare.out_dir={sft_dir}",
        *batch_overrides(args.batch_size, args.micro_batch),
        "logger=csv",
    ]
    if args.smoke:
        common += ["debug=smoke", "data.max_length=128", "trainer.limit_train_batches=null"]
    else:
        common += ["trainer=gpu", "data.max_length=1024"]
    arms = []
    for seed in args.seeds:
        seeded = [*common, f"seed={seed}", *args.extra]
        arms.append(
            Arm(f"sft_s{seed}", ["experiment=meap_passkey_sft", f"trainer.max_steps={args.steps}", *seeded])
        )
        arms.append(
            Arm(
                f"meap_s{seed}",
                [
                    "experiment=meap_passkey_meap",
                    f"trainer.max_steps={meap_steps}",
                    f"objective.meap.min_answer_tokens={args.min_answer_tokens}",
                    *seeded,
                ],
            )
        )
    return arms


# ---- 3. probe ---------------------------------------------------------------------------------------
def evaluate_all(args, arms: list[Arm]) -> dict[str, dict[str, list[dict]]]:
    """{model name: {format: per-trial results}}, cached in <out>/eval/<model>_<format>.jsonl."""
    import torch

    out, trials = Path(args.out), load_jsonl(Path(args.out) / "data" / "passkey_trials.jsonl")
    device = pick_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    models = {"base": None, **{a.name: out / a.name for a in arms}}
    results: dict[str, dict[str, list[dict]]] = {}
    for name, run_dir in models.items():
        paths = {fmt: out / "eval" / f"{name}_{fmt}.jsonl" for fmt in FORMATS}
        if not all(p.exists() for p in paths.values()):
            model, tokenizer = load_base(args.smoke) if run_dir is None else load_trained(run_dir)
            model.to(device=device, dtype=dtype)
            tokenizer.padding_side = "left"
            for fmt, path in paths.items():
                if not path.exists():
                    print(f"[study] pass-key probe: {name} ({fmt}), {len(trials)} trials", flush=True)
                    save_jsonl(evaluate_passkey(model, tokenizer, trials, fmt, args.eval_batch_size), path)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results[name] = {fmt: load_jsonl(p) for fmt, p in paths.items()}
    return results


def accuracy_table(results: dict[str, dict[str, list[dict]]], fmt: str, lengths: list[int]) -> dict:
    """{model: {length: (correct, n, low, high)}} for one format."""
    table = {}
    for name, by_format in results.items():
        table[name] = {}
        for length in lengths:
            hits = [r["correct"] for r in by_format[fmt] if r["length"] == length]
            low, high = wilson_interval(sum(hits), len(hits))
            table[name][length] = (sum(hits), len(hits), low, high)
    return table


def paired(results, fmt: str, a: str, b: str, length: int) -> tuple[float, float, float]:
    """a - b in points over the same trials of one length."""
    key = {(r["length"], r["index"]): r["correct"] for r in results[b][fmt]}
    rows = [r for r in results[a][fmt] if r["length"] == length]
    diff, low, high = paired_difference(
        [r["correct"] for r in rows], [key[(length, r["index"])] for r in rows]
    )
    return 100 * diff, 100 * low, 100 * high


# ---- 4. report --------------------------------------------------------------------------------------
def write_report(args, arms: list[Arm], budget: dict, results) -> Path:
    out = Path(args.out)
    lines = [
        "# Study 3: MEAP-SFT vs plain SFT, pass-key retrieval (SmolLM2-135M)"
        + (" [SMOKE]" if args.smoke else ""),
        "",
        f"Command: `python studies/meap_passkey.py --out {args.out}"
        + (" --smoke" if args.smoke else "")
        + "`",
        "",
        f"Matched compute: MEAP copies {budget['rows_with_copy']}/{budget['rows']} training rows (answers > "
        f"{budget['min_answer_tokens']} tokens), {budget['ratio']:.3f}x the tokens per batch; the MEAP arm runs "
        f"{max(1, round(args.steps / budget['ratio']))} steps against {args.steps} for SFT (batch {args.batch_size}"
        + (
            f" in micro-batches of {args.micro_batch}"
            if args.micro_batch not in (None, args.batch_size)
            else ""
        )
        + "), "
        "so both train on the same number of tokens.",
        "",
    ]
    lines += ["| arm | steps | val perplexity (held-out) | train loss last |", "|---|---|---|---|"]
    for arm in arms:
        res = arm_results(out, arm) or {}
        ppl = res.get("after", {}).get("val/perplexity")
        lines.append(
            f"| {arm.name} | {res.get('step', '?')} | {ppl:.2f} | {res.get('train_loss_last', float('nan')):.3f} |"
            if ppl is not None
            else f"| {arm.name} | ? | ? | ? |"
        )
    for fmt in FORMATS:
        table = accuracy_table(results, fmt, args.lengths)
        title = "primary" if fmt == PRIMARY_FORMAT else "secondary"
        lines += ["", f"## Pass-key accuracy, {fmt} format ({title}), % [95% Wilson CI]", ""]
        lines += ["| model | " + " | ".join(f"{n} tok" for n in args.lengths) + " |"]
        lines += ["|---|" + "---|" * len(args.lengths)]
        for name, row in table.items():
            cells = [
                f"{100 * c / n:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] ({c}/{n})"
                for c, n, lo, hi in row.values()
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        for seed in args.seeds:
            cells = []
            for length in args.lengths:
                d, lo, hi = paired(results, fmt, f"meap_s{seed}", f"sft_s{seed}", length)
                cells.append(f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}]")
            lines.append(f"| MEAP - SFT, seed {seed} (points, paired) | " + " | ".join(cells) + " |")
    if GOAL_LENGTH in args.lengths:
        goal = [paired(results, PRIMARY_FORMAT, f"meap_s{s}", f"sft_s{s}", GOAL_LENGTH) for s in args.seeds]
        mean = sum(g[0] for g in goal) / len(goal)
        verdict = "met" if mean >= GOAL_POINTS else "NOT met"
        lines += [
            "",
            f"Goal (>= +{GOAL_POINTS:.0f} points at {GOAL_LENGTH} tokens, {PRIMARY_FORMAT} format): {verdict} "
            f"(MEAP - SFT = {mean:+.1f} points, mean over seeds {args.seeds}).",
        ]
    plot = plot_accuracy(out, results, args.lengths)
    if plot:
        lines += ["", f"![pass-key accuracy]({plot.name})"]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def plot_accuracy(out: Path, results, lengths: list[int]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(FORMATS), figsize=(5 * len(FORMATS), 3.5), sharey=True)
    for ax, fmt in zip(axes, FORMATS):
        for name, row in accuracy_table(results, fmt, lengths).items():
            acc = [100 * c / n for c, n, _, _ in row.values()]
            err = [
                [100 * (c / n - lo) for c, n, lo, _ in row.values()],
                [100 * (hi - c / n) for c, n, _, hi in row.values()],
            ]
            ax.errorbar(lengths, acc, yerr=err, marker="o", capsize=3, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_xlabel("prompt length (tokens)")
        ax.set_title(f"pass-key, {fmt} format")
    axes[0].set_ylabel("exact match (%)")
    axes[0].legend()
    fig.tight_layout()
    path = out / "passkey.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _, tokenizer = load_base(args.smoke) if args.smoke else (None, _smollm2_tokenizer())
    budget = prepare_data(args, tokenizer)
    print(f"[study] data ready; MEAP token ratio {budget['ratio']:.3f}", flush=True)
    if args.prepare_only:
        return out / "data"
    arms = make_arms(args, budget)
    run_arms(arms, out)
    results = evaluate_all(args, arms)
    report = write_report(args, arms, budget, results)
    print(report.read_text(), flush=True)
    return report


def _smollm2_tokenizer():
    from models.causal_lm import find_package_file, load_tokenizer
    from studies.eval_generate import SMOLLM2

    path = Path(find_package_file(SMOLLM2["package"], SMOLLM2["filename"]))
    return load_tokenizer(str(path.parent), path.name, SMOLLM2["special_tokens"])


if __name__ == "__main__":
    main()
