"""Build the synthetic AVSR corpus in the LRS3/auto_avsr layout (see docs/data.md).

    python build_corpus.py --out artifacts/data/synthetic_avsr --num-train 200 --num-val 24 --num-test 24 --seed 0

Skips the build when the folder already holds a corpus of the same parameters (use --force to rebuild).
"""

import argparse
import os
from pathlib import Path

from data.avsr.speech_synth import SYNTHESIZERS
from data.avsr.synthetic_corpus import MARKER, CorpusParams, build_synthetic_corpus, ensure_synthetic_corpus


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = CorpusParams()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="artifacts/data/synthetic_avsr", help="corpus root (data.root)")
    parser.add_argument("--num-train", type=int, default=defaults.num_train)
    parser.add_argument("--num-val", type=int, default=defaults.num_val)
    parser.add_argument("--num-test", type=int, default=defaults.num_test, help="synthetic test clips")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--min-words", type=int, default=defaults.min_words)
    parser.add_argument("--max-words", type=int, default=defaults.max_words)
    parser.add_argument("--min-seconds", type=float, default=defaults.min_seconds)
    parser.add_argument("--max-seconds", type=float, default=defaults.max_seconds)
    parser.add_argument("--synthesizer", choices=["auto", *SYNTHESIZERS], default=defaults.synthesizer)
    parser.add_argument(
        "--no-librivox",
        dest="include_librivox",
        action="store_false",
        help="leave out real LibriVox test clips",
    )
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="build processes")
    parser.add_argument("--force", action="store_true", help="rebuild even if the marker matches")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = vars(parse_args(argv))
    out, workers, force = args.pop("out"), args.pop("workers"), args.pop("force")
    if force:
        build_synthetic_corpus(out, workers=workers, **args)
    else:
        ensure_synthetic_corpus(out, workers=workers, **args)
    print((Path(out) / MARKER).read_text())


if __name__ == "__main__":
    main()
