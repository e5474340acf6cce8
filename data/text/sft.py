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
    assistant header), so the labels cover exactly the answer and its end-of-turn token.
    """
    prompt_ids = _template_ids(tokenizer, messages[:-1], add_generation_prompt=True)
    full_ids = _template_ids(tokenizer, messages, add_generation_prompt=False)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError("chat template is not prefix-stable; cannot locate the answer tokens")
    labels = [IGNORE_INDEX] * len(prompt_ids) + full_ids[len(prompt_ids) :]
    truncated = len(full_ids) > max_length
    return TokenizedExample(full_ids[:max_length], labels[:max_length], truncated)


def _template_ids(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True
        )
        return list(out["input_ids"])
    # No template: "role: content" lines, with the answer after "assistant: ".
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    if add_generation_prompt:
        text += "assistant: "
    return tokenizer(text, add_special_tokens=False)["input_ids"]
