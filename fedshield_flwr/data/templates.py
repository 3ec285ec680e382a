"""Prompt templates and tokenization with the loss on response tokens only.

``alpaca`` is the Stanford Alpaca prompt (FlowerTune's default); ``chat`` uses the tokenizer's
own chat template (a user turn, then the assistant turn); ``auto`` picks ``chat`` when the
tokenizer has a chat template. Prompt tokens get label ``-100`` so only the response is learnt.
"""

from __future__ import annotations

from typing import Any

IGNORE_INDEX = -100

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def resolve_template(template: str, tokenizer) -> str:
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("data.template='chat' but the tokenizer has no chat template; use alpaca")
    return template


def prompt_and_response(row: dict[str, Any], template: str, tokenizer) -> tuple[str, str]:
    """The prompt text (no loss) and the response text (loss), for one instruction row."""
    instruction, inp, response = row["instruction"], row.get("input", "") or "", row["response"]
    if template == "alpaca":
        fmt = ALPACA_WITH_INPUT if inp.strip() else ALPACA_NO_INPUT
        return fmt.format(instruction=instruction, input=inp), response + (tokenizer.eos_token or "")
    user = instruction if not inp.strip() else f"{instruction}\n\n{inp}"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}, {"role": "assistant", "content": response}],
        tokenize=False,
    )
    if not full.startswith(prompt):
        raise ValueError("chat template does not extend the generation prompt; use data.template=alpaca")
    return prompt, full[len(prompt):]


def tokenize_example(row: dict[str, Any], tokenizer, template: str, max_length: int) -> dict:
    """``input_ids`` and ``labels`` (prompt masked with -100), truncated to ``max_length``.

    The prompt is truncated first (keeping its end) so that at least part of the response is
    always learnt.
    """
    prompt, response = prompt_and_response(row, template, tokenizer)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    r_ids = r_ids[: max(1, max_length // 2)] if len(p_ids) + len(r_ids) > max_length else r_ids
    p_ids = p_ids[-(max_length - len(r_ids)):] if len(p_ids) + len(r_ids) > max_length else p_ids
    ids = p_ids + r_ids
    labels = [IGNORE_INDEX] * len(p_ids) + r_ids
    return {"input_ids": ids, "labels": labels}
