"""Instruction / chat examples -> token ids with prompt labels masked (-100)."""

from __future__ import annotations

from dataclasses import dataclass

from models.segments import IGNORE_INDEX


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def to_messages(row: dict) -> list[dict]:
    """Accept {"prompt","response"} (optionally "system") or {"messages": [{role, content}, ...]}."""
    if "messages" in row:
        messages = row["messages"]
        if (
            not isinstance(messages, list)
            or not messages
            or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)
        ):
            raise ValueError("`messages` must be a non-empty list of {role, content}")
        if messages[-1]["role"] != "assistant" or not str(messages[-1]["content"]).strip():
            raise ValueError("the last message must be a non-empty assistant turn")
        return messages
    if "prompt" in row and "response" in row:
        if not str(row["response"]).strip():
            raise ValueError("empty response")
        messages = [
            {"role": "user", "content": str(row["prompt"])},
            {"role": "assistant", "content": str(row["response"])},
        ]
        if row.get("system"):
            messages.insert(0, {"role": "system", "content": str(row["system"])})
        return messages
    raise ValueError("expected keys prompt/response or messages")


def tokenize_chat(tokenizer, messages: list[dict], max_length: int) -> TokenizedExample:
    """Apply the chat template; only the final assistant turn is a target.

    The prompt is everything the template renders before the last assistant message (including the
    assistant header), so the labels cover exactly the answer and its end-of-turn token. Tokenizers
    without a chat template get "role: content" lines (`fallback_ids`). A sequence longer than
    `max_length` is cut and, when it ended with EOS and an answer token survives, its last kept token
    becomes EOS (as torchtune's `truncate` does): the model still learns to stop.
    """
    if getattr(tokenizer, "chat_template", None):
        prompt_ids = _template_ids(tokenizer, messages[:-1], add_generation_prompt=True)
        full_ids = _template_ids(tokenizer, messages, add_generation_prompt=False)
        if full_ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError("chat template is not prefix-stable; cannot locate the answer tokens")
    else:
        prompt_ids, answer_ids = fallback_ids(tokenizer, messages)
        full_ids = prompt_ids + answer_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + full_ids[len(prompt_ids) :]
    truncated = len(full_ids) > max_length
    ids, labels = full_ids[:max_length], labels[:max_length]
    eos = tokenizer.eos_token_id
    if truncated and eos is not None and eos in full_ids[len(prompt_ids) :] and len(prompt_ids) < max_length:
        ids[-1] = labels[-1] = eos
    return TokenizedExample(ids, labels, truncated)


def _template_ids(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True
    )
    return list(out["input_ids"])


def fallback_ids(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) without a chat template: "role: content" lines, then "assistant:"; the
    answer is " <content>\n" and EOS. The two parts are tokenised apart, so the prompt is a prefix of the
    whole whatever the tokenizer merges (a BPE tokenizer would merge "assistant: " + "Red" differently)."""
    prompt = "".join(f"{m['role']}: {m['content']}\n" for m in messages[:-1]) + "assistant:"
    answer = tokenizer(f" {messages[-1]['content']}\n", add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return tokenizer(prompt, add_special_tokens=False)["input_ids"], list(answer) + eos
