"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP): the ``dcp/`` folder of a checkpoint.

DCP stores every tensor with its global shape and the slices each rank wrote, so a checkpoint saved by N ranks
loads on M ranks (FSDP2-sharded or not) or in a plain single process: loading asks for the slices this process's
own parameters and optimizer states hold. Model and optimizer go through ``get_state_dict`` / ``set_state_dict``,
which key the optimizer state by parameter name (not by position), and which see through DDP and FSDP2 wrappers.

Only trainable parameters are stored: the frozen base of LoRA / freeze runs comes from ``model_name_or_path`` on
resume, exactly as in the single-process format.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from tunesmith.errors import TunesmithError

_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


def save_sharded(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the trainable parameters and their optimizer state (a collective)."""
    import torch.distributed.checkpoint as dcp

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(directory))


def load_sharded(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Fill ``model`` and ``optimizer`` from a DCP folder written on any number of ranks (a collective when a
    process group exists; a plain read in a single process)."""
    import torch.distributed.checkpoint as dcp

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    # Only the per-parameter state is read: the param groups (hyper-parameters) come from this run's config and
    # its lr from the scheduler, so folders written by another engine's optimizer load as well.
    wanted = {"model": model_sd, "optimizer": {"state": optim_sd["state"]}}
    with warnings.catch_warnings():
        # Without a process group DCP warns that it loads "without distributed": that is the point here.
        warnings.filterwarnings("ignore", message=".*distributed.*", category=UserWarning)
        try:
            dcp.load(wanted, checkpoint_id=str(directory))
        except Exception as err:  # noqa: BLE001 - DCP raises CheckpointException / RuntimeError / KeyError
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise TunesmithError(
                f"the sharded checkpoint {directory} does not match this run's trainable parameters ({first}); "
                "resume with the same model and finetuning settings or use another output_dir"
            ) from None
    loaded_optim = {"state": wanted["optimizer"]["state"], "param_groups": optim_sd["param_groups"]}
    set_state_dict(model, optimizer, model_state_dict=wanted["model"], optim_state_dict=loaded_optim, options=_OPTIONS)


def full_model_state_dict(model: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The unsharded weights on rank 0's CPU (an empty dict on the other ranks); a collective under FSDP2."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(model, options=options)
