"""Text datasets: JSONL instruction/chat data (SFT) and plain-text corpora (language modelling)."""

from __future__ import annotations

import logging
from pathlib import Path

from torch.utils.data import Dataset

from data.text.jsonl import SkipReport, read_jsonl
from data.text.sft import to_messages, tokenize_chat
from models.segments import IGNORE_INDEX

log = logging.getLogger(__name__)


class SFTDataset(Dataset):
    """Chat-templated examples; prompt labels -100. Bad rows are skipped and counted in `report`."""

    def __init__(
        self, path, tokenizer, max_length: int, strict: bool = False, config_key: str = "data.train_file"
    ):
        rows, self.report = read_jsonl(path, strict=strict, config_key=config_key)
        self.examples, self.num_truncated = [], 0
        for row in rows:
            try:
                example = tokenize_chat(tokenizer, to_messages(row), max_length)
            except ValueError as err:
                if strict:
                    raise ValueError(f"{path}:{row['_line']}: {err}") from err
                self.report.add(row["_line"], str(err))
                continue
            if all(label == IGNORE_INDEX for label in example.labels):
                self.report.add(row["_line"], f"no answer token left after truncation to {max_length}")
                continue
            self.num_truncated += example.truncated
            self.examples.append({"input_ids": example.input_ids, "labels": example.labels})
        if not self.examples:
            raise ValueError(f"no usable example in {path} ({self.report.summary()})")
        if self.num_truncated:
            log.info("%s: %d example(s) truncated to %d tokens", path, self.num_truncated, max_length)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index]


class TextCorpusDataset(Dataset):
    """A plain-text file cut into blocks of `max_length` tokens; every token is a target.

    full_blocks_only: drop the last block when it is shorter (the tokens it held are counted in
    `dropped_tokens`): every batch then has one shape and no padding, so a compiled fast path with static
    shapes never meets a second variant (on the H200 the one padded batch of a 430-step epoch cost a
    12 s recompile and CUDA-graph re-recording)."""

    def __init__(
        self,
        path,
        tokenizer,
        max_length: int,
        config_key: str = "data.train_file",
        full_blocks_only: bool = False,
        **_,
    ):
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"data file {str(path)!r} does not exist (config key `{config_key}`)")
        ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        block = max_length - len(bos)
        if len(ids) < 2:
            raise ValueError(f"{path} holds no text (config key `{config_key}`)")
        self.examples = [bos + ids[i : i + block] for i in range(0, len(ids) - 1, block)]
        self.examples = [e for e in self.examples if len(e) > 1 + len(bos)]
        self.dropped_tokens = 0
        if full_blocks_only and len(self.examples) > 1 and len(self.examples[-1]) < max_length:
            self.dropped_tokens = len(self.examples.pop()) - len(bos)
        self.report = SkipReport(str(path))
        self.num_truncated = 0

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        ids = self.examples[index]
        return {"input_ids": ids, "labels": list(ids)}
