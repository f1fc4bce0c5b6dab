"""From a tunesmith config to a plan: ``plan_config`` (``tunesmith plan``, ``tunesmith train --dry-run``) and
``preflight`` (the warnings ``tunesmith train`` logs before an obvious out-of-memory)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

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
        **extra,
    )


def _keeps_reference_copy(cfg: Config) -> bool:
    """DPO and KTO compare with the initial model: a LoRA policy with its adapter off, else a frozen copy."""
    needs_reference = cfg.stage == "kto" or (cfg.stage == "dpo" and cfg.pref_loss not in ("orpo", "simpo"))
    return needs_reference and cfg.finetuning_type != "lora"


# ------------------------------------------------------------------------------------------- suggestions


def candidate_changes(s: Setup) -> list[Change]:
    """Single changes in order of cost: checkpointing, smaller micro-batch (same global batch), ZeRO stage up,
    optimizer offload, parameter offload, LoRA, QLoRA."""
    out: list[Change] = []
    if not s.grad_ckpt:
        out.append(Change("gradient checkpointing", ("gradient_checkpointing=true",), s.with_changes(grad_ckpt=True)))
    if s.micro_batch > 1:
        accumulation = s.accumulation * s.micro_batch
        out.append(Change(
            f"micro-batch 1 with accumulation {accumulation} (same global batch)",
            ("per_device_train_batch_size=1", f"gradient_accumulation_steps={accumulation}"),
            s.with_changes(micro_batch=1, accumulation=accumulation),
        ))
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
    return out


def find_suggestion(s: Setup, devices: DeviceSpec | None) -> tuple[Change | None, list[WhatIf]]:
    """The first single change that fits; if none does, the first cumulative one (each change on top of the
    previous)."""
    changes = candidate_changes(s)
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
