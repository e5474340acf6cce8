"""AV-HuBERT in plain PyTorch: audio front end, sizes, shapes, padding, modalities, LoRA, the AVSR slots."""

import math

import numpy as np
import pytest
import torch

from models.avsr.avhubert import AVHubertConfig, AVHubertModel
from models.avsr.avhubert_encoder import build_avhubert_encoder
from models.avsr.avhubert_frontend import StackedLogFilterbank, stacked_frames
from models.avsr.projector import ModalityProjector


def logfbank_reference(signal: np.ndarray) -> np.ndarray:
    """python_speech_features.logfbank(signal, 16000) with its defaults, written out in float64 numpy."""
    signal = np.append(signal[0], signal[1:] - 0.97 * signal[:-1])
    slen, flen, step = len(signal), 400, 160
    n = 1 if slen <= flen else 1 + int(math.ceil((slen - flen) / step))
    padded = np.concatenate([signal, np.zeros((n - 1) * step + flen - slen)])
    frames = np.stack([padded[i * step : i * step + flen] for i in range(n)])
    power = np.abs(np.fft.rfft(frames, 512)) ** 2 / 512

    def hz2mel(hz):
        return 2595 * np.log10(1 + hz / 700.0)

    def mel2hz(mel):
        return 700 * (10 ** (mel / 2595.0) - 1)

    points = np.linspace(hz2mel(0), hz2mel(8000), 28)
    bins = np.floor((512 + 1) * mel2hz(points) / 16000)
    bank = np.zeros([26, 257])
    for j in range(26):
        for i in range(int(bins[j]), int(bins[j + 1])):
            bank[j, i] = (i - bins[j]) / (bins[j + 1] - bins[j])
        for i in range(int(bins[j + 1]), int(bins[j + 2])):
            bank[j, i] = (bins[j + 2] - i) / (bins[j + 2] - bins[j + 1])
    feat = power @ bank.T
    return np.log(np.where(feat == 0, np.finfo(float).eps, feat))


def stack_reference(feats: np.ndarray) -> np.ndarray:
    """AV-HuBERT's `stacker(feats, 4)`: zero-fill to a multiple of 4 frames, concatenate groups of 4."""
    rest = (-len(feats)) % 4
    feats = np.concatenate([feats, np.zeros([rest, feats.shape[1]])])
    return feats.reshape(-1, 4 * feats.shape[1])


def test_audio_frontend_matches_python_speech_features_logfbank_stacked_per_clip():
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([16000, 9123])
    audio = 0.1 * torch.randn(2, 16000, generator=g)
    audio[1, 9123:] = 0.7  # padding must not leak into the shorter clip
    audio[0, 4000:4800] = 0.0  # digital silence: the eps floor
    frontend = StackedLogFilterbank(normalize=False)
    features, out_lengths = frontend(audio, lengths)
    for row in range(2):
        samples = (audio[row, : lengths[row]].double() * 32768).numpy()
        want = stack_reference(logfbank_reference(samples))
        assert out_lengths[row] == len(want)
        got = features[row, : out_lengths[row]].double().numpy()
        np.testing.assert_allclose(got, want, atol=2e-3, rtol=1e-4)
        assert features[row, out_lengths[row] :].abs().sum() == 0
    normalized, _ = StackedLogFilterbank(normalize=True)(audio, lengths)
    frame = features[0, 3]
    assert torch.allclose(
        normalized[0, 3], (frame - frame.mean()) / (frame.var(unbiased=False) + 1e-5).sqrt(), atol=1e-4
    )


def test_audio_cut_to_640_samples_per_video_frame_gives_one_feature_per_video_frame():
    frames = torch.tensor([1, 7, 60])
    assert torch.equal(stacked_frames(frames * 640), frames)


def parameter_millions(cfg: AVHubertConfig) -> float:
    with torch.device("meta"):
        model = AVHubertModel(cfg)
    return sum(p.numel() for p in model.parameters()) / 1e6


def test_base_and_large_have_the_published_sizes():
    # AV-HuBERT paper (Shi et al. 2022): Base 103M, Large 325M parameters
    assert parameter_millions(AVHubertConfig.base()) == pytest.approx(103, abs=1)
    assert parameter_millions(AVHubertConfig.large()) == pytest.approx(325, abs=1)


def video_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(2, 9, 1, 88, 88, generator=g)
    lengths = torch.tensor([9, 5])
    audio = 0.1 * torch.randn(2, 9 * 640, generator=g)
    audio[1, 5 * 640 :] = 0
    return video, lengths, audio, lengths * 640


@pytest.mark.parametrize("modality", ["video", "audio", "audiovisual"])
def test_forward_shapes_and_padded_row_equals_the_clip_alone(modality):
    encoder = build_avhubert_encoder(size="tiny", modality=modality, frozen=True).eval()
    video, lengths, audio, audio_lengths = video_batch()

    def run(rows):
        if modality == "audio":
            return encoder(audio[rows], audio_lengths[rows])
        extra = (
            {"audio": audio[rows], "audio_lengths": audio_lengths[rows]} if modality == "audiovisual" else {}
        )
        return encoder(video[rows], lengths[rows], **extra)

    features, out_lengths = run(slice(0, 2))
    assert features.shape == (2, 9, encoder.output_dim) and torch.equal(out_lengths, lengths)
    alone, _ = run(slice(1, 2))
    alone = alone[:, :5] if modality == "audio" else alone[:, :5]
    assert torch.allclose(features[1, :5], alone[0, :5], atol=1e-5)
    assert features[1, 5:].abs().sum() == 0


def test_audiovisual_encoder_uses_both_streams_and_asks_for_audio_clearly():
    encoder = build_avhubert_encoder(size="tiny", modality="audiovisual").eval()
    video, lengths, audio, audio_lengths = video_batch()
    both, _ = encoder(video, lengths, audio=audio, audio_lengths=audio_lengths)
    silent, _ = encoder(video, lengths, audio=audio * 0, audio_lengths=audio_lengths)
    assert not torch.allclose(both, silent)
    with pytest.raises(ValueError, match="data.modality=audiovisual"):
        encoder(video, lengths)


def test_lora_on_query_and_value_only_trains_alone_and_starts_as_the_identity():
    plain = build_avhubert_encoder(size="tiny", modality="video", seed=3).eval()
    lora = build_avhubert_encoder(
        size="tiny",
        modality="video",
        seed=3,
        lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    ).eval()
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".self_attn.")[1].split(".")[0] for n in trainable} == {"q_proj", "v_proj"}
    video, lengths, _, _ = video_batch()
    assert torch.allclose(plain(video, lengths)[0], lora(video, lengths)[0], atol=1e-6)
    lora.train()
    assert not lora.model.training  # frozen base: no dropout, BatchNorm statistics kept
    lora(video, lengths)[0].sum().backward()
    assert all(p.grad is not None for n, p in lora.named_parameters() if "lora_B" in n)


def test_projector_layer_norm_after_the_mlp_normalises_the_llm_width_tokens():
    before = ModalityProjector(8, 16, rate=2, compression="avg_pool", layer_norm=True)
    after = ModalityProjector(
        8, 16, rate=2, compression="avg_pool", layer_norm=True, layer_norm_position="after", activation="relu"
    )
    assert isinstance(before.norm, torch.nn.LayerNorm) and before.norm.normalized_shape == (8,)
    assert isinstance(after.norm_after, torch.nn.LayerNorm) and isinstance(after.mlp[1], torch.nn.ReLU)
    tokens, lengths = after(torch.randn(2, 6, 8), torch.tensor([6, 3]))
    assert torch.allclose(tokens[0].mean(-1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(tokens[0].std(-1, unbiased=False), torch.ones(3), atol=1e-3)
    assert torch.equal(lengths, torch.tensor([3, 2])) and tokens[1, 2:].abs().sum() == 0
    with pytest.raises(ValueError, match="layer_norm_position"):
        ModalityProjector(8, 16, layer_norm=True, layer_norm_position="middle")


def test_one_fused_av_hubert_in_the_video_slot_reads_the_batch_audio(tiny_lm):
    from models.avsr.avsr_model import AVSRModel

    llm, tokenizer = tiny_lm
    encoder = build_avhubert_encoder(size="tiny", modality="audiovisual").eval()
    model = AVSRModel(
        llm,
        tokenizer,
        "video",
        "Transcribe.",
        video_encoder=encoder,
        video_projector=ModalityProjector(encoder.output_dim, llm.config.hidden_size, rate=2),
    )
    video, lengths, audio, audio_lengths = video_batch()
    batch = {
        "text": ["a", "b"],
        "video": video,
        "video_lengths": lengths,
        "audio": audio,
        "audio_lengths": audio_lengths,
    }
    tokens, token_lengths = model.modality_tokens(batch)["video"]
    assert tokens.shape[:2] == (2, 5) and torch.equal(token_lengths, torch.tensor([5, 3]))
    silent, _ = model.modality_tokens({**batch, "audio": audio * 0})["video"]
    assert not torch.allclose(tokens, silent)


def test_pre_ln_layer_equals_torch_transformer_layer_with_the_same_weights():
    from models.avsr.avhubert import EncoderLayer

    cfg = AVHubertConfig.tiny()
    ours = EncoderLayer(cfg).eval()
    torch_layer = torch.nn.TransformerEncoderLayer(
        32, 2, 64, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
    ).eval()
    attn = ours.self_attn
    with torch.no_grad():
        torch_layer.self_attn.in_proj_weight.copy_(
            torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        )
        torch_layer.self_attn.in_proj_bias.copy_(
            torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
        )
        torch_layer.self_attn.out_proj.load_state_dict(attn.out_proj.state_dict())
        torch_layer.linear1.load_state_dict(ours.fc1.state_dict())
        torch_layer.linear2.load_state_dict(ours.fc2.state_dict())
        torch_layer.norm1.load_state_dict(ours.self_attn_layer_norm.state_dict())
        torch_layer.norm2.load_state_dict(ours.final_layer_norm.state_dict())
    x = torch.randn(2, 7, 32)
    valid = torch.arange(7)[None] < torch.tensor([[7], [4]])
    want = torch_layer(x, src_key_padding_mask=~valid)
    assert torch.allclose(ours(x, valid)[valid], want[valid], atol=1e-5)


def test_positional_conv_weight_norm_matches_torch_weight_norm_state_dict():
    from models.avsr.avhubert import WeightNormConv1d

    conv = torch.nn.Conv1d(32, 32, kernel_size=8, padding=4, groups=4)
    normed = torch.nn.utils.weight_norm(conv, name="weight", dim=2)  # what fairseq's pos_conv used
    ours = WeightNormConv1d(32, 8, 4)
    ours.load_state_dict({k: v for k, v in normed.state_dict().items()})
    x = torch.randn(2, 32, 11)
    assert torch.allclose(ours(x), normed(x), atol=1e-6)


def test_output_layer_stops_early_and_bf16_runs():
    video, lengths, _, _ = video_batch()
    full = build_avhubert_encoder(size="tiny", seed=5).eval()
    first = build_avhubert_encoder(size="tiny", seed=5, output_layer=1).eval()
    valid = torch.arange(9)[None] < lengths[:, None]
    want = full.model.encoder.layers[0](stem(full, video, valid), valid)
    assert torch.allclose(first(video, lengths)[0][valid], want[valid], atol=1e-5)
    assert not torch.allclose(first(video, lengths)[0], full(video, lengths)[0])
    half = build_avhubert_encoder(size="tiny", dtype="bf16").eval()
    assert half(video, lengths)[0].dtype == torch.bfloat16


def stem(encoder, video, valid):
    """Fused, projected features plus conv positions: the input of the first transformer layer."""
    model = encoder.model
    x = model.feature_extractor_video(video.transpose(1, 2) * valid[:, None, :, None, None])
    x = model.post_extract_proj(model.layer_norm(torch.cat([torch.zeros_like(x), x], -1))) * valid[..., None]
    return x + model.encoder.pos_conv(x.transpose(1, 2)).transpose(1, 2)
