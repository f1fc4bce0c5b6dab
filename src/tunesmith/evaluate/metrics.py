"""BLEU-4 and ROUGE-1/2/L of generated answers against references, for English and Chinese alike.

Text is split into tokens first: Chinese (Han / kana) runs are segmented into words with jieba when it is
installed, else one token per character; everything else is split into words and single punctuation marks.
Case is kept (BLEU's usual convention).

Scores are sentence-level and averaged over samples, × 100, as LLaMA-Factory reports them:
- BLEU-4: geometric mean of the clipped 1..4-gram precisions times the brevity penalty, smoothed as NLTK's
  ``SmoothingFunction().method3`` (mteval-v13a: the k-th precision with no match counts as 1 / (2^k · n-grams)),
  and 0 when not even a unigram matches — the same number as ``nltk.translate.bleu_score.sentence_bleu`` on
  these tokens. (LLaMA-Factory feeds NLTK characters instead of words; words are the usual unit.)
- ROUGE-N: F1 of the clipped n-gram overlap; ROUGE-L: F1 of the longest common subsequence (β = 1).
Implemented here (a few dozen lines) rather than pulling nltk / rouge-score and their data files.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Sequence
from functools import cache
from typing import Literal

Segmenter = Literal["auto", "jieba", "char"]

# Han ideographs (basic, extension A, compatibility) and Japanese kana: scripts written without spaces.
_CJK_RUN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
_WORD_OR_MARK = re.compile(r"\w+|[^\w\s]")


@cache
def _jieba():  # imported once, on first Chinese text: loading its dictionary takes about a second
    try:
        import jieba
    except ImportError:
        return None
    jieba.setLogLevel(logging.WARNING)  # it announces "Building prefix dict..." at INFO otherwise
    return jieba


def tokenize(text: str, segmenter: Segmenter = "auto") -> list[str]:
    """Words and punctuation marks; CJK runs as jieba words (``auto``/``jieba``) or characters (``char``)."""
    jieba = _jieba() if segmenter != "char" else None
    if segmenter == "jieba" and jieba is None:
        raise ImportError("segmenter='jieba' needs the jieba package (pip install jieba)")
    tokens: list[str] = []
    pos = 0
    for run in _CJK_RUN.finditer(text):
        tokens += _WORD_OR_MARK.findall(text[pos : run.start()])
        chunk = run.group()
        tokens += [w for w in jieba.lcut(chunk) if w.strip()] if jieba is not None else list(chunk)
        pos = run.end()
    tokens += _WORD_OR_MARK.findall(text[pos:])
    return tokens


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _overlap(hyp: Sequence[str], ref: Sequence[str], n: int) -> tuple[int, int, int]:
    """(clipped matches, hypothesis n-grams, reference n-grams)."""
    h, r = _ngrams(hyp, n), _ngrams(ref, n)
    return sum(min(c, r[g]) for g, c in h.items()), sum(h.values()), sum(r.values())


def bleu4(hyp: Sequence[str], ref: Sequence[str]) -> float:
    """Sentence BLEU-4 in [0, 1] (NLTK's sentence_bleu with method3 smoothing, one reference)."""
    if not hyp or not ref:
        return 0.0
    counts = [_overlap(hyp, ref, n)[:2] for n in range(1, 5)]
    if counts[0][0] == 0:
        return 0.0
    log_sum, k = 0.0, 1
    for matches, total in counts:
        total = max(total, 1)  # a hypothesis shorter than n has no n-grams: NLTK divides by 1
        if matches == 0:
            precision = 1.0 / (2**k * total)
            k += 1
        else:
            precision = matches / total
        log_sum += 0.25 * math.log(precision)
    brevity = 1.0 if len(hyp) > len(ref) else math.exp(1 - len(ref) / len(hyp))
    return brevity * math.exp(log_sum)


def _f1(matches: int, hyp_count: int, ref_count: int) -> float:
    if matches == 0:
        return 0.0
    precision, recall = matches / hyp_count, matches / ref_count
    return 2 * precision * recall / (precision + recall)


def rouge_n(hyp: Sequence[str], ref: Sequence[str], n: int) -> float:
    """ROUGE-N F1 in [0, 1]."""
    return _f1(*_overlap(hyp, ref, n))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row at a time)."""
    previous = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b):
            row.append(previous[j] + 1 if x == y else max(previous[j + 1], row[j]))
        previous = row
    return previous[-1]


def rouge_l(hyp: Sequence[str], ref: Sequence[str]) -> float:
    """ROUGE-L F1 (β = 1) in [0, 1]."""
    return _f1(lcs_length(hyp, ref), len(hyp), len(ref)) if hyp and ref else 0.0


def compute_metrics(
    predictions: Sequence[str], references: Sequence[str], segmenter: Segmenter = "auto"
) -> dict[str, float]:
    """Mean sentence BLEU-4 and ROUGE-1/2/L F1 over the pairs, × 100 and rounded to 4 places."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    sums = {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    for prediction, reference in zip(predictions, references, strict=True):
        hyp, ref = tokenize(prediction, segmenter), tokenize(reference, segmenter)
        sums["bleu-4"] += bleu4(hyp, ref)
        sums["rouge-1"] += rouge_n(hyp, ref, 1)
        sums["rouge-2"] += rouge_n(hyp, ref, 2)
        sums["rouge-l"] += rouge_l(hyp, ref)
    count = max(len(predictions), 1)
    return {name: round(100 * total / count, 4) for name, total in sums.items()}
