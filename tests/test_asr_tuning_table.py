"""studies/asr_tuning_table.py: the val WER table of study 2's x4 tuning variants, and the pick by val."""

import json

from studies.asr_tuning_table import main, variant_rows


def fake_variant(root, name, curve, results=None):
    folder = root / f"asr_x4_{name}" / "x4_base_s0"
    (folder / "csv").mkdir(parents=True)
    lines = ["step,val/wer,train/loss"] + [f"{s},{w}," for s, w in curve] + ["5,,0.3"]
    (folder / "csv" / "metrics.csv").write_text("\n".join(lines) + "\n")
    (folder / "command.txt").write_text("python train.py\n")
    if results is not None:
        (folder / "results.json").write_text(json.dumps(results))


def test_the_table_picks_the_lowest_val_wer_and_ignores_test(tmp_path):
    after = {"val/wer": 0.41, "test/wer": 0.90}  # a poor test WER must not change the pick
    fake_variant(
        tmp_path,
        "plain",
        [(0, 2.8), (249, 0.7), (499, 0.6), (999, 0.62), (1000, 0.6)],
        {"step": 1000, "after": {"val/wer": 0.6, "test/wer": 0.58}},
    )
    fake_variant(
        tmp_path,
        "nomask",
        [(0, 2.8), (249, 0.5), (499, 0.41), (999, 0.45), (1000, 0.41)],
        {"step": 1000, "after": after},
    )
    fake_variant(tmp_path, "gcide", [(0, 2.8), (249, 0.9)])  # still running
    rows = {row["variant"]: row for row in variant_rows(tmp_path)}
    assert rows["nomask"]["best_val_wer"] == 0.41 and rows["nomask"]["best_step"] == 499
    assert [s for s, _ in rows["plain"]["curve"]] == [
        249,
        499,
        999,
    ]  # step 0 and the after-training pass left out
    assert not rows["gcide"]["finished"] and rows["gcide"]["test_wer"] is None
    text = main(["--root", str(tmp_path), "--out", str(tmp_path / "t.md")])
    assert "Lowest val WER: **nomask** (41.0% at step 499)" in text
    assert "| gcide | 90.0 | - | - | 90.0 (249) | - | - | no |" in text
    assert (tmp_path / "t.md").read_text() == text
