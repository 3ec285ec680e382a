"""Generation metrics of a silo: greedy answers to its held-out prompts, exact match and ROUGE-L.

A held-out row (:func:`fedshield_flwr.data.templates.tokenize_example`) is the prompt (label
``IGNORE_INDEX``) followed by the reference response (labelled). With ``eval.generate = true``
the silo greedily generates up to ``eval.max-new-tokens`` tokens after each of its first
``eval.max-examples`` prompts and compares the decoded answer with the decoded reference: exact
match after lower-casing and collapsing whitespace, and ROUGE-L F1 (``rouge-score``, stemmed).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from fedshield_flwr.data.templates import IGNORE_INDEX


@dataclass(frozen=True)
class GenerationResult:
    exact_match: float  # mean over generated examples, in [0, 1]
    rouge_l: float  # mean ROUGE-L F1, in [0, 1]
    num_generated: int  # examples generated (the weight of the two means)
    seconds: float


def prompt_and_reference(row: dict) -> tuple[list[int], list[int]]:
    """The prompt ids (ignored labels before the first response token) and the reference ids."""
    labels = row["labels"]
    start = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))
    return list(row["input_ids"][:start]), [t for t in labels[start:] if t != IGNORE_INDEX]


def normalize(text: str) -> str:
    """Lower case, whitespace collapsed: what exact match compares."""
    return " ".join(text.lower().split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


_SCORER = None


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of ``prediction`` against ``reference`` (``rouge-score``, Porter stemmer)."""
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(_SCORER.score(reference, prediction)["rougeL"].fmeasure)


def _device(model) -> torch.device:
    return next(p.device for p in model.parameters())


@torch.no_grad()
def greedy_continuations(model, tokenizer, prompts: Sequence[list[int]], max_new_tokens: int,
                         batch_size: int, progress: bool = False,
                         desc: str = "generate") -> list[list[int]]:
    """The greedy continuation of each prompt, as token ids up to and including the first EOS.

    Prompts are left-padded into batches of ``batch_size``, so every prompt ends where its
    generation starts; a batch stops when all its rows reached EOS or ``max_new_tokens``.
    """
    model.eval()
    device = _device(model)
    pad_id, eos_id = int(tokenizer.pad_token_id), tokenizer.eos_token_id
    out: list[list[int]] = []
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, mininterval=2.0, leave=False)
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, p in enumerate(chunk):
            ids[j, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[j, width - len(p):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                             eos_token_id=eos_id, use_cache=True)
        for row in gen[:, width:].tolist():
            # After EOS a finished row is filled with padding until the batch ends.
            out.append(row[:row.index(eos_id) + 1] if eos_id in row else row)
        bar.update(len(chunk))
    bar.close()
    return out


def generation_metrics(model, tokenizer, rows: Sequence[dict], max_new_tokens: int,
                       max_examples: int, batch_size: int, progress: bool = False,
                       desc: str = "generate") -> GenerationResult:
    """Exact match and ROUGE-L of ``model``'s greedy answers to the first ``max_examples`` rows.

    Rows without a prompt or without a reference token (an answer truncated away) are skipped.
    """
    return score_generations(
        lambda prompts: greedy_continuations(model, tokenizer, prompts, max_new_tokens,
                                             batch_size, progress, desc),
        tokenizer, rows, max_examples, desc)


def score_generations(generate: Callable[[list[list[int]]], list[list[int]]], tokenizer,
                      rows: Sequence[dict], max_examples: int,
                      desc: str = "generate") -> GenerationResult:
    """Exact match and ROUGE-L of ``generate(prompts)`` (new token ids per prompt, EOS included
    or not) against the references of the first ``max_examples`` usable ``rows``.

    ``generate`` is whatever produces a silo's greedy answers: ``model.generate`` for a whole
    model (:func:`generation_metrics`), the split relay for a split silo.
    """
    t0 = time.time()
    pairs = [prompt_and_reference(r) for r in rows]
    pairs = [(p, ref) for p, ref in pairs if p and ref][:max_examples]
    if not pairs:
        raise ValueError(f"{desc}: no held-out row has both a prompt and a reference answer")
    generated = generate([p for p, _ in pairs])
    if len(generated) != len(pairs):
        raise ValueError(f"{desc}: {len(generated)} answers for {len(pairs)} prompts")
    answers = tokenizer.batch_decode(generated, skip_special_tokens=True)
    refs = tokenizer.batch_decode([ref for _, ref in pairs], skip_special_tokens=True)
    em = [exact_match(a, r) for a, r in zip(answers, refs)]
    rl = [rouge_l(a, r) for a, r in zip(answers, refs)]
    return GenerationResult(exact_match=sum(em) / len(em), rouge_l=sum(rl) / len(rl),
                            num_generated=len(pairs), seconds=time.time() - t0)
