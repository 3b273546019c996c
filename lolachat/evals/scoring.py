"""RULER's scoring of needle tasks (`string_match_all`), reimplemented from its documented rule.

A prediction is cleaned (whitespace stripped, control characters turned into newlines); a sample scores
the fraction of its reference values that occur in it as a case-insensitive substring; a task scores the
mean over samples × 100, rounded to 2 decimals.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess_pred(text: str) -> str:
    """Strip, turn every control character into a newline, strip again (RULER `postprocess_pred`)."""
    return _CONTROL.sub("\n", text.strip()).strip()


def sample_score(prediction: str, references: Sequence[str]) -> float:
    """Fraction of `references` found in the cleaned prediction, ignoring case (0.0 .. 1.0)."""
    if not references:
        raise ValueError("a sample needs at least one reference value")
    pred = postprocess_pred(prediction).lower()
    return sum(1.0 for ref in references if ref.lower() in pred) / len(references)


def string_match_all(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """RULER task score: mean sample score × 100, rounded to 2 decimals."""
    if len(predictions) != len(references):
        raise ValueError("predictions and references differ in number")
    if not predictions:
        return 0.0
    total = sum(sample_score(p, r) for p, r in zip(predictions, references))
    return round(total / len(predictions) * 100, 2)
