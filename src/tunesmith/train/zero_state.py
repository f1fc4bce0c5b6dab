"""A DeepSpeed engine's training state by parameter name, independent of the world size and the ZeRO stage.

ZeRO keeps its fp32 master weights and Adam moments in flat partitions (one slice of every parameter group
per rank), so DeepSpeed's own checkpoint only loads on the same number of ranks. DeepSpeed's tensor-fragment
API (``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state`` and their ``safe_set`` twins) reads and
writes one whole parameter at a time, whatever the stage and offload. Through it this module writes a
checkpoint's ``dcp/`` folder in the layout FSDP2's ``get_state_dict`` produces::

    model.<name>                         fp32 master weight
    optimizer.state.<name>.step          Adam step count (a float tensor, as torch.optim.AdamW keeps it)
    optimizer.state.<name>.exp_avg       first moment
    optimizer.state.<name>.exp_avg_sq    second moment

for the trainable parameters only (the frozen base comes from ``model_name_or_path``), so a ZeRO checkpoint
resumes with DeepSpeed on any number of ranks and with fsdp2, ddp or one process, and DeepSpeed resumes
fsdp2's. The collectives run parameter by parameter, in the same order on every rank; each rank writes every
``world_size``-th parameter, so no rank writes (or holds for writing) more than its share.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from tunesmith.errors import TunesmithError

MOMENTS = ("exp_avg", "exp_avg_sq")
MASTER_ATTR = "_tunesmith_fp32_master"  # on a ZeRO-0 half-precision parameter: its fp32 copy the optimizer steps
# how many bytes of full tensors one load round reads onto every rank (weights + moments, fp32)
LOAD_CHUNK_BYTES = 1 << 30


def trainable(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, param) for name, param in module.named_parameters() if param.requires_grad]


def full_shape(param: torch.nn.Parameter) -> torch.Size:
    """ZeRO-3 empties ``param.data`` between uses; ``ds_shape`` keeps the real shape."""
    return getattr(param, "ds_shape", None) or param.shape


def zero_managed(param: torch.nn.Parameter) -> bool:
    """ZeRO-3 parameters carry ``ds_id``; ZeRO-1/2 (and bf16) ones a ``_hp_mapping`` to their fp32 fragment.
    Plain ZeRO-0 fp32 parameters are their own master weights, with torch's optimizer state keyed by the
    parameter."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def get_full(
    param: torch.nn.Parameter, optimizer: torch.optim.Optimizer, key: str | None = None
) -> torch.Tensor:
    """The whole fp32 weight (``key`` None) or Adam moment of ``param``, on every rank (a collective under
    ZeRO)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if zero_managed(param):
        value = safe_get_full_fp32_param(param) if key is None else safe_get_full_optimizer_state(param, key)
    else:  # plain ZeRO-0: the fp32 master (a bf16 run's separate copy, see link_optimizer_fragments) holds the state
        master = getattr(param, MASTER_ATTR, param)
        value = master.detach() if key is None else optimizer.state[master][key]
    if value is None:
        raise TunesmithError(f"DeepSpeed holds no {key or 'fp32 weight'} for a trainable parameter")
    return value.detach().float().reshape(full_shape(param))


def set_full(
    param: torch.nn.Parameter, optimizer: torch.optim.Optimizer, value: torch.Tensor, key: str | None = None
) -> None:
    """Write a whole weight / moment into this rank's part of ``param`` (every rank passes the same value)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if not zero_managed(param):
        master = getattr(param, MASTER_ATTR, param)
        target = master.data if key is None else optimizer.state[master][key]
        target.copy_(value.to(target.device, target.dtype))
        if key is None and master is not param:  # the module's bf16 copy follows its master
            param.data.copy_(value.to(param.data.device, param.dtype))
        return
    value = value.to(torch.float32)
    if key is not None:
        safe_set_full_optimizer_state(param, value, key)
        return
    safe_set_full_fp32_param(param, value)  # the fp32 master; the module's own (maybe bf16) copy follows
    if hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            param.data.copy_(value.to(param.data.device, param.dtype))  # re-partitioned on exit
    else:  # ZeRO-1/2 keep the whole module copy on every rank
        param.data.copy_(value.to(param.data.device, param.dtype))


def link_optimizer_fragments(wrapper: object) -> None:
    """Point every ZeRO-1/2 (and bf16) parameter at its slice of the Adam moments.

    DeepSpeed links these views once, right after stepping the *first* parameter group, when the other
    groups have no optimizer state yet (0.19: ``_optimizer_step`` runs per group), so parameters of
    tunesmith's second group (no weight decay) would never find their moments. Relinking once the state exists
    is idempotent: the views alias the optimizer's own tensors, which Adam updates in place."""
    # ZeRO-0 with bf16 / fp16 (DeepSpeed's unfused fp16 optimizer): the torch optimizer steps fp32 copies of the
    # module's half-precision parameters, and keys its state by those copies
    for low, high in zip(getattr(wrapper, "fp16_groups", []), getattr(wrapper, "fp32_groups", []), strict=False):
        for param, master in zip(low, high, strict=True):
            setattr(param, MASTER_ATTR, master)
    relink = getattr(wrapper, "_lazy_init_hp_params_optimizer_state", None)
    if relink is None or not hasattr(wrapper, "_hp_optimizer_states_linked"):
        return  # ZeRO-3 (reads its flat partitions directly) or plain ZeRO-0
    wrapper._hp_optimizer_states_linked = False
    relink()


def step_count(optimizer: torch.optim.Optimizer) -> int:
    """Adam's step count: every parameter (flat partition) steps together, so any state entry tells it."""
    for state in optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def set_step_count(optimizer: torch.optim.Optimizer, step: int) -> None:
    """Keep each optimizer's own type for the count (torch: a float tensor; DeepSpeed's CPU Adam: an int)."""
    for state in optimizer.state.values():
        if "step" in state:
            old = state["step"]
            state["step"] = torch.full_like(old, step) if torch.is_tensor(old) else type(old)(step)
    for group in optimizer.param_groups:
        if "step" in group:
            group["step"] = step


def save_state(
    directory: Path,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rank: int,
    world_size: int,
    gather_weights_on_main: bool,
) -> dict[str, torch.Tensor]:
    """Write ``directory`` (DCP; a collective) and return the full trainable fp32 weights on rank 0 when asked
    (for the consolidated HF/PEFT copy), an empty dict elsewhere."""
    import torch.distributed.checkpoint as dcp

    step = torch.tensor(float(step_count(optimizer)))
    weights: dict[str, torch.Tensor] = {}
    states: dict[str, dict[str, torch.Tensor]] = {}
    gathered: dict[str, torch.Tensor] = {}
    for index, (name, param) in enumerate(trainable(module)):
        weight = get_full(param, optimizer)
        moments = {key: get_full(param, optimizer, key) for key in MOMENTS}
        if index % world_size == rank:
            weights[name] = weight.cpu().clone()
            states[name] = {"step": step.clone(), **{k: v.cpu().clone() for k, v in moments.items()}}
        if gather_weights_on_main and rank == 0:
            gathered[name] = weight.cpu().clone()
    dcp.save({"model": weights, "optimizer": {"state": states}}, checkpoint_id=str(directory))
    return gathered


def gather_weights(
    module: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int
) -> dict[str, torch.Tensor]:
    """The full trainable fp32 weights on rank 0 (a collective; no moments, nothing written)."""
    gathered = {}
    for name, param in trainable(module):
        weight = get_full(param, optimizer)
        if rank == 0:
            gathered[name] = weight.cpu().clone()
    return gathered


def _chunks(params: list[tuple[str, torch.nn.Parameter]]) -> Iterator[list[tuple[str, torch.nn.Parameter]]]:
    chunk: list[tuple[str, torch.nn.Parameter]] = []
    size = 0
    for name, param in params:
        chunk.append((name, param))
        size += 3 * 4 * full_shape(param).numel()
        if size >= LOAD_CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def load_state(directory: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Fill weights, Adam moments and step from a ``dcp/`` folder written by any engine on any world size.

    The optimizer state must exist first (see ``DeepSpeedEngine._materialize_optimizer_state``). Every rank
    reads the whole tensors of a chunk of parameters and keeps its part, chunk after chunk, so the peak extra
    memory stays near ``LOAD_CHUNK_BYTES``."""
    import torch.distributed.checkpoint as dcp

    step = None
    for chunk in _chunks(trainable(module)):
        wanted = {
            "model": {name: torch.empty(full_shape(param)) for name, param in chunk},
            "optimizer": {
                "state": {
                    name: {"step": torch.zeros(()), **{k: torch.empty(full_shape(param)) for k in MOMENTS}}
                    for name, param in chunk
                }
            },
        }
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*distributed.*", category=UserWarning)
            try:
                dcp.load(wanted, checkpoint_id=str(directory))
            except Exception as err:  # noqa: BLE001 - DCP raises CheckpointException, RuntimeError, KeyError
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise TunesmithError(
                    f"the sharded checkpoint {directory} does not match this run's trainable parameters "
                    f"({first}); resume with the same model and finetuning settings or use another output_dir"
                ) from None
        for name, param in chunk:
            set_full(param, optimizer, wanted["model"][name])
            state = wanted["optimizer"]["state"][name]
            for key in MOMENTS:
                set_full(param, optimizer, state[key], key)
            step = int(state["step"])
    if step is not None:
        set_step_count(optimizer, step)
