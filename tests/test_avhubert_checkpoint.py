"""Loading AV-HuBERT fairseq checkpoints without fairseq, on files written here in the same format."""

import argparse
import os
import pickle
import sys
import types
from collections import OrderedDict

import pytest
import torch
from omegaconf import OmegaConf

from models.avsr.avhubert import AVHubertConfig, AVHubertModel
from models.avsr.avhubert_checkpoint import load_fairseq_checkpoint
from models.avsr.avhubert_encoder import build_avhubert_encoder

TINY = AVHubertConfig.tiny()
# fairseq's `cfg.model` of a tiny pre-trained AV-HuBERT (same field names as large_vox_iter5.pt's)
MODEL_CFG = {
    "_name": "av_hubert",
    "encoder_layers": TINY.encoder_layers,
    "encoder_embed_dim": TINY.encoder_embed_dim,
    "encoder_ffn_embed_dim": TINY.encoder_ffn_embed_dim,
    "encoder_attention_heads": TINY.encoder_attention_heads,
    "layer_norm_first": True,
    "conv_pos": TINY.conv_pos,
    "conv_pos_groups": TINY.conv_pos_groups,
    "audio_feat_dim": 104,
    "modality_fuse": "concat",
    "resnet_relu_type": "prelu",
    "sub_encoder_layers": 0,
    "final_dim": 16,
    "encoder_layerdrop": 0.05,
    "label_rate": 25,
}
TASK_CFG = {"_name": "av_hubert_pretraining", "normalize": True, "stack_order_audio": 4, "labels": ["km"]}


class Meter:
    """Stands for fairseq.logging.meters.AverageMeter in `extra_state` (fairseq is not installed here)."""

    def __init__(self):
        self.val, self.count = 1.5, 3


FAKE_PACKAGES = ("fairseq", "fairseq.logging", "fairseq.logging.meters")


@pytest.fixture(autouse=True)
def fake_fairseq(monkeypatch):
    """Pickle `Meter` as if it came from fairseq; `forget_fairseq()` makes fairseq unimportable again."""
    for name in FAKE_PACKAGES:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    Meter.__module__, Meter.__qualname__, Meter.__name__ = FAKE_PACKAGES[-1], "AverageMeter", "AverageMeter"
    sys.modules[FAKE_PACKAGES[-1]].AverageMeter = Meter


def forget_fairseq():
    for name in FAKE_PACKAGES:
        sys.modules.pop(name, None)


def source_model(seed: int = 0) -> AVHubertModel:
    torch.manual_seed(seed)
    model = AVHubertModel(TINY).eval()
    for module in model.modules():  # non-trivial BatchNorm statistics, so they must load too
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    return model


def pretraining_state(model: AVHubertModel) -> OrderedDict:
    state = OrderedDict(model.state_dict())
    state["mask_emb"] = torch.randn(104)
    state["final_proj.weight"] = torch.randn(16, TINY.encoder_embed_dim)
    state["label_embs_concat"] = torch.randn(10, 16)
    return state


def write(path, checkpoint):
    torch.save(checkpoint, path)
    return str(path)


def pretrained_file(tmp_path, model, cfg_style="dict"):
    extra = {"metrics": {"train": OrderedDict(loss=Meter())}, "train_iterator": {"epoch": 3}}
    if cfg_style == "args":  # older fairseq: one argparse namespace, no cfg
        return write(
            tmp_path / "old.pt",
            {
                "args": argparse.Namespace(**{**TASK_CFG, **MODEL_CFG}),
                "cfg": None,
                "model": pretraining_state(model),
            },
        )
    cfg = {"model": MODEL_CFG, "task": TASK_CFG, "common": {"seed": 1}}
    if cfg_style == "omegaconf":
        cfg = OmegaConf.create(cfg)
    return write(
        tmp_path / "pretrained.pt",
        {
            "args": None,
            "cfg": cfg,
            "model": pretraining_state(model),
            "extra_state": extra,
            "optimizer_history": [],
        },
    )


def finetuned_file(tmp_path, model):
    state = OrderedDict(("encoder.w2v_model." + k, v) for k, v in pretraining_state(model).items())
    state["decoder.embed_tokens.weight"] = torch.randn(20, 8)
    state["decoder.layers.0.fc1.weight"] = torch.randn(8, 8)
    cfg = {
        "model": {
            "_name": "av_hubert_seq2seq",
            "w2v_path": "/x/large_vox_iter5.pt",
            "decoder_layers": 1,
            "w2v_args": {"model": MODEL_CFG, "task": TASK_CFG},
        },
        "task": {"_name": "av_hubert_pretraining", "normalize": True, "modalities": ["video"]},
    }
    return write(tmp_path / "finetuned_433h.pt", {"cfg": cfg, "model": state})


def inputs():
    g = torch.Generator().manual_seed(1)
    video = torch.randn(2, 6, 1, 88, 88, generator=g)
    lengths = torch.tensor([6, 4])
    audio = 0.1 * torch.randn(2, 6 * 640, generator=g)
    return video, lengths, audio, lengths * 640


def expected(model, modality):
    """The source model run the way fairseq's extract_finetune runs one modality (the other one absent)."""
    video, lengths, audio, audio_lengths = inputs()
    encoder = build_avhubert_encoder(size="tiny", modality=modality).eval()
    encoder.model.load_state_dict(model.state_dict(), strict=False)
    return encoder(video, lengths)[0] if modality == "video" else encoder(audio, audio_lengths)[0]


@pytest.mark.parametrize("cfg_style", ["dict", "omegaconf", "args"])
def test_pretrained_checkpoint_loads_without_fairseq_and_runs_on_known_shapes(tmp_path, cfg_style):
    model = source_model()
    path = pretrained_file(tmp_path, model, cfg_style)
    forget_fairseq()  # loading must not need fairseq
    encoder = build_avhubert_encoder(size="tiny", checkpoint=path, modality="video").eval()
    video, lengths, _, _ = inputs()
    features, out_lengths = encoder(video, lengths)
    assert features.shape == (2, 6, TINY.encoder_embed_dim) and torch.equal(out_lengths, lengths)
    assert torch.allclose(features, expected(model, "video"), atol=1e-6)
    for name, tensor in encoder.model.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name


def test_finetuned_checkpoint_encoder_under_w2v_model_prefix_loads_for_audio(tmp_path):
    model = source_model(seed=2)
    path = finetuned_file(tmp_path, model)
    forget_fairseq()
    encoder = build_avhubert_encoder(size=None, checkpoint=path, modality="audio").eval()
    _, _, audio, audio_lengths = inputs()
    features, out_lengths = encoder(audio, audio_lengths)
    assert features.shape == (2, 6, TINY.encoder_embed_dim) and torch.equal(out_lengths, torch.tensor([6, 4]))
    assert torch.allclose(features, expected(model, "audio"), atol=1e-6)
    assert not hasattr(encoder.model, "feature_extractor_video")  # the unused branch is not built


def test_missing_and_unexpected_keys_are_all_named(tmp_path):
    state = pretraining_state(source_model())
    del state["encoder.layers.1.fc2.bias"]
    state["encoder.layers.1.extra_adapter.weight"] = torch.zeros(2)
    path = write(tmp_path / "bad.pt", {"cfg": {"model": MODEL_CFG, "task": TASK_CFG}, "model": state})
    with pytest.raises(ValueError) as error:
        build_avhubert_encoder(size="tiny", checkpoint=path)
    assert "missing from the checkpoint (1): encoder.layers.1.fc2.bias" in str(error.value)
    assert "unexpected in the checkpoint (1): encoder.layers.1.extra_adapter.weight" in str(error.value)


def test_a_checkpoint_of_another_size_is_refused_with_the_config_key_to_change(tmp_path):
    path = pretrained_file(tmp_path, source_model())
    with pytest.raises(ValueError, match="video_encoder=avhubert_base|avhubert_large"):
        build_avhubert_encoder(size="large", checkpoint=path)


def test_globals_outside_tensors_containers_and_fairseq_are_refused(tmp_path):
    path = write(tmp_path / "evil.pt", {"cfg": {}, "model": {}, "hook": os.getcwd})
    with pytest.raises(pickle.UnpicklingError, match="getcwd"):
        load_fairseq_checkpoint(path)
