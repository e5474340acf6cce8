"""Evaluate a trained AVSR run the way the field reports it: WER per noise condition, audio-visual vs audio-only.

    python evaluate.py run=outputs/avsr_decorr/<run> output_dir=eval/avsr_decorr
    python evaluate.py run=<run> data=lrs3 data.root=/data/lrs3 data.test_manifest=labels/test.csv \\
        noise.kinds=[babble,white] noise.snr_db=[-5,0,5,10] decoding.num_beams=4
    torchrun --nproc_per_node=4 evaluate.py run=<run> output_dir=<dir>      # one shard per rank, exact WER

The run's model is rebuilt from its composed config (`<run>/.hydra/config.yaml`), then its LoRA adapter
(`<run>/adapter`) and the non-LLM weights it exported (`<run>/avsr_modules.pt`) are loaded. The test manifest
is decoded once per (input, condition): inputs are the streams the model sees (audio-only = video frames
zeroed), conditions are clean audio and noise at each SNR (data/avsr/noise.py). Written to `output_dir`:
`hypotheses.jsonl`, `results.json` (one entry per input and condition), `results.md`. docs/evaluation.md.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from hydra.utils import instantiate, to_absolute_path
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import DataLoader

from data.avsr.batching import FrameBudgetBatchSampler
from data.avsr.collate import AVSRCollate
from data.avsr.media_io import VIDEO_FPS
from data.avsr.noise import NoiseCondition, clip_noise, load_babble_sources, mix_at_snr, noise_conditions
from data.avsr.skipped_clips import zero_counts
from harness.run_dir import register_resolvers
from metrics.wer import EditCounts, transcript_edit_counts

log = logging.getLogger("unsink.evaluate")
ROOT = Path(__file__).resolve().parent
INPUTS = {"audiovisual": ("audio", "video"), "audio": ("audio",), "video": ("video",)}
INPUT_LABELS = {"audiovisual": "audio-visual", "audio": "audio only", "video": "video only"}


# ---- the run ------------------------------------------------------------------------------------
def run_config(run: str) -> tuple[Path, DictConfig]:
    """(run folder, its composed training config) with paths pointing at this checkout."""
    run_dir = Path(to_absolute_path(run))
    config_file = run_dir / ".hydra" / "config.yaml"
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist (config key `run`)")
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{config_file} does not exist: `run` must be a training run folder (config key `run`)"
        )
    cfg = OmegaConf.load(config_file)
    if OmegaConf.select(cfg, "model._target_") != "recipes.avsr.AVSRRecipe":
        raise ValueError(
            f"{run_dir} is not an AVSR run (model._target_ = {OmegaConf.select(cfg, 'model._target_')!r}); "
            "evaluate.py decodes AVSR runs, analyze.py measures text ones"
        )
    with open_dict(cfg):
        if "paths" in cfg:  # its interpolations name the training job's Hydra folders
            cfg.paths.root_dir = os.environ.get("PROJECT_ROOT", str(ROOT))
            cfg.paths.run_dir = str(run_dir)
    return run_dir, cfg


def merge_data_config(run_cfg: DictConfig, data_cfg: DictConfig) -> DictConfig:
    """Put the evaluation's data node into the run config: `from_run` keys override the run's node, another
    data group replaces it. The run's modality is kept (the model is built for it). Returns the resolved node."""
    modality = OmegaConf.select(run_cfg, "data.modality")
    chosen = OmegaConf.to_container(data_cfg, resolve=False)
    with open_dict(run_cfg):
        if chosen.pop("from_run", False):
            for key, value in chosen.items():
                if value is not None:
                    run_cfg.data[key] = value
        else:
            run_cfg.data = chosen
        if run_cfg.data.get("modality") not in (None, modality):
            log.warning("data.modality is the run's (%s): audio-only etc. is the `inputs` key", modality)
        run_cfg.data.modality = modality
        run_cfg.data.eval_noise_snr_db = None  # evaluate.py mixes noise itself, per clip and condition
    data = OmegaConf.to_container(run_cfg.data, resolve=True)
    return OmegaConf.create(data)


def load_recipe(run_dir: Path, run_cfg: DictConfig):
    """The run's AVSRRecipe with its trained adapter and modules loaded, in eval mode."""
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    modules_file, adapter_dir = run_dir / "avsr_modules.pt", run_dir / "adapter"
    if not modules_file.is_file():
        raise FileNotFoundError(
            f"{modules_file} does not exist: the run exported no modules (did it finish? train.py exports at "
            f"the end; config key `run`)"
        )
    recipe = instantiate(run_cfg.model, objectives={}, _convert_="all")
    if hasattr(recipe.llm, "peft_config"):
        if not (adapter_dir / "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"{adapter_dir} has no adapter_config.json: the run's LoRA adapter is missing"
            )
        result = set_peft_model_state_dict(recipe.llm, load_peft_weights(str(adapter_dir), device="cpu"))
        if result.unexpected_keys:
            raise ValueError(f"adapter keys that the rebuilt model lacks: {result.unexpected_keys[:10]}")
    saved = torch.load(modules_file, map_location="cpu", weights_only=False)
    result = recipe.model.load_state_dict(saved["state_dict"], strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{modules_file}: keys the rebuilt model lacks: {result.unexpected_keys[:10]}")
    return recipe.eval()


def eval_inputs(modality: str, inputs: Sequence[str] | None) -> list[str]:
    """Which streams to feed; None = the run's modality (+ audio-only for audio-visual runs)."""
    if inputs is None:
        return ["audiovisual", "audio"] if modality == "audiovisual" else [modality]
    for name in inputs:
        if name not in INPUTS:
            raise ValueError(f"inputs: {name!r} is not one of {list(INPUTS)}")
        if not set(INPUTS[name]) <= set(INPUTS[modality]):
            raise ValueError(f"inputs: {name!r} needs streams a {modality!r} run was not trained with")
    return list(inputs)


# ---- one decoding condition -----------------------------------------------------------------------
def condition_batch(
    batch: dict,
    streams: str,
    condition: NoiseCondition,
    seed: int,
    babble_sources: Sequence[tuple[str, torch.Tensor]],
    talkers: int,
) -> dict:
    """A copy of the batch with noise mixed into each clip's audio (valid samples only) and the streams
    not in `streams` zeroed (zero = silence for audio, the mean frame for normalised video)."""
    out = dict(batch)
    if "audio" in batch:
        audio = batch["audio"].clone()
        if condition.kind is not None and "audio" in INPUTS[streams]:
            for b, (clip_id, length) in enumerate(zip(batch["ids"], batch["audio_lengths"].tolist())):
                noise = clip_noise(condition, clip_id, length, seed, babble_sources, talkers)
                audio[b, :length] = mix_at_snr(audio[b, :length], noise, condition.snr_db)
        if "audio" not in INPUTS[streams]:
            audio.zero_()
        out["audio"] = audio
    if "video" in batch and "video" not in INPUTS[streams]:
        out["video"] = torch.zeros_like(batch["video"])
    return out


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# ---- distributed ----------------------------------------------------------------------------------
def init_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); a process group under torchrun (nccl on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu" if device == "auto" else device)


def gather(value):
    """[value of every rank] (a one-element list without a process group)."""
    if not dist.is_initialized():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


# ---- the evaluation -------------------------------------------------------------------------------
def evaluate(cfg: DictConfig) -> list[dict]:
    """Decode every (input, condition) and write the three outputs (rank 0); returns results.json's list."""
    register_resolvers()
    rank, world, device = init_distributed(cfg.device)
    run_dir, run_cfg = run_config(cfg.run)
    data_cfg = merge_data_config(run_cfg, cfg.data)
    modality = data_cfg.modality
    inputs = eval_inputs(modality, cfg.inputs)
    noise = cfg.noise
    conditions = noise_conditions(
        noise.kinds if "audio" in INPUTS[modality] else [], noise.snr_db, noise.clean
    )

    datamodule = instantiate(data_cfg, _convert_="all")
    if rank == 0:
        datamodule.prepare_data()  # e.g. builds the synthetic corpus on first use
    if dist.is_initialized():
        dist.barrier()
    if cfg.split not in ("test", "val"):
        raise ValueError(f"split must be test or val, got {cfg.split!r}")
    datamodule.setup({"test": "test", "val": "validate"}[cfg.split])
    dataset = datamodule.datasets[cfg.split]
    if cfg.limit is not None:
        dataset.rows = dataset.rows[: cfg.limit]
    row_index = {row.rel_path: i for i, row in enumerate(dataset.rows)}
    budget = int(datamodule.max_duration_s * VIDEO_FPS)
    sampler = FrameBudgetBatchSampler(
        [min(n, budget) for n in dataset.lengths], datamodule.max_frames, shuffle=False, world_size=1
    )
    batches = sampler.global_batches(0)[rank::world]  # every clip exactly once over all ranks
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=AVSRCollate(modality, datamodule.crop_size),
        num_workers=datamodule.num_workers,
    )
    babble = []
    if any(c.kind == "babble" for c in conditions):
        babble = load_babble_sources(datamodule.root, dataset.rows, noise.babble_pool, noise.seed)

    recipe = load_recipe(run_dir, run_cfg).to(device)
    generation = {**recipe.generation, **{k: v for k, v in cfg.decoding.items() if v is not None}}
    edit = instantiate(cfg.attention_edit) if cfg.get("attention_edit") else None

    keys = [(streams, condition) for streams in inputs for condition in conditions]
    counts = {key: EditCounts() for key in keys}
    records = {key: [] for key in keys}
    skipped, utterances = zero_counts(), 0
    with torch.no_grad(), edit.applied(recipe.llm) if edit is not None else nullcontext():
        for batch in loader:
            for reason, count in batch["skipped"].items():
                skipped[reason] += count
            if not batch["text"]:
                continue
            utterances += len(batch["text"])
            for key in keys:
                conditioned = condition_batch(batch, *key, noise.seed, babble, noise.babble_talkers)
                hypotheses = recipe.model.generate(to_device(conditioned, device), **generation)
                for clip_id, reference, hypothesis in zip(batch["ids"], batch["text"], hypotheses):
                    counts[key] += transcript_edit_counts(reference, hypothesis)
                    records[key].append((row_index[clip_id], clip_id, reference, hypothesis))
            log.info("rank %d: %d utterances decoded", rank, utterances)

    gathered = gather((counts, records, skipped, utterances))
    if rank != 0:
        return []
    total_skipped = sum(sum(part[2].values()) for part in gathered)
    total_utterances = sum(part[3] for part in gathered)
    results, lines = [], []
    for key in keys:
        streams, condition = key
        summed = sum((part[0][key] for part in gathered), EditCounts())
        results.append(
            {
                "condition": condition.name,
                "input": streams,
                "wer": summed.errors / max(summed.reference_words, 1),
                "substitutions": summed.substitutions,
                "insertions": summed.insertions,
                "deletions": summed.deletions,
                "reference_words": summed.reference_words,
                "utterances": total_utterances,
                "skipped": total_skipped,
            }
        )
        for _, clip_id, reference, hypothesis in sorted(r for part in gathered for r in part[1][key]):
            lines.append(
                json.dumps(
                    {
                        "id": clip_id,
                        "condition": condition.name,
                        "input": streams,
                        "reference": reference,
                        "hypothesis": hypothesis,
                    },
                    ensure_ascii=False,
                )
            )
    out_dir = Path(to_absolute_path(cfg.output_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "hypotheses.jsonl").write_text("\n".join(lines) + "\n")
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    skipped_by_reason = {r: sum(part[2][r] for part in gathered) for r in skipped}
    title = f"{run_dir.name}, {cfg.split} manifest" + (f", attention edit {edit.name}" if edit else "")
    markdown = results_markdown(results, title, skipped_by_reason, generation)
    (out_dir / "results.md").write_text(markdown)
    print(markdown + f"\nwritten: {out_dir}/results.json, results.md, hypotheses.jsonl", flush=True)
    return results


def results_markdown(results: list[dict], title: str, skipped: dict, generation: dict) -> str:
    """The full table, then the robustness table (WER %, one row per condition, one column per input)."""
    lines = [
        f"# Evaluation: {title}",
        "",
        f"Decoding: {generation}. Utterances: {results[0]['utterances']}; skipped clips: "
        f"{results[0]['skipped']} ({', '.join(f'{r} {n}' for r, n in skipped.items() if n) or 'none'}).",
        "",
        "| input | condition | WER % | substitutions | insertions | deletions | reference words |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {INPUT_LABELS[r['input']]} | {r['condition']} | {100 * r['wer']:.2f} | {r['substitutions']} "
            f"| {r['insertions']} | {r['deletions']} | {r['reference_words']} |"
        )
    inputs = list(dict.fromkeys(r["input"] for r in results))
    conditions = list(dict.fromkeys(r["condition"] for r in results))
    wer = {(r["input"], r["condition"]): 100 * r["wer"] for r in results}
    lines += [
        "",
        "## Robustness (WER %)",
        "",
        "| condition | " + " | ".join(INPUT_LABELS[i] for i in inputs) + " |",
        "|---|" + "---:|" * len(inputs),
    ]
    for condition in conditions:
        lines.append(f"| {condition} | " + " | ".join(f"{wer[(i, condition)]:.2f}" for i in inputs) + " |")
    return "\n".join(lines) + "\n"


@hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
