"""Tensor-parallel workers for tests/train/test_tensor_parallel.py, run under torchrun on CPU (gloo) or alone.

    python -m torch.distributed.run --nproc-per-node 2 tp_worker.py vocab RESULT.json
    python -m torch.distributed.run --nproc-per-node 2 tp_worker.py train MODEL_DIR OUTPUT_DIR [key=value ...]

``vocab``: the vocab-parallel cross entropy (each rank holds V/N rows of the head) against the whole head's on one
rank: the summed loss, the hidden states' gradient and each rank's rows of the weight's gradient, whole and in
chunks of 5 targets; rank 0 writes the largest differences to RESULT.json. ``train``: tunesmith's loop, as in
sp_worker.py.
"""

from __future__ import annotations

import json
import sys

import torch
from sp_worker import train
from train_helpers import parse_value

from tunesmith.logging import setup_logging
from tunesmith.train.distributed import end_process, shutdown_distributed
from tunesmith.train.objectives.head import LinearCrossEntropy, vocab_shard


def vocab(result_path: str) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    torch.distributed.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(23, 16, generator=generator)
    weight = torch.randn(50, 16, generator=generator)  # 50 rows: 25 per rank, or uneven (17, 17, 16) on 3
    targets = torch.randint(0, 50, (23,), generator=generator)
    found: dict[str, float] = {}
    for chunk in (23, 5):
        h_full = hidden.clone().requires_grad_()
        w_full = weight.clone().requires_grad_()
        want = LinearCrossEntropy.apply(h_full, w_full, None, targets, chunk, True, torch.float32, None)
        want.backward()
        h = hidden.clone().requires_grad_()
        split = torch.nn.Parameter(distribute_tensor(weight.clone(), mesh, [Shard(0)]))
        local, shard = vocab_shard(split)
        got = LinearCrossEntropy.apply(h, local, None, targets, chunk, True, torch.float32, shard)
        got.backward()
        rows = slice(shard.start, shard.start + shard.size)
        stats = [abs(float(got - want)), float((h.grad - h_full.grad).abs().max()),
                 float((split.grad.to_local() - w_full.grad[rows]).abs().max())]
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, stats)
        found.update({f"chunk{chunk}_loss": max(s[0] for s in gathered), f"chunk{chunk}_hidden": max(s[1] for s in gathered),
                      f"chunk{chunk}_weight": max(s[2] for s in gathered), "loss": float(want)})
    if torch.distributed.get_rank() == 0:
        with open(result_path, "w", encoding="utf-8") as handle:
            json.dump(found, handle)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    setup_logging()
    if sys.argv[1] == "vocab":
        vocab(sys.argv[2])
    else:
        pairs = dict(arg.split("=", 1) for arg in sys.argv[4:])
        train(sys.argv[2], sys.argv[3], {k: parse_value(v) for k, v in pairs.items()})
        shutdown_distributed()
    end_process(0)  # a rank of a multi-rank job exits here (see end_process)
