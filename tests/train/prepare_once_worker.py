"""A worker for tests/test_prepare_once.py: join the job with a short collective timeout, preprocess the data
through ``prepare_datasets_once`` while rank 0 takes ``DELAY`` seconds longer than that timeout (or fails), then
run one collective to show the group survived. Writes ``OUT/rank<R>.json``.

    torchrun --nproc-per-node 2 prepare_once_worker.py CONFIG OUT DELAY ok|fail [TIMEOUT_S]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

import tunesmith.data as data_module
from tunesmith.config import load_config
from tunesmith.errors import DataError, TunesmithError
from tunesmith.logging import setup_logging
from tunesmith.model.load import load_tokenizer
from tunesmith.train.distributed import (
    end_process,
    init_distributed,
    prepare_datasets_once,
    shutdown_distributed,
)

COLLECTIVE_TIMEOUT_S = 3


def main() -> int:
    config, out, delay, mode = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    timeout = int(sys.argv[5]) if len(sys.argv) > 5 else COLLECTIVE_TIMEOUT_S
    setup_logging()
    cfg = load_config(config)
    info = init_distributed(torch.device("cpu"), timeout)
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    calls: list[float] = []
    original = data_module._prepare

    def slow_prepare(cfg, tokenizer, template):  # the real preprocessing, slower on rank 0
        calls.append(time.monotonic())
        if info.rank == 0:
            time.sleep(delay)
            if mode == "fail":
                raise DataError("identity.json row 3 has no 'output' (test)")
        return original(cfg, tokenizer, template)

    data_module._prepare = slow_prepare
    start = time.monotonic()
    try:
        data = prepare_datasets_once(cfg, tokenizer, log_every_s=2)
    except TunesmithError as err:
        print(f"tunesmith: error (rank {info.rank}): {err}", file=sys.stderr, flush=True)
        return 2
    waited = time.monotonic() - start
    # a collective right after the long wait: it works, so no rank hit the 3 s timeout meanwhile
    counts = torch.tensor([len(data.train), len(calls)], dtype=torch.int64)
    gathered = [torch.zeros_like(counts) for _ in range(info.world_size)]
    torch.distributed.all_gather(gathered, counts)
    result = {
        "rank": info.rank,
        "preprocessed": len(calls),
        "train": len(data.train),
        "first_ids": list(data.train[0].input_ids),
        "waited_s": waited,
        "gathered": [g.tolist() for g in gathered],
    }
    (out / f"rank{info.rank}.json").write_text(json.dumps(result), encoding="utf-8")
    shutdown_distributed()
    return end_process(0)  # a rank of a multi-rank job exits here (see end_process)


if __name__ == "__main__":
    sys.exit(main())
