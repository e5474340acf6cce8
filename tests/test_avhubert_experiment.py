"""experiment=avsr_reference_lrs3: the reference configuration in one override, smoke-testable with tiny parts."""

import hydra
import pytest

from data.avsr.synthetic_corpus import ensure_synthetic_corpus
from models.avsr.avhubert_encoder import AVHubertEncoder
from models.avsr.video_encoder import ResNet18VideoEncoder
from tests.hydra_utils import compose_train
from train import train


def test_reference_experiment_holds_the_paper_configuration():
    cfg = compose_train(["experiment=avsr_reference_lrs3"])
    assert cfg.backbone.source == "meta-llama/Llama-3.2-3B-Instruct"
    assert list(cfg.peft.target_modules) == ["q_proj", "v_proj"]
    assert cfg.objective.decorr.weight == 1.0e4
    assert cfg.video_encoder.size == "large" and cfg.video_encoder.modality == "video"
    assert list(cfg.video_encoder.lora.target_modules) == ["q_proj", "v_proj"] and cfg.video_encoder.frozen
    assert cfg.audio_encoder.size == "large" and cfg.audio_encoder.modality == "audio"
    projector = cfg.model.video_projector
    assert (projector.layer_norm, projector.layer_norm_position, projector.activation) == (
        True,
        "after",
        "relu",
    )
    assert (projector.rate, projector.compression) == (5, "avg_pool")


def test_debug_smoke_swaps_av_hubert_for_a_tiny_one_and_keeps_resnet_elsewhere():
    cfg = compose_train(["experiment=avsr_reference_lrs3", "debug=smoke"])
    video = hydra.utils.instantiate(cfg.video_encoder)()
    assert isinstance(video, AVHubertEncoder) and video.output_dim == 32 and video.modality == "video"
    assert any("lora_" in n for n, p in video.named_parameters() if p.requires_grad)
    audio = hydra.utils.instantiate(cfg.audio_encoder)()
    assert isinstance(audio, AVHubertEncoder) and audio.modality == "audio"
    other = compose_train(["experiment=vsr_decorr", "debug=smoke"])
    assert isinstance(hydra.utils.instantiate(other.video_encoder)(), ResNet18VideoEncoder)


FUSED = ["model.modality=video", "smoke_encoders.video=avhubert_audiovisual"]  # one AV-HuBERT, both streams


@pytest.mark.slow
@pytest.mark.parametrize(
    "modality, extra", [("video", []), ("audio", []), ("audiovisual", []), ("audiovisual", FUSED)]
)
def test_reference_experiment_smoke_runs_on_an_lrs3_layout_corpus(tmp_path, modality, extra):
    root = ensure_synthetic_corpus(
        tmp_path / "corpus", num_train=4, num_val=2, num_test=1, include_librivox=False, progress=False
    )
    cfg = compose_train(
        [
            "experiment=avsr_reference_lrs3",
            "debug=smoke",
            f"data.root={root}",
            f"data.modality={modality}",
            "data.train_manifest=labels/train.csv",
            "trainer.max_steps=2",
            "trainer.limit_val_batches=1",
            "model.generation.num_beams=2",
            "model.generation.max_new_tokens=4",
            *extra,
        ],
        tmp_path / "run",
    )
    after = train(cfg)
    assert after and all(v == v for v in after.values())
