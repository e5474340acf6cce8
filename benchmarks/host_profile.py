"""Where a training step's host time goes: py-spy samples of a `train.py` run, summarised.

A launch-bound step (SmolLM2-135M on an H200 with the decoder as one CUDA graph: about 9 ms of kernels in
a 46 ms step) is Python, and `torch.profiler` names only the operators: about 31 ms a step sat in the
"Optimizer.step" range with no operator under it. py-spy samples the Python stacks instead, outside the
process (no change to the run):

    py-spy record --nonblocking -r 100 -f raw -o run.spy.txt -- python train.py ...   # `pyspy_prefix`
    summarise_samples(Path("run.spy.txt").read_text())

Raw format (py-spy `-f raw`, flamegraph's collapsed stacks): one line per distinct stack,
`frame;frame;...;leaf COUNT`, each frame `function (file:line)`. Only samples inside the training loop
(`within`) count, and samples in torch.compile's compiler (`exclude`) are dropped, so compile time does not
hide the steady state. Frames are keyed by function and file, not line.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

TRAINING_LOOP = "training_epoch_loop.py"
COMPILER_FRAMES = ("compile_fx", "convert_frame", "codecache", "select_algorithm")
PYSPY_FALLBACK = Path("/tmp/site/bin/py-spy")  # where studies/gpu_env.sh installs the .whl wheels


def frame_key(frame: str) -> str:
    """`function (path/to/file.py:123)` -> `function (file.py)`; site-packages prefixes dropped."""
    name, _, where = frame.partition(" (")
    if not where:
        return frame
    path = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({path.split('site-packages/')[-1]})"


def summarise_samples(
    raw: str, within: str = TRAINING_LOOP, exclude: tuple[str, ...] = COMPILER_FRAMES, top: int = 40
) -> dict:
    """{samples, inclusive: [{frame, share}], self: [{frame, share}]} of the stacks that pass `within`
    and none of `exclude`; share = fraction of those samples (inclusive: the frame anywhere on the stack,
    counted once per sample; self: the frame as the leaf)."""
    inclusive: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if not any(within in f for f in frames) or any(x in f for f in frames for x in exclude):
            continue
        n = int(count)
        total += n
        for key in {frame_key(f) for f in frames}:
            inclusive[key] += n
        leaf[frame_key(frames[-1])] += n

    def ranked(counter: Counter[str]) -> list[dict]:
        return [{"frame": k, "share": v / total} for k, v in counter.most_common(top)]

    return {"samples": total, "inclusive": ranked(inclusive), "self": ranked(leaf)}  # no samples: empty lists


def pyspy_prefix(out: Path, rate: int = 100) -> list[str]:
    """The command prefix that samples a child process with py-spy into `out` (raw format); raises when
    py-spy is not installed (`pip install py-spy`; on the GPU machine it comes in `.whl`)."""
    binary = shutil.which("py-spy") or (str(PYSPY_FALLBACK) if PYSPY_FALLBACK.exists() else None)
    if binary is None:
        raise FileNotFoundError("py-spy is not installed: `pip install py-spy` (GPU machine: add it to .whl)")
    # --nonblocking: read the stacks without pausing the process, so the timed steps stay as they are
    return [binary, "record", "--nonblocking", "-r", str(rate), "-f", "raw", "-o", str(out), "--"]
