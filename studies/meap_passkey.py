"""Study 3: does MEAP-SFT improve pass-key retrieval over plain SFT at matched compute? (issue 8)

    python studies/meap_passkey.py --out outputs/studies/meap_passkey            # one H200: trainer=gpu, bf16
    python studies/meap_passkey.py --out outputs/studies/meap_passkey --micro-batch 16  # 4 x 16 rows a step
    python studies/meap_passkey.py --out outputs/studies/meap_passkey --probes multikey --keys 12
    python studies/meap_passkey.py --out /tmp/meap_smoke --smoke                 # tiny model, CPU, a minute

1. Data (built once under <out>/data, so the GPU machine needs no Debian text): the retrieval SFT set
   (data/text/retrieval_sft.py, 12k train / 300 val rows) and the trials of each probe (`--probes`, both
   by default; seeded, shared by every model, 200 per length):
   - `passkey` (studies/eval_passkey.py, data/passkey_trials.jsonl, `--lengths` 256,1024,2048): one 5-digit
     key in a Devil's Dictionary haystack; measures plain retrieval. Base 96.5/33.0/0.0% (chat), and both
     trained arms 100% at every length: a ceiling, it cannot separate the arms.
   - `multikey` (studies/eval_multikey.py, data/multikey_trials.jsonl, `--multikey-lengths`
     256,1024,2048,4096, `--keys` 8): K doors with distinct colours and keys at random depths, the question
     asks for one door; measures retrieval among look-alike needles. Also counts confuser answers (another
     door's key: found a needle, the wrong one).
2. Arms (studies/arms.py, one train.py per GPU, resumable): `sft` (plain CE) and `meap` (CE with MEAP-SFT
   masked copies). Matched compute: every row whose answer exceeds `min_answer_tokens` gets a full-length
   copy, so a MEAP batch holds `ratio` times the tokens of a plain one (ratio measured on the tokenised
   training set, <out>/data/budget.json); the MEAP arm keeps the batch size and runs steps / ratio steps,
   so both arms train on the same number of tokens. `--micro-batch m`: batch/m micro-batches of m rows
   per optimizer step (studies.arms.batch_overrides; the same rows per step, less memory: the SFT arm
   needs ~81 GiB at 64 rows x 1024 tokens). MEAP copies are appended per micro-batch, so the token ratio
   holds; both arms' CE is a per-micro-batch token mean, averaged over the micro-batches of a step.
3. Probes: greedy decoding of every trial for the untouched base model and each arm, in the chat format
   (primary) and raw text; exact match of the key; 95% Wilson intervals; MEAP - SFT as a paired
   difference over the same trials. Results per model, probe and format in <out>/eval/
   (<model>_<format>.jsonl for passkey, <model>_multikey_<format>.jsonl); <out>/report.md has one block
   per probe with its goal line (MEAP - SFT >= +5 points at 1024 tokens, chat), <probe>.png its plot.
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
from studies.eval_multikey import build_multikey_trials, evaluate_multikey  # noqa: E402
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
PROBES = {"passkey": "Pass-key", "multikey": "Multi-key"}  # name: title in the report
EVALUATE = {"passkey": evaluate_passkey, "multikey": evaluate_multikey}


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
    parser.add_argument("--probes", default="passkey,multikey", help=f"comma-separated, of {list(PROBES)}")
    parser.add_argument("--lengths", default=None, help="pass-key probe lengths in tokens (256,1024,2048)")
    parser.add_argument(
        "--multikey-lengths", default=None, help="multi-key probe lengths in tokens (256,1024,2048,4096)"
    )
    parser.add_argument("--keys", type=int, default=None, help="multi-key probe: needles per trial (8)")
    parser.add_argument("--trials", type=int, default=None, help="trials per length, each probe (200)")
    parser.add_argument("--min-answer-tokens", type=int, default=16, help="MEAP: rows longer get a copy")
    parser.add_argument("--eval-batch-size", type=int, default=None, help="probe batch (32)")
    parser.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for both arms")
    args = parser.parse_args(argv)
    defaults = (
        {
            "steps": 4,
            "batch_size": 4,
            "lengths": "64,128",
            "multikey_lengths": "128,256",  # 3 needles and the question take ~100 tokens
            "keys": 3,
            "trials": 6,
            "eval_batch_size": 8,
        }
        if args.smoke
        else {
            "steps": 250,
            "batch_size": 64,
            "lengths": "256,1024,2048",
            "multikey_lengths": "256,1024,2048,4096",
            "keys": 8,
            "trials": 200,
            "eval_batch_size": 32,
        }
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.lengths = [int(x) for x in str(args.lengths).split(",")]
    args.multikey_lengths = [int(x) for x in str(args.multikey_lengths).split(",")]
    args.probes = [p for p in str(args.probes).split(",") if p]
    unknown = [p for p in args.probes if p not in PROBES]
    if unknown or not args.probes:
        parser.error(f"--probes: {unknown or 'none'} not among {list(PROBES)}")
    args.seeds = [int(x) for x in str(args.seeds).split(",")]
    try:
        batch_overrides(args.batch_size, args.micro_batch)
    except ValueError as error:
        parser.error(f"--micro-batch: {error}")
    return args


def probe_lengths(args, probe: str) -> list[int]:
    return args.multikey_lengths if probe == "multikey" else args.lengths


# ---- 1. data ----------------------------------------------------------------------------------------
def prepare_data(args, tokenizer) -> dict:
    """SFT rows, each probe's trials and the token budget under <out>/data (each built once)."""
    from data.text.retrieval_sft import build_retrieval_sft

    data_dir = Path(args.out) / "data"
    sizes = {"num_train": 48, "num_val": 8, "max_quotes": 3} if args.smoke else {}
    build_retrieval_sft(data_dir / "sft", **sizes)
    for probe in args.probes:
        path = trials_path(args.out, probe)
        if not path.exists():
            save_jsonl(build_probe_trials(args, probe, tokenizer), path)
        check_trials(args, probe, load_jsonl(path))
    budget_path = data_dir / "budget.json"
    if not budget_path.exists():
        budget = meap_token_ratio(data_dir / "sft" / "train.jsonl", tokenizer, args)
        budget_path.write_text(json.dumps(budget, indent=2) + "\n")
    return json.loads(budget_path.read_text())


def trials_path(out: str | Path, probe: str) -> Path:
    return Path(out) / "data" / f"{probe}_trials.jsonl"


def build_probe_trials(args, probe: str, tokenizer) -> list[dict]:
    """The probe's trials, seed 0, `args.trials` per length."""
    pieces = haystack_pieces(smoke=args.smoke)
    if probe == "multikey":
        return build_multikey_trials(
            tokenizer, args.multikey_lengths, args.trials, keys=args.keys, seed=0, pieces=pieces
        )
    return build_trials(tokenizer, args.lengths, args.trials, seed=0, pieces=pieces)


def check_trials(args, probe: str, trials: list[dict]) -> None:
    """Trials saved by an earlier run must hold the lengths (and for multikey the K) asked for now."""
    found, wanted = {t["length"] for t in trials}, set(probe_lengths(args, probe))
    keys = {len(t["needles"]) for t in trials} if probe == "multikey" else {args.keys}
    if not wanted <= found or keys != {args.keys}:
        what = f" with {sorted(keys)} keys" if probe == "multikey" else ""
        raise ValueError(
            f"{trials_path(args.out, probe)} holds lengths {sorted(found)}{what}, not what was asked for "
            "now: delete it and the probe's <out>/eval files to rebuild them"
        )


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
def eval_path(out: str | Path, probe: str, model: str, fmt: str) -> Path:
    """<out>/eval/<model>_<format>.jsonl for passkey (its name from before multikey: old folders resume),
    <out>/eval/<model>_<probe>_<format>.jsonl for the other probes."""
    return (
        Path(out)
        / "eval"
        / (f"{model}_{fmt}.jsonl" if probe == "passkey" else f"{model}_{probe}_{fmt}.jsonl")
    )


def evaluate_all(args, arms: list[Arm]) -> dict[str, dict[str, dict[str, list[dict]]]]:
    """{probe: {model name: {format: per-trial results}}}, each cached in eval_path(...); a model is
    loaded only when one of its files is missing."""
    import torch

    out = Path(args.out)
    trials = {probe: load_jsonl(trials_path(out, probe)) for probe in args.probes}
    device = pick_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    models = {"base": None, **{a.name: out / a.name for a in arms}}
    results: dict[str, dict[str, dict[str, list[dict]]]] = {probe: {} for probe in args.probes}
    for name, run_dir in models.items():
        paths = {(p, fmt): eval_path(out, p, name, fmt) for p in args.probes for fmt in FORMATS}
        if not all(path.exists() for path in paths.values()):
            model, tokenizer = load_base(args.smoke) if run_dir is None else load_trained(run_dir)
            model.to(device=device, dtype=dtype)
            tokenizer.padding_side = "left"
            for (probe, fmt), path in paths.items():
                if not path.exists():
                    print(f"[study] {probe} probe: {name} ({fmt}), {len(trials[probe])} trials", flush=True)
                    rows = EVALUATE[probe](model, tokenizer, trials[probe], fmt, args.eval_batch_size)
                    save_jsonl(rows, path)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for (probe, fmt), path in paths.items():
            results[probe].setdefault(name, {})[fmt] = load_jsonl(path)
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
    """<out>/report.md: the arms, then one block per probe; results as evaluate_all returns them."""
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
    for probe in args.probes:
        lines += probe_section(args, probe, results[probe])
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def probe_section(args, probe: str, results: dict[str, dict[str, list[dict]]]) -> list[str]:
    """One probe's report block: per format its accuracy table with the paired MEAP - SFT rows (and for
    multikey the confuser answers), then its goal line and plot."""
    lengths = probe_lengths(args, probe)
    name = PROBES[probe] + (f" ({args.keys} needles)" if probe == "multikey" else "")
    lines = []
    for fmt in FORMATS:
        table = accuracy_table(results, fmt, lengths)
        title = "primary" if fmt == PRIMARY_FORMAT else "secondary"
        header = [
            "| model | " + " | ".join(f"{n} tok" for n in lengths) + " |",
            "|---|" + "---|" * len(lengths),
        ]
        lines += ["", f"## {name} accuracy, {fmt} format ({title}), % [95% Wilson CI]", "", *header]
        for model, row in table.items():
            cells = [
                f"{100 * c / n:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] ({c}/{n})"
                for c, n, lo, hi in row.values()
            ]
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        for seed in args.seeds:
            cells = []
            for length in lengths:
                d, lo, hi = paired(results, fmt, f"meap_s{seed}", f"sft_s{seed}", length)
                cells.append(f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}]")
            lines.append(f"| MEAP - SFT, seed {seed} (points, paired) | " + " | ".join(cells) + " |")
        if probe == "multikey":
            lines += [
                "",
                f"Confuser answers ({fmt}): another door's key, count/trials (% of trials)",
                "",
                *header,
            ]
            for model, row in confuser_table(results, fmt, lengths).items():
                cells = [f"{c}/{n} ({100 * c / n:.1f}%)" for c, n in row.values()]
                lines.append(f"| {model} | " + " | ".join(cells) + " |")
    if GOAL_LENGTH in lengths:
        goal = [paired(results, PRIMARY_FORMAT, f"meap_s{s}", f"sft_s{s}", GOAL_LENGTH) for s in args.seeds]
        mean = sum(g[0] for g in goal) / len(goal)
        verdict = "met" if mean >= GOAL_POINTS else "NOT met"
        others = []  # the secondary formats at the same length: a verdict they contradict is not robust
        for fmt in (f for f in FORMATS if f != PRIMARY_FORMAT):
            gains = [paired(results, fmt, f"meap_s{s}", f"sft_s{s}", GOAL_LENGTH)[0] for s in args.seeds]
            other = sum(gains) / len(gains)
            sign = " (opposite sign: not robust)" if other * mean < 0 else ""
            others.append(f"{fmt} format {other:+.1f}{sign}")
        lines += [
            "",
            f"Goal, {probe} probe (>= +{GOAL_POINTS:.0f} points at {GOAL_LENGTH} tokens, {PRIMARY_FORMAT} "
            f"format): {verdict} (MEAP - SFT = {mean:+.1f} points, mean over seeds {args.seeds}; "
            + "; ".join(others)
            + ").",
        ]
    plot = plot_accuracy(Path(args.out), results, lengths, probe, name)
    if plot:
        lines += ["", f"![{name} accuracy]({plot.name})"]
    return lines


def confuser_table(results: dict[str, dict[str, list[dict]]], fmt: str, lengths: list[int]) -> dict:
    """{model: {length: (confuser answers, trials)}} for one format of the multikey probe."""
    return {
        model: {
            length: (
                sum(r["confuser"] for r in by_format[fmt] if r["length"] == length),
                sum(r["length"] == length for r in by_format[fmt]),
            )
            for length in lengths
        }
        for model, by_format in results.items()
    }


def plot_accuracy(out: Path, results, lengths: list[int], probe: str, title: str) -> Path | None:
    """<out>/<probe>.png: accuracy against length with Wilson intervals, one panel per format."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(FORMATS), figsize=(5 * len(FORMATS), 3.5), sharey=True)
    for ax, fmt in zip(axes, FORMATS):
        for model, row in accuracy_table(results, fmt, lengths).items():
            acc = [100 * c / n for c, n, _, _ in row.values()]
            err = [
                [100 * (c / n - lo) for c, n, lo, _ in row.values()],
                [100 * (hi - c / n) for c, n, _, hi in row.values()],
            ]
            ax.errorbar(lengths, acc, yerr=err, marker="o", capsize=3, label=model)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_xlabel("prompt length (tokens)")
        ax.set_title(f"{title}, {fmt} format")
    axes[0].set_ylabel("exact match (%)")
    axes[0].legend()
    fig.tight_layout()
    path = out / f"{probe}.png"
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
