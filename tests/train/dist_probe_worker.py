"""A worker for the distributed tests: load a checkpoint exactly as ``fit`` does (any engine, DeepSpeed included),
dump the full (unsharded) model and optimizer state plus the data position from rank 0, then continue the run with
``train(cfg)``.

    python -m torch.distributed.run --nproc-per-node 3 dist_probe_worker.py CONFIG DUMP [key=value ...]
    python dist_probe_worker.py CONFIG DUMP [key=value ...]                 (one process)

``CONFIG`` must set ``resume_from_checkpoint``. The dump is keyed by parameter name, so dumps taken on different
world sizes (and engines) compare directly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from tunesmith.config import load_config
from tunesmith.logging import setup_logging
from tunesmith.model.adapt import apply_finetuning
from tunesmith.model.load import load_model
from tunesmith.train import train
from tunesmith.train.distributed import end_process, shutdown_distributed
from tunesmith.train.engines import create_engine
from tunesmith.train.optim import build_scheduler


def probe(cfg, dump: Path) -> None:
    engine = create_engine(cfg, torch.device("cpu"))
    torch.manual_seed(cfg.seed)
    model = apply_finetuning(load_model(cfg.model_name_or_path, dtype=torch.float32), cfg)
    engine.setup(model, cfg, cfg.max_steps)
    model, optimizer = engine.model, engine.optimizer
    scheduler = build_scheduler(optimizer, cfg, cfg.max_steps)
    state = engine.load_checkpoint(Path(cfg.resume_from_checkpoint), scheduler)
    if engine.name == "deepspeed":
        model_sd, optim_sd = deepspeed_state(engine)
    else:
        if engine.comm.world_size == 1 and engine.name == "single":
            options = StateDictOptions(ignore_frozen_params=True)  # no process group: nothing to gather
        else:
            options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    if engine.comm.is_main:
        torch.save(
            {
                "model": {k: v.detach().clone() for k, v in model_sd.items()},
                "optimizer": optim_sd,
                "scheduler": scheduler.state_dict(),
                "epoch": state.epoch,
                "sample_index": state.samples_consumed(),
                "world_size": engine.comm.world_size,
            },
            dump,
        )


def deepspeed_state(engine) -> tuple[dict, dict]:
    """Whole weights and Adam state by parameter name out of ZeRO's partitions (a collective), in the layout of
    torch's get_state_dict, so dumps of every engine compare directly."""
    from tunesmith.train import zero_state

    zero_state.link_optimizer_fragments(engine.model.optimizer)
    step = torch.tensor(float(zero_state.step_count(engine.optimizer)))
    model_sd, state = {}, {}
    for name, param in zero_state.trainable(engine.model.module):
        model_sd[name] = zero_state.get_full(param, engine.optimizer).cpu()
        moments = {key: zero_state.get_full(param, engine.optimizer, key).cpu() for key in zero_state.MOMENTS}
        state[name] = {"step": step, **moments}
    return model_sd, {"state": state}


if __name__ == "__main__":
    setup_logging()
    config = load_config(sys.argv[1], sys.argv[3:])
    probe(config, Path(sys.argv[2]))
    train(config)
    shutdown_distributed()
    end_process(0)  # a rank of a multi-rank job exits here (see end_process)
