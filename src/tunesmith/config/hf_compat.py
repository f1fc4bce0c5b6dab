"""HF TrainingArguments and LLaMA-Factory keys that LLaMA-Factory's example configs set and that map onto
tunesmith's own (``use_cpu`` → device, ``disable_gradient_checkpointing`` → gradient_checkpointing, ``fsdp`` →
engine: fsdp2, …) or that say something about hardware this run may not have (``fp8``, ``use_v1_kernels``); a
section of :class:`~tunesmith.config.schema.Config`, which applies them (``_apply_hf_keys``)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from tunesmith.config.section import Section


class HFCompatArgs(Section):
    use_cpu: bool = Field(False, description="HF: train on the CPU even when an accelerator is there (device: cpu).")
    do_eval: bool | None = Field(
        None, description="HF: accepted; validation runs when there is a validation set (val_size or "
        "eval_dataset) and eval_strategy is steps. do_eval: false sets eval_strategy: no."
    )
    disable_gradient_checkpointing: bool | None = Field(
        None, description="LLaMA-Factory: the inverse of gradient_checkpointing (LLaMA-Factory checkpoints by "
        "default; tunesmith does not). Set: gradient_checkpointing = not this."
    )
    ddp_find_unused_parameters: bool | None = Field(
        None, description="HF: DDP looks for parameters without a gradient each step (slower; needed only when "
        "a forward can skip trainable parameters). Unset: false."
    )
    lr_scheduler_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Options of lr_scheduler_type (HF's): cosine_with_min_lr takes min_lr or min_lr_rate (and "
        "num_cycles), cosine_with_restarts num_cycles, polynomial lr_end and power.",
    )
    use_v1_kernels: bool = Field(
        False, description="LLaMA-Factory v1's fused CUDA / Ascend kernels; they need a GPU or NPU (refused on CPU)."
    )
    fp8: bool = Field(False, description="FP8 training (torchao / Transformer Engine on Hopper GPUs); refused here.")
    fp8_backend: str = Field("auto", description="With fp8: the FP8 backend (accepted with fp8: false only).")
    fp8_enable_fsdp_float8_all_gather: bool = Field(False, description="With fp8: FP8 all-gathers under FSDP.")
    fsdp: list[str] = Field(
        default_factory=list,
        description="HF's FSDP options (`full_shard auto_wrap` …): tunesmith's engine: fsdp2 shards every decoder "
        "layer, which is what full_shard with auto_wrap does; offload is not supported.",
    )
    fsdp_transformer_layer_cls_to_wrap: str | list[str] | None = Field(
        None, description="HF FSDP: the layer class to wrap; fsdp2 wraps the decoder layers whatever it says."
    )

    ray_num_workers: int | None = Field(
        None, ge=1, description="LLaMA-Factory's Ray launch: this many worker processes, one per device. tunesmith "
        "starts them with torchrun on this machine (as --nproc-per-node; the flag wins), without Ray; across "
        "machines use --nnodes, Slurm or Kubernetes."
    )

    @field_validator("fp8")
    @classmethod
    def _no_fp8_here(cls, value: bool) -> bool:
        if value:
            raise ValueError("fp8: true needs FP8 matrix units (Hopper-class GPUs) with torchao or Transformer "
                             "Engine, which this build does not drive; set fp8: false (bf16: true is the nearest)")
        return value

    @field_validator("fsdp", mode="before")
    @classmethod
    def _split_fsdp(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return ["full_shard", "auto_wrap"] if value else []
        return value.split() if isinstance(value, str) else value
