"""The embedded default data set: English Q/A pairs from the PyPI package ``chatterbot-corpus``.

Each YAML file of the English folder is a topic (``ai``, ``botprofile``, ``computers``...) holding
conversations; consecutive turns (question, answer) become one instruction/response pair, and the
topic is kept as ``category`` so that Dirichlet partitioning has a label to skew by.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import yaml


class EmbeddedDataError(RuntimeError):
    pass


def chatterbot_english_dir() -> Path:
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedDataError(
            "the embedded data set needs the PyPI package 'chatterbot-corpus': "
            "pip install chatterbot-corpus==1.3.3"
        )
    root = Path(list(spec.submodule_search_locations)[0]) / "data" / "english"
    if not root.is_dir():
        raise EmbeddedDataError(f"chatterbot-corpus is installed but {root} is missing")
    return root


def _text(turn) -> str:
    if isinstance(turn, str):
        return turn.strip()
    if isinstance(turn, list):  # a few answers are lists of lines
        return " ".join(str(t).strip() for t in turn)
    return str(turn).strip()


@functools.lru_cache(maxsize=1)
def _pairs() -> tuple[tuple[str, str, str], ...]:
    out: list[tuple[str, str, str]] = []
    for path in sorted(chatterbot_english_dir().glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        category = path.stem
        for conv in doc.get("conversations") or []:
            if not isinstance(conv, list):  # trivia.yml has one malformed (string) entry
                continue
            turns = [_text(t) for t in conv if _text(t)]
            for q, a in zip(turns, turns[1:]):
                out.append((q, a, category))
    if not out:
        raise EmbeddedDataError("chatterbot-corpus English folder held no conversations")
    return tuple(out)


def chatterbot_pairs() -> list[dict[str, str]]:
    """All English Q/A pairs as ``{"instruction", "input", "response", "category"}`` rows."""
    return [
        {"instruction": q, "input": "", "response": a, "category": c} for q, a, c in _pairs()
    ]
