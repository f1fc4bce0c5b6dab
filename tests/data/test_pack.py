"""Packing: rows are built deterministically, and a packed row computes exactly what its samples compute alone
(loss, gradients and logits), with samples isolated from each other and no NaN from padding."""

from __future__ import annotations

import pytest
import torch

from tunesmith.data.encode import TokenIds
from tunesmith.data.loader import collate
from tunesmith.data.pack import PackedSample, balanced_groups, block_mask, pack_groups, pack_samples
from tunesmith.train.loop import token_loss_sum

QA = [
    ("Who are you?", "I am Ada, an AI assistant made by Lab."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Translate to French: good morning.", "Bonjour."),
    (
        "Write a haiku about the sea.",
        "Waves fold into foam, salt wind carries gull voices, the tide keeps its time.",
    ),
    ("Give three tips for staying healthy.", "Eat vegetables, sleep well, and exercise regularly."),
]


class Enc:
    def __init__(self, input_ids: list[int], labels: list[int]) -> None:
        self.input_ids, self.labels = input_ids, labels


def _samples(tokenizer) -> list[Enc]:
    out = []
    for question, answer in QA:
        prompt = tokenizer(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
        reply = tokenizer(f"{answer}<|im_end|>\n")["input_ids"]
        out.append(Enc(prompt + reply, [-100] * len(prompt) + reply))
    return out


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation=request.param
    )
    m.train()  # the tiny model has no dropout: train mode is deterministic and is what the loop uses
    return m


def test_pack_groups_is_best_fit_decreasing_and_deterministic():
    lengths = [5, 3, 7, 2, 4, 1, 6]
    groups = pack_groups(lengths, 8)
    assert groups == pack_groups(lengths, 8)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in g) <= 8 for g in groups)
    assert len(groups) == 4  # 28 tokens need at least 4 rows of 8
    with pytest.raises(ValueError, match="more than the packing capacity"):
        pack_groups([9], 8)


def test_packed_rows_mask_each_first_label_and_keep_every_target(tiny_tokenizer):
    samples = _samples(tiny_tokenizer)
    rows, stats = pack_samples(samples, 100)
    assert stats.samples == len(samples) and stats.rows == len(rows) and 0 < stats.fill <= 1
    assert sum(len(r.seq_lens) for r in rows) == len(samples)
    targets = sum(collate([s], 0).num_targets for s in samples)
    assert collate(rows, 0).num_targets == targets  # unpacked, the first label is never predicted either


def test_padding_rows_are_finite_and_positions_restart(model, tiny_tokenizer):
    samples = _samples(tiny_tokenizer)
    rows, _ = pack_samples(samples, 100)
    batch = collate(rows, tiny_tokenizer.pad_token_id)
    width = batch.input_ids.shape[1]
    assert batch.model_inputs()["attention_mask"].shape == (len(rows), 1, width, width)  # block-diagonal, 4-D
    assert batch.position_ids is not None
    first = rows[0].seq_lens[0]
    assert batch.position_ids[0, first] == 0 and batch.position_ids[0, first - 1] == first - 1
    with torch.no_grad():
        logits = model(**batch.model_inputs(), use_cache=False).logits
    assert torch.isfinite(logits).all()


def test_the_block_mask_of_a_batch_on_a_device_is_built_on_that_device(tiny_tokenizer):
    # a batch moved to the GPU made its mask on the CPU and failed ("mask on cuda:0 and self on cpu"); the meta
    # device stands in for any device other than the CPU
    rows, _ = pack_samples(_samples(tiny_tokenizer), 100)
    batch = collate(rows, tiny_tokenizer.pad_token_id)
    width = batch.input_ids.shape[1]
    mask = block_mask(batch.segments.to("meta"))
    assert mask.device.type == "meta" and mask.shape == (len(rows), 1, width, width)
    assert batch.to("meta").model_inputs("mask")["attention_mask"].device.type == "meta"


def test_packed_loss_and_gradients_equal_the_samples_one_by_one(model, tiny_tokenizer):
    samples = _samples(tiny_tokenizer)
    rows, _ = pack_samples(samples, 100)
    assert any(len(r.seq_lens) > 1 for r in rows)  # the test must actually pack

    model.zero_grad()
    packed = collate(rows, tiny_tokenizer.pad_token_id)
    loss_packed = token_loss_sum(model(**packed.model_inputs(), use_cache=False).logits, packed.labels)
    loss_packed.backward()
    grads_packed = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    loss_single = torch.zeros(())
    for sample in samples:
        batch = collate([sample], tiny_tokenizer.pad_token_id)
        loss = token_loss_sum(model(**batch.model_inputs(), use_cache=False).logits, batch.labels)
        loss.backward()
        loss_single += loss.detach()
    assert float(loss_packed.detach()) == pytest.approx(
        float(loss_single), abs=1e-5 * max(1.0, float(loss_single))
    )
    for name, param in model.named_parameters():
        assert torch.allclose(grads_packed[name], param.grad, atol=1e-5, rtol=1e-4), name
    model.zero_grad()


def test_changing_one_sample_leaves_the_other_samples_logits_unchanged(model, tiny_tokenizer):
    a, b = _samples(tiny_tokenizer)[:2]
    changed_a = Enc([t if i < 2 else (t + 7) % 300 for i, t in enumerate(a.input_ids)], a.labels)
    row = PackedSample(a.input_ids + b.input_ids, a.labels + b.labels, [len(a.input_ids), len(b.input_ids)])
    row2 = PackedSample(
        changed_a.input_ids + b.input_ids, a.labels + b.labels, [len(a.input_ids), len(b.input_ids)]
    )
    with torch.no_grad():
        logits = [model(**collate([r], 0).model_inputs(), use_cache=False).logits[0] for r in (row, row2)]
    n = len(a.input_ids)
    assert not torch.allclose(logits[0][:n], logits[1][:n])  # sample A did change ...
    assert torch.allclose(logits[0][n:], logits[1][n:], atol=1e-6)  # ... and sample B did not notice


def _batch_waste(row_lens: list[int], batch: int) -> float:
    """Pad positions over all positions when rows are batched in order and padded to each batch's longest."""
    real = padded = 0
    for k in range(0, len(row_lens), batch):
        chunk = row_lens[k : k + batch]
        real, padded = real + sum(chunk), padded + max(chunk) * len(chunk)
    return 1 - real / padded


def test_balanced_rows_keep_the_row_count_and_leave_almost_no_padding():
    import random

    rng = random.Random(0)
    lengths = [min(1024, int(rng.lognormvariate(5.0, 0.6)) + 8) for _ in range(600)]  # alpaca-like lengths
    plain = pack_groups(lengths, 1024)
    balanced = balanced_groups(lengths, 1024)
    assert balanced == balanced_groups(lengths, 1024)  # deterministic
    assert sorted(i for g in balanced for i in g) == list(range(len(lengths)))
    assert len(balanced) == len(plain)  # no extra rows: the same compute per epoch
    plain_lens = [sum(lengths[i] for i in g) for g in plain]
    row_lens = [sum(lengths[i] for i in g) for g in balanced]
    assert max(row_lens) <= 1024
    order = random.Random(1).sample(range(len(row_lens)), len(row_lens))  # as the loader shuffles rows
    for batch in (4, 8):
        assert _batch_waste([row_lens[i] for i in order], batch) <= 0.02
        assert _batch_waste([plain_lens[i] for i in order], batch) > _batch_waste(
            [row_lens[i] for i in order], batch
        )


def test_pack_samples_uses_balanced_rows(tiny_tokenizer):
    samples = _samples(tiny_tokenizer) * 7
    rows, stats = pack_samples(samples, 100)
    groups = balanced_groups([len(s.input_ids) for s in samples], 100)
    assert [r.seq_lens for r in rows] == [[len(samples[i].input_ids) for i in sorted(g)] for g in groups]
    assert stats.width == max(len(r.input_ids) for r in rows) <= 100 and stats.balance >= stats.fill
    assert isinstance(rows[0].input_ids, TokenIds) and rows[0].labels[0] == -100
