"""Scoring free-form answers: how much of the reference an answer says (token F1 and ROUGE-L), in a few lines.

Exact match suits closed answers (numbers, labels, short strings); on free text (Alpaca-style
instructions) it is ~0 for base and tuned alike and says nothing. There the lab reports word overlap
with the reference beside the side-by-side generations: SQuAD's token F1 (bag of words) and ROUGE-L
(longest common subsequence, so word order counts). Both lower-case and drop punctuation; neither
needs a new dependency.
"""

from __future__ import annotations

import re
from collections import Counter

__all__ = ["words", "token_f1", "rouge_l", "overlap_scores", "closed_answers"]

_WORD = re.compile(r"\w+", re.UNICODE)
# "closed" answers: every one at most this many words (a label, a number, a name, a short phrase)
CLOSED_MAX_WORDS = 5


def words(text: str) -> list[str]:
    """Return the lower-cased words of text (punctuation and spacing ignored)."""
    return _WORD.findall(text.lower())


def token_f1(prediction: str, reference: str) -> float:
    """Return SQuAD's token F1: the harmonic mean of word precision and recall, counting repeats."""
    p, r = words(prediction), words(reference)
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    """Return ROUGE-L F1: the longest common word subsequence against both lengths."""
    p, r = words(prediction), words(reference)
    if not p or not r:
        return float(p == r)
    prev = [0] * (len(r) + 1)
    for a in p:  # one row of the LCS table at a time
        cur = [0]
        for j, b in enumerate(r):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def overlap_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Return the mean token F1 and ROUGE-L of predictions against references."""
    n = len(references)
    if not n:
        return {}
    pairs = list(zip(predictions, references, strict=True))
    return {"token_f1": sum(token_f1(p, r) for p, r in pairs) / n, "rouge_l": sum(rouge_l(p, r) for p, r in pairs) / n}


def closed_answers(references: list[str]) -> bool:
    """Return True when every reference is short (≤ CLOSED_MAX_WORDS words): exact match can judge them."""
    return bool(references) and all(len(words(r)) <= CLOSED_MAX_WORDS for r in references)
