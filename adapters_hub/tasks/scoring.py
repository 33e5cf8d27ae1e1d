"""Pure answer checks: reading an answer out of text and scoring predictions (no model).

    extract_number_after_marker("... #### 1,000", "####") -> "1000"
    normalize("  The Answer. ") -> "the answer"
    match_label("Billing issue, I think", ["billing", "technical"]) -> "billing"
    macro_f1(["a", "b", None], ["a", "a", "b"], labels=["a", "b"]) -> 0.4
"""

from __future__ import annotations

import re
import string
from decimal import Decimal, InvalidOperation

_NUMBER = re.compile(r"-?\$?\s*\d[\d,]*(?:\.\d+)?")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def extract_number_after_marker(text: str, marker: str) -> str | None:
    """The first number after the first `marker`, normalised ("1,000.50" -> "1000.5", "$18" -> "18").

    The first marker counts: a model that keeps generating after its answer often writes a
    new question with its own "####" line.
    """
    at = text.find(marker)
    if at < 0:
        return None
    match = _NUMBER.search(text, at + len(marker))
    if match is None:
        return None
    raw = match.group(0).replace("$", "").replace(",", "").replace(" ", "")
    try:
        value = Decimal(raw)
    except InvalidOperation:
        return None
    # Canonical form: 18 == 18.0 == 18.00, no exponent.
    return format(value.normalize(), "f") if value != 0 else "0"


def normalize(text: str) -> str:
    """SQuAD-style normalisation for exact match: lower case, no punctuation, no articles,
    single spaces."""
    text = _ARTICLES.sub(" ", str(text).lower().translate(_PUNCT))
    return " ".join(text.split())


def extract_regex(text: str, pattern: str) -> str | None:
    """Group 1 of the first match of `pattern` (the whole match when it has no group), normalised."""
    match = re.search(pattern, text)
    if match is None:
        return None
    return normalize(match.group(1) if match.re.groups else match.group(0))


def first_line(text: str) -> str | None:
    """The first non-empty line of a generation, normalised (exact-match answers)."""
    for line in text.splitlines():
        if line.strip():
            return normalize(line)
    return None


def match_label(text: str, labels: list[str]) -> str | None:
    """The label a generation names: the one whose normalised form starts the normalised
    generation (longest first, so "not spam" wins over "not"), else the first label named
    as a whole word anywhere; None when it names none."""
    said = normalize(text)
    by_length = sorted(labels, key=lambda lab: -len(normalize(lab)))
    for label in by_length:
        norm = normalize(label)
        if said == norm or said.startswith(norm + " "):
            return label
    hits = [(m.start(), label) for label in by_length
            if (m := re.search(rf"\b{re.escape(normalize(label))}\b", said))]
    return min(hits)[1] if hits else None


def macro_f1(predicted: list[str | None], targets: list[str], *, labels: list[str]) -> float:
    """Mean over `labels` of F1 (a prediction of no label is wrong for every class)."""
    scores = []
    for label in labels:
        tp = sum(p == label and t == label for p, t in zip(predicted, targets))
        fp = sum(p == label and t != label for p, t in zip(predicted, targets))
        fn = sum(p != label and t == label for p, t in zip(predicted, targets))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)
