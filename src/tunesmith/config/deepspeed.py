"""The DeepSpeed config of ``engine: deepspeed``: a preset or a ds_config.json, with its ``"auto"`` values
filled.

``deepspeed: ds_z3`` names a preset shipped in ``tunesmith/resources/deepspeed/`` (``ds_z0`` …
``ds_z3_offload``); anything else is a JSON file, as in LLaMA-Factory and the HF Trainer (``deepspeed:
path/to/ds_config.json``), or an inline mapping in the YAML. The tunesmith config stays the single source of
truth for everything it has a key for, exactly as the HF Trainer treats ``"auto"``:

* ``"auto"`` is replaced by the tunesmith value (batch sizes, accumulation, clipping, AdamW hyper-parameters,
  scheduler parameters, fp16/bf16, and the ZeRO bucket sizes derived from the model's hidden size);
* an explicit value that contradicts the tunesmith config is an error naming both keys (never a silent
  choice);
* a section the file leaves out is added with the tunesmith values (gradient clipping, fp16/bf16, the
  optimizer), so a 3-line ``{"zero_optimization": {"stage": 2}}`` trains exactly like the other engines.

The learning rate always follows tunesmith's schedule (``lr_scheduler_type``, warm-up), stepped by the loop
on every engine, so runs compare one to one. The file's ``scheduler`` section is checked and then left out of
what DeepSpeed receives: its WarmupDecayLR / WarmupLR / WarmupCosineLR are the linear / constant_with_warmup /
cosine schedules, except that DeepSpeed warms up logarithmically by default where tunesmith (and HF) warm up
linearly.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from tunesmith.errors import ConfigError, short_repr
from tunesmith.jsonfile import read_json_object

PRESETS = ("ds_z0", "ds_z1", "ds_z2", "ds_z2_offload", "ds_z3", "ds_z3_offload")
DEFAULT_PRESET = "ds_z2"
AUTO = "auto"
# DeepSpeed's scheduler types and the tunesmith lr_scheduler_type each one stands for.
SCHEDULER_EQUIVALENT = {
    "WarmupDecayLR": ("linear",),
    "WarmupLR": ("constant", "constant_with_warmup"),
    "WarmupCosineLR": ("cosine",),
}
ADAM_TYPES = ("adam", "adamw")


@dataclass(frozen=True)
class RunValues:
    """The tunesmith side of every ``"auto"``: the config's values plus what the run derives from them."""

    micro_batch: int
    accumulation: int
    world_size: int
    max_grad_norm: float
    learning_rate: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    lr_scheduler_type: str
    warmup_steps: int
    total_steps: int
    precision: str  # fp32 | bf16 | fp16, as resolved for the device
    hidden_size: int | None
    on_cpu: bool


@dataclass
class ResolvedConfig:
    """``for_deepspeed``: what ``deepspeed.initialize`` receives; ``full``: the filled file, scheduler
    included."""

    for_deepspeed: dict[str, Any]
    full: dict[str, Any]
    source: str
    warnings: list[str] = field(default_factory=list)  # for the user, logged once (rank 0) by the engine
    notes: list[str] = field(default_factory=list)

    @property
    def stage(self) -> int:
        return int(self.for_deepspeed.get("zero_optimization", {}).get("stage", 0))

    @property
    def offload_optimizer(self) -> bool:
        return _offload_device(self.for_deepspeed, "offload_optimizer") is not None


def read_ds_config(value: str | dict[str, Any] | None) -> tuple[dict[str, Any], str]:
    """The raw config and where it came from: an inline mapping, a preset name, or a JSON file."""
    if value is None:
        value = DEFAULT_PRESET
    if isinstance(value, dict):
        return copy.deepcopy(value), "the inline deepspeed mapping"
    if value in PRESETS:
        text = (resources.files("tunesmith") / "resources" / "deepspeed" / f"{value}.json").read_text("utf-8")
        return json.loads(text), f"preset {value}"
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"deepspeed: {value} is neither a file nor a preset; use a ds_config.json path or one of "
            f"{', '.join(PRESETS)}"
        )
    data = read_json_object(path, ConfigError, "fix the file", prefix="deepspeed: ")
    check_sections(data, f"deepspeed: {path}")
    return data, str(path)


# Sections of an inline DeepSpeed mapping that DeepSpeed (and tunesmith's resolution of "auto") read as mappings.
_DS_MAPPINGS = (
    "zero_optimization",
    "zero_optimization.offload_optimizer",
    "zero_optimization.offload_param",
    "optimizer",
    "optimizer.params",
    "scheduler",
    "scheduler.params",
    "fp16",
    "bf16",
    "bfloat16",
)


def check_sections(value: Any, loc: str) -> None:
    """A DeepSpeed config (inline mapping or JSON file, at ``loc``) whose sections are not mappings
    (``zero_optimization: 3``) would fail deep inside the engine or the memory planner; name the section instead."""
    if not isinstance(value, dict):
        return
    for dotted in _DS_MAPPINGS:
        node: Any = value
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None and not isinstance(node, dict):
            example = {"zero_optimization": "{stage: 3}"}.get(dotted, "{device: cpu}" if "offload" in dotted else "{...}")
            for part in reversed(dotted.split(".")):
                example = f"{{{part}: {example}}}"
            raise ConfigError(
                f"{loc}: deepspeed.{dotted} is {short_repr(node)}, not a mapping; write it as a mapping, e.g. "
                f"deepspeed: {example}"
            )



def zero_stage(value: str | dict[str, Any] | None) -> int | None:
    """The ZeRO stage a deepspeed value (preset, file or mapping) asks for; None when it is not a number."""
    raw, _ = read_ds_config(value)
    stage = (raw.get("zero_optimization") or {}).get("stage", 0)
    return stage if isinstance(stage, int) else None


def _get(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(config: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool):
        return bool(a) == bool(b)
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return a == b


def _offload_device(config: dict[str, Any], key: str) -> str | None:
    device = _get(config, f"zero_optimization.{key}.device")
    return None if device in (None, "none") else str(device)


def _auto_table(run: RunValues) -> list[tuple[str, Any, str | None]]:
    """(DeepSpeed key, tunesmith value, tunesmith key it must agree with; None: derived, never compared)."""
    hidden = run.hidden_size
    return [
        ("train_micro_batch_size_per_gpu", run.micro_batch, "per_device_train_batch_size"),
        ("gradient_accumulation_steps", run.accumulation, "gradient_accumulation_steps"),
        (
            "train_batch_size",
            run.micro_batch * run.accumulation * run.world_size,
            "per_device_train_batch_size × gradient_accumulation_steps × ranks",
        ),
        ("gradient_clipping", run.max_grad_norm, "max_grad_norm"),
        ("optimizer.params.lr", run.learning_rate, "learning_rate"),
        ("optimizer.params.betas", list(run.betas), "adam_beta1, adam_beta2"),
        ("optimizer.params.eps", run.eps, "adam_epsilon"),
        ("optimizer.params.weight_decay", run.weight_decay, "weight_decay"),
        ("scheduler.params.warmup_min_lr", 0.0, "the schedule's warm-up start (always 0)"),
        ("scheduler.params.warmup_max_lr", run.learning_rate, "learning_rate"),
        ("scheduler.params.warmup_num_steps", run.warmup_steps, "warmup_steps / warmup_ratio"),
        ("scheduler.params.total_num_steps", run.total_steps, "max_steps / num_train_epochs"),
        ("fp16.enabled", run.precision == "fp16", "fp16"),
        ("bf16.enabled", run.precision == "bf16", "bf16"),
        ("bfloat16.enabled", run.precision == "bf16", "bf16"),
        # the HF Trainer's choices for the bucket sizes, from the model's width
        ("zero_optimization.reduce_bucket_size", hidden * hidden if hidden else None, None),
        (
            "zero_optimization.stage3_prefetch_bucket_size",
            int(0.9 * hidden * hidden) if hidden else None,
            None,
        ),
        ("zero_optimization.stage3_param_persistence_threshold", 10 * hidden if hidden else None, None),
    ]


def resolve_ds_config(value: str | dict[str, Any] | None, run: RunValues) -> ResolvedConfig:
    """Read the config (see :func:`read_ds_config`), fill ``"auto"``, check explicit values, add what is
    missing."""
    raw, source = read_ds_config(value)
    full = copy.deepcopy(raw)
    mismatches = []
    for key, ours, tunesmith_key in _auto_table(run):
        theirs = _get(full, key)
        if theirs == AUTO:
            if ours is None:
                raise ConfigError(
                    f'deepspeed ({source}): {key} is "auto" but the model has no hidden_size; set it'
                )
            _set(full, key, ours)
        elif theirs is not None and tunesmith_key is not None and not _same(theirs, ours):
            mismatches.append(f"{key}={theirs!r} but {tunesmith_key} gives {ours!r}")
    if mismatches:
        raise ConfigError(
            f"deepspeed ({source}) contradicts the tunesmith config: {'; '.join(mismatches)}; set these to "
            '"auto" (tunesmith fills them) or change the tunesmith keys'
        )
    _add_missing(full, run)
    warnings, notes = _check(full, source, run)

    if _get(full, "zero_optimization.round_robin_gradients"):
        # DeepSpeed 0.19 then maps parameters to the wrong fp32 slices in its tensor-fragment API (without
        # padding it links them in the original order, not the round-robin one), so safe_get_full_fp32_param
        # returns other parameters' values: world-size-free checkpoints would be wrong. Training itself is
        # unaffected.
        notes.append(
            f"deepspeed ({source}): round_robin_gradients turned off (with it DeepSpeed 0.19 reads wrong "
            "weights back for tunesmith's checkpoints; it only speeds up offloaded gradient copies)"
        )
        full["zero_optimization"]["round_robin_gradients"] = False
    for_deepspeed = {k: v for k, v in full.items() if k != "scheduler"}
    if "bfloat16" in for_deepspeed and "bf16" in for_deepspeed:
        for_deepspeed.pop("bfloat16")  # an old alias of "bf16"; DeepSpeed refuses both at once
    optimizer_params = for_deepspeed["optimizer"].setdefault("params", {})
    if run.on_cpu and _offload_device(full, "offload_optimizer") is None:
        # DeepSpeed's default Adam without offload is FusedAdam, a GPU kernel whose CPU build compiles a C++
        # op and keeps its step count elsewhere; torch's AdamW is the same update (and the other engines'
        # optimizer).
        optimizer_params.setdefault("torch_adam", True)
    return ResolvedConfig(
        for_deepspeed=for_deepspeed, full=full, source=source, warnings=warnings, notes=notes
    )


def _add_missing(config: dict[str, Any], run: RunValues) -> None:
    """Sections the file leaves out get the tunesmith values, so every engine trains the same way."""
    for key, value in (
        ("train_micro_batch_size_per_gpu", run.micro_batch),
        ("gradient_accumulation_steps", run.accumulation),
        ("train_batch_size", run.micro_batch * run.accumulation * run.world_size),
        ("gradient_clipping", run.max_grad_norm),
    ):
        config.setdefault(key, value)
    if "bf16" not in config and "bfloat16" not in config:
        config["bf16"] = {"enabled": run.precision == "bf16"}
    if "fp16" not in config:
        config["fp16"] = {"enabled": run.precision == "fp16"}
    optimizer = config.setdefault("optimizer", {"type": "AdamW"})
    params = optimizer.setdefault("params", {})
    for key, value in (
        ("lr", run.learning_rate),
        ("betas", list(run.betas)),
        ("eps", run.eps),
        ("weight_decay", run.weight_decay),
    ):
        params.setdefault(key, value)


def _check(config: dict[str, Any], source: str, run: RunValues) -> tuple[list[str], list[str]]:
    """Refuse what tunesmith does not handle; (warnings, notes) where DeepSpeed would silently ignore a
    setting or tunesmith replaces it."""
    warnings: list[str] = []
    notes: list[str] = []
    stage = _get(config, "zero_optimization.stage") or 0
    if stage not in (0, 1, 2, 3):
        raise ConfigError(
            f"deepspeed ({source}): zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}"
        )
    kind = str(_get(config, "optimizer.type") or "").lower()
    if kind not in ADAM_TYPES:
        raise ConfigError(
            f"deepspeed ({source}): optimizer type {_get(config, 'optimizer.type')!r} is not supported; "
            "tunesmith trains with AdamW (type Adam or AdamW), whose state its checkpoints carry across "
            "engines"
        )
    for key in ("offload_optimizer", "offload_param"):
        device = _offload_device(config, key)
        if device not in (None, "cpu"):
            raise ConfigError(
                f"deepspeed ({source}): zero_optimization.{key}.device={device} is not supported yet; use cpu"
            )
    if _offload_device(config, "offload_param") and stage != 3:
        warnings.append(
            f"deepspeed ({source}): offload_param only applies to ZeRO stage 3; DeepSpeed ignores it at "
            f"stage {stage} (offload_optimizer still moves the optimizer state to the CPU)"
        )
    if _offload_device(config, "offload_optimizer") and stage == 0:
        raise ConfigError(f"deepspeed ({source}): offload_optimizer needs ZeRO stage 1, 2 or 3, not stage 0")
    if _get(config, "bf16.enabled") and _get(config, "fp16.enabled"):
        raise ConfigError(f"deepspeed ({source}): bf16 and fp16 are both enabled; choose one")
    scheduler = config.get("scheduler")
    if isinstance(scheduler, dict):
        kind = str(scheduler.get("type"))
        equivalent = SCHEDULER_EQUIVALENT.get(kind)
        message = (
            f"deepspeed ({source}): the lr follows tunesmith's lr_scheduler_type={run.lr_scheduler_type} on "
            f"every engine (warm-up linear, as in HF); the file's scheduler {kind} is not passed to DeepSpeed"
        )
        if equivalent is None or run.lr_scheduler_type not in equivalent:
            warnings.append(f"{message}; set lr_scheduler_type to choose the schedule")
        else:
            notes.append(message)
    return warnings, notes
