"""Config keys that choose and tune the optimizer: HF's ``optim`` names and LLaMA-Factory's GaLore, APOLLO, BAdam,
Adam-mini, Muon, LoRA+ and pure_bf16 keys (LLaMA-Factory's names and defaults); a section of
:class:`~tunesmith.config.schema.Config`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tunesmith.config.section import Section

Optim = Literal[
    "adamw_torch", "adamw_torch_fused", "adamw_hf", "sgd", "adafactor", "adamw_8bit", "adamw_bnb_8bit",
    "paged_adamw_8bit", "paged_adamw_32bit", "lion_8bit", "lion_32bit", "paged_lion_8bit", "paged_lion_32bit",
]
# LLaMA-Factory's optimizer switches, in the order it checks them
SWITCHES = ("use_galore", "use_apollo", "loraplus_lr_ratio", "use_badam", "use_adam_mini", "use_muon")


class OptimizerArgs(Section):
    optim: Optim = Field(
        "adamw_torch",
        description="The optimizer (HF's names): adamw_torch (default; adamw_hf is the same: torch's AdamW, fused "
        "wherever torch has the kernel for the device, else multi-tensor), adamw_torch_fused (always fused), "
        "sgd, adafactor (torch's own); adamw_8bit / adamw_bnb_8bit, paged_adamw_8bit / 32bit, lion_8bit / 32bit, "
        "paged_lion_8bit / 32bit (bitsandbytes). GaLore uses it as its base: adamw_torch, an 8-bit AdamW or "
        "adafactor.",
    )
    pure_bf16: bool = Field(
        False, description="Train in bfloat16 without float32 master weights (the model is loaded in bfloat16 and "
        "the optimizer steps it directly); less memory, less precise updates."
    )
    loraplus_lr_ratio: float | None = Field(
        None, gt=0.0, description="LoRA+: the learning rate of the LoRA B matrices is learning_rate × this ratio."
    )
    loraplus_lr_embedding: float = Field(1e-6, gt=0.0, description="LoRA+: the learning rate of LoRA embedding B.")
    use_galore: bool = Field(False, description="GaLore (galore-torch): gradients of the target linear layers "
                             "projected to a low rank (full fine-tuning).")
    galore_target: list[str] = Field(default_factory=lambda: ["all"], description="GaLore: modules to project "
                                     "(`all`: every linear layer but the output head; comma list allowed).")
    galore_rank: int = Field(16, ge=1, description="GaLore: the projection rank.")
    galore_update_interval: int = Field(200, ge=1, description="GaLore: steps between projection updates.")
    galore_scale: float = Field(2.0, description="GaLore: the scale of the projected update.")
    galore_proj_type: Literal["std", "reverse_std", "right", "left", "full"] = Field(
        "std", description="GaLore: the projection type.")
    galore_layerwise: bool = Field(
        False, description="GaLore: step each parameter inside backward and free its gradient at once (less "
        "memory; needs gradient_accumulation_steps: 1 and one rank; no gradient clipping)."
    )
    use_apollo: bool = Field(False, description="APOLLO (apollo-torch): AdamW with low-rank random-projected "
                             "scaling of the target linear layers (full fine-tuning).")
    apollo_target: list[str] = Field(default_factory=lambda: ["all"], description="APOLLO: modules to project "
                                     "(`all`: every linear layer but the output head).")
    apollo_rank: int = Field(16, ge=1, description="APOLLO: the projection rank.")
    apollo_update_interval: int = Field(200, ge=1, description="APOLLO: steps between projection updates.")
    apollo_scale: float = Field(32.0, description="APOLLO: the scale of the update.")
    apollo_proj: Literal["svd", "random"] = Field("random", description="APOLLO: the projection.")
    apollo_proj_type: Literal["std", "right", "left"] = Field("std", description="APOLLO: the projection type.")
    apollo_scale_type: Literal["channel", "tensor"] = Field("channel", description="APOLLO: the scaling granularity.")
    apollo_layerwise: bool = Field(False, description="APOLLO: step each parameter inside backward (as "
                                   "galore_layerwise).")
    apollo_scale_front: bool = Field(False, description="APOLLO: scale the gradient before the norm-growth limiter.")
    use_badam: bool = Field(False, description="BAdam (badam): block-coordinate Adam, one block of layers trained "
                            "at a time (full fine-tuning).")
    badam_mode: Literal["layer", "ratio"] = Field("layer", description="BAdam: blocks of layers, or a ratio of "
                                                  "each parameter.")
    badam_start_block: int | None = Field(None, description="BAdam (layer): the first block.")
    badam_switch_mode: Literal["ascending", "descending", "random", "fixed"] = Field(
        "ascending", description="BAdam (layer): the order blocks are switched in.")
    badam_switch_interval: int = Field(50, ge=1, description="BAdam (layer): steps between block switches.")
    badam_update_ratio: float = Field(0.05, gt=0.0, le=1.0, description="BAdam (ratio): the share of each "
                                      "parameter updated.")
    badam_mask_mode: Literal["adjacent", "scatter"] = Field("adjacent", description="BAdam (ratio): the mask.")
    badam_verbose: int = Field(0, ge=0, le=2, description="BAdam: 0 quiet, 1 block switches, 2 trainable params.")
    use_adam_mini: bool = Field(False, description="Adam-mini (adam-mini): one second-moment value per block of "
                                "parameters instead of per weight.")
    use_muon: bool = Field(False, description="Muon (torch.optim.Muon) for the 2-D weight matrices, AdamW for "
                           "embeddings, the output head and 1-D parameters.")

    @field_validator("galore_target", "apollo_target", mode="before")
    @classmethod
    def _split_targets(cls, value: Any) -> Any:
        return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_optimizer(self) -> OptimizerArgs:
        chosen = [key for key in SWITCHES if getattr(self, key) not in (False, None)]
        if len(chosen) > 1:
            raise ValueError(f"{' and '.join(chosen)} each choose the optimizer; keep one of them")
        return self
