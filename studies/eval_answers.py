"""Exact-match accuracy of the final numeric answer on held-out arithmetic word problems.

The model gets the chat-templated question, decodes greedily, and is right when the number after its first
"The answer is" equals the item's answer (data/text/arith_word.py writes answers in that form).
"""

from __future__ import annotations

from data.text.arith_word import parse_answer
from studies.eval_generate import greedy_generate


def question_ids(tokenizer, prompt: str) -> list[int]:
    messages = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def evaluate_answers(
    model, tokenizer, rows: list[dict], max_new_tokens: int = 128, batch_size: int = 64
) -> list[dict]:
    """Per item {index, answer, predicted, correct, output}; rows are {"prompt", "answer"} dicts."""
    prompts = [question_ids(tokenizer, row["prompt"]) for row in rows]
    outputs = greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    results = []
    for index, (row, output) in enumerate(zip(rows, outputs)):
        predicted = parse_answer(output)
        results.append(
            {
                "index": index,
                "answer": int(row["answer"]),
                "predicted": predicted,
                "correct": predicted == int(row["answer"]),
                "output": output,
            }
        )
    return results
