"""Finished arms in a compact, committable form, and back again.

An archive folder (`docs/results_<date>/<study>/`) keeps, for each finished arm, what a study's report reads
and nothing heavier (no checkpoints, adapters or weights):

    <arm>.command.txt     the command the arm ran (studies/arms.py writes it)
    <arm>.results.json    train.py's results (WER, losses before and after)
    <arm>.csv.gz          the CSV log (csv/metrics.csv)
    <arm>.sinks.json.gz   the final sink measurement (sinks.json)

`archive` writes that from a study folder. `restore` puts archived arms back as arm folders, so a later run
of the same study skips them: a baseline arm of one seed, say, that an earlier run already trained with the
same command. An arm is restored only when its archived command has exactly the overrides the study would
launch it with (the repository root and run folder aside); others are left to train, with the difference
said. Each restored folder holds `restored_from.txt`, which the study's report names.

    python studies/arm_archive.py archive /tmp/unsink/asr_gcide docs/results_2026-11-29f/asr_gcide
    python studies/arm_archive.py unpack docs/results_2026-11-29f/asr_gcide /tmp/two_seeds   # then --report-only
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python studies/arm_archive.py`, not only as a module
    sys.path.insert(0, str(REPO))

from studies.arms import Arm, arm_dir, arm_results  # noqa: E402

# (file in the arm folder, suffix in the archive, gzipped there)
ARM_FILES = (
    ("command.txt", "command.txt", False),
    ("results.json", "results.json", False),
    ("csv/metrics.csv", "csv.gz", True),
    ("sinks.json", "sinks.json.gz", True),
)
RESTORED_MARKER = "restored_from.txt"
RUN_ONLY = ("hydra.run.dir=", "ckpt_path=")  # overrides that name the run, not what it trains


class ArchiveMismatch(ValueError):
    """A command.txt that is not an arm's train.py command."""


def archive(study_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Write every finished arm of `study_dir` into `out_dir`; return the arms' names."""
    study_dir, out_dir = Path(study_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for folder in sorted(p for p in study_dir.iterdir() if (p / "results.json").is_file()):
        for inside, suffix, gzipped in ARM_FILES:
            source, target = folder / inside, out_dir / f"{folder.name}.{suffix}"
            if not source.is_file():
                continue
            if gzipped:
                with source.open("rb") as raw, gzip.open(target, "wb") as packed:
                    shutil.copyfileobj(raw, packed)
            else:
                shutil.copyfile(source, target)
        names.append(folder.name)
    return names


def trained_overrides(command_line: str) -> list[str]:
    """The overrides of an arm's command that decide what it trains: the interpreter, entry point, run
    folder and resume flag dropped, and the repository root of the machine that ran it written as <repo>."""
    words = command_line.split()  # studies/arms.py writes the words joined by spaces, unquoted
    entry = next((i for i, w in enumerate(words) if w.endswith("train.py")), None)
    if entry is None:
        raise ArchiveMismatch(f"not an arm command (no train.py): {command_line.strip()[:200]}")
    root = str(Path(words[entry]).parent)
    return [w.replace(root, "<repo>") for w in words[entry + 1 :] if not w.startswith(RUN_ONLY)]


def restore(
    archive_dir: str | Path, study_dir: str | Path, arms: list[Arm]
) -> tuple[list[str], dict[str, str]]:
    """Restore each of `arms` that is unfinished in `study_dir` and archived in `archive_dir` with the same
    overrides. Returns (restored names, {name: why not} for archived arms left to train: a loss variant's arms
    share their names with the archived study's but not their overrides)."""
    archive_dir, study_dir = Path(archive_dir), Path(study_dir)
    if not archive_dir.is_dir():
        raise FileNotFoundError(f"no archive folder {archive_dir}")
    restored, refused = [], {}
    for arm in arms:
        command = archive_dir / f"{arm.name}.command.txt"
        if (
            arm_results(study_dir, arm) is not None
            or not (archive_dir / f"{arm.name}.results.json").is_file()
        ):
            continue
        if not command.is_file():
            refused[arm.name] = "no command.txt in the archive"
            continue
        archived = trained_overrides(command.read_text())
        wanted = [w.replace(str(REPO), "<repo>") for w in arm.overrides if not w.startswith(RUN_ONLY)]
        if archived != wanted:
            refused[arm.name] = (
                f"other overrides: only archived {sorted(set(archived) - set(wanted))}, "
                f"only here {sorted(set(wanted) - set(archived))}"
            )
            continue
        _unpack(archive_dir, arm_dir(study_dir, arm), arm.name)
        restored.append(arm.name)
    return restored, refused


def _unpack(archive_dir: Path, folder: Path, name: str) -> None:
    (folder / "csv").mkdir(parents=True, exist_ok=True)
    for inside, suffix, gzipped in ARM_FILES:
        source = archive_dir / f"{name}.{suffix}"
        if not source.is_file():
            continue
        if gzipped:
            with gzip.open(source, "rb") as packed, (folder / inside).open("wb") as raw:
                shutil.copyfileobj(packed, raw)
        else:
            shutil.copyfile(source, folder / inside)
    (folder / RESTORED_MARKER).write_text(f"{archive_dir.resolve()}\n")


def unpack_all(archive_dir: str | Path, study_dir: str | Path) -> list[str]:
    """Every archived arm as an arm folder under `study_dir`, whatever its command: for a report over arms of
    several sessions (`--report-only`). Arms already finished there are left alone. Returns the names."""
    archive_dir, study_dir = Path(archive_dir), Path(study_dir)
    if not archive_dir.is_dir():
        raise FileNotFoundError(f"no archive folder {archive_dir}")
    names = sorted(path.name[: -len(".results.json")] for path in archive_dir.glob("*.results.json"))
    unpacked = []
    for name in names:
        if arm_results(study_dir, Arm(name)) is None:
            _unpack(archive_dir, arm_dir(study_dir, Arm(name)), name)
            unpacked.append(name)
    return unpacked


def restored_from(study_dir: str | Path, name: str) -> str | None:
    """The archive an arm folder was restored from, or None when the study trained it."""
    marker = Path(study_dir) / name / RESTORED_MARKER
    return marker.read_text().strip() if marker.is_file() else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    actions = parser.add_subparsers(dest="action", required=True)
    pack = actions.add_parser("archive", help="a study folder's finished arms -> an archive folder")
    pack.add_argument("study_dir")
    pack.add_argument("out_dir")
    unpack = actions.add_parser("unpack", help="every arm of an archive -> arm folders (for --report-only)")
    unpack.add_argument("archive_dir")
    unpack.add_argument("study_dir")
    args = parser.parse_args(argv)
    if args.action == "archive":
        names = archive(args.study_dir, args.out_dir)
        print(f"archived {len(names)} arms into {args.out_dir}: {', '.join(names)}")
    else:
        names = unpack_all(args.archive_dir, args.study_dir)
        print(f"unpacked {len(names)} arms into {args.study_dir}: {', '.join(names) or 'none'}")


if __name__ == "__main__":
    main()
