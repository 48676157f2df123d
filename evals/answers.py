"""The one answer extraction: what every stage that scores a response reads as its answer.

lm-eval's regex filter (`group_select: -1`), the demo's own checks, rollout's `n_correct`,
patching and knockout all take the *last* match of the same pattern, so a response that states
an intermediate "answer:" and then a final one is scored the same everywhere. The lm-eval task
YAMLs carry the same pattern; a test checks it.

>>> extract_answer("answer: 12\\nanswer: 34<eos>", r"answer:\\s*(-?\\d+)")
'34'
>>> is_correct("so answer: 7", " 7", r"answer:\\s*(-?\\d+)")
True
"""
from __future__ import annotations

import re
from functools import lru_cache


@lru_cache(maxsize=64)
def _compiled(pattern: str) -> re.Pattern:
    rx = re.compile(pattern)
    if rx.groups < 1:
        raise ValueError(f"answer pattern {pattern!r} needs a capturing group around the answer")
    return rx


def extract_answer(text: str, pattern: str) -> str | None:
    """Group 1 of the last match of `pattern` in `text`, stripped; None when nothing matches
    or the match is empty."""
    found = None
    for m in _compiled(pattern).finditer(text):
        found = m
    if found is None:
        return None
    value = (found.group(1) or "").strip()
    return value or None


def is_correct(text: str, answer: str, pattern: str) -> bool:
    """Whether the last answer in `text` equals `answer` (both stripped)."""
    got = extract_answer(text, pattern)
    return got is not None and got == str(answer).strip()
