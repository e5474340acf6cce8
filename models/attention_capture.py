"""Capture post-RoPE queries and keys while the model keeps its fused attention (SDPA / flash).

Objectives and diagnostics that need attention probabilities never switch the model to eager
attention. Instead we register, through transformers' `AttentionInterface`, a thin wrapper around the
fused kernel: it forwards to the real kernel unchanged and, for the layers a `QueryKeyCapture` asks for,
keeps references to the (already computed) query and key tensors. Probabilities are then recomputed only
for the query rows that are needed (`sampled_attention_probs`) or streamed in chunks
(`attention_to_keys`), at O(S*T) instead of O(T^2) memory per head.

Works for every HF model that dispatches attention through `ALL_ATTENTION_FUNCTIONS` with a
`layer_idx` on its attention modules (Llama, SmolLM2, Qwen2/3, Mistral, Gemma, ...). Capturing a layer whose
attention is not plain causal softmax (a sliding window shorter than the sequence, logit soft-capping,
attention-sink logits: Gemma 2/3, sliding-window Mistral/Qwen, GPT-OSS) raises `NotImplementedError`.

Shapes: query [B, H, T, hd], key [B, KV, T, hd] with H = KV * G (grouped-query attention).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from models.compiled import compile_once

CAPTURE_PREFIX = "unsink_capture|"
_STORE_ATTR = "_unsink_qk_store"
# set by models/attention_edit.py on edited layers: recomputed rows get the same probability edit
PROBABILITY_EDIT_ATTR = "_unsink_probability_edit"


@dataclass
class CapturedQueryKey:
    """Post-RoPE query [B,H,T,hd] and key [B,KV,T,hd] of one layer, with the layer's softmax scale and the
    layer's training-free attention edit, if any (`models.attention_edit`, reapplied to recomputed rows)."""

    query: torch.Tensor
    key: torch.Tensor
    scaling: float
    edit: Callable | None = None


def unsupported_attention(kwargs: dict, num_keys: int) -> str:
    """Why plain causal softmax over the captured query/key would not be this layer's attention, or "".

    Recomputation knows the causal and padding masks and the scale only: a sliding window shorter than the
    keys (Mistral, Qwen2/3 with use_sliding_window, Gemma 2/3 local layers), logit soft-capping (Gemma 2) and
    attention-sink logits (GPT-OSS `s_aux`) change the probabilities.
    """
    window = kwargs.get("sliding_window")
    if window is not None and num_keys > window:
        return f"a sliding window of {window} keys over {num_keys} keys"
    if kwargs.get("softcap") is not None:
        return f"attention logit soft-capping ({kwargs['softcap']})"
    if kwargs.get("s_aux") is not None:
        return "attention-sink logits (s_aux)"
    return ""


def _make_capturing_attention(base_name: str):
    base_fn = ALL_ATTENTION_FUNCTIONS[base_name]

    def capturing_attention(module, query, key, value, attention_mask, **kwargs):
        store = getattr(module, _STORE_ATTR, None)
        if store is not None:
            problem = unsupported_attention(kwargs, key.shape[2])
            if problem:
                raise NotImplementedError(
                    f"layer {module.layer_idx} uses {problem}: probabilities recomputed from its captured "
                    "queries/keys would be wrong, so ADL and the sink probe refuse this layer"
                )
            scaling = kwargs.get("scaling")
            if scaling is None:
                scaling = query.shape[-1] ** -0.5
            edit = getattr(module, PROBABILITY_EDIT_ATTR, None)
            store[module.layer_idx] = CapturedQueryKey(query, key, float(scaling), edit)
        return base_fn(module, query, key, value, attention_mask, **kwargs)

    return capturing_attention


def capture_implementation_name(base_name: str) -> str:
    """Register (once) and return the name of the capturing wrapper around a fused attention kernel."""
    if base_name.startswith(CAPTURE_PREFIX):
        return base_name
    if base_name == "eager":
        raise ValueError(
            "query/key capture wraps a fused kernel; load the model with sdpa or flash attention"
        )
    name = CAPTURE_PREFIX + base_name
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _make_capturing_attention(base_name))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base_name])
    return name


def enable_capture(model: torch.nn.Module) -> None:
    """Switch a loaded HF model to the capturing wrapper of its own attention kernel (idempotent).

    The wrapper is a pass-through while no `QueryKeyCapture` is active, so this costs nothing.
    """
    config = model.config
    current = config._attn_implementation or "sdpa"
    wanted = capture_implementation_name(current)
    if current != wanted:
        model.set_attn_implementation(wanted)


def disable_capture(model: torch.nn.Module) -> None:
    """Restore the plain kernel name (e.g. before `save_pretrained`, so configs stay portable)."""
    current = model.config._attn_implementation or ""
    if current.startswith(CAPTURE_PREFIX):
        model.set_attn_implementation(current[len(CAPTURE_PREFIX) :])


def attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Map layer index -> self-attention module (any module with `layer_idx` and `q_proj`)."""
    found: dict[int, torch.nn.Module] = {}
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if idx is not None and hasattr(module, "q_proj") and idx not in found:
            found[idx] = module
    return dict(sorted(found.items()))


class QueryKeyCapture:
    """Context manager: while active, the chosen layers keep their query/key tensors.

    >>> with QueryKeyCapture(model, layers=[3, 7]) as captured:
    ...     model(input_ids)
    >>> captured[3].query.shape  # [B, H, T, hd]

    The captured tensors are the ones the kernel used (not copies) and stay in the autograd graph, so a
    loss on recomputed probabilities back-propagates into the LoRA weights.
    """

    def __init__(self, model: torch.nn.Module, layers: Iterable[int] | None = None):
        enable_capture(model)
        modules = attention_modules(model)
        if not modules:
            raise ValueError("no attention modules with `layer_idx` found: unsupported architecture")
        chosen = list(modules) if layers is None else list(layers)
        unknown = [i for i in chosen if i not in modules]
        if unknown:
            raise ValueError(f"layers {unknown} do not exist; the model has layers 0..{max(modules)}")
        self.modules = {i: modules[i] for i in chosen}
        self.captured: dict[int, CapturedQueryKey] = {}

    def __enter__(self) -> dict[int, CapturedQueryKey]:
        self.captured.clear()
        for module in self.modules.values():
            setattr(module, _STORE_ATTR, self.captured)
        return self.captured

    def __exit__(self, *exc) -> None:
        for module in self.modules.values():
            if hasattr(module, _STORE_ATTR):
                delattr(module, _STORE_ATTR)


def _grouped_logits(query_rows: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """query_rows [B,H,S,hd], key [B,KV,K,hd] -> fp32 logits [B,H,S,K] (GQA without repeating keys)."""
    b, h, s, d = query_rows.shape
    kv = key.shape[1]
    q = query_rows.float().reshape(b, kv, h // kv, s, d)
    logits = torch.einsum("bgrsd,bgkd->bgrsk", q, key.float())
    return logits.reshape(b, h, s, key.shape[2]) * scaling


def _row_mask(
    query_positions: torch.Tensor, num_keys: int, key_padding_mask: torch.Tensor | None, causal: bool
) -> torch.Tensor | None:
    """Boolean [B or 1, 1, S, K] mask of visible keys for the given query rows (None = all visible)."""
    mask = None
    if causal:
        keys = torch.arange(num_keys, device=query_positions.device)
        mask = (keys[None, :] <= query_positions[:, None])[None, None]  # [1,1,S,K]
    if key_padding_mask is not None:
        pad = key_padding_mask.bool()[:, None, None, :]  # [B,1,1,K]
        mask = pad if mask is None else mask & pad
    return mask


def sampled_attention_probs(
    captured: CapturedQueryKey,
    query_positions: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """Recompute softmax attention for a subset of query rows.

    Args:
        captured: query [B,H,T,hd], key [B,KV,K,hd], scaling.
        query_positions: [S] long, the rows to recompute (positions in 0..T-1).
        key_padding_mask: [B,K] (1 = real token) or None.
        causal: hide keys after each query position.
    Returns:
        probs [B,H,S,K] float32; rows with no visible key are all zero (not NaN).
    Memory O(B*H*S*K); gradients flow into query and key.
    """
    rows = captured.query.index_select(2, query_positions)
    mask = _row_mask(query_positions, captured.key.shape[2], key_padding_mask, causal)
    probs = _row_probs(rows, captured.key, captured.scaling, mask)
    if captured.edit is not None:
        visible = torch.ones_like(probs[:1, :1], dtype=torch.bool) if mask is None else mask
        probs = captured.edit.reapply(probs, visible)
    return probs


def _row_probs(
    query_rows: torch.Tensor, key: torch.Tensor, scaling: float, mask: torch.Tensor | None
) -> torch.Tensor:
    """[B,H,S,hd] rows, [B,KV,K,hd] keys, mask [B|1,1,S,K] or None -> fp32 probs [B,H,S,K]; rows with no
    visible key are all zero (not NaN)."""
    logits = _grouped_logits(query_rows, key, scaling)
    if mask is None:
        return torch.softmax(logits, dim=-1)
    return torch.nan_to_num(torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1), nan=0.0)


def _head_mean_probs(
    query_rows: torch.Tensor, key: torch.Tensor, scaling: float, mask: torch.Tensor | None
) -> torch.Tensor:
    """`_row_probs` averaged over heads: [B,1,S,K] (what torch.compile fuses in one graph)."""
    return _row_probs(query_rows, key, scaling, mask).mean(dim=1, keepdim=True)


def sampled_head_mean_probs(
    captured: CapturedQueryKey,
    query_positions: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = True,
    compiled: bool = False,
) -> torch.Tensor:
    """The mean over heads of `sampled_attention_probs`: [B,1,S,K] float32 (what ADL reads).

    compiled: run it through `torch.compile` (dynamic shapes: one graph for every length). The eager form
    writes and reads the fp32 [B,H,S,K] tensor several times (scale, mask, softmax, NaN guard, mean) and
    again in backward: at Llama-3.2-1B shape, B=8, 64 rows, T=2048 that is 0.5 GB per pass per layer, the
    bulk of ADL's cost on the fast path. Inductor fuses them. Same values (tests/test_loss_attention_diversity.py).
    Attention edits (`captured.edit`) always take the eager path.
    """
    if captured.edit is not None:
        return sampled_attention_probs(captured, query_positions, key_padding_mask, causal).mean(
            1, keepdim=True
        )
    rows = captured.query.index_select(2, query_positions)
    mask = _row_mask(query_positions, captured.key.shape[2], key_padding_mask, causal)
    function = compile_once(_head_mean_probs, dynamic=True) if compiled else _head_mean_probs
    return function(rows, captured.key, captured.scaling, mask)


@torch.no_grad()
def attention_to_keys(
    captured: CapturedQueryKey,
    key_positions: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = True,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Attention that every query pays to a few keys, streamed over query chunks (diagnostics).

    Args:
        captured: query [B,H,T,hd], key [B,KV,T,hd].
        key_positions: [P] long, the keys of interest (e.g. tensor([0]) for the first token).
        key_padding_mask: [B,T] (1 = real token) or None.
        chunk_size: queries per chunk; peak memory O(B*H*chunk_size*T).
    Returns:
        [B,H,T,P] float32: probability that query t gives to key key_positions[p] (0 where invisible).
    """
    q_len = captured.query.shape[2]
    device = captured.query.device
    out = []
    for start in range(0, q_len, chunk_size):
        positions = torch.arange(start, min(start + chunk_size, q_len), device=device)
        probs = sampled_attention_probs(captured, positions, key_padding_mask, causal)
        out.append(probs.index_select(-1, key_positions))
    return torch.cat(out, dim=2)
