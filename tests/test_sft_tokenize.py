"""SFT tokenisation: the fallback for tokenizers without a chat template, and EOS kept on truncation."""

import copy

import pytest

from data.text.sft import fallback_ids, tokenize_chat
from models.segments import IGNORE_INDEX

MESSAGES = [
    {"role": "user", "content": "Name two colours."},
    {"role": "assistant", "content": "Red and blue, and a long tail of other colours as well."},
]


@pytest.fixture
def bpe_without_template(tiny_lm):
    tokenizer = copy.deepcopy(tiny_lm[1])  # SmolLM2's byte-level BPE tokenizer
    tokenizer.chat_template = None
    return tokenizer


def test_fallback_passes_its_prefix_check_with_a_bpe_tokenizer(bpe_without_template):
    tokenizer = bpe_without_template
    example = tokenize_chat(tokenizer, MESSAGES, max_length=256)
    prompt_ids, answer_ids = fallback_ids(tokenizer, MESSAGES)
    assert example.input_ids == prompt_ids + answer_ids and not example.truncated
    answer = [label for label in example.labels if label != IGNORE_INDEX]
    assert answer[-1] == tokenizer.eos_token_id  # the answer ends with EOS, so the model learns to stop
    assert tokenizer.decode(answer[:-1]) == " " + MESSAGES[-1]["content"] + "\n"
    assert tokenizer.decode(example.input_ids[: len(prompt_ids)]).endswith("assistant:")


@pytest.mark.parametrize("template", [True, False])
def test_truncation_keeps_eos_as_the_last_target(tiny_lm, bpe_without_template, template):
    tokenizer = tiny_lm[1] if template else bpe_without_template
    whole = tokenize_chat(tokenizer, MESSAGES, max_length=256)
    prompt_length = sum(label == IGNORE_INDEX for label in whole.labels)
    cut = tokenize_chat(tokenizer, MESSAGES, max_length=prompt_length + 4)
    assert cut.truncated and len(cut.input_ids) == prompt_length + 4
    assert cut.input_ids[-1] == cut.labels[-1] == tokenizer.eos_token_id
    assert cut.input_ids[:-1] == whole.input_ids[: prompt_length + 3]
