"""Answer scoring: normalised contains-match, exact match and token F1 (SQuAD-style normalisation)."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalise(text: str) -> str:
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def contains_match(prediction: str, gold: str) -> bool:
    """The gold answer appears in the prediction as whole words (after normalisation)."""
    g, p = normalise(gold), normalise(prediction)
    return bool(g) and f" {g} " in f" {p} "


def states_other_fact(prediction: str, gold: str, question: str, document_answers: Iterable[str]) -> bool:
    """A wrong answer that contains the answer to another question about the same document.

    Separates "retrieved the wrong fact" (the value exists, the key was missed) from "produced a
    value the document does not hold" (the value itself was not stored or copied). Values the
    question itself names do not count: echoing the asked-about entity is not recalling a fact."""
    if contains_match(prediction, gold):
        return False
    g = normalise(gold)
    return any(
        normalise(other) != g and contains_match(prediction, other) and not contains_match(question, other)
        for other in document_answers
    )


def exact_match(prediction: str, gold: str) -> bool:
    return normalise(prediction) == normalise(gold)


def token_f1(prediction: str, gold: str) -> float:
    p, g = normalise(prediction).split(), normalise(gold).split()
    common = sum((Counter(p) & Counter(g)).values())
    if not p or not g or not common:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)
