"""From a tunesmith config to a plan: ``plan_config`` (``tunesmith plan``, ``tunesmith train --dry-run``) and
``preflight`` (the warnings ``tunesmith train`` logs before an obvious out-of-memory)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from tunesmith.config.speed import DEFAULT_LOSS_CHUNK
from tunesmith.errors import ConfigError
from tunesmith.logging import get_logger
from tunesmith.plan.arch import ArchFacts, builtin_table, facts_for_model
from tunesmith.plan.hardware import GIB, DeviceSpec, available_ram_bytes, host_ram_bytes, parse_gpus
from tunesmith.plan.memory import Setup, estimate
from tunesmith.plan.report import (
    DEFAULT_MFU,
    Change,
    PlanReport,
    WhatIf,
    fits,
    flops_per_token,
    tokens_per_second,
)

if TYPE_CHECKING:
    from tunesmith.config.schema import Config

log = get_logger("plan")


# -------------------------------------------------------------------------------------------- config → setup


def ds_settings(value: str | dict[str, Any] | None, hidden_size: int) -> dict[str, Any]:
    """ZeRO stage, offload and bucket sizes of a preset, a ds_config.json or an inline mapping ("auto" sizes as
    tunesmith fills them: reduce bucket = hidden², as the HF Trainer does)."""
    from tunesmith.config.deepspeed import read_ds_config

    raw, _ = read_ds_config(value)
    zero = raw.get("zero_optimization") or {}
    stage = int(zero.get("stage") or 0)

    def size(key: str, default: float) -> float:
        got = zero.get(key, default)
        return float(hidden_size * hidden_size) if got == "auto" else float(got)

    def offload(key: str) -> bool:
        device = (zero.get(key) or {}).get("device")
        return device not in (None, "none")

    return {
        "zero_stage": stage,
        "offload_optimizer": offload("offload_optimizer"),
        "offload_param": offload("offload_param"),
        "reduce_bucket": size("reduce_bucket_size", 5e8),
        "allgather_bucket": size("allgather_bucket_size", 5e8),
        "overlap_comm": bool(zero.get("overlap_comm", stage == 3)),  # DeepSpeed's default: on for ZeRO-3
        "max_live_params": size("stage3_max_live_parameters", 1e9),
    }


def resolve_arch(cfg: Config) -> ArchFacts:
    facts = facts_for_model(cfg.model_name_or_path, cfg.cache_dir)
    if facts is None:
        known = ", ".join(sorted(builtin_table()))
        raise ConfigError(
            f"cannot plan model_name_or_path {cfg.model_name_or_path!r}: it is not a local folder with a "
            f"config.json and not in the built-in table ({known}); point model_name_or_path at a model folder"
        )
    return facts


def setup_from_config(cfg: Config, arch: ArchFacts, world_size: int, ranks_per_node: int, device: str) -> Setup:
    precision = "bf16" if cfg.bf16 else ("fp16" if cfg.fp16 and device != "cpu" else "fp32")
    engine = cfg.resolved_engine(world_size)
    extra: dict[str, Any] = {}
    if engine == "deepspeed":
        extra = ds_settings(cfg.deepspeed, arch.hidden_size)
    return Setup(
        arch=arch,
        method=cfg.finetuning_type,
        quant_bits=cfg.quantization_bit,
        double_quant=cfg.double_quantization,
        lora_rank=cfg.lora_rank,
        lora_targets=cfg.lora_target,
        freeze_layers=cfg.freeze_trainable_layers,
        engine=engine,
        micro_batch=cfg.per_device_train_batch_size,
        rows_per_example=2 if cfg.stage in ("dpo", "rm", "kto") else 1,
        reference_copy=_keeps_reference_copy(cfg),
        seq_len=cfg.cutoff_len,
        accumulation=cfg.gradient_accumulation_steps,
        grad_ckpt=cfg.gradient_checkpointing,
        precision=precision,
        device=device,
        world_size=world_size,
        ranks_per_node=ranks_per_node,
        sp=cfg.sequence_parallel_size,
        tp=cfg.tensor_parallel_size,
        pp=cfg.pipeline_parallel_size,
        loss_chunk=cfg.resolved_chunk_size() if _fuses_the_loss(cfg) else 0,
        lean_activations=cfg.lean_activations and not cfg.torch_compile,
        **extra,
    )


def _fuses_the_loss(cfg: Config) -> bool:
    """Whether the stage's loss can be the fused chunked one: a plain sum of token cross entropies (sft without
    the weighted losses, pt); the others need the logits (train/objectives)."""
    weighted = cfg.use_dft_loss or cfg.use_eaft_loss or cfg.use_asft_loss
    return cfg.stage == "pt" or (cfg.stage == "sft" and not weighted)


def _keeps_reference_copy(cfg: Config) -> bool:
    """DPO and KTO compare with the initial model: a LoRA policy with its adapter off, else a frozen copy."""
    needs_reference = cfg.stage == "kto" or (cfg.stage == "dpo" and cfg.pref_loss not in ("orpo", "simpo"))
    return needs_reference and cfg.finetuning_type != "lora"


# ------------------------------------------------------------------------------------------- suggestions


CHUNK = DEFAULT_LOSS_CHUNK  # the chunk the planner proposes where a config turned the fused loss off


def candidate_changes(s: Setup, devices: DeviceSpec | None = None) -> list[Change]:
    """Single changes in order of cost: the chunked loss, checkpointing, smaller micro-batch (same global batch),
    sequence parallel (long rows), ZeRO stage up, tensor / pipeline parallel (when the weights do not fit even
    sharded), optimizer offload, parameter offload, LoRA, QLoRA. Changes the config would refuse are left out."""
    out = _activation_changes(s, devices)
    h = s.arch.hidden_size
    presets = {name: ds_settings(name, h) for name in ("ds_z1", "ds_z2", "ds_z3", "ds_z2_offload", "ds_z3_offload")}

    def zero(name: str, label: str) -> Change:
        return Change(label, ("engine=deepspeed", f"deepspeed={name}"),
                      s.with_changes(engine="deepspeed", **presets[name]))

    if s.world_size > 1:
        if not s.deepspeed or s.zero_stage < 2:
            out.append(zero("ds_z2", "ZeRO-2 (shard gradients and optimizer states)"))
        if not s.deepspeed or s.zero_stage < 3:
            out.append(zero("ds_z3", "ZeRO-3 (also shard the weights)"))
        sharded = s.with_changes(engine="deepspeed", sp=1, tp=1, pp=1, **presets["ds_z3"])
        if devices is not None and not fits(sharded, devices):  # the weights do not fit even sharded
            out += _mesh_change(s, devices, "tp") + _mesh_change(s, devices, "pp")
    if not s.offload_optimizer and not (s.deepspeed and s.zero_stage == 3):
        out.append(zero("ds_z2_offload", "ZeRO-2 + optimizer offload to CPU"))
    if not (s.deepspeed and s.zero_stage == 3 and s.offload_param):
        out.append(zero("ds_z3_offload", "ZeRO-3 + optimizer and parameter offload to CPU"))
    if s.method != "lora":
        out.append(Change("LoRA instead of " + s.method, ("finetuning_type=lora",),
                          s.with_changes(method="lora", engine=s.engine)))
    if not s.quant_bits:
        out.append(Change("QLoRA 4-bit", ("finetuning_type=lora", "quantization_bit=4"),
                          s.with_changes(method="lora", quant_bits=4)))
    return [change for change in out if mesh_allowed(change.setup)]


def _activation_changes(s: Setup, devices: DeviceSpec | None) -> list[Change]:
    """The changes that lower the activations and logits."""
    out: list[Change] = []
    tokens = s.micro_batch * s.rows_per_example * s.seq_len // s.sp
    if not s.loss_chunk and s.rows_per_example == 1 and tokens > CHUNK:
        out.append(Change(f"chunked loss ({CHUNK} tokens × vocab logits at a time)",
                          (f"loss_chunk_size={CHUNK}",), s.with_changes(loss_chunk=CHUNK)))
    if not s.grad_ckpt:
        out.append(Change("gradient checkpointing", ("gradient_checkpointing=true",), s.with_changes(grad_ckpt=True)))
    if s.micro_batch > 1:
        accumulation = s.accumulation * s.micro_batch
        out.append(Change(
            f"micro-batch 1 with accumulation {accumulation} (same global batch)",
            ("per_device_train_batch_size=1", f"gradient_accumulation_steps={accumulation}"),
            s.with_changes(micro_batch=1, accumulation=accumulation),
        ))
    if _activation_bound(s):
        out += _mesh_change(s, devices, "sp")
    return out


def _activation_bound(s: Setup) -> bool:
    """Activations and logits are the larger part of the peak: what sequence parallel divides."""
    b = estimate(s)
    return b.activation_total > b.model_states


MESH_KEYS = {"sp": "sequence_parallel_size", "tp": "tensor_parallel_size", "pp": "pipeline_parallel_size"}
MESH_LABELS = {
    "sp": "sequence parallel {n} (1/{n} of every row per rank)",
    "tp": "tensor parallel {n} (1/{n} of attention, MLP, vocab per rank)",
    "pp": "pipeline parallel {n} (1/{n} of the layers per rank)",
}


def _mesh_change(s: Setup, devices: DeviceSpec | None, dim: str) -> list[Change]:
    """One change of the mesh dimension ``dim``: the smallest size (2, 4, 8, ...) that fits, else the largest the
    model and the world allow. Tensor parallel stays inside a node on fsdp2's 2-D mesh (not in fp16), pipeline
    stages run on ddp."""
    sizes = []
    n = 2
    limit = s.ranks_per_node if dim == "tp" else s.world_size
    while n <= limit:
        engine = s.engine
        if dim == "pp":
            engine = "ddp"
        elif dim == "tp":
            engine = "fsdp2"  # the data-parallel dimension of tensor parallel's 2-D mesh
        elif s.deepspeed or engine == "single":
            engine = "fsdp2" if s.precision != "fp16" else "ddp"
        setup = s.with_changes(engine=engine, zero_stage=0, offload_optimizer=False, offload_param=False,
                               **{dim: n})
        if mesh_allowed(setup):
            sizes.append((n, setup))
        n *= 2
    if not sizes:
        return []
    n, setup = next(((n, x) for n, x in sizes if devices is not None and fits(x, devices)), sizes[-1])
    overrides = [f"{MESH_KEYS[dim]}={n}"]
    if setup.engine != s.engine:
        overrides.append(f"engine={setup.engine}")
    if s.deepspeed:
        overrides.append("deepspeed=null")
    return [Change(MESH_LABELS[dim].format(n=n), tuple(overrides), setup)]


def mesh_allowed(s: Setup) -> bool:
    """The mesh rules the config and the engines enforce (tunesmith.config.schema, tunesmith.train), mirrored so
    the planner never proposes a layout ``tunesmith train`` would refuse."""
    a = s.arch
    if s.sp == s.tp == s.pp == 1:
        return True
    if s.deepspeed or s.rows_per_example != 1 or s.reference_copy or s.world_size % (s.sp * s.tp * s.pp):
        return False
    if s.engine == "fsdp2" and s.precision == "fp16":
        return False
    if a.num_heads % s.sp or a.num_heads % s.tp or a.num_kv_heads % s.tp:
        return False
    if s.tp > 1 and (s.sp > 1 or s.engine != "fsdp2" or s.quant_bits or a.intermediate_size % s.tp
                     or a.vocab_size % s.tp):
        return False
    if s.pp > 1:
        return (s.tp == s.sp == 1 and s.method == "full" and not s.quant_bits and s.engine == "ddp"
                and s.pp <= a.num_layers)
    return True


def find_suggestion(s: Setup, devices: DeviceSpec | None) -> tuple[Change | None, list[WhatIf]]:
    """The first single change that fits; if none does, the first cumulative one (each change on top of the
    previous)."""
    changes = candidate_changes(s, devices)
    what_ifs = []
    chosen = None
    for change in changes:
        verdict = fits(change.setup, devices)
        what_ifs.append(WhatIf(change.label, change.overrides, estimate(change.setup).peak, verdict))
        if verdict and chosen is None:
            chosen = change
    if chosen is None and devices is not None:
        current = s
        overrides: list[str] = []
        labels: list[str] = []
        for change in changes:
            # re-apply the change's differences on top of what was accumulated so far
            diff = {k: getattr(change.setup, k) for k in change.setup.__dataclass_fields__
                    if getattr(change.setup, k) != getattr(s, k)}
            if not mesh_allowed(current.with_changes(**diff)):
                continue  # e.g. ZeRO on top of sequence parallel: the config would refuse it
            current = current.with_changes(**diff)
            overrides = [o for o in overrides if o.split("=")[0] not in {c.split("=")[0] for c in change.overrides}]
            overrides += list(change.overrides)
            labels.append(change.label)
            if fits(current, devices):
                chosen = Change(" + ".join(labels), tuple(overrides), current)
                what_ifs.append(WhatIf(chosen.label, chosen.overrides, estimate(current).peak, True))
                break
    return chosen, what_ifs


# ------------------------------------------------------------------------------------------------ public


def _device_kind(cfg: Config) -> str:
    name = (cfg.device or "auto").strip().lower()
    if name.startswith("cpu"):
        return "cpu"
    return "npu" if name.startswith("npu") else "cuda"


def plan_config(
    cfg: Config,
    gpus: str | None = None,
    nodes: int | None = None,
    nproc_per_node: int | None = None,
    gpu_type: str | None = None,
    mfu: float = DEFAULT_MFU,
    devices: DeviceSpec | None = None,
) -> PlanReport:
    """Plan ``cfg`` on ``gpus`` (``4x24GB``: devices per node) × ``nodes``. Without ``gpus`` the devices are
    unknown (the verdict is None) unless the config pins ``device: cpu`` (then this machine's RAM)."""
    arch = resolve_arch(cfg)
    if devices is None and gpus:
        devices = parse_gpus(gpus, gpu_type)
    kind = devices.kind if devices is not None else _device_kind(cfg)
    if devices is None and kind == "cpu":
        devices = DeviceSpec(count=1, memory_bytes=host_ram_bytes(), kind="cpu", text="this machine")
    nodes = nodes or 1
    per_node = nproc_per_node or (devices.count if devices is not None and kind != "cpu" else 1)
    setup = setup_from_config(cfg, arch, per_node * nodes, per_node, kind)
    breakdown = estimate(setup)
    verdict = fits(setup, devices)
    report = PlanReport(
        model=str(cfg.model_name_or_path),
        setup=setup,
        breakdown=breakdown,
        devices=devices,
        nodes=nodes,
        fits=verdict,
        mfu=mfu,
        flops_per_token=flops_per_token(setup),
        tokens_per_s=tokens_per_second(setup, devices, mfu),
    )
    if verdict is False:
        chosen, what_ifs = find_suggestion(setup, devices)
        report.what_ifs = what_ifs
        if chosen is not None:
            report.suggestion = " ".join(chosen.overrides)
            report.suggestion_label = chosen.label
    if devices is not None and devices.accelerator and gpus and not gpu_type and kind != "cpu":
        report.notes.append(f"throughput assumes {devices.accelerator.name} (set --gpu-type to change)")
    if setup.deepspeed and (setup.offload_optimizer or setup.offload_param) and report.tokens_per_s:
        report.notes.append("with CPU offload the step is often bound by the host's Adam and PCIe copies, not "
                            "by FLOPs: expect less than the tokens/s above")
    split = setup.sp * setup.tp * setup.pp
    if setup.world_size % split:
        report.notes.append(f"sequence × tensor × pipeline parallel = {split} does not divide the {setup.world_size} "
                            f"rank(s) planned: the launch would refuse it; plan a multiple of {split} (--gpus, "
                            "--nodes, --nproc-per-node)")
    if setup.quant_bits and setup.deepspeed:
        report.notes.append("QLoRA with DeepSpeed: the quantized base is not sharded; only the adapters are")
    return report


def local_devices(device: Any, world_size: int) -> DeviceSpec | None:
    """The memory of this machine's ``device`` (a torch device): GPU/NPU memory, or available RAM on CPU."""
    kind = getattr(device, "type", str(device))
    if kind == "cuda":
        import torch

        index = device.index if getattr(device, "index", None) is not None else torch.cuda.current_device()
        total = float(torch.cuda.get_device_properties(index).total_memory)
        return DeviceSpec(count=max(torch.cuda.device_count(), 1), memory_bytes=total, kind="cuda")
    if kind == "npu":
        import torch

        total = float(torch.npu.get_device_properties(device).total_memory)  # type: ignore[attr-defined]
        return DeviceSpec(count=1, memory_bytes=total, kind="npu")
    if kind == "cpu":
        return DeviceSpec(count=1, memory_bytes=available_ram_bytes() or host_ram_bytes(), kind="cpu")
    return None


def preflight(cfg: Config, world_size: int, device: Any) -> list[str]:
    """Warnings when the plan says this run will obviously run out of memory on this machine (the device's
    memory, or the RAM the ranks of a CPU node share). Fast, and never raises: [] when facts are missing."""
    try:
        arch = facts_for_model(cfg.model_name_or_path, cfg.cache_dir)
        if arch is None:
            return []
        devices = local_devices(device, world_size)
        if devices is None or not devices.memory_bytes:
            return []
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE") or world_size or 1)
        setup = setup_from_config(cfg, arch, max(world_size, 1), per_node, devices.kind)
        peak = estimate(setup).peak
        need = peak * (per_node if devices.kind == "cpu" else 1)
        if need <= devices.memory_bytes:
            return []
        where = "RAM available" if devices.kind == "cpu" else f"{devices.kind} memory per device"
        message = (
            f"memory plan: this run needs about {need / GIB:.1f} GiB but {where} is {devices.memory_bytes / GIB:.1f}"
            " GiB; it will likely run out of memory"
        )
        chosen, _ = find_suggestion(setup, devices)
        if chosen is not None:
            message += f"; the cheapest change that fits: {chosen.label} ({' '.join(chosen.overrides)})"
        return [message + " (tunesmith plan CONFIG shows the breakdown)"]
    except Exception as err:  # noqa: BLE001 - a preflight must never stop a run
        log.debug("memory preflight skipped: %s", err)
        return []
