"""A plan: the breakdown of one setup, the verdict against the devices, the cheapest change that fits, and a
tokens/s estimate from FLOPs at a stated MFU."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tunesmith.config.parallel import format_mesh
from tunesmith.plan.hardware import GIB, DeviceSpec
from tunesmith.plan.memory import FITS_HEADROOM, Breakdown, Setup, estimate

DEFAULT_MFU = 0.40


@dataclass(frozen=True)
class Change:
    """A candidate change: what to write in the config, and the setup it gives."""

    label: str
    overrides: tuple[str, ...]
    setup: Setup


@dataclass
class WhatIf:
    label: str
    overrides: tuple[str, ...]
    peak: float
    fits: bool | None


@dataclass
class PlanReport:
    model: str
    setup: Setup
    breakdown: Breakdown
    devices: DeviceSpec | None
    nodes: int = 1
    fits: bool | None = None
    suggestion: str | None = None  # the cheapest change that fits, as config overrides (None: fits or nothing does)
    suggestion_label: str | None = None
    what_ifs: list[WhatIf] = field(default_factory=list)
    tokens_per_s: float | None = None
    flops_per_token: float = 0.0
    mfu: float = DEFAULT_MFU
    notes: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------------------------------ numbers

    @property
    def peak(self) -> float:
        return self.breakdown.peak

    @property
    def capacity(self) -> float | None:
        return self.devices.memory_bytes if self.devices else None

    def to_dict(self) -> dict[str, Any]:
        s, b = self.setup, self.breakdown
        return {
            "model": self.model,
            "arch": s.arch.to_dict(),
            "setup": {
                "method": _method(s),
                "engine": s.engine,
                "zero_stage": s.zero_stage if s.deepspeed else None,
                "offload_optimizer": s.offload_optimizer,
                "offload_param": s.offload_param,
                "micro_batch": s.micro_batch,
                "seq_len": s.seq_len,
                "accumulation": s.accumulation,
                "gradient_checkpointing": s.grad_ckpt,
                "precision": s.precision,
                "device": s.device,
                "world_size": s.world_size,
                "ranks_per_node": s.ranks_per_node,
                "mesh": s.mesh,
                "loss_chunk_size": s.loss_chunk,
            },
            "devices": None if self.devices is None else {
                "count_per_node": self.devices.count,
                "memory_bytes": self.devices.memory_bytes,
                "kind": self.devices.kind,
                "accelerator": self.devices.accelerator.name if self.devices.accelerator else None,
            },
            "nodes": self.nodes,
            "trainable_params": b.trainable,
            "bytes_per_device": {name: value for name, value in b.items()} | {
                "model_states": b.model_states,
                "quantization_constants": b.quant_constants,
                "peak": b.peak,
            },
            "host_bytes_per_node": b.host_per_node,
            "fits": self.fits,
            "suggestion": self.suggestion,
            "suggestion_label": self.suggestion_label,
            "what_if": [{"change": w.label, "overrides": list(w.overrides), "peak_bytes": w.peak, "fits": w.fits}
                        for w in self.what_ifs],
            "tokens_per_s": self.tokens_per_s,
            "flops_per_token": self.flops_per_token,
            "mfu": self.mfu,
            "notes": list(self.notes) + list(b.notes),
        }

    # ------------------------------------------------------------------------------------------ text

    def format(self) -> str:
        s, b = self.setup, self.breakdown
        arch = s.arch
        lines = [
            f"plan for {self.model}: {arch.total_params / 1e9:.3g} B parameters "
            f"({arch.num_layers} layers, hidden {arch.hidden_size}, vocab {arch.vocab_size}; {arch.source})",
            f"setup: {_method(s)}, {_engine(s)}, {s.world_size} rank(s) ({self.nodes} node(s) × "
            f"{s.ranks_per_node}), {s.precision}, micro-batch {s.micro_batch} × {s.seq_len} tokens, accumulation "
            f"{s.accumulation}, gradient checkpointing {'on' if s.grad_ckpt else 'off'}"
            + (f", chunked loss ({s.loss_chunk} tokens)" if s.loss_chunk else ""),
            *([f"mesh: {format_mesh(s.mesh)}{_mesh_words(s)}"] if s.world_size > 1 else []),
            f"trainable: {b.trainable:,} parameters",
            f"devices: {self.devices.describe() if self.devices else 'unknown (pass --gpus, e.g. 4x24GB)'}",
            "",
            f"{'per device':<34}{'GiB':>9}",
        ]
        for name, value in b.items():
            if value:
                extra = ""
                if name == "weights" and b.quant_constants:
                    extra = f"  (quantization constants {b.quant_constants / GIB:.2f})"
                lines.append(f"  {name:<32}{value / GIB:>9.2f}{extra}")
        lines.append(f"  {'model states (w + g + optimizer)':<32}{b.model_states / GIB:>9.2f}")
        cap = self.capacity
        usable = f"  of {cap * FITS_HEADROOM / GIB:.2f} usable" if cap else ""
        lines.append(f"  {'peak':<32}{b.peak / GIB:>9.2f}{usable}")
        if b.host_per_node:
            lines.append(f"host RAM per node: {b.host_per_node / GIB:.2f} GiB (offloaded states "
                         f"{b.host_offload / GIB:.2f}, model loading {b.host_load / GIB:.2f})")
        verdict = {True: "fits", False: "does NOT fit", None: "unknown (no device memory given)"}[self.fits]
        lines.append(f"verdict: {verdict}")
        if self.fits is False:
            if self.suggestion:
                lines.append(f"cheapest change that fits: {self.suggestion_label} ({self.suggestion})")
            else:
                lines.append("no single change tried makes it fit; use more or larger devices")
        if self.tokens_per_s:
            acc = self.devices.accelerator if self.devices else None
            lines.append(
                f"throughput: ~{self.tokens_per_s:,.0f} tokens/s ({self.flops_per_token / 1e9:.1f} GFLOPs/token; "
                f"{s.world_size} × {acc.name if acc else '?'} at {acc.peak_tflops if acc else 0:g} TFLOPS × "
                f"{self.mfu:.0%} MFU)"
            )
        if self.what_ifs:
            lines += ["", f"{'what if':<60}{'peak GiB':>9}  fits"]
            for w in self.what_ifs:
                mark = {True: "yes", False: "no", None: "?"}[w.fits]
                lines.append(f"  {w.label:<58}{w.peak / GIB:>9.2f}  {mark}")
        for note in [*self.notes, *b.notes]:
            lines.append(f"note: {note}")
        return "\n".join(lines)


def _mesh_words(s: Setup) -> str:
    """What each dimension of the mesh holds per rank, in words."""
    words = []
    if s.sp > 1:
        words.append(f"1/{s.sp} of every row's tokens")
    if s.tp > 1:
        words.append(f"1/{s.tp} of the attention, MLP and vocabulary")
    if s.pp > 1:
        words.append(f"1/{s.pp} of the layers")
    return f" (each rank: {', '.join(words)})" if words else ""


def _method(s: Setup) -> str:
    if s.method == "lora" and s.quant_bits:
        return f"QLoRA {s.quant_bits}-bit (r={s.lora_rank})"
    if s.method == "lora":
        return f"LoRA (r={s.lora_rank})"
    if s.method == "freeze":
        return f"freeze (last {s.freeze_layers} layers train)"
    return "full fine-tuning"


def _engine(s: Setup) -> str:
    if not s.deepspeed:
        return s.engine
    offload = [name for name, on in (("optimizer", s.offload_optimizer),
                                     ("param", s.offload_param and s.zero_stage == 3)) if on]
    return f"deepspeed ZeRO-{s.zero_stage}" + (f" + {' + '.join(offload)} offload" if offload else "")


# ---------------------------------------------------------------------------------------------- verdicts


def fits(setup: Setup, devices: DeviceSpec | None) -> bool | None:
    if devices is None or not devices.memory_bytes:
        return None
    peak = estimate(setup).peak
    if devices.kind == "cpu":  # the ranks of a node share its RAM
        return peak * setup.ranks_per_node <= devices.memory_bytes * FITS_HEADROOM
    return peak <= devices.memory_bytes * FITS_HEADROOM


def flops_per_token(s: Setup) -> float:
    """Training FLOPs per token: 6·N (forward 2N, backward 4N), 8·N with checkpointing (forward twice); LoRA
    and QLoRA skip the frozen weights' gradients: 4·N (6·N with checkpointing); plus causal attention."""
    n = s.arch.total_params
    if s.method == "lora":
        base = 4.0
    elif s.method == "freeze":
        base = 4.0 + 2.0 * min(abs(s.freeze_layers), s.arch.num_layers) / s.arch.num_layers
    else:
        base = 6.0
    passes = 4.0 if s.grad_ckpt else 3.0  # forward + backward (2×), + a recomputed forward
    attention = passes * 2.0 * s.arch.num_layers * s.seq_len * s.arch.num_heads * s.arch.head_dim
    return (base + (2.0 if s.grad_ckpt else 0.0)) * n + attention


def tokens_per_second(s: Setup, devices: DeviceSpec | None, mfu: float) -> float | None:
    """FLOPs-bound tokens/s; pipeline stages idle in 1F1B's bubble, (pp - 1) of (micro-batches + pp - 1) slots."""
    if devices is None or devices.accelerator is None or devices.kind == "cpu":
        return None
    micro = max(s.accumulation, 1)
    bubble = micro / (micro + s.pp - 1)
    return s.world_size * devices.accelerator.peak_tflops * 1e12 * mfu * bubble / flops_per_token(s)
