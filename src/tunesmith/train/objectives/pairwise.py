"""What the pairwise objectives (dpo, rm) share: B pairs per micro-batch as 2B rows (chosen first), a pair as the
unit of the loss, and every real token counting for throughput."""

from __future__ import annotations

from tunesmith.data.loader import Batch, Collator
from tunesmith.data.pairs import PairCollator, pairs_with_targets


class PairwiseBatches:
    def collator(self, pad_token_id: int) -> Collator:
        return PairCollator(pad_token_id)

    def units(self, batch: Batch) -> int:
        return int(pairs_with_targets(batch).sum())  # a masked filler pair counts 0

    def tokens(self, batch: Batch) -> int:
        return int(batch.attention_mask.sum())
