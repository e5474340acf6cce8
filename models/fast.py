"""The fast path of the LLM recipes (`model.kernels=fast`; `model.kernels=plain` is plain HF + PEFT).

What changes, every piece applied to ONE model instance (never to a class or a module global, so a LeaF
teacher or a reference model built in the same process keeps the plain code):

- frozen base weights stored in `base_dtype` (bf16): no fp32 -> bf16 cast of every weight in every
  forward under autocast. Trainable parameters (LoRA A/B, MEAP's `[MASK]` row) stay fp32 master weights;
  autocast runs their matmuls in bf16, as on the plain path.
- LoRA dropout `lora_dropout` (0): peft then skips the dropout kernel and the extra copy of every input.
- the training loss without [B,T,V] logits (`fused_cross_entropy`): `chunked` (models/fast_loss.py, pure
  torch, any device; with a frozen head, as under LoRA, the gradient is computed in the forward pass:
  models/fused_linear_ce.py), `liger` (liger-kernel's fused linear cross-entropy, CUDA: the gradient is computed
  in the forward pass, no recomputation) or `auto` (liger where it imports, CUDA is present, the model is
  at least 1024 wide and no LM-head row trains through peft's trainable tokens, as MEAP's `[MASK]` does on
  a tied head unless `objective.meap.mask_in_output=false`; else chunked). Skipped when an objective reads
  the logits (LeaF): that objective gets full logits and pays for them.
  `ce_compile` runs the chunked loss's per-chunk softmax and gradient compiled (models/fused_linear_ce.py:
  eager torch spends about 46 bytes of memory traffic per logit there); null = on for models at least
  LIGER_MIN_HIDDEN wide on CUDA (where the loss is memory-bound), off below (SmolLM2: launch-bound, measured
  without it).
- `compile: layers`: `torch.compile` on each decoder layer (regional compilation: one compiled graph reused
  by every layer, RMSNorm / RoPE / SwiGLU / LoRA fused by Inductor); `none` keeps eager.
  `compile_mode: reduce-overhead` adds CUDA graphs (one replay per layer instead of its kernel launches:
  what small, launch-bound models need); pair it with `data.pad_to_multiple_of` so lengths repeat.
  Training passes `use_cache=False`: a KV cache built in every forward would make each layer's
  compiled graph a separate one (guards on the cache's per-layer state). Generation runs eagerly
  (`eager_generation()`): token-by-token decoding with a growing KV cache recompiled every layer for each
  cache state until dynamo's limit (a study's step-0 validation took 5 min 48 s on an H200).
  `compile: model` compiles the whole decoder (embedding to final norm) as one graph: with CUDA graphs a
  step replays two graphs instead of two per layer, at a longer compile.

Without CUDA (`require_cuda: true`, the default) `kernels=fast` falls back to the plain path with a log
line: CPU runs, CI and tests keep the plain code. Loss and gradients match the plain path (same model,
LoRA dropout 0) within bf16 rounding: tests/test_fast_path.py.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch

from models.causal_lm import resolve_dtype
from models.compiled import compile_by_default
from models.fast_loss import install_chunked_loss

log = logging.getLogger(__name__)

KERNELS = ("plain", "fast")
CE_MODES = ("auto", "chunked", "liger", "none")
COMPILE_MODES = ("layers", "model", "none")


@dataclass
class FastPath:
    """The `model.fast` config node (conf/model/causal_lm.yaml)."""

    base_dtype: str = "bf16"
    lora_dropout: float = 0.0
    fused_cross_entropy: str = "auto"
    ce_chunk_tokens: int = 4096
    ce_compile: bool | None = None
    compile: str = "layers"
    compile_backend: str = "inductor"
    compile_mode: str | None = None
    require_cuda: bool = True

    def __post_init__(self):
        if self.fused_cross_entropy not in CE_MODES:
            raise ValueError(f"model.fast.fused_cross_entropy must be one of {CE_MODES}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"model.fast.compile must be one of {COMPILE_MODES}")
        if self.ce_compile not in (None, True, False):
            raise ValueError(f"model.fast.ce_compile must be null, true or false, got {self.ce_compile!r}")
        resolve_dtype(self.base_dtype)


def resolve_fast_path(kernels: str, fast: Mapping | FastPath | None) -> FastPath | None:
    """The fast-path settings to apply, or None for the plain path (kernels=plain, or no CUDA)."""
    if kernels not in KERNELS:
        raise ValueError(f"model.kernels must be one of {KERNELS}, got {kernels!r}")
    if kernels == "plain":
        return None
    if isinstance(fast, FastPath):
        settings = fast
    else:
        known = {f.name for f in fields(FastPath)}
        unknown = sorted(set(fast or {}) - known)
        if unknown:
            raise ValueError(f"unknown model.fast key(s) {unknown}; known: {sorted(known)}")
        settings = FastPath(**dict(fast or {}))
    if settings.require_cuda and not torch.cuda.is_available():
        log.info("model.kernels=fast: no CUDA device, using the plain path")
        return None
    return settings


def liger_available() -> bool:
    try:
        from liger_kernel.transformers.model.llama import lce_forward  # noqa: F401
    except Exception:  # noqa: BLE001  (missing package, or no Triton backend on this machine)
        return False
    return torch.cuda.is_available()


# Below this width `auto` uses the chunked loss. Measured on one H200 (benchmarks/RESULTS.md): SmolLM2-135M
# (576 wide) ran 8.45 steps/s chunked vs 6.98 with Liger; the 1B shape (2048 wide) 79.6k tokens/s with
# Liger vs 65.4k chunked.
LIGER_MIN_HIDDEN = 1024


def cross_entropy_mode(
    fast: FastPath,
    needs_logits: bool,
    trainable_tokens: bool,
    model_type: str | None = "llama",
    hidden_size: int | None = None,
) -> str:
    """The CE implementation to install: none | chunked | liger (see the module docstring for `auto`).

    `trainable_tokens`: rows of the LM head train through peft's trainable tokens (Liger needs a plain
    frozen head).

    `auto` picks liger only for Llama-family models (SmolLM2, Llama 3: its forward is Llama's) at least
    LIGER_MIN_HIDDEN wide; smaller models are faster with the chunked loss.
    """
    if needs_logits or fast.fused_cross_entropy == "none":
        return "none"
    if fast.fused_cross_entropy == "auto":
        wide = hidden_size is None or hidden_size >= LIGER_MIN_HIDDEN
        liger = model_type == "llama" and wide and not trainable_tokens and liger_available()
        return "liger" if liger else "chunked"
    return fast.fused_cross_entropy


def apply_before_lora(
    model: torch.nn.Module, fast: FastPath, needs_logits: bool = False, trainable_tokens: bool = False
) -> str:
    """Per-instance swap of the training loss on the bare HF causal LM (before peft wraps it)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    hidden_size = getattr(config, "hidden_size", None)
    mode = cross_entropy_mode(fast, needs_logits, trainable_tokens, model_type, hidden_size)
    if mode == "chunked":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        compile_rows = compile_by_default(fast.ce_compile, device, hidden_size or 0)
        install_chunked_loss(model, fast.ce_chunk_tokens, compile_rows)
    elif mode == "liger":
        from liger_kernel.transformers.model.llama import lce_forward

        model.forward = types.MethodType(lce_forward, model)
    log.info("fast path: training loss %s", mode)
    return mode


def cast_frozen(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Store every frozen floating-point parameter and buffer in `dtype`; return how many tensors moved.

    Trainable parameters keep their dtype (fp32 master weights for the optimizer). Rotary inverse
    frequencies stay fp32 (transformers computes RoPE in fp32).
    """
    moved = 0
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            moved += 1
    return moved


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder's layer list (`...model.layers` of an HF causal LM, under peft wrappers too)."""
    candidates = [
        module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and name.split(".")[-1] == "layers" and len(module)
    ]
    if not candidates:
        raise ValueError(f"no decoder layer list found in {type(model).__name__}")
    return max(candidates, key=len)


def compile_layers(model: torch.nn.Module, backend: str = "inductor", mode: str | None = None) -> int:
    """`torch.compile` every decoder layer in place (regional compilation); return the layer count."""
    layers = decoder_layers(model)
    # One graph serves every layer, but guards on per-layer Python state (the layer index that query/key
    # capture stores under, hidden-state hooks switched on and off) add variants: allow them all.
    limit = max(64, 4 * len(layers))
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    torch._dynamo.config.accumulated_recompile_limit = max(
        torch._dynamo.config.accumulated_recompile_limit, 4 * limit
    )
    for layer in layers:
        compile_module(layer, backend, mode)
    return len(layers)


CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
_cudagraphs_used = False


def compile_module(module: torch.nn.Module, backend: str, mode: str | None) -> None:
    """`module.compile(...)` in place, noting whether CUDA graphs are now in use (mark_training_step).

    With CUDA graphs the shapes are static (`dynamic=False`): a graph is recorded per shape anyway, and
    static kernels are faster than the symbolic ones automatic dynamic shapes would switch to after the
    second length; `data.pad_to_multiple_of` keeps the number of lengths small."""
    cudagraphs = mode in CUDAGRAPH_MODES
    module.compile(backend=backend, mode=mode, dynamic=False if cudagraphs else None)
    if cudagraphs:
        global _cudagraphs_used
        _cudagraphs_used = True


def eager_generation():
    """Context manager: every `torch.compile`d module runs its eager code inside (`force_eager` stance).

    For `generate()` on a fast-path model: each decoding step grows the KV cache, and the compiled layers'
    guards on the cache's per-layer state would compile a new graph per layer and step. A no-op for a
    model that was never compiled."""
    return torch.compiler.set_stance("force_eager")


def mark_training_step() -> None:
    """Start of a training step: with CUDA graphs (`compile_mode=reduce-overhead`) tell Inductor's graph
    trees that the previous step's outputs are dead, so their memory can be reused. No-op otherwise."""
    if _cudagraphs_used:
        torch.compiler.cudagraph_mark_step_begin()


def decoder_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module that owns the decoder's layer list (an HF `LlamaModel`: embedding, mask, RoPE, layers,
    final norm), under peft wrappers too."""
    layers = decoder_layers(model)
    for module in model.modules():
        if getattr(module, "layers", None) is layers:
            return module
    raise ValueError(f"no module owns the decoder layers of {type(model).__name__}")


def compile_decoder(model: torch.nn.Module, backend: str = "inductor", mode: str | None = None) -> int:
    """`torch.compile` the whole decoder in place (one graph for the forward, one for the backward: with
    CUDA graphs two replays per step instead of two per layer); return its layer count. The loss (Liger or
    chunked) stays outside. Longer to compile than `layers` (every layer is traced)."""
    compile_module(decoder_model(model), backend, mode)
    return len(decoder_layers(model))


def apply_after_lora(model: torch.nn.Module, fast: FastPath) -> torch.nn.Module:
    """bf16 frozen weights, then compiled decoder layers (or the whole decoder)."""
    moved = cast_frozen(model, resolve_dtype(fast.base_dtype))
    log.info("fast path: %d frozen tensors stored as %s", moved, fast.base_dtype)
    if fast.compile == "layers":
        count = compile_layers(model, fast.compile_backend, fast.compile_mode)
        log.info("fast path: compiled %d decoder layers (%s)", count, fast.compile_backend)
    elif fast.compile == "model":
        count = compile_decoder(model, fast.compile_backend, fast.compile_mode)
        log.info("fast path: compiled the whole %d-layer decoder (%s)", count, fast.compile_backend)
    return model
