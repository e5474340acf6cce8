"""What the text-LM studies share: their command-line options and the train.py overrides of every arm.

Every arm trains SmolLM2-135M with LoRA on `data=pd_text` (local public-domain text, held-out split by
document) for `--steps` steps at B=32, T=256 in bf16 on one GPU, measuring sinks on the first held-out
batch 10 times over training; `--smoke` swaps in the tiny random model, a tiny corpus and CPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SMOLLM2_BANDS = "{early_middle:[1,8],late:[9,null]}"
TINY_BANDS = "{early_middle:[0,0],late:[1,null]}"


def add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="study folder (default outputs/studies/<study>[_smoke])")
    parser.add_argument(
        "--steps", type=int, default=None, help="optimizer steps per arm (default 1000; smoke 4)"
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--batch-size", type=int, default=None, help="default 32 (smoke 2)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per block (default 256; smoke 64)")
    parser.add_argument(
        "--val-batches",
        type=int,
        default=None,
        help="validation batches per check (default: all held-out text)",
    )
    parser.add_argument("--trainer", default="gpu", help="trainer config group (default gpu)")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--smoke", action="store_true", help="tiny random model on CPU, a few steps")
    parser.add_argument("--report-only", action="store_true", help="only (re)write the report")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        help="extra Hydra override for every arm (repeatable), e.g. model.kernels=fast",
    )


def finish_common_options(args: argparse.Namespace, study: str) -> argparse.Namespace:
    """Fill the defaults that depend on --smoke; resolve --out."""
    if args.smoke:
        args.steps = args.steps or 4
        args.batch_size = args.batch_size or 2
        args.seq_len = args.seq_len or 64
        args.val_batches = args.val_batches or 2
        args.bands = TINY_BANDS
    else:
        args.steps = args.steps or 1000
        args.batch_size = args.batch_size or 32
        args.seq_len = args.seq_len or 256
        args.bands = SMOLLM2_BANDS
    default_out = f"outputs/studies/{study}" + ("_smoke" if args.smoke else "")
    args.out = str(Path(args.out or REPO_ROOT / default_out).resolve())
    return args


def common_overrides(args: argparse.Namespace) -> list[str]:
    """train.py overrides shared by every arm of a text-LM study (only the objective differs between arms)."""
    steps = args.steps
    overrides = [
        "data=pd_text",
        f"seed={args.seed}",
        f"trainer.max_steps={steps}",
        "trainer.max_epochs=-1",
        "trainer.check_val_every_n_epoch=null",
        f"trainer.val_check_interval={max(1, steps // 4)}",
        f"trainer.log_every_n_steps={max(1, min(10, steps // 20))}",
        f"data.batch_size={args.batch_size}",
        f"data.eval_batch_size={args.batch_size}",
        f"data.max_length={args.seq_len}",
        f"callbacks.sink_diagnostics.every_n_steps={max(1, steps // 10)}",
        f"callbacks.sink_diagnostics.layer_bands={args.bands}",
        "callbacks.sink_diagnostics.plots=false",
        "logger=csv",
        "export_merged=false",
    ]
    if args.val_batches is not None:
        overrides.append(f"++trainer.limit_val_batches={args.val_batches}")
    if args.smoke:
        overrides += [
            "debug=smoke",
            "trainer.limit_train_batches=null",
            f"data.prepare.out_dir={corpus_dir(args)}",
            "data.prepare.max_words=20000",
            "data.prepare.max_eval_words=2000",
            "data.prepare.val_percent=5",
            "data.prepare.test_percent=5",
        ]
    else:
        overrides += [f"trainer={args.trainer}", f"trainer.precision={args.precision}"]
    return overrides + list(args.override)


def prepare_corpus(args: argparse.Namespace) -> Path:
    """Build the arms' corpus once, before they start (parallel arms would race to write it).

    Outside smoke mode, a corpus that fell back to generated text (no Debian text package here) is an
    error: copy `artifacts/data/pd_text` from a machine that has them (docs/diagnostics.md)."""
    import json

    from data.text.public_domain_corpus import build_public_domain_text

    out = corpus_dir(args)
    if args.smoke:
        build_public_domain_text(out, max_words=20000, val_percent=5, test_percent=5, max_eval_words=2000)
        return out
    build_public_domain_text(
        out, max_words=4_000_000, val_percent=1.0, test_percent=1.0, max_eval_words=60000
    )
    stats = json.loads((out / "stats.json").read_text()) if (out / "stats.json").exists() else {}
    if "generated" in stats.get("sources", {}):
        raise RuntimeError(
            f"{out} holds generated text, not the public-domain corpus: install Debian fortunes, dict-devil and "
            "dict-gcide (scripts/setup.sh), delete that folder and rerun, or copy artifacts/data/pd_text from a "
            "machine that has them"
        )
    return out


def corpus_dir(args: argparse.Namespace) -> Path:
    """Where the arms' corpus lives (train/val/test.txt): the study's own tiny one in smoke mode."""
    if args.smoke:
        return Path(args.out) / "corpus"
    return REPO_ROOT / "artifacts" / "data" / "pd_text"
