"""Sequence-parallel workers for tests/train/test_sequence_parallel.py, run under torchrun on CPU (gloo) or alone.

    python -m torch.distributed.run --nproc-per-node 2 sp_worker.py attention MODEL_DIR RESULT.json
    python -m torch.distributed.run --nproc-per-node 2 sp_worker.py train MODEL_DIR OUTPUT_DIR [key=value ...]

``attention``: the Ulysses attention on a packed row whose samples straddle the ranks' slices, against the same
model with plain SDPA and the full row's 4-D mask on one rank: logits and parameter gradients, then the row with one
sample changed (the other samples' logits must not move). Rank 0 writes the measured differences to RESULT.json.
``train``: tunesmith's loop on hand-encoded samples (``packing=true``: packed rows; ``val_samples=N``: the first N
also validate), as qlora_worker.py does.
"""

from __future__ import annotations

import copy
import json
import sys

import torch
from train_helpers import encode_pairs, make_cfg, parse_value, tiny_model

from tunesmith.data.loader import collate
from tunesmith.data.pack import PackedSample, pack_samples
from tunesmith.logging import setup_logging
from tunesmith.model.load import load_tokenizer
from tunesmith.train import sequence_parallel as sp
from tunesmith.train.distributed import Collectives, end_process, shutdown_distributed
from tunesmith.train.engines import create_engine
from tunesmith.train.loop import fit
from tunesmith.train.objectives.head import token_loss_sum

# --------------------------------------------------------------------------------------------- attention


def _models(model_dir: str, kv_heads: int):
    """The tiny model's architecture with ``kv_heads`` key/value heads (random weights, the same on every rank)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    config.num_key_value_heads = kv_heads
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    return reference, copy.deepcopy(reference)


def _row(lengths: list[int], vocab: int, seed: int) -> PackedSample:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (sum(lengths),), generator=generator).tolist()
    return PackedSample(ids, ids, seq_lens=lengths)  # every token a target (the first of each sample too)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def attention(model_dir: str, result_path: str) -> None:
    torch.distributed.init_process_group("gloo")
    comm = Collectives(torch.distributed.get_rank(), torch.distributed.get_world_size())
    size = comm.world_size
    mesh = sp.Mesh(comm.rank, comm.world_size, size)
    group, _ = torch.distributed.new_subgroups(group_size=size)
    found: dict[str, float] = {}
    # 37 tokens: padded to 38 (2 ranks) or 40 (4 ranks), the 9-token sample straddles the first boundary
    lengths = [11, 9, 6, 11]
    for kv_heads in (2, 1):  # 1: fewer key/value heads than ranks, repeated up to the query heads
        reference, model = _models(model_dir, kv_heads)
        sp.install(model, size, group)
        row = _row(lengths, reference.config.vocab_size, seed=1)
        full = collate([row], pad_token_id=0)
        want = reference(**full.model_inputs(), use_cache=False).logits
        token_loss_sum(want, full.labels).backward()
        mine = sp.split_batch(full, [lengths], mesh, pad_token_id=0)
        got = model(**mine.model_inputs(), use_cache=False).logits
        token_loss_sum(got, mine.labels).backward()
        step = mine.input_ids.size(1)
        start = mesh.sp_rank * step
        end = min(start + step, full.input_ids.size(1))
        logits_diff = float((got[:, : end - start] - want[:, start:end]).detach().abs().max())
        grads_want = _grads(reference)
        grads_got = _grads(model)
        for grad in grads_got.values():  # the engines sum the ranks' gradients
            torch.distributed.all_reduce(grad)
        grad_diff = max(float((grads_got[k] - grads_want[k]).abs().max()) for k in grads_want)
        targets = comm.all_reduce_sum([mine.num_targets])[0]

        # change the last sample: the three before it (two of them in rank 0's slice only) must not notice
        changed = _row(lengths, reference.config.vocab_size, seed=1)
        other = _row(lengths, reference.config.vocab_size, seed=2)
        first = sum(lengths[:-1])
        changed.input_ids[first:] = other.input_ids[first:]
        with torch.no_grad():
            again = model(**sp.split_batch(collate([changed], 0), [lengths], mesh, 0).model_inputs(),
                          use_cache=False).logits
        keep = max(0, min(end, first) - start)  # this slice's positions that belong to the unchanged samples
        isolation = float((again[:, :keep] - got[:, :keep].detach()).abs().max()) if keep else 0.0
        moved = float((again - got.detach()).abs().max())
        stats = comm.all_gather_object([logits_diff, grad_diff, isolation, moved, int(targets)])
        found.update({
            f"kv{kv_heads}_logits": max(s[0] for s in stats),
            f"kv{kv_heads}_grads": max(s[1] for s in stats),
            f"kv{kv_heads}_isolation": max(s[2] for s in stats),
            f"kv{kv_heads}_moved": max(s[3] for s in stats),
            f"kv{kv_heads}_targets": stats[0][4],
            "full_targets": full.num_targets,
        })
    if comm.is_main:
        with open(result_path, "w", encoding="utf-8") as handle:
            json.dump(found, handle)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------------------------- train


def train(model_dir: str, output_dir: str, overrides: dict) -> None:
    values = dict(max_steps=6, learning_rate=1e-2, per_device_train_batch_size=2, save_steps=100)
    values.update(overrides)
    packing = bool(values.get("packing"))
    held_out = int(values.pop("val_samples", 0))  # the first rows also make a validation set
    cfg = make_cfg(output_dir, model_dir, **values)
    engine = create_engine(cfg, torch.device("cpu"))  # validates, joins the process group unless single
    tokenizer = load_tokenizer(model_dir)
    model = tiny_model(model_dir, cfg)  # seeded: the same weights (and adapters) on every rank
    samples = encode_pairs(tokenizer, repeat=2)
    if packing:  # rows of several samples, most of them crossing the ranks' slice boundaries
        samples, _ = pack_samples(samples, cutoff_len=96)
    fit(cfg, model, tokenizer, samples, samples[:held_out], engine=engine, resume_from=cfg.resume_from_checkpoint)


if __name__ == "__main__":
    setup_logging()
    if sys.argv[1] == "attention":
        attention(sys.argv[2], sys.argv[3])
    else:
        pairs = dict(arg.split("=", 1) for arg in sys.argv[4:])
        train(sys.argv[2], sys.argv[3], {k: parse_value(v) for k, v in pairs.items()})
        shutdown_distributed()
    end_process(0)  # a rank of a multi-rank job exits here (see end_process)
