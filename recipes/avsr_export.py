"""What an AVSR run saves: the LoRA adapter (PEFT format) and the non-LLM weights that trained.

    <run>/adapter/          PeftModel.from_pretrained(base_llm, "<run>/adapter") + the tokenizer
    <run>/avsr_modules.pt   {"state_dict": projectors and trained encoders (incl. BatchNorm statistics),
                             "settings": the recipe's hyperparameters (modality, prompt, rates, ...)}
    <run>/merged/           optional: the LLM with LoRA merged in (save_pretrained)
Load `avsr_modules.pt` into `AVSRModel` built from the same config with `load_state_dict(strict=False)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from models.avsr.avsr_model import AVSRModel
from recipes.checkpoint import gathered_part, trainable_state_keys


def export_avsr(
    model: AVSRModel,
    settings: Mapping,
    run_dir: str | Path,
    merged: bool = False,
    state_dict: dict | None = None,
) -> dict[str, str]:
    """Write the files above; returns {what: path}. state_dict: the recipe's trainable weights gathered under
    FSDP (keys `model.*`); None reads the model."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    keys = trainable_state_keys(model)
    is_peft = hasattr(model.llm, "peft_config")
    gathered = gathered_part(state_dict, "model.", merged, is_peft)
    paths = {}
    if is_peft:
        llm_state = None if gathered is None else gathered_part(gathered, "llm.", merged, is_peft)
        model.llm.save_pretrained(run_dir / "adapter", state_dict=llm_state)
        model.tokenizer.save_pretrained(run_dir / "adapter")
        paths["adapter"] = str(run_dir / "adapter")
    state = {
        k: v.detach().cpu()
        for k, v in (model.state_dict() if gathered is None else gathered).items()
        if k in keys and not (is_peft and k.startswith("llm."))
    }
    torch.save({"state_dict": state, "settings": dict(settings)}, run_dir / "avsr_modules.pt")
    paths["avsr_modules"] = str(run_dir / "avsr_modules.pt")
    if merged and is_peft:
        merged_llm = model.llm.merge_and_unload()
        merged_llm.save_pretrained(run_dir / "merged")
        model.tokenizer.save_pretrained(run_dir / "merged")
        paths["merged"] = str(run_dir / "merged")
    return paths
