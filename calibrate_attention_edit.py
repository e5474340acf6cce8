"""Calibrate a training-free attention edit (ACT or ZeroTuning): which heads to edit, chosen on calibration text.

    python calibrate_attention_edit.py attention_edit=act output=calibration/act.json
    python calibrate_attention_edit.py attention_edit=zerotuning factors=[0.5,2.0] layers=[0,1,2,3,4,5]
    python analyze.py attention_edit=act attention_edit.heads_file=calibration/act.json

The calibration texts must not be the test texts: by default the even Devil's Dictionary entries
(benchmarks/training_free.py measures on the odd ones). docs/training_free.md.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
from hydra.utils import instantiate, to_absolute_path
from omegaconf import DictConfig

from analyze import build_backbone, find_backbone_node, load_run, pick_device, read_texts
from models.attention_edit_calibration import calibrate_by_attention, calibrate_heads

log = logging.getLogger("unsink.calibrate")
ROOT = Path(__file__).resolve().parent


def calibration_texts(path: str | None, max_texts: int) -> list[str]:
    """The `texts` file, else Devil's Dictionary entries 0, 2, 4, ... ("Word: definition")."""
    if path:
        return read_texts(path, max_texts)
    from data.text.demo_corpus import devil_dictionary_entries

    entries = devil_dictionary_entries()
    if not entries:
        raise FileNotFoundError(
            "no calibration text: install dict-devil or pass texts=<file> (config key `texts`)"
        )
    return [f"{word}: {definition}" for word, definition in entries[0::2][:max_texts]]


def calibrate(cfg: DictConfig) -> dict:
    edit = instantiate(cfg.attention_edit)
    if cfg.run:
        model, tokenizer, _ = load_run(cfg.run)
    else:
        model, tokenizer = build_backbone(find_backbone_node(cfg))
    model.to(pick_device(cfg.device)).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    texts = calibration_texts(cfg.texts, cfg.max_texts)
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=cfg.max_length)
    batch = {k: v.to(model.device) for k, v in batch.items()}
    start = time.time()
    if cfg.criterion == "loss":
        result = calibrate_heads(
            model,
            batch,
            edit,
            cfg.layers,
            cfg.factors,
            cfg.max_heads,
            cfg.min_gain,
            progress=lambda layer, head, gain: log.info("layer %d head %d: gain %.4f", layer, head, gain),
        )
    elif cfg.criterion == "attention":
        result = calibrate_by_attention(model, batch, edit, cfg.layers, cfg.max_heads)
    else:
        raise ValueError(f"criterion must be loss or attention, got {cfg.criterion!r}")
    result.update(texts=len(texts), seconds=round(time.time() - start, 1))
    out = Path(to_absolute_path(cfg.output or f"calibration/{edit.name}.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    kept = sum(len(v) for v in result["heads"].values())
    print(f"{edit.name} ({cfg.criterion}): kept {kept} heads {result['heads']}; wrote {out}")
    return result


@hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="calibrate_attention_edit")
def main(cfg: DictConfig) -> None:
    calibrate(cfg)


if __name__ == "__main__":
    main()
