"""Side-by-side val WER of study 2's x4 tuning baselines (`STUDIES="2v"`): which setting to keep.

Each variant is its own study folder (`<root>/asr_x4_<variant>/x4_base_s0`, from studies/gpu_queue.sh). The
table gives every variant's val WER at each validation step, its best step, the val and test WER of the
checkpoint it scored, and picks the variant with the lowest best val WER. The choice reads val only; test
is shown for the record.

    python studies/asr_tuning_table.py --root /tmp/unsink            # prints markdown
    python studies/asr_tuning_table.py --root DIR --arm x4_base_s0 --out DIR/tuning.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from studies.arms import Arm, arm_results  # noqa: E402
from studies.asr_downsampling import val_wer_curve  # noqa: E402


def variant_rows(root: Path, arm: str = "x4_base_s0", pattern: str = "asr_x4_*") -> list[dict]:
    """One row per variant folder: its val WER curve, best point, and the scored val/test WER if finished."""
    rows = []
    for folder in sorted(root.glob(pattern)):
        results = arm_results(folder, Arm(arm)) or {}
        end = results.get("step")  # the validation after training (of the scored checkpoint) is not a point
        curve = [
            (step, wer)
            for step, wer in val_wer_curve(folder, arm)
            if 0 < step and (end is None or step < end)
        ]
        after = results.get("after", {})
        best = min(curve, key=lambda point: point[1]) if curve else None
        rows.append(
            {
                "variant": folder.name.removeprefix(pattern.rstrip("*")) or folder.name,
                "curve": curve,
                "best_step": best[0] if best else None,
                "best_val_wer": best[1] if best else None,
                "scored_val_wer": after.get("val/wer"),
                "test_wer": after.get("test/wer"),
                "finished": bool(results),
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    steps = sorted({step for row in rows for step, _ in row["curve"]})
    fmt = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = [
        "| variant | "
        + " | ".join(f"val WER % at {s}" for s in steps)
        + " | best (step) | scored val | test | finished |",
        "|---|" + "---:|" * len(steps) + "---|---:|---:|---|",
    ]
    for row in rows:
        at = dict(row["curve"])
        best = f"{fmt(row['best_val_wer'])} ({row['best_step']})" if row["best_step"] is not None else "-"
        lines.append(
            f"| {row['variant']} | "
            + " | ".join(fmt(at.get(s)) for s in steps)
            + f" | {best} | {fmt(row['scored_val_wer'])} | {fmt(row['test_wer'])} | "
            + f"{'yes' if row['finished'] else 'no'} |"
        )
    scored = [row for row in rows if row["best_val_wer"] is not None]
    if scored:
        pick = min(scored, key=lambda row: row["best_val_wer"])
        lines += [
            "",
            f"Lowest val WER: **{pick['variant']}** ({fmt(pick['best_val_wer'])}% at step {pick['best_step']}).",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", required=True, help="folder holding the asr_x4_<variant> study folders")
    parser.add_argument("--arm", default="x4_base_s0")
    parser.add_argument("--pattern", default="asr_x4_*")
    parser.add_argument("--out", default=None, help="also write the table here")
    args = parser.parse_args(argv)
    rows = variant_rows(Path(args.root), args.arm, args.pattern)
    if not rows:
        raise SystemExit(f"no {args.pattern} folders under {args.root}")
    text = table(rows)
    if args.out:
        Path(args.out).write_text(text)
    print(text, end="")
    return text


if __name__ == "__main__":
    main()
