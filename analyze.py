"""Sink diagnostics of a backbone, or of a trained adapter, on plain texts: sinks.json, PNG plots, summary.md.

    python analyze.py backbone=smollm2_135m texts=my_texts.txt output_dir=analysis/smollm2
    python analyze.py run=outputs/train/<run folder> output_dir=analysis/my_run
    python analyze.py attention_edit=act attention_edit.heads_file=calibration/act.json   # training-free edit

Metric definitions and the sinks.json schema: docs/diagnostics.md.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate, to_absolute_path
from omegaconf import DictConfig, OmegaConf

from diagnostics.plots import write_sink_plots
from diagnostics.probe import measure_sinks
from diagnostics.report import band_layers, summary_markdown, write_sinks_json

log = logging.getLogger("unsink.analyze")
ROOT = Path(__file__).resolve().parent
DEFAULT_TEXTS = ROOT / "diagnostics" / "probe_texts.txt"


def read_texts(path: str | None, max_texts: int) -> list[str]:
    """Non-empty lines of the texts file (config key `texts`; None = the shipped probe texts)."""
    file = Path(to_absolute_path(path)) if path else DEFAULT_TEXTS
    if not file.is_file():
        raise FileNotFoundError(f"texts file {file} does not exist (config key `texts`: one text a line)")
    texts = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"texts file {file} has no non-empty line (config key `texts`)")
    if len(texts) > max_texts:
        log.warning("using the first %d of %d texts (config key `max_texts`)", max_texts, len(texts))
    return texts[:max_texts]


def backbone_name(node: DictConfig) -> str:
    for key in ("filename", "gguf_file", "source"):
        if node.get(key):
            return str(node[key])
    return str(node.get("_target_", "backbone")).rsplit(".", 1)[-1]


def build_backbone(node: DictConfig):
    """Instantiate a `conf/backbone` node (a partial or a direct call) -> (model, tokenizer)."""
    built = instantiate(node)
    return built() if callable(built) and not isinstance(built, tuple) else built


def find_backbone_node(cfg: DictConfig) -> DictConfig:
    """The model a (train or analyze) config trains or measures: `model.backbone` (what the recipe trained:
    LeaF's student, not the teacher that top-level `backbone` names there), else top-level `backbone`."""
    for node in (OmegaConf.select(cfg, "model.backbone"), cfg.get("backbone")):
        if isinstance(node, DictConfig) and "_target_" in node:
            return node
    raise KeyError("no `backbone` node with a `_target_` in the run config")


def load_run(run: str):
    """Backbone from `<run>/.hydra/config.yaml` plus the PEFT adapter in `<run>/adapter` -> (model, tokenizer, name)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    run_dir = Path(to_absolute_path(run))
    config_file, adapter_dir = run_dir / ".hydra" / "config.yaml", run_dir / "adapter"
    for needed in (config_file, adapter_dir):
        if not needed.exists():
            raise FileNotFoundError(
                f"{needed} does not exist (config key `run` = {run!r}: a training run folder)"
            )
    node = find_backbone_node(OmegaConf.load(config_file))
    model, tokenizer = build_backbone(node)
    if (adapter_dir / "tokenizer_config.json").exists():  # e.g. MEAP added a [MASK] token
        tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    check_adapter_matches(model, adapter_dir, backbone_name(node))
    return model, tokenizer, f"{run_dir.name} (adapter on {backbone_name(node)})"


def check_adapter_matches(model, adapter_dir: Path, base: str) -> None:
    """Raise unless every saved adapter tensor has a slot of the same shape in `model` and every adapter slot
    of `model` was saved (PEFT loads a 15-layer student's adapter into a 30-layer teacher without a word)."""
    from peft.utils import get_peft_model_state_dict, load_peft_weights

    saved = load_peft_weights(str(adapter_dir), device="cpu")
    expected = get_peft_model_state_dict(model)
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    reshaped = sorted(k for k in set(saved) & set(expected) if saved[k].shape != expected[k].shape)
    if missing or unexpected or reshaped:
        raise ValueError(
            f"the adapter in {adapter_dir} does not match its base {base}: {len(missing)} adapter tensors "
            f"missing (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}), "
            f"{len(reshaped)} of another shape (e.g. {reshaped[:2]}). Check the run's model.backbone."
        )


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def analyze(cfg: DictConfig) -> dict:
    """Run the probe and write sinks.json, the plots and summary.md into cfg.output_dir; return sinks.json."""
    texts = read_texts(cfg.texts, cfg.max_texts)
    if cfg.run:
        model, tokenizer, name = load_run(cfg.run)
    else:
        node = find_backbone_node(cfg)
        (model, tokenizer), name = build_backbone(node), backbone_name(node)
    model.to(pick_device(cfg.device))
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=cfg.max_length)
    batch = {key: value.to(model.device) for key, value in batch.items()}
    edit = instantiate(cfg.attention_edit) if cfg.get("attention_edit") else None
    with edit.applied(model) if edit is not None else contextlib.nullcontext():
        report = measure_sinks(
            model,
            batch,
            None,
            tokenizer=tokenizer,
            layers=cfg.layers,
            sink_eps=cfg.sink_eps,
            sink_key_position=cfg.sink_key_position,
            chunk_size=cfg.chunk_size,
            intermediate_cosine_threshold=cfg.intermediate_cosine_threshold,
            intermediate_attention_threshold=cfg.intermediate_attention_threshold,
            num_bos_features=cfg.get("num_bos_features", 1),
            max_intermediate_candidates=cfg.get("max_intermediate_candidates", 64),
        )
    out_dir = Path(to_absolute_path(cfg.output_dir))
    if edit is not None:
        name = f"{name} + {edit.name}"
    sinks = report.to_json(model=name, num_texts=len(texts))
    bands = OmegaConf.to_container(cfg.layer_bands) if cfg.get("layer_bands") else None
    sinks["layer_bands"] = bands
    write_sinks_json(out_dir / "sinks.json", sinks)
    plots = write_sink_plots(report, out_dir, title=name)
    summary = summary_markdown(sinks, plots, title=f"Sink diagnostics: {name}", bands=bands)
    (out_dir / "summary.md").write_text(summary)
    print(
        "\n".join(summary.splitlines()[: 9 + len(band_layers(sinks, bands))])
        + f"\n\nwritten: {out_dir}/sinks.json, summary.md, *.png",
        flush=True,
    )
    return sinks


@hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="analyze")
def main(cfg: DictConfig) -> None:
    analyze(cfg)


if __name__ == "__main__":
    main()
