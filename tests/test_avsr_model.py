"""AVSR model pieces: log-mel, true-length Whisper, lip encoder, projectors, packing and masks, generation."""

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from transformers import WhisperFeatureExtractor

from models import segments as seg
from models.avsr.audio_encoder import encode_true_length
from models.avsr.avsr_model import AVSRModel
from models.avsr.projector import ModalityProjector, compressed_lengths
from models.avsr.sequence import IGNORE_INDEX
from models.avsr.tiny import build_tiny_video_encoder, build_tiny_whisper_encoder
from models.avsr.whisper_frontend import WhisperLogMel
from models.fast import compile_layers


def _speechlike(samples: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / 16000
    return 0.3 * torch.sin(2 * torch.pi * 180 * t) * torch.sin(2 * torch.pi * 2 * t) + 0.02 * torch.randn(
        samples, generator=g
    )


def test_log_mel_matches_transformers_feature_extractor():
    clip = _speechlike(9000)
    extractor = WhisperFeatureExtractor(chunk_length=1)  # 1 s window = 100 frames, same maths as 30 s
    expected = torch.from_numpy(
        extractor(clip.numpy(), sampling_rate=16000, return_tensors="np").input_features
    )
    audio = torch.stack([_speechlike(16000, seed=1), torch.nn.functional.pad(clip, (0, 7000))])
    lengths = torch.tensor([16000, 9000])
    window, frames = WhisperLogMel(pad_to_samples=16000)(audio, lengths)
    assert window.shape == (2, 80, 100) and frames.tolist() == [100, 56]
    torch.testing.assert_close(window[1], expected[0], atol=1e-5, rtol=0)
    true_length, _ = WhisperLogMel()(audio, lengths)
    torch.testing.assert_close(true_length[1, :, :56], expected[0, :, :56], atol=1e-5, rtol=0)


def test_true_length_encoder_equals_transformers_on_a_full_window_and_ignores_padding():
    audio_encoder = build_tiny_whisper_encoder(true_length=True, max_source_positions=50)
    encoder = audio_encoder.encoder
    mel = torch.randn(2, 80, 100)
    with torch.no_grad():
        expected = encoder(input_features=mel).last_hidden_state
        actual = encode_true_length(encoder, mel, torch.tensor([100, 100]))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    audio = torch.stack([_speechlike(16000), torch.nn.functional.pad(_speechlike(7000, seed=2), (0, 9000))])
    with torch.no_grad():
        batch, lengths = audio_encoder(audio, torch.tensor([16000, 7000]))
        alone, alone_lengths = audio_encoder(audio[1:, :7000], torch.tensor([7000]))
    assert lengths.tolist() == [50, 22] and alone_lengths.tolist() == [22] and batch.shape == (2, 50, 32)
    torch.testing.assert_close(batch[1, :22], alone[0], atol=1e-5, rtol=1e-5)
    assert batch[1, 22:].abs().max() == 0


@pytest.mark.parametrize("temporal_layers", [0, 1])
def test_video_encoder_shapes_and_padding_invariance(temporal_layers):
    encoder = build_tiny_video_encoder(temporal_layers=temporal_layers).eval()
    video = torch.randn(2, 6, 1, 88, 88)
    video[1, 4:] = 0
    with torch.no_grad():
        features, lengths = encoder(video, torch.tensor([6, 4]))
        alone, _ = encoder(video[1:, :4], torch.tensor([4]))
    assert (
        features.shape == (2, 6, encoder.output_dim)
        and encoder.output_dim == 32
        and lengths.tolist() == [6, 4]
    )
    torch.testing.assert_close(features[1, :4], alone[0], atol=1e-5, rtol=1e-5)
    assert features[1, 4:].abs().max() == 0


def test_video_encoder_checkpoint_loading_and_clear_errors(tmp_path):
    source = build_tiny_video_encoder(seed=1)
    torch.save(
        {"model": {f"encoder.frontend.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "ck.pt"
    )
    target = build_tiny_video_encoder(seed=2)
    target.load_checkpoint(tmp_path / "ck.pt", key="model", strip_prefix="encoder.frontend.")
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="video_encoder.checkpoint"):
        target.load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(KeyError, match="no key 'state_dict'"):
        target.load_checkpoint(tmp_path / "ck.pt", key="state_dict")
    with pytest.raises(ValueError, match="missing"):
        target.load_checkpoint(tmp_path / "ck.pt", key="model")


@pytest.mark.parametrize("compression", ["stack", "avg_pool"])
@pytest.mark.parametrize("rate", [1, 3, 32])
def test_projector_lengths_and_padding_invariance(compression, rate):
    torch.manual_seed(0)
    projector = ModalityProjector(8, 16, rate=rate, compression=compression, layer_norm=True)
    features = torch.randn(2, 70, 8)
    lengths = torch.tensor([70, 37])
    tokens, out_lengths = projector(features, lengths)
    alone, _ = projector(features[1:, :37], lengths[1:])
    assert (
        out_lengths.tolist() == [-(-70 // rate), -(-37 // rate)] == compressed_lengths(lengths, rate).tolist()
    )
    assert tokens.shape == (2, -(-70 // rate), 16)
    torch.testing.assert_close(tokens[1, : out_lengths[1]], alone[0, : out_lengths[1]])
    assert tokens[1, out_lengths[1] :].abs().sum() == 0


def test_projector_rejects_bad_rates():
    with pytest.raises(ValueError, match="1..32"):
        ModalityProjector(8, 16, rate=33)


@pytest.fixture()
def tiny_avsr(tiny_lm):
    llm, tokenizer = tiny_lm
    audio, video = build_tiny_whisper_encoder(), build_tiny_video_encoder()
    torch.manual_seed(0)
    width = llm.config.hidden_size
    return AVSRModel(
        llm,
        tokenizer,
        "audiovisual",
        "Transcribe:",
        audio_encoder=audio,
        video_encoder=video,
        audio_projector=ModalityProjector(audio.output_dim, width, rate=4),
        video_projector=ModalityProjector(video.output_dim, width, rate=2),
    ).eval()


def _batch(audio_samples=(16000, 6400), video_frames=(25, 10), texts=("hello world", "hi")):
    audio = torch.zeros(len(texts), max(audio_samples))
    video = torch.zeros(len(texts), max(video_frames), 1, 88, 88)
    for i, (samples, frames) in enumerate(zip(audio_samples, video_frames)):
        audio[i, :samples] = _speechlike(samples, seed=i)
        video[i, :frames] = torch.randn(frames, 1, 88, 88, generator=torch.Generator().manual_seed(i))
    return {
        "audio": audio,
        "audio_lengths": torch.tensor(audio_samples),
        "video": video,
        "video_lengths": torch.tensor(video_frames),
        "text": list(texts),
        "ids": [str(i) for i in texts],
    }


def _row(batch, i):
    a, v = int(batch["audio_lengths"][i]), int(batch["video_lengths"][i])
    return {
        "audio": batch["audio"][i : i + 1, :a],
        "audio_lengths": batch["audio_lengths"][i : i + 1],
        "video": batch["video"][i : i + 1, :v],
        "video_lengths": batch["video_lengths"][i : i + 1],
        "text": batch["text"][i : i + 1],
    }


def test_packed_rows_have_no_holes_and_masks_cover_padding(tiny_avsr):
    batch = _batch()
    with torch.no_grad():
        packed = tiny_avsr.build_inputs(batch)
    segments, mask, labels = packed.segments, packed.attention_mask, packed.labels
    audio_tokens = [-(-(s // 320) // 4) for s in (16000, 6400)]  # 20 ms frames, rate 4
    video_tokens = [-(-f // 2) for f in (25, 10)]
    for row in range(2):
        n = int(mask[row].sum())
        assert mask[row, :n].all() and not mask[row, n:].any()  # right padding only, no holes
        s = segments[row, :n].tolist()
        assert (
            s[0] == seg.BOS
            and s.count(seg.AUDIO) == audio_tokens[row]
            and s.count(seg.VIDEO) == video_tokens[row]
        )
        order = [x for i, x in enumerate(s) if i == 0 or x != s[i - 1]]
        assert order == [
            seg.BOS,
            seg.DELIMITER,
            seg.AUDIO,
            seg.DELIMITER,
            seg.VIDEO,
            seg.DELIMITER,  # </a><v>
            seg.PROMPT,
            seg.TARGET,
        ]
        target = labels[row][segments[row] == seg.TARGET]
        assert (target != IGNORE_INDEX).all() and target[-1] == tiny_avsr.eos_id
        assert (labels[row][segments[row] != seg.TARGET] == IGNORE_INDEX).all()
        assert tiny_avsr.tokenizer.decode(target[:-1]).strip() == batch["text"][row]
    assert (packed.inputs_embeds[mask == 0] == 0).all() and (segments[mask == 0] == seg.PAD).all()


def test_padded_row_gives_the_same_logits_and_loss_as_the_row_alone(tiny_avsr):
    batch = _batch()
    with torch.no_grad():
        packed = tiny_avsr.build_inputs(batch)
        logits = tiny_avsr.llm(**packed.llm_inputs()).logits
        alone_packed = tiny_avsr.build_inputs(_row(batch, 1))
        alone = tiny_avsr.llm(**alone_packed.llm_inputs()).logits
    n = int(alone_packed.attention_mask.sum())
    assert n < packed.inputs_embeds.shape[1]
    torch.testing.assert_close(logits[1, :n], alone[0], atol=1e-4, rtol=1e-4)
    assert torch.equal(packed.labels[1, :n], alone_packed.labels[0])


def test_batched_greedy_and_beam_generation_match_row_by_row(tiny_avsr):
    """Left-padded batched decoding equals decoding each row alone. The random model would stop at once or
    emit only special tokens (decoded to ""), which makes any two runs equal: 4 new ordinary tokens are
    forced (no EOS before them, special tokens suppressed), so the comparison has text to compare."""
    batch = _batch()
    forced = {"min_new_tokens": 4, "suppress_tokens": list(tiny_avsr.tokenizer.all_special_ids)}
    for beams in (1, 2):
        together = tiny_avsr.generate(batch, max_new_tokens=4, num_beams=beams, **forced)
        separate = [
            tiny_avsr.generate(_row(batch, i), max_new_tokens=4, num_beams=beams, **forced)[0]
            for i in range(2)
        ]
        assert together == separate
        assert all(isinstance(t, str) and t for t in together), together  # non-empty outputs


def test_generation_runs_compiled_layers_eagerly(tiny_avsr):
    """With `kernels=fast` the decoder layers are compiled; token-by-token decoding would compile them again
    at every step (guards on the growing KV cache's per-layer state: an H200 study's first validation took
    5 min 48 s). Generation runs them eagerly: no new graph, the same transcripts."""
    batch = _batch()
    forced = {"min_new_tokens": 4, "suppress_tokens": list(tiny_avsr.tokenizer.all_special_ids)}
    eager = tiny_avsr.generate(batch, max_new_tokens=4, **forced)
    counter = CompileCounter()
    torch._dynamo.reset()
    try:
        assert compile_layers(tiny_avsr.llm, backend=counter) == 2
        with torch.no_grad():  # a training-style forward goes through the compiled layers
            tiny_avsr.llm(**tiny_avsr.build_inputs(batch).llm_inputs(), use_cache=False)
        compiled = counter.frame_count
        assert compiled >= 1
        assert tiny_avsr.generate(batch, max_new_tokens=4, **forced) == eager
        assert counter.frame_count == compiled
    finally:
        torch._dynamo.reset()


def test_generation_prefix_is_left_padded_and_ends_with_the_prompt(tiny_avsr):
    with torch.no_grad():
        packed = tiny_avsr.build_inputs(_batch(), with_targets=False)
    assert (packed.attention_mask[:, -1] == 1).all() and (packed.segments[:, -1] == seg.PROMPT).all()
    assert packed.attention_mask[1, 0] == 0 and not (packed.segments == seg.TARGET).any()


def test_single_modality_models_need_only_their_inputs(tiny_lm):
    llm, tokenizer = tiny_lm
    video = build_tiny_video_encoder()
    model = AVSRModel(
        llm,
        tokenizer,
        "video",
        "Read the lips:",
        video_encoder=video,
        video_projector=ModalityProjector(video.output_dim, llm.config.hidden_size, rate=5),
    ).eval()
    batch = _batch()
    del batch["audio"], batch["audio_lengths"]
    with torch.no_grad():
        packed = model.build_inputs(batch)
    assert not (packed.segments == seg.AUDIO).any() and (packed.segments == seg.VIDEO).sum() == 5 + 2
    with pytest.raises(ValueError, match="needs a audio encoder"):
        AVSRModel(llm, tokenizer, "audiovisual", "x", video_encoder=video)
