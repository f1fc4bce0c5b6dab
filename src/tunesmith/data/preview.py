"""`tunesmith data preview CONFIG`: what the model will actually see and learn from.

Prints the preprocessing report (kept / dropped / truncated, length percentiles) and a few encoded samples with
the trained spans marked, so template, masking and truncation problems show up before training starts.
"""

from __future__ import annotations

import sys
from itertools import groupby
from typing import Any

from tunesmith.config import Config

TARGET_OPEN, TARGET_CLOSE = "\x1b[32m[[", "]]\x1b[0m"


def render_sample(tokenizer, input_ids: list[int], labels: list[int], color: bool = True) -> str:
    """Decode a sample, wrapping the spans that are training targets in [[...]] (green on a terminal)."""
    opening, closing = (TARGET_OPEN, TARGET_CLOSE) if color else ("[[", "]]")
    pieces = []
    pairs = list(zip(input_ids, labels, strict=True))
    for is_target, group in groupby(pairs, key=lambda pair: pair[1] != -100):
        text = tokenizer.decode([token for token, _ in group], skip_special_tokens=False)
        pieces.append(f"{opening}{text}{closing}" if is_target else text)
    return "".join(pieces)


def preview(cfg: Config, tokenizer: Any, show: int = 2, color: bool | None = None) -> int:
    """Print the preprocessing report and the first ``show`` training samples, trained spans marked."""
    from tunesmith.data import StreamingData, prepare_datasets

    if color is None:
        color = sys.stdout.isatty()
    prepared = prepare_datasets(cfg, tokenizer)
    if isinstance(prepared.train, StreamingData):
        train = prepared.train.head(show)  # reads and encodes only what it shows
        count = "? (streaming: encoded while training)"
        print(f"streaming: the first {len(train)} samples of pass 0 follow")
    else:
        train, count = prepared.train[:show], str(len(prepared.train))
        print(prepared.report.format())
    print(f"train samples: {count}, validation samples: {len(prepared.val)}, template: {prepared.template.name}")
    for index, sample in enumerate(train):
        print(render_example(tokenizer, index, sample, color))
    return 0


def render_example(tokenizer: Any, index: int, sample: Any, color: bool) -> str:
    """A header and the decoded sample; a preference pair shows its prompt once and both replies, a feedback
    example its tag."""
    from tunesmith.data.feedback import FeedbackSample
    from tunesmith.data.pairs import PairSample

    if isinstance(sample, PairSample):
        (chosen_ids, chosen_labels), (rejected_ids, rejected_labels) = sample.rows()
        cut = len(sample.prompt)
        return "\n".join([
            f"\n--- pair {index}: prompt {cut} tokens, chosen {len(sample.chosen)}, rejected "
            f"{len(sample.rejected)} ([[...]] are trained) ---",
            tokenizer.decode(list(sample.prompt), skip_special_tokens=False),
            "chosen:   " + render_sample(tokenizer, chosen_ids[cut:], chosen_labels[cut:], color=color),
            "rejected: " + render_sample(tokenizer, rejected_ids[cut:], rejected_labels[cut:], color=color),
        ])
    targets = sum(label != -100 for label in sample.labels)
    tag = ""
    if isinstance(sample, FeedbackSample):
        tag = f", kto_tag {'true (desirable)' if sample.desirable else 'false (undesirable)'}"
    header = f"\n--- sample {index}: {len(sample.input_ids)} tokens, {targets} targets{tag} ([[...]] are trained) ---"
    return header + "\n" + render_sample(tokenizer, list(sample.input_ids), list(sample.labels), color=color)
