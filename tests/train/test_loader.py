"""The data loader: seeded epoch permutations with a resumable position, right-padding collate."""

from __future__ import annotations

import torch
from train_helpers import Enc

from tunesmith.data.loader import EpochLoader, collate, count_targets


def _data(n: int) -> list[Enc]:
    return [Enc(list(range(1, 2 + i % 5)), [-100] + list(range(2, 2 + i % 5))) for i in range(n)]


def test_collate_right_pads_ids_labels_and_mask():
    batch = collate([Enc([5, 6, 7], [-100, 6, 7]), Enc([8], [8])], pad_token_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch.labels.tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.num_targets == 2  # shifted: row 0 predicts 6 and 7; row 1 has nothing after its only token
    assert count_targets(torch.tensor([[1, 2, -100, 3]])) == 2


def test_epoch_permutation_is_seeded_per_epoch_and_touches_no_global_rng():
    loader = EpochLoader(_data(10), batch_size=3, pad_token_id=0, seed=1)
    rng = torch.get_rng_state()
    first = loader.permutation(0)
    assert torch.equal(rng, torch.get_rng_state())
    assert sorted(first) == list(range(10))
    assert first == EpochLoader(_data(10), 3, 0, seed=1).permutation(0)  # same seed, same order
    assert first != loader.permutation(1)  # a new order every epoch
    assert first != EpochLoader(_data(10), 3, 0, seed=2).permutation(0)
    assert len(loader) == 4 and [len(b) for b in loader.batch_indices(0)] == [3, 3, 3, 1]


def test_resuming_mid_epoch_yields_exactly_the_remaining_windows():
    loader = EpochLoader(_data(11), batch_size=2, pad_token_id=0, seed=3)
    full = list(loader.epoch_windows(epoch=2, start=0, size=2))
    assert [pos for pos, _ in full] == [2, 4, 6]  # 6 micro-batches → windows of 2; never crosses the epoch
    resumed = list(loader.epoch_windows(epoch=2, start=4, size=2))
    assert len(resumed) == 1 and resumed[0][0] == 6
    for a, b in zip(full[-1][1], resumed[0][1], strict=True):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert [p for p, _ in loader.epoch_windows(0, 0, 4)] == [4, 6]  # the short last window still steps
