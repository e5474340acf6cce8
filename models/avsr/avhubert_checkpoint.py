"""Read AV-HuBERT's fairseq checkpoints without fairseq: configuration, encoder weights, clear key errors.

A fairseq checkpoint is a `torch.save`d dict: `{"cfg": {"model": {...}, "task": {...}, ...}, "model":
state_dict, "extra_state": {...}, "optimizer_history": [...], "task_state": {...}}` (newer fairseq writes
`cfg` as plain dicts and `args: None`), or `{"args": argparse.Namespace(...), "model": ...}` (older ones).
- Pre-trained (`base_vox_iter5.pt`, `large_vox_iter5.pt`): the encoder's keys have no prefix
  (`feature_extractor_video.resnet...`, `encoder.layers.0...`); the architecture is `cfg.model`.
- Fine-tuned seq2seq (`*_vox_433h.pt`): the encoder lives under `encoder.w2v_model.` and its architecture
  under `cfg.model.w2v_args.model`; the decoder (`decoder.*`) is not used here.

Unpickling: `torch.load(weights_only=True)` is tried first. Real fairseq checkpoints also pickle fairseq
objects (training meters in `extra_state`, dictionaries in `task_state`), argparse namespaces and sometimes
OmegaConf nodes, which weights_only refuses and which cannot be imported without fairseq. The fallback is a
restricted unpickler: tensors, storages, plain containers and numpy arrays/scalars load as themselves,
`argparse.Namespace` loads as itself, classes from fairseq / omegaconf / av_hubert modules become inert
placeholders that only keep their pickled state (OmegaConf nodes are converted back to plain values), and
any other global (os.system, builtins.eval, ...) is refused with an error naming it. So nothing from the
file is executed beyond building tensors and containers.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import collections
import copyreg
import logging
import pickle
import types
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from models.avsr.avhubert import AVHubertConfig

log = logging.getLogger(__name__)

FINETUNED_PREFIX = "encoder.w2v_model."
# Placeholders for classes of these top-level packages (fairseq objects, configs, the av_hubert user dir).
STUB_PACKAGES = {"fairseq", "omegaconf", "avhubert", "hubert", "hubert_pretraining", "hubert_asr", "examples"}
SAFE_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): collections.defaultdict,
    ("argparse", "Namespace"): argparse.Namespace,
    ("copyreg", "_reconstructor"): copyreg._reconstructor,
    ("builtins", "object"): object,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "tuple"): tuple,
    ("builtins", "str"): str,
    ("builtins", "int"): int,
    ("builtins", "float"): float,
    ("builtins", "bool"): bool,
    ("builtins", "bytes"): bytes,
}
TYPING_GLOBALS = {"Any", "Dict", "List", "Tuple", "Optional", "Union"}  # OmegaConf node metadata
TORCH_GLOBALS = {
    "torch._utils": {
        "_rebuild_tensor",
        "_rebuild_tensor_v2",
        "_rebuild_parameter",
        "_rebuild_device_tensor_from_numpy",
    },
    "torch._tensor": {"_rebuild_from_type_v2"},
    "torch": {"Size", "device", "Tensor", "dtype"},
    "torch.nn.parameter": {"Parameter"},
}
NUMPY_GLOBALS = {"_reconstruct", "scalar", "ndarray", "dtype"}
# Keys of a fairseq AV-HuBERT state_dict that the encoder does not use (pre-training heads, masking).
PRETRAINING_ONLY = ("mask_emb", "label_embs_concat", "final_proj.", "target_glu.")
# fairseq's `AVHubertConfig` defaults, for fields an old checkpoint does not spell out.
FAIRSEQ_DEFAULTS = {
    "encoder_layers": 12,
    "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12,
    "layer_norm_first": False,
    "conv_pos": 128,
    "conv_pos_groups": 16,
    "audio_feat_dim": -1,
    "modality_fuse": "concat",
    "resnet_relu_type": "prelu",
    "dropout": 0.1,
    "attention_dropout": 0.1,
    "activation_dropout": 0.0,
    "dropout_input": 0.0,
}


class Placeholder:
    """Stands in for a class that cannot (or must not) be imported; keeps what was pickled."""

    _qualified = "?"

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        return obj

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<placeholder {self._qualified}>"


def _placeholder(module: str, name: str) -> type:
    return type(name, (Placeholder,), {"_qualified": f"{module}.{name}"})


class RestrictedUnpickler(pickle.Unpickler):
    """Loads tensors and plain data; placeholders for fairseq/omegaconf classes; refuses anything else."""

    def find_class(self, module: str, name: str):
        if (module, name) in _compat_pickle.NAME_MAPPING:  # protocol 2 writes Python 2 names
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in SAFE_GLOBALS:
            return SAFE_GLOBALS[(module, name)]
        if module == "typing" and name in TYPING_GLOBALS:
            return super().find_class(module, name)
        if name in TORCH_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and (name.endswith("Storage") or name in ("float32", "float16", "bfloat16")):
            return super().find_class(module, name)
        if module.split(".")[0] == "numpy" and (name in NUMPY_GLOBALS or module == "numpy.dtypes"):
            return super().find_class(module, name)
        if module.split(".")[0] in STUB_PACKAGES:
            return _placeholder(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name} from an AV-HuBERT checkpoint (not a tensor, a plain "
            "container, numpy data or a fairseq/omegaconf object)"
        )


restricted_pickle = types.ModuleType("restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler
restricted_pickle.load = lambda file, **kw: RestrictedUnpickler(file, **kw).load()
restricted_pickle.__name__ = "restricted_pickle"


def load_fairseq_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict on CPU (weights_only first, then the restricted unpickler above)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"AV-HuBERT checkpoint {path} does not exist (`video_encoder.checkpoint`)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        log.info(
            "%s holds non-tensor objects (fairseq/argparse): loading with the restricted unpickler", path
        )
        state = torch.load(path, map_location="cpu", weights_only=False, pickle_module=restricted_pickle)
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path} is not a fairseq checkpoint (expected a dict with a 'model' state_dict)")
    return state


def to_plain(value: Any) -> Any:
    """Placeholders (OmegaConf containers and nodes, fairseq objects) and namespaces -> dicts/lists/values."""
    if isinstance(value, Placeholder):
        state = value.state
        if isinstance(state, dict) and "_content" in state:  # DictConfig / ListConfig
            return to_plain(state["_content"])
        if isinstance(state, dict) and "_val" in state:  # AnyNode, StringNode, ...
            return to_plain(state["_val"])
        return to_plain(state) if state is not None else None
    if isinstance(value, argparse.Namespace):
        return to_plain(vars(value))
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def encoder_settings(state: dict) -> tuple[dict, dict, str]:
    """(model settings, task settings, state_dict prefix of the encoder) of a pre-trained or fine-tuned file."""
    cfg = to_plain(state.get("cfg"))
    if cfg:
        model, task = dict(cfg.get("model") or {}), dict(cfg.get("task") or {})
    else:
        args = to_plain(state.get("args"))
        if not args:
            raise ValueError("the checkpoint has neither `cfg` nor `args`: cannot tell its architecture")
        model, task = dict(args), dict(args)  # old fairseq: one flat namespace
    prefix = ""
    w2v = model.get("w2v_args")
    if model.get("_name") == "av_hubert_seq2seq" or w2v:
        if not w2v:
            raise ValueError(
                "fine-tuned checkpoint without `w2v_args`: its encoder architecture is unknown (fairseq "
                "would read it from the pre-trained file at `w2v_path`)"
            )
        w2v = to_plain(w2v)
        model = dict(w2v.get("model") or w2v)
        task = dict(w2v.get("task") or w2v)
        prefix = FINETUNED_PREFIX
    return model, task, prefix


def config_from_settings(model: dict, state_dict: dict[str, torch.Tensor], prefix: str) -> AVHubertConfig:
    """AVHubertConfig from fairseq model settings (fairseq defaults for absent fields)."""
    known = {f.name for f in fields(AVHubertConfig)}
    values = {k: model.get(k, FAIRSEQ_DEFAULTS[k]) for k in FAIRSEQ_DEFAULTS}
    if int(model.get("sub_encoder_layers", 0) or 0) > 0:
        raise ValueError(
            "AV-HuBERT with per-modality transformer layers (sub_encoder_layers > 0) is not supported"
        )
    frontend = state_dict.get(f"{prefix}feature_extractor_video.resnet.frontend3D.0.weight")
    if frontend is not None:
        values["resnet_channels"] = int(frontend.shape[0])
    if values["audio_feat_dim"] in (None, -1):
        audio_proj = state_dict.get(f"{prefix}feature_extractor_audio.proj.weight")
        values["audio_feat_dim"] = int(audio_proj.shape[1]) if audio_proj is not None else 104
    return AVHubertConfig(**{k: v for k, v in values.items() if k in known})


def encoder_state_dict(
    state_dict: dict[str, torch.Tensor], prefix: str, modalities: tuple[str, ...]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The encoder's tensors renamed for `AVHubertModel` (prefix stripped), and the keys left out on purpose."""
    kept, ignored = {}, []
    unused_branches = tuple(f"feature_extractor_{m}." for m in ("audio", "video") if m not in modalities)
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            ignored.append(key)  # decoder.*, encoder.proj.* of the seq2seq model
            continue
        name = key[len(prefix) :]
        if name.startswith(PRETRAINING_ONLY) or name.startswith(unused_branches):
            ignored.append(key)
            continue
        # a checkpoint re-saved with torch's parametrized weight norm
        name = name.replace("pos_conv.0.parametrizations.weight.original0", "pos_conv.0.weight_g")
        name = name.replace("pos_conv.0.parametrizations.weight.original1", "pos_conv.0.weight_v")
        kept[name] = value
    return kept, ignored


def load_encoder_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict that fails with every missing and unexpected key named."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:

        def listing(keys: list[str]) -> str:
            return ", ".join(keys[:40]) + (f", ... ({len(keys)} in all)" if len(keys) > 40 else "")

        raise ValueError(
            f"AV-HuBERT checkpoint {source} does not match the encoder it configures:\n"
            f"  missing from the checkpoint ({len(missing)}): {listing(missing) or '-'}\n"
            f"  unexpected in the checkpoint ({len(unexpected)}): {listing(unexpected) or '-'}"
        )
