"""Memory-bound per-row maths under `torch.compile`: one cached compiled function per process, an eager
fallback if compiling fails, and the default for when to compile at all.

Four pieces use it: the chunked CE's softmax (models/fused_linear_ce.py), LeaF's fused KL
(models/fused_linear_kl.py), ADL's recomputed attention rows (models/attention_capture.py) and the
decorrelation loss (losses/decorrelation.py). Eager torch runs each of them as several passes over fp32
copies of large blocks; Inductor fuses them. Measured on one H200 at the Llama-3.2-1B shape, B=8, T=2048
(benchmarks/RESULTS.md, eleventh session), against the fast step of the same call: chunked CE 0.850x eager
-> 0.963x compiled, LeaF 0.704x -> 0.817x (and 20.5 -> 16.1 GiB), ADL 0.839x -> 0.864x, decorrelation
0.935x -> 0.944x. Small models (SmolLM2, 576 wide) are launch-bound: compiling them was not measured to pay.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

# At least this wide on CUDA, the objectives' per-row maths is compiled by default (`compile: null`).
# The same width picks Liger's loss over the chunked one (models/fast.py: LIGER_MIN_HIDDEN).
COMPILE_MIN_HIDDEN = 1024

_cache: dict[tuple, Callable] = {}


def compile_by_default(setting: bool | None, device: torch.device, width: int) -> bool:
    """An objective's `compile` option: true/false as set; null = compile on CUDA for a model at least
    COMPILE_MIN_HIDDEN wide (`width`: its hidden size)."""
    if setting is not None:
        return bool(setting)
    return device.type == "cuda" and width >= COMPILE_MIN_HIDDEN


def compile_once(function: Callable, **options) -> Callable:
    """`torch.compile(function, **options)`, built once per process (per function and options) and wrapped
    by `eager_on_failure`."""
    key = (function, tuple(sorted(options.items())))
    if key not in _cache:
        _cache[key] = eager_on_failure(torch.compile(function, **options), function)
    return _cache[key]


def compiled_unless_tracing(function: Callable, enabled: bool, **options) -> Callable:
    """`compile_once(function, **options)` when `enabled`, else `function`; also `function` while torch.compile
    traces the caller (the fused losses inside a compiled region: traced there anyway)."""
    if not enabled or torch.compiler.is_compiling():
        return function
    return compile_once(function, **options)


def is_compiled(function: Callable) -> bool:
    """Whether `compile_once(function, ...)` has been built in this process (tests check that it was used)."""
    return any(key[0] is function for key in _cache)


def eager_on_failure(compiled_function: Callable, eager: Callable) -> Callable:
    """`compiled_function`, falling back to `eager` for good after its first exception (logged with the
    cause). torch.compile'd functions compile on their first call, before they touch their inputs, so a
    failed attempt changes nothing: the eager call sees the same arguments."""
    state = {"failed": False}

    def run(*args, **kwargs):
        if not state["failed"]:
            try:
                return compiled_function(*args, **kwargs)
            except Exception as error:  # noqa: BLE001  (Inductor/Triton errors have no common base class)
                state["failed"] = True
                log.warning(
                    "torch.compile of %s failed (%s: %s); running it eagerly from now on (same values, "
                    "more memory traffic; set the option that compiles it to false to skip the attempt)",
                    eager.__name__,
                    type(error).__name__,
                    str(error).splitlines()[0][:300] if str(error) else "",
                )
        return eager(*args, **kwargs)

    return run
