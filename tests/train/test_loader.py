"""The data loader: seeded epoch permutations with a resumable position, right-padding collate."""

from __future__ import annotations

import torch
from train_helpers import Enc

from tunesmith.data.loader import DataPosition, EpochLoader, collate, count_targets


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
    full = list(loader.windows(epoch=2, start=0, accumulation=2))
    assert [pos for pos, _ in full] == [4, 8, 11]  # 6 micro-batches → windows of 2; never crosses the epoch
    resumed = list(loader.windows(epoch=2, start=8, accumulation=2))
    assert len(resumed) == 1 and resumed[0][0] == 11
    for a, b in zip(full[-1][1], resumed[0][1], strict=True):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert [p for p, _ in loader.windows(0, 0, 4)] == [8, 11]  # the short last window still steps


def _global_order(loaders: list[EpochLoader], epoch: int, start: int, accumulation: int) -> tuple[list[int], list]:
    """Rebuild the global sample order from every rank's windows (rank-major inside each micro-batch round)."""
    per_rank = [list(loader.window_indices(epoch, start, accumulation)) for loader in loaders]
    positions = [[p for p, _ in windows] for windows in per_rank]
    assert all(p == positions[0] for p in positions)  # every rank steps at the same sample positions
    seen: list[int] = []
    for w in range(len(per_rank[0])):
        groups = [windows[w][1] for windows in per_rank]
        assert len({len(g) for g in groups}) == 1  # the same number of micro-batches on every rank
        for k in range(len(groups[0])):
            for group in groups:
                seen += group[k]
    return seen, positions[0]


def test_ranks_see_each_sample_exactly_once_per_epoch():
    data = _data(23)
    for world in (1, 2, 3):
        for batch in (1, 2, 4):
            for accumulation in (1, 3):
                loaders = [EpochLoader(data, batch, 0, seed=5, rank=r, world_size=world) for r in range(world)]
                seen, positions = _global_order(loaders, epoch=1, start=0, accumulation=accumulation)
                assert seen == loaders[0].permutation(1), (world, batch, accumulation)
                assert positions[-1] == 23 and len(loaders[0]) == -(-23 // (batch * world))
    single = EpochLoader(data, 2, 0, seed=5)  # one rank: consecutive micro-batches of the permutation
    order = single.permutation(0)
    expected = [[order[i : i + 2] for i in range(first, min(first + 6, 23), 2)] for first in range(4, 23, 6)]
    assert [ids for _, ids in single.window_indices(0, 4, 3)] == expected


def test_a_position_saved_on_two_ranks_continues_on_one_and_three():
    data = _data(23)
    two = [EpochLoader(data, 2, 0, seed=5, rank=r, world_size=2) for r in range(2)]
    _, positions = _global_order(two, epoch=0, start=0, accumulation=2)
    saved = positions[1]  # after two optimizer steps on 2 ranks
    assert saved == 16
    order = two[0].permutation(0)
    for world, batch in ((1, 4), (3, 1)):
        loaders = [EpochLoader(data, batch, 0, seed=5, rank=r, world_size=world) for r in range(world)]
        seen, _ = _global_order(loaders, epoch=0, start=saved, accumulation=2)
        assert seen == order[saved:]  # nothing skipped, nothing repeated


def test_ranks_without_samples_run_a_masked_copy():
    data = _data(7)
    loaders = [EpochLoader(data, 2, 0, seed=1, rank=r, world_size=3) for r in range(3)]
    last = [list(loader.windows(0, 0, 1))[-1] for loader in loaders]  # 7 = 6 + 1: one sample in the last round
    assert [p for p, _ in last] == [7, 7, 7]
    assert [len(w) for _, w in last] == [1, 1, 1]
    assert last[0][1][0].num_targets > 0
    for _, window in last[1:]:
        assert window[0].num_targets == 0 and window[0].input_ids.numel() > 0


def test_windows_from_rolls_over_to_the_next_epoch():
    """The position after each window, as the loop records it: the epoch's last window leads to the next epoch's
    start, and continuing from any recorded position yields the rest of the epoch."""
    data = _data(7)
    loader = EpochLoader(data, 2, 0, seed=4)
    steps = list(loader.windows_from(DataPosition(0, 0), accumulation=2))
    assert [after for after, _ in steps] == [DataPosition(0, 4), DataPosition(1, 0)]
    rest = list(loader.windows_from(DataPosition(0, 4), accumulation=2))
    assert [[b.input_ids.tolist() for b in w] for _, w in rest] == [[b.input_ids.tolist() for b in steps[1][1]]]
    assert [a for a, _ in loader.windows_from(DataPosition(1, 0), 2)][-1] == DataPosition(2, 0)
