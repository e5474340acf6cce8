"""Study 4: LeaF vs plain KD with the same teacher, data and steps (issue 8).

    python studies/leaf_vs_kd.py --out outputs/studies/leaf_vs_kd               # one H200: trainer=gpu, bf16
    python studies/leaf_vs_kd.py --out outputs/studies/leaf_vs_kd_same_item \\
        --distractors same-item --stage1-student kd --micro-batch 32            # confounders; 2 x 32 rows/step
    python studies/leaf_vs_kd.py --out /tmp/leaf_smoke --smoke                  # tiny model, CPU, minutes

1. Data (<out>/data/arith, built once): generated multi-step arithmetic word problems with distractor
   sentences (data/text/arith_word.py; our own seeded generator, not reasoning-gym), 20k train / 200 val /
   600 test items, split by item. `--distractors other` (default): the distractors mention other things
   ("Leo owns 9 bicycles."); `same-item`: the question's item held or moved by another person ("Leo has 9
   apples."), so reading the wrong sentence gives a wrong number. The kind (and `--stage1-student`) is
   recorded in <out>/study_settings.json; a rerun with other values is refused, so a study never mixes them.
2. Teacher (arm `teacher`, studies/arms.py): SmolLM2-135M fully fine-tuned on the train split.
3. Student: the same checkpoint with every other decoder layer (`--student-layers ::2`, 15 of 30 layers).
4. LeaF stage 1 (leaf_prepare.py) on the first `--distill-rows` training rows: <out>/data/kd_train.jsonl
   holds those rows, <out>/data/leaf_train.jsonl the same rows each followed by its counterfactual rows
   (confounder spans cut out of the question). The student whose gradients are compared with the
   teacher's: `--stage1-student base` (default) the untrained layer-pruned student; `kd` the KD arm of the
   first seed, trained first (its exported model, already pruned), then stage 1, then the LeaF arms.
5. Arms `kd_s{seed}` and `leaf_s{seed}`: the same distillation (KL to the teacher only, same steps, batch,
   learning rate and seed), on kd_train vs leaf_train. `--micro-batch m`: every arm (teacher included)
   runs batch/m micro-batches of m rows per optimizer step (studies.arms.batch_overrides), for memory.
6. Exact-match accuracy of the final answer on the test split for the teacher, the student before
   distillation, and every arm (95% Wilson intervals; LeaF - KD paired over items), accuracy on items with
   and without distractor sentences, and how many wrong answers use a number found only in a distractor
   sentence (`distractor_errors`). Table: <out>/report.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from studies.arms import Arm, arm_results, batch_overrides, run_arms  # noqa: E402
from studies.eval_answers import evaluate_answers  # noqa: E402
from studies.eval_generate import (  # noqa: E402
    SMOLLM2,
    exported_model_dir,
    load_base,
    load_trained,
    paired_difference,
    pick_device,
    wilson_interval,
)
from studies.eval_passkey import load_jsonl, save_jsonl  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="study folder (rerun to resume)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, CPU, a few steps")
    parser.add_argument("--teacher-steps", type=int, default=None, help="teacher fine-tuning steps (400)")
    parser.add_argument("--steps", type=int, default=None, help="distillation steps per arm (300)")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per optimizer step (64)")
    parser.add_argument(
        "--micro-batch", type=int, default=None, help="rows per forward (default: the batch size)"
    )
    parser.add_argument(
        "--distractors", default="other", choices=["other", "same-item"], help="distractor sentences"
    )
    parser.add_argument(
        "--stage1-student",
        default="base",
        choices=["base", "kd"],
        help="stage 1 student: the untrained pruned model, or the first seed's KD arm",
    )
    parser.add_argument(
        "--distill-rows", type=int, default=None, help="training rows scored by stage 1 (4000)"
    )
    parser.add_argument("--seeds", default="0,1", help="comma-separated distillation seeds")
    parser.add_argument("--student-layers", default="::2", help="decoder layers the student keeps")
    parser.add_argument(
        "--quantile", type=float, default=0.05, help="LeaF threshold quantile (paper: 0.05 math)"
    )
    parser.add_argument("--eval-batch-size", type=int, default=None, help="decoding batch (64)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="answer budget (128)")
    parser.add_argument("--teacher-extra", nargs="*", default=[], help="more Hydra overrides for the teacher")
    parser.add_argument(
        "--extra", nargs="*", default=[], help="more Hydra overrides for the distillation arms"
    )
    args = parser.parse_args(argv)
    defaults = (
        {
            "teacher_steps": 4,
            "steps": 4,
            "batch_size": 4,
            "distill_rows": 12,
            "eval_batch_size": 8,
            "max_new_tokens": 12,
        }
        if args.smoke
        else {
            "teacher_steps": 400,
            "steps": 300,
            "batch_size": 64,
            "distill_rows": 4000,
            "eval_batch_size": 64,
            "max_new_tokens": 128,
        }
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.seeds = [int(x) for x in str(args.seeds).split(",")]
    try:
        batch_overrides(args.batch_size, args.micro_batch)
    except ValueError as error:
        parser.error(f"--micro-batch: {error}")
    return args


def data_dir(args) -> Path:
    return Path(args.out).resolve() / "data"


SETTINGS_FILE = "study_settings.json"
LEGACY_SETTINGS = {"distractors": "other", "stage1_student": "base"}  # study folders made before the flags


def check_study_settings(args) -> dict:
    """Record --distractors and --stage1-student in <out>/study_settings.json; refuse other values later.

    Data, teacher, stage 1 and arms of a study folder are all built from them, so a rerun with other
    values would mix two studies. A folder with data but no record was made before the flags existed:
    its values are the defaults.
    """
    out = Path(args.out)
    wanted = {"distractors": args.distractors, "stage1_student": args.stage1_student}
    path = out / SETTINGS_FILE
    if path.exists():
        recorded = json.loads(path.read_text())
    elif (data_dir(args) / "arith").exists():
        recorded = LEGACY_SETTINGS
    else:
        recorded = wanted
    differ = {k: (recorded.get(k), v) for k, v in wanted.items() if recorded.get(k) != v}
    if differ:
        raise SystemExit(
            f"{out} was built with "
            + ", ".join(f"--{k.replace('_', '-')} {old}" for k, (old, _) in differ.items())
            + "; this run asks for "
            + ", ".join(f"--{k.replace('_', '-')} {new}" for k, (_, new) in differ.items())
            + ". Use another --out (or the recorded values) so one study never mixes them."
        )
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(wanted, indent=2) + "\n")
    return wanted


def prepare_data(args) -> dict[str, str]:
    from data.text.arith_word import build_arith_word

    sizes = {"num_train": 48, "num_val": 8, "num_test": 12} if args.smoke else {}
    return build_arith_word(data_dir(args) / "arith", distractors=args.distractors, **sizes)


def common_overrides(args) -> list[str]:
    out = [
        f"data.prepare.out_dir={data_dir(args) / 'arith'}",
        *batch_overrides(args.batch_size, args.micro_batch),
        "logger=csv",
    ]
    if args.smoke:
        return [*out, "debug=smoke", "trainer.limit_train_batches=null", "data.max_length=128"]
    return [*out, "trainer=gpu"]


def teacher_arm(args) -> Arm:
    overrides = [
        "experiment=arith_teacher",
        f"trainer.max_steps={args.teacher_steps}",
        *common_overrides(args),
    ]
    return Arm("teacher", [*overrides, *args.teacher_extra])


def write_kd_rows(args, train_file: str) -> Path:
    """<out>/data/kd_train.jsonl: the first distill-rows training rows (written once)."""
    kd_file = data_dir(args) / "kd_train.jsonl"
    if not kd_file.exists():
        kd_file.parent.mkdir(parents=True, exist_ok=True)
        rows = Path(train_file).read_text(encoding="utf-8").splitlines()[: args.distill_rows]
        kd_file.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return kd_file


def stage1_student(args) -> tuple[str, str]:
    """leaf_prepare.py's (--student, --student-layers): the untrained backbone, pruned to the student's
    layers (`base`), or the first seed's trained KD arm, exported already pruned, so kept whole (`kd`)."""
    if args.stage1_student == "kd":
        return str(exported_model_dir(Path(args.out).resolve() / f"kd_s{args.seeds[0]}")), ""
    return ("tiny" if args.smoke else "smollm2"), args.student_layers


def leaf_stage1(args, teacher_dir: Path, kd_file: Path) -> dict:
    """leaf_train.jsonl (kd_train.jsonl's rows, each followed by its counterfactuals), once; its counts."""
    import leaf_prepare

    leaf_file, counts_file = data_dir(args) / "leaf_train.jsonl", data_dir(args) / "leaf_counts.json"
    if not counts_file.exists():
        student, layers = stage1_student(args)
        argv = ["--data", str(kd_file), "--out", str(leaf_file), "--teacher", str(teacher_dir)]
        argv += ["--student", student, "--student-layers", layers, "--quantile", str(args.quantile)]
        counts = leaf_prepare.main(argv)
        pruned = Counter(r["pruned_text"].strip() for r in load_jsonl(leaf_file) if r.get("counterfactual"))
        payload = {"counts": dict(counts), "most_pruned": pruned.most_common(15), "student": student}
        counts_file.write_text(json.dumps(payload, indent=2) + "\n")
    return json.loads(counts_file.read_text())


def train_all(args, train_file: str) -> tuple[Arm, list[Arm], dict]:
    """Teacher, stage 1 and the distillation arms, in the order `--stage1-student` needs.

    base: teacher -> stage 1 (untrained student) -> every arm. kd: teacher -> the first seed's KD arm ->
    stage 1 with that trained student -> the other arms (the KD arm is finished and skipped).
    Returns (teacher arm, distillation arms, stage-1 counts).
    """
    out = Path(args.out)
    teacher = teacher_arm(args)
    run_arms([teacher], out)
    teacher_dir = exported_model_dir(out / teacher.name)
    kd_file = write_kd_rows(args, train_file)
    arms = distill_arms(args, teacher_dir)
    if args.stage1_student == "kd":
        run_arms([next(a for a in arms if a.name == f"kd_s{args.seeds[0]}")], out)
    stage1 = leaf_stage1(args, teacher_dir, kd_file)
    run_arms(arms, out)
    return teacher, arms, stage1


def distill_arms(args, teacher_dir: Path) -> list[Arm]:
    teacher = (
        "objective.leaf.teacher={_target_:models.causal_lm.load_pretrained_causal_lm,_partial_:true,"
        f"source:'{teacher_dir}',special_tokens:{{eos_token:'{SMOLLM2['special_tokens']['eos_token']}'}}}}"
    )
    shared = [
        "experiment=arith_distill",
        f"trainer.max_steps={args.steps}",
        f"student.layers='{args.student_layers}'",
        teacher,
        *common_overrides(args),
    ]
    arms = []
    for seed in args.seeds:
        for name, train_file in (("kd", "kd_train.jsonl"), ("leaf", "leaf_train.jsonl")):
            arms.append(
                Arm(
                    f"{name}_s{seed}",
                    [*shared, f"data.train_file={data_dir(args) / train_file}", f"seed={seed}", *args.extra],
                )
            )
    return arms


def load_student_before(args):
    from models.layer_subset import keep_decoder_layers

    model, tokenizer = load_base(args.smoke)
    return keep_decoder_layers(model, args.student_layers), tokenizer


def evaluate_all(args, models: dict[str, Path | None], test_file: str) -> dict[str, list[dict]]:
    """{model: per-item results} on the test split, cached in <out>/eval/<model>.jsonl."""
    import torch

    rows = load_jsonl(test_file)
    device = pick_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results = {}
    for name, run_dir in models.items():
        path = Path(args.out) / "eval" / f"{name}.jsonl"
        if not path.exists():
            model, tokenizer = load_student_before(args) if run_dir is None else load_trained(run_dir)
            model.to(device=device, dtype=dtype)
            print(f"[study] exact match: {name}, {len(rows)} test items", flush=True)
            save_jsonl(
                evaluate_answers(model, tokenizer, rows, args.max_new_tokens, args.eval_batch_size), path
            )
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results[name] = load_jsonl(path)
    return results


def distractor_errors(test_rows: list[dict], results: list[dict]) -> dict:
    """How one model's answers relate to the distractor sentences of the test items.

    test_rows: {"prompt", "response"} per item; results: evaluate_answers' {"correct", "predicted",
    "output"} for the same items, in the same order. Returns
    - "wrong": wrong answers; "wrong_distractor_number": those whose output contains a number found only
      in a distractor sentence (`distractor_only_numbers`: not in the reference worked answer), and
      "wrong_distractor_answer": those whose final answer is such a number;
    - "with_distractors" / "without_distractors": (correct, items) over items with / without any.
    """
    from data.text.arith_word import NUMBER, distractor_numbers, distractor_only_numbers

    if len(test_rows) != len(results):
        raise ValueError(f"{len(results)} results for {len(test_rows)} test items: evaluate them again")
    counts = {"wrong": 0, "wrong_distractor_number": 0, "wrong_distractor_answer": 0}
    split = {"with_distractors": [0, 0], "without_distractors": [0, 0]}
    for row, result in zip(test_rows, results):
        bucket = split["with_distractors" if distractor_numbers(row["prompt"]) else "without_distractors"]
        bucket[0] += bool(result["correct"])
        bucket[1] += 1
        if result["correct"]:
            continue
        leaked = distractor_only_numbers(row["prompt"], row["response"])
        counts["wrong"] += 1
        counts["wrong_distractor_number"] += bool(leaked & {int(n) for n in NUMBER.findall(result["output"])})
        counts["wrong_distractor_answer"] += result["predicted"] in leaked
    return {**counts, **{k: tuple(v) for k, v in split.items()}}


def _percent(hits: int, n: int) -> str:
    return f"{100 * hits / n:.1f} ({hits}/{n})" if n else "- (0/0)"


def command_line(args) -> str:
    """The command that made (and resumes) this study, with every option that changes it."""
    parts = [f"python studies/leaf_vs_kd.py --out {args.out}"] + (["--smoke"] if args.smoke else [])
    if args.seeds != [0, 1]:
        parts.append("--seeds " + ",".join(str(seed) for seed in args.seeds))
    if args.distractors != "other":
        parts.append(f"--distractors {args.distractors}")
    if args.stage1_student != "base":
        parts.append(f"--stage1-student {args.stage1_student}")
    if args.micro_batch not in (None, args.batch_size):
        parts.append(f"--micro-batch {args.micro_batch}")
    return " ".join(parts)


def write_report(
    args, arms: list[Arm], stage1: dict, results: dict[str, list[dict]], test_rows: list[dict]
) -> Path:
    out = Path(args.out)
    n_items = len(next(iter(results.values())))
    micro = (
        f" ({args.batch_size // args.micro_batch} micro-batches of {args.micro_batch})"
        if args.micro_batch not in (None, args.batch_size)
        else ""
    )
    student = (
        f"the trained KD arm kd_s{args.seeds[0]}" if args.stage1_student == "kd" else "the untrained student"
    )
    lines = [
        "# Study 4: LeaF vs plain KD, arithmetic word problems (SmolLM2-135M teacher, layer-pruned student)"
        + (" [SMOKE]" if args.smoke else ""),
        "",
        f"Command: `{command_line(args)}`",
        "",
        f"Data: distractor sentences `{args.distractors}`. "
        f"Teacher: {args.teacher_steps} steps of full fine-tuning; student: layers `{args.student_layers}`; "
        f"distillation: {args.steps} steps x {args.batch_size} rows{micro} per arm, KL only, seeds {args.seeds}. "
        f"Stage 1 with {student} on {args.distill_rows} training rows (quantile {args.quantile}): "
        + ", ".join(f"{k} {v}" for k, v in stage1["counts"].items())
        + ".",
        "",
        f"## Exact match of the final answer, {n_items} held-out items, % [95% Wilson CI]",
        "",
        "Items with / without distractor sentences: exact match on each part. Wrong, distractor number: wrong "
        "answers whose output contains a number found only in a distractor sentence (not in the reference "
        "worked answer), of all wrong answers; in brackets, those whose final answer is such a number.",
        "",
        "| model | accuracy | with distractors | without | wrong, distractor number | val loss after |",
        "|---|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        hits = sum(r["correct"] for r in rows)
        low, high = wilson_interval(hits, len(rows))
        res = arm_results(out, Arm(name)) or {}
        val = res.get("after", {}).get("val/loss")
        val_text = f"{val:.3f}" if val is not None else "-"
        errors = distractor_errors(test_rows, rows)
        lines.append(
            f"| {name} | {100 * hits / len(rows):.1f} [{100 * low:.1f}, {100 * high:.1f}] ({hits}/{len(rows)}) "
            f"| {_percent(*errors['with_distractors'])} | {_percent(*errors['without_distractors'])} "
            f"| {errors['wrong_distractor_number']}/{errors['wrong']} ({errors['wrong_distractor_answer']}) "
            f"| {val_text} |"
        )
    diffs = []
    for seed in args.seeds:
        leaf, kd = results[f"leaf_s{seed}"], results[f"kd_s{seed}"]
        d, lo, hi = paired_difference([r["correct"] for r in leaf], [r["correct"] for r in kd])
        diffs.append(100 * d)
        lines.append(
            f"| LeaF - KD, seed {seed} (points, paired) | {100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] "
            "| | | | |"
        )
    mean = sum(diffs) / len(diffs)
    verdict = "met" if mean > 0 else "NOT met"
    lines += [
        "",
        f"Goal (LeaF above KD): {verdict} (LeaF - KD = {mean:+.1f} points, mean over seeds {args.seeds}).",
    ]
    lines += [
        "",
        "Most pruned spans (stage 1): " + ", ".join(f"`{t}` x{n}" for t, n in stage1["most_pruned"]),
    ]
    plot = plot_accuracy(out, results)
    if plot:
        lines += ["", f"![exact match]({plot.name})"]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def plot_accuracy(out: Path, results: dict[str, list[dict]]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = list(results)
    acc, err_low, err_high = [], [], []
    for name in names:
        hits, n = sum(r["correct"] for r in results[name]), len(results[name])
        low, high = wilson_interval(hits, n)
        acc.append(100 * hits / n)
        err_low.append(100 * (hits / n - low))
        err_high.append(100 * (high - hits / n))
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 3.5))
    ax.bar(names, acc, yerr=[err_low, err_high], capsize=4, color=["C0", "C7"] + ["C1", "C2"] * len(names))
    ax.set_ylabel("exact match (%)")
    ax.set_title("arithmetic word problems, held-out items")
    fig.tight_layout()
    path = out / "exact_match.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check_study_settings(args)
    paths = prepare_data(args)
    teacher, arms, stage1 = train_all(args, paths["train"])
    models = {"teacher": out / teacher.name, "student_before": None, **{a.name: out / a.name for a in arms}}
    results = evaluate_all(args, models, paths["test"])
    report = write_report(args, arms, stage1, results, load_jsonl(paths["test"]))
    print(report.read_text(), flush=True)
    return report


if __name__ == "__main__":
    main()
