"""CTranslate2 -> Hugging Face Whisper conversion: binary format round trip, exact weights, real tiny.en."""

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

from models.avsr.audio_encoder import ensure_converted_whisper, load_whisper_encoder
from models.ct2_format import Ct2Model, read_ct2_model, write_ct2_model
from models.whisper_ct2 import Ct2WhisperFiles, convert_ct2_whisper, folder_files

SPECIALS = [
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|en|>",
    "<|transcribe|>",
    "<|translate|>",
    "<|notimestamps|>",
]


def _attention_to_ct2(state, hf, ct2, cross):
    q, k, v = (state[f"{hf}.{p}_proj.weight"] for p in "qkv")
    qb, vb = state[f"{hf}.q_proj.bias"], state[f"{hf}.v_proj.bias"]
    out = {
        f"{ct2}/layer_norm/gamma": state[f"{hf}_layer_norm.weight"],
        f"{ct2}/layer_norm/beta": state[f"{hf}_layer_norm.bias"],
    }
    if cross:
        out |= {
            f"{ct2}/linear_0/weight": q,
            f"{ct2}/linear_0/bias": qb,
            f"{ct2}/linear_1/weight": torch.cat([k, v]),
            f"{ct2}/linear_1/bias": torch.cat([torch.zeros_like(vb), vb]),
            f"{ct2}/linear_2/weight": state[f"{hf}.out_proj.weight"],
            f"{ct2}/linear_2/bias": state[f"{hf}.out_proj.bias"],
        }
    else:
        out |= {
            f"{ct2}/linear_0/weight": torch.cat([q, k, v]),
            f"{ct2}/linear_0/bias": torch.cat([qb, torch.zeros_like(qb), vb]),
            f"{ct2}/linear_1/weight": state[f"{hf}.out_proj.weight"],
            f"{ct2}/linear_1/bias": state[f"{hf}.out_proj.bias"],
        }
    return out


def hf_to_ct2(model: WhisperForConditionalGeneration) -> Ct2Model:
    """What CTranslate2's own converter writes for an HF Whisper (fp16 weights, metadata scalars)."""
    state, cfg = model.state_dict(), model.config
    var = {
        "encoder/num_heads": torch.tensor(cfg.encoder_attention_heads, dtype=torch.int16),
        "decoder/num_heads": torch.tensor(cfg.decoder_attention_heads, dtype=torch.int16),
        "decoder/activation": torch.tensor(1, dtype=torch.int8),
        "decoder/scale_embeddings": torch.tensor(0, dtype=torch.int8),
        "decoder/embeddings/weight": state["model.decoder.embed_tokens.weight"],
    }
    for stack, layers in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
        var[f"{stack}/position_encodings/encodings"] = state[f"model.{stack}.embed_positions.weight"]
        var[f"{stack}/layer_norm/gamma"] = state[f"model.{stack}.layer_norm.weight"]
        var[f"{stack}/layer_norm/beta"] = state[f"model.{stack}.layer_norm.bias"]
        for i in range(layers):
            hf, ct2 = f"model.{stack}.layers.{i}", f"{stack}/layer_{i}"
            var |= _attention_to_ct2(state, f"{hf}.self_attn", f"{ct2}/self_attention", cross=False)
            if stack == "decoder":
                var |= _attention_to_ct2(state, f"{hf}.encoder_attn", f"{ct2}/attention", cross=True)
            for j, fc in enumerate(("fc1", "fc2")):
                var[f"{ct2}/ffn/linear_{j}/weight"] = state[f"{hf}.{fc}.weight"]
                var[f"{ct2}/ffn/linear_{j}/bias"] = state[f"{hf}.{fc}.bias"]
            var[f"{ct2}/ffn/layer_norm/gamma"] = state[f"{hf}.final_layer_norm.weight"]
            var[f"{ct2}/ffn/layer_norm/beta"] = state[f"{hf}.final_layer_norm.bias"]
    for conv in ("conv1", "conv2"):
        var[f"encoder/{conv}/weight"] = state[f"model.encoder.{conv}.weight"]
        var[f"encoder/{conv}/bias"] = state[f"model.encoder.{conv}.bias"]
    var = {k: v.half() if v.is_floating_point() else v for k, v in var.items()}
    return Ct2Model("WhisperSpec", 3, var, {"decoder/projection/weight": "decoder/embeddings/weight"})


@pytest.fixture(scope="module")
def tiny_ct2_folder(tmp_path_factory):
    """A random 2-layer Whisper written as a CTranslate2 folder (split in two parts), with its HF original."""
    folder = tmp_path_factory.mktemp("ct2")
    vocab = {t: i for i, t in enumerate("abcdefghijklmnopqrstuvwxyz ")}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.add_special_tokens(SPECIALS)
    tokenizer.save(str(folder / "tokenizer.json"))
    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=len(vocab) + len(SPECIALS),
        d_model=16,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_source_positions=20,
        max_target_positions=12,
        pad_token_id=27,
        bos_token_id=27,
        eos_token_id=27,
        decoder_start_token_id=28,
    )
    original = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # fp16-representable weights, so the conversion must be exact
        for p in original.parameters():
            p.copy_(p.half().float())
    write_ct2_model(folder / "whole.bin", hf_to_ct2(original))
    raw = (folder / "whole.bin").read_bytes()
    (folder / "model.bin.part1").write_bytes(raw[: len(raw) // 3])
    (folder / "model.bin.part2").write_bytes(raw[len(raw) // 3 :])
    (folder / "whole.bin").unlink()
    (folder / "config.json").write_text(
        json.dumps(
            {
                "suppress_ids": [1, 2],
                "suppress_ids_begin": [26, 27],
                "lang_ids": [29],
                "alignment_heads": [[1, 0]],
            }
        )
    )
    return folder, original


def test_binary_format_round_trip_keeps_every_dtype_and_alias(tmp_path):
    variables = {
        "a/f32": torch.randn(3, 2),
        "a/f16": torch.randn(4).half(),
        "a/bf16": torch.randn(2, 2).bfloat16(),
        "a/i8": torch.tensor(-3, dtype=torch.int8),
        "a/i16": torch.tensor([7, -9], dtype=torch.int16),
        "a/i32": torch.tensor([[123456]], dtype=torch.int32),
    }
    write_ct2_model(tmp_path / "m.bin", Ct2Model("WhisperSpec", 3, variables, {"b/alias": "a/f32"}))
    back = read_ct2_model(tmp_path / "m.bin")
    assert (back.spec, back.revision, back.aliases) == ("WhisperSpec", 3, {"b/alias": "a/f32"})
    for name, tensor in variables.items():
        assert back.variables[name].dtype == tensor.dtype and torch.equal(back.variables[name], tensor)
    assert torch.equal(back.get("b/alias"), variables["a/f32"])
    (tmp_path / "cut.bin").write_bytes((tmp_path / "m.bin").read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_ct2_model(tmp_path / "cut.bin")


def test_conversion_reproduces_the_original_model_exactly(tiny_ct2_folder, tmp_path):
    folder, original = tiny_ct2_folder
    files = folder_files(folder)
    assert [p.name for p in files.model_parts] == ["model.bin.part1", "model.bin.part2"]
    convert_ct2_whisper(files, tmp_path / "hf")
    converted = WhisperForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    features = torch.randn(2, 80, 40)
    decoder_ids = torch.tensor([[28, 3, 4], [28, 5, 6]])
    with torch.no_grad():
        expected = original(input_features=features, decoder_input_ids=decoder_ids).logits
        actual = converted(input_features=features, decoder_input_ids=decoder_ids).logits
    assert torch.equal(actual, expected)
    assert converted.config.decoder_start_token_id == 28 and converted.config.eos_token_id == 27
    assert converted.generation_config.suppress_tokens == [1, 2]
    assert converted.generation_config.begin_suppress_tokens == [26, 27]
    assert (tmp_path / "hf" / "preprocessor_config.json").exists() and (
        tmp_path / "hf" / "tokenizer.json"
    ).exists()


def test_conversion_names_missing_files(tmp_path):
    files = Ct2WhisperFiles((tmp_path / "model.bin",), tmp_path / "config.json", tmp_path / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="model.bin"):
        convert_ct2_whisper(files, tmp_path / "out")


@pytest.mark.slow  # the real tiny.en weights; the conversion itself is covered fast on a tiny CT2 model above
def test_offline_tiny_en_encoder_is_finite_deterministic_and_close_to_the_30s_window(tmp_path):
    folder = ensure_converted_whisper("tiny.en", tmp_path / "whisper-tiny.en")
    assert ensure_converted_whisper("tiny.en", folder) == folder  # idempotent: no second conversion
    extractor = WhisperFeatureExtractor.from_pretrained(folder)
    assert extractor.feature_size == 80
    t = torch.arange(16000 * 2) / 16000
    rng = np.random.default_rng(0)
    audio = (
        0.3 * torch.sin(2 * torch.pi * 220 * t) * torch.sin(2 * torch.pi * 3 * t)
        + 0.01 * torch.from_numpy(rng.standard_normal(t.shape[0])).float()
    )[None]
    lengths = torch.tensor([audio.shape[1]])
    true_length = load_whisper_encoder(str(folder), true_length=True)
    window = load_whisper_encoder(str(folder), true_length=False)
    with torch.no_grad():
        first, out_lengths = true_length(audio, lengths)
        second, _ = true_length(audio, lengths)
        padded, padded_lengths = window(audio, lengths)
    assert first.shape == (1, 100, 384) and out_lengths.tolist() == [100] == padded_lengths.tolist()
    assert torch.isfinite(first).all() and torch.equal(first, second)
    cosine = torch.nn.functional.cosine_similarity(first[0], padded[0], dim=-1)
    assert cosine.mean() > 0.8  # same encoder; only the 28 s of padded context differ
