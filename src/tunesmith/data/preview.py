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
        targets = sum(label != -100 for label in sample.labels)
        print(
            f"\n--- sample {index}: {len(sample.input_ids)} tokens, {targets} targets ([[...]] are trained) ---"
        )
        print(render_sample(tokenizer, sample.input_ids, sample.labels, color=color))
    return 0
