"""studies/arm_archive.py: finished arms to a committable archive and back, only where the command matches."""

import gzip
import json
from pathlib import Path

import pytest

from studies import asr_downsampling as study
from studies.arm_archive import REPO, ArchiveMismatch, archive, restore, restored_from, trained_overrides
from studies.arms import Arm, arm_dir

ARCHIVED_SEED_1 = REPO / "docs" / "results_2026-11-29f" / "asr_gcide"  # the ninth session's GPU arms


def _finished_arm(study_dir: Path, name: str, overrides: list[str]) -> None:
    folder = study_dir / name
    (folder / "csv").mkdir(parents=True)
    cmd = [
        "/venv/bin/python3",
        "/other/checkout/train.py",
        *overrides,
        f"hydra.run.dir={folder}",
        "ckpt_path=auto",
    ]
    (folder / "command.txt").write_text(" ".join(cmd) + "\n")
    (folder / "results.json").write_text(json.dumps({"after": {"test/wer": 0.37}}))
    (folder / "csv" / "metrics.csv").write_text("step,val/wer\n0,3.0\n999,0.35\n")
    (folder / "sinks.json").write_text(json.dumps({"layers": []}))


def test_archive_and_restore_round_trip(tmp_path):
    overrides = ["experiment=asr_study_baseline", "seed=1", "data.root=/other/checkout/artifacts/data/c"]
    _finished_arm(tmp_path / "run", "x4_base_s1", overrides)
    (tmp_path / "run" / "unfinished_arm").mkdir()  # no results.json: not archived
    assert archive(tmp_path / "run", tmp_path / "archive") == ["x4_base_s1"]
    with gzip.open(tmp_path / "archive" / "x4_base_s1.csv.gz", "rt") as stream:
        assert stream.read().endswith("999,0.35\n")
    # the same overrides on this checkout (its own repository root) restore the arm as a finished folder
    here = [o.replace("/other/checkout", str(REPO)) for o in overrides]
    assert restore(tmp_path / "archive", tmp_path / "again", [Arm("x4_base_s1", here)]) == (
        ["x4_base_s1"],
        {},
    )
    folder = arm_dir(tmp_path / "again", Arm("x4_base_s1"))
    assert json.loads((folder / "results.json").read_text())["after"]["test/wer"] == 0.37
    assert (folder / "csv" / "metrics.csv").read_text() == "step,val/wer\n0,3.0\n999,0.35\n"
    assert restored_from(tmp_path / "again", "x4_base_s1") == str((tmp_path / "archive").resolve())
    # finished now: a second restore leaves it alone
    assert restore(tmp_path / "archive", tmp_path / "again", [Arm("x4_base_s1", here)]) == ([], {})


def test_an_arm_with_other_overrides_is_left_to_train_with_the_difference_said(tmp_path):
    _finished_arm(tmp_path / "run", "x4_base_s1", ["experiment=asr_study_baseline", "seed=1"])
    archive(tmp_path / "run", tmp_path / "archive")
    restored, refused = restore(tmp_path / "archive", tmp_path / "again",
                                [Arm("x4_base_s1", ["experiment=asr_study_baseline", "seed=2"])])  # fmt: skip
    assert restored == [] and refused == {
        "x4_base_s1": "other overrides: only archived ['seed=1'], only here ['seed=2']"
    }
    assert not (tmp_path / "again" / "x4_base_s1").exists()
    with pytest.raises(FileNotFoundError, match="no archive folder"):
        restore(tmp_path / "absent", tmp_path / "again", [])


def test_trained_overrides_drop_the_interpreter_run_folder_and_resume_flag():
    line = "/opt/venv/bin/python3 /work/main/train.py experiment=x data.root=/work/main/a seed=1 hydra.run.dir=/t ckpt_path=auto"
    assert trained_overrides(line) == ["experiment=x", "data.root=<repo>/a", "seed=1"]
    with pytest.raises(ArchiveMismatch, match="no train.py"):
        trained_overrides("python other.py a=b")


def test_study_2_reuses_the_archived_seed_1_baselines_for_a_loss_variant(tmp_path, monkeypatch):
    """The ninth session's seed-1 baseline arms (archived in docs/) have exactly the command that the
    sink-token variant's seed-1 baselines would run, so `--reuse-arms-from` takes them and only the loss arms
    train; the report names them."""
    argv = ["--out", str(tmp_path), "--seeds", "1", "--decorr-weight", "10", "--steps", "1000", "--val-every",
            "250", "--override", "model.kernels=fast", "--loss-override", "objective.decorr.tokens=sinks",
            "--reuse-arms-from", str(ARCHIVED_SEED_1)]  # fmt: skip
    args = study.parse_args(argv)
    # the archived arms ran in /work/main on the GPU machine; give this checkout's root the same role
    monkeypatch.setattr(study, "REPO", Path("/work/main"))
    common = study.common_overrides(args)
    arms = [Arm(s.name, study.arm_overrides(s, args) + common) for s in study.arm_specs(args)]
    monkeypatch.setattr("studies.arm_archive.REPO", Path("/work/main"))
    restored, refused = restore(args.reuse_arms_from, tmp_path, arms)
    assert restored == ["x4_base_s1", "x32_base_s1"]  # the loss arms ran without the variant's override:
    assert set(refused) == {"x4_decorr_w10_s1", "x32_decorr_w10_s1"}  # they train again
    assert "only here ['objective.decorr.tokens=sinks']" in refused["x4_decorr_w10_s1"]
    report = study.write_report(tmp_path, study.arm_specs(args), args, failures=[]).read_text()
    assert (
        "| x4_base_s1 | x4 | CE | 1 | 309.8 | 35.2 | 37.0 |" in report and "Arms: 2 of 4 finished" in report
    )
    assert "Reused, not trained in this run" in report and "x32_base_s1 (" in report
    # a seed the archive does not hold is trained, not taken
    other = study.parse_args([a if a != "1" else "0" for a in argv])
    arms0 = [Arm(s.name, study.arm_overrides(s, other) + study.common_overrides(other))
             for s in study.arm_specs(other)]  # fmt: skip
    assert restore(other.reuse_arms_from, tmp_path / "s0", arms0) == ([], {})


def test_the_archive_command_runs_as_a_script_from_any_folder(tmp_path):
    """`python studies/arm_archive.py archive ...`, as docs/results.md says, outside the repository's path."""
    import subprocess
    import sys

    _finished_arm(tmp_path / "run", "x32_base_s1", ["experiment=asr_study_baseline", "seed=1"])
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "studies" / "arm_archive.py"),
            "archive",
            str(tmp_path / "run"),
            str(tmp_path / "a"),
        ],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "a" / "x32_base_s1.results.json").is_file()


def test_unpack_takes_every_archived_arm_for_a_report_across_sessions(tmp_path):
    _finished_arm(
        tmp_path / "run", "x4_decorr_w10_s0", ["experiment=asr_study", "objective.decorr.tokens=sinks"]
    )
    _finished_arm(tmp_path / "run", "x4_base_s0", ["experiment=asr_study_baseline"])
    archive(tmp_path / "run", tmp_path / "archive")
    from studies.arm_archive import unpack_all

    assert unpack_all(tmp_path / "archive", tmp_path / "report") == ["x4_base_s0", "x4_decorr_w10_s0"]
    assert restored_from(tmp_path / "report", "x4_decorr_w10_s0") == str((tmp_path / "archive").resolve())
    assert unpack_all(tmp_path / "archive", tmp_path / "report") == []  # finished there now: left alone
    with pytest.raises(FileNotFoundError, match="no archive folder"):
        unpack_all(tmp_path / "missing", tmp_path / "report")
