"""BLEU-4 and ROUGE-1/2/L on a fixed tiny set, against values computed by hand below."""

from __future__ import annotations

import math

import pytest

from tunesmith.evaluate.metrics import bleu4, compute_metrics, lcs_length, rouge_l, rouge_n, tokenize

# (prediction, reference, segmentation, hand-computed BLEU-4, ROUGE-1, ROUGE-2, ROUGE-L), scores in [0, 1].
CASES = [
    # 6 tokens each. 1-grams: the×2 cat on mat match → 5/6; 2-grams: "the cat", "on the", "the mat" → 3/5;
    # 3-grams: "on the mat" → 1/4; 4-grams: none of 3 → smoothed 1/(2^1·3) = 1/6. Equal lengths: BP = 1.
    # BLEU = (5/6 · 3/5 · 1/4 · 1/6)^(1/4) = (1/48)^(1/4). ROUGE-1 = 5/6, ROUGE-2 = 3/5;
    # LCS "the cat on the mat" = 5 → ROUGE-L = 5/6.
    ("the cat sat on the mat", "the cat is on the mat", "char", (1 / 48) ** 0.25, 5 / 6, 3 / 5, 5 / 6),
    # Characters 我 爱 北 京 vs 我 爱 上 海. 1-grams 2/4; 2-grams "我爱" 1/3; 3-grams 0/2 → 1/(2·2);
    # 4-grams 0/1 → 1/(2^2·1). BLEU = (1/2 · 1/3 · 1/4 · 1/4)^(1/4) = (1/96)^(1/4).
    # ROUGE-1 = 2/4, ROUGE-2 = 1/3, LCS "我爱" = 2 → ROUGE-L = 2/4.
    ("我爱北京", "我爱上海", "char", (1 / 96) ** 0.25, 1 / 2, 1 / 3, 1 / 2),
    # A short hypothesis: 1-grams 2/2, 2-grams 1/1, 3-grams 0/1 (no 3-gram: divide by 1) → 1/2, 4-grams → 1/4;
    # BP = exp(1 - 6/2) = e^-2. BLEU = e^-2 · (1/8)^(1/4).
    # ROUGE-1: P = 2/2, R = 2/6 → F = 2·(1/3)/(4/3) = 1/2; ROUGE-2: P = 1, R = 1/5 → 1/3; ROUGE-L: LCS 2 → 1/2.
    ("the cat", "the cat sat on the mat", "char", math.exp(-2) * (1 / 8) ** 0.25, 1 / 2, 1 / 3, 1 / 2),
    # Nothing generated: every score is 0.
    ("", "The capital of France is Paris.", "char", 0.0, 0.0, 0.0, 0.0),
    # Not one unigram in common: BLEU is 0 (NLTK's rule), so are the ROUGEs.
    ("dog", "cat", "char", 0.0, 0.0, 0.0, 0.0),
]


@pytest.mark.parametrize("prediction, reference, segmenter, bleu, r1, r2, rl", CASES)
def test_each_pair_matches_the_hand_computation(prediction, reference, segmenter, bleu, r1, r2, rl):
    hyp, ref = tokenize(prediction, segmenter), tokenize(reference, segmenter)
    assert bleu4(hyp, ref) == pytest.approx(bleu, abs=1e-12)
    assert rouge_n(hyp, ref, 1) == pytest.approx(r1, abs=1e-12)
    assert rouge_n(hyp, ref, 2) == pytest.approx(r2, abs=1e-12)
    assert rouge_l(hyp, ref) == pytest.approx(rl, abs=1e-12)


def test_corpus_scores_are_the_mean_times_100():
    scores = compute_metrics([c[0] for c in CASES], [c[1] for c in CASES], segmenter="char")
    for name, column in (("bleu-4", 3), ("rouge-1", 4), ("rouge-2", 5), ("rouge-l", 6)):
        expected = 100 * sum(c[column] for c in CASES) / len(CASES)
        assert scores[name] == pytest.approx(expected, abs=1e-4), name
    # the first pair by hand, as a number: (1/48)^(1/4) = 0.37992...
    assert 100 * (1 / 48) ** 0.25 == pytest.approx(37.9918, abs=1e-4)
    assert compute_metrics(["the cat sat on the mat"], ["the cat sat on the mat"]) == {
        "bleu-4": 100.0, "rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0
    }


def test_tokenize_splits_words_marks_and_chinese():
    assert tokenize("Hello, world! 你好", "char") == ["Hello", ",", "world", "!", "你", "好"]
    assert tokenize("x=1;  y", "char") == ["x", "=", "1", ";", "y"]
    assert tokenize("中文，English。", "char") == ["中", "文", "，", "English", "。"]


def test_jieba_segments_chinese_into_words():
    pytest.importorskip("jieba")
    assert tokenize("我爱北京天安门", "jieba") == ["我", "爱", "北京", "天安门"]
    # words, not characters, are the unit: one wrong word is one wrong unigram
    assert rouge_n(tokenize("我爱北京", "jieba"), tokenize("我爱上海", "jieba"), 1) == pytest.approx(2 / 3)


def test_lcs_length():
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # the textbook example (CLRS)
    assert lcs_length([], ["a"]) == 0
