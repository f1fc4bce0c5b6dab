"""Config keys of LLaMA-Factory's extra fine-tuning methods (OFT, PiSSA, LLaMA Pro, NEFTune, the DFT / EAFT /
ASFT losses, Mixture-of-Depths): a section of its own, part of :class:`~tunesmith.config.schema.Config`.

Key names and defaults are LLaMA-Factory's. The checks across sections (``stage``, ``finetuning_type``, …) read
those keys with ``getattr``: they run on the whole :class:`~tunesmith.config.schema.Config`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tunesmith.config.section import Section

_LOSSES = ("use_dft_loss", "use_eaft_loss", "use_asft_loss")
_OFT_KEYS = ("oft_rank", "oft_block_size", "oft_target", "module_dropout")


class LFMethodArgs(Section):
    oft_rank: int = Field(
        0,
        ge=0,
        description="oft: the number of orthogonal blocks per adapted layer (0: derived from oft_block_size; set "
        "exactly one of the two).",
    )
    oft_block_size: int = Field(
        32,
        ge=0,
        description="oft: the size of each orthogonal block (0: derived from oft_rank). Bigger blocks train more "
        "parameters. Where it does not divide a layer's input size, PEFT uses the nearest size that does (logged).",
    )
    oft_target: list[str] | str = Field(
        "all",
        description="oft: module names to adapt, `all` for every linear layer except the output head, or a comma "
        "list such as `q_proj,v_proj`.",
    )
    module_dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="oft: the probability of dropping a layer's whole OFT rotation in training."
    )
    pissa_init: bool = Field(
        False,
        description="lora: initialise the adapters with PiSSA (the principal singular vectors of each weight, "
        "which the frozen base then no longer holds) instead of zeros.",
    )
    pissa_iter: int = Field(
        16,
        ge=-1,
        description="lora with pissa_init: power iterations of the fast randomised SVD (seeded by `seed`, so a "
        "resumed run gets the same start); -1: the exact, slower full SVD.",
    )
    pissa_convert: bool = Field(
        False,
        description="lora with pissa_init: the final adapter in output_dir is converted into a plain LoRA adapter "
        "(rank 2 × lora_rank) that applies to the unmodified base model; checkpoints keep the PiSSA form that "
        "resuming needs.",
    )
    neftune_noise_alpha: float | None = Field(
        None,
        ge=0.0,
        description="NEFTune: add uniform noise in ±alpha / sqrt(sequence length × hidden size) to the input "
        "embeddings of every training forward that backpropagates (not in evaluation or reference passes); drawn "
        "from the RNG that checkpoints restore, so a resumed run draws the same noise. Unset: no noise.",
    )
    use_dft_loss: bool = Field(
        False,
        description="sft: Dynamic Fine-Tuning loss: each target token's cross entropy weighted by the model's own "
        "(detached) probability of that token.",
    )
    use_eaft_loss: bool = Field(
        False,
        description="sft: Entropy-Adaptive Fine-Tuning loss: each target token's cross entropy weighted by "
        "(H / 3)^eaft_alpha, H the (detached) entropy of the model's top-20 next-token distribution.",
    )
    eaft_alpha: float = Field(1.0, ge=0.0, description="sft with use_eaft_loss: the exponent of the entropy weight.")
    use_asft_loss: bool = Field(
        False,
        description="sft: Anchored SFT loss: the DFT loss plus asft_alpha × each target token's KL divergence from "
        "the reference model (the initial model: LoRA with its adapter off, else a frozen copy) to the policy.",
    )
    asft_alpha: float = Field(0.1, ge=0.0, description="sft with use_asft_loss: the weight of the KL term.")
    use_llama_pro: bool = Field(
        False,
        description="LLaMA Pro, on a model expanded by `tunesmith llama-pro` (freeze_trainable_layers = its "
        "--num-expand): only the expanded blocks train (freeze), or carry the adapters (lora / oft).",
    )
    mixture_of_depths: Literal["convert", "load"] | None = Field(
        None,
        description="Not supported: LLaMA-Factory's Mixture-of-Depths needs the `mixture-of-depth` package, whose "
        "last release (1.2.0, 2024) does not import with transformers 5.",
    )

    @field_validator("oft_target", mode="before")
    @classmethod
    def _split_oft_target(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        return "all" if value == ["all"] else value

    @model_validator(mode="after")
    def _check_lf_methods(self) -> LFMethodArgs:
        stage = getattr(self, "stage", "sft")
        finetuning_type = getattr(self, "finetuning_type", "lora")
        # keys changed from their defaults: a dumped config (config.yaml, every key) must load again
        defaults = {key: field.default for key, field in LFMethodArgs.model_fields.items()}
        changed = {key for key, default in defaults.items() if getattr(self, key) != default}
        if self.mixture_of_depths is not None:
            raise ValueError(
                f"mixture_of_depths: {self.mixture_of_depths} is not supported: it needs the mixture-of-depth "
                "package, whose last release (1.2.0, June 2024) does not import with transformers 5 (it uses "
                "transformers.modeling_attn_mask_utils and TRANSFORMERS_CACHE, both removed); remove the key"
            )
        self._check_oft(finetuning_type, changed)
        self._check_pissa(stage, finetuning_type, changed)
        self._check_losses(stage, changed)
        if self.use_llama_pro:
            if finetuning_type == "full":
                raise ValueError(
                    "use_llama_pro trains only the expanded blocks, so it needs finetuning_type: freeze, lora or "
                    "oft, not full"
                )
            if getattr(self, "freeze_trainable_layers", 1) <= 0:
                raise ValueError(
                    "use_llama_pro needs freeze_trainable_layers > 0: the number of expanded blocks "
                    "(tunesmith llama-pro --num-expand)"
                )
        return self

    def _check_oft(self, finetuning_type: str, changed: set[str]) -> None:
        if finetuning_type != "oft":
            stray = [key for key in _OFT_KEYS if key in changed]
            if stray:
                raise ValueError(f"{stray[0]} is for finetuning_type: oft; remove it or set finetuning_type: oft")
            return
        if (self.oft_rank == 0) == (self.oft_block_size == 0):
            raise ValueError(
                f"oft_rank is {self.oft_rank} and oft_block_size is {self.oft_block_size}; set exactly one of them "
                "(the other 0), since oft_rank × oft_block_size is a layer's input size"
            )

    def _check_pissa(self, stage: str, finetuning_type: str, changed: set[str]) -> None:
        if not self.pissa_init:
            key = "pissa_convert" if self.pissa_convert else "pissa_iter" if "pissa_iter" in changed else None
            if key:
                raise ValueError(f"{key} is set but pissa_init is false; set pissa_init: true or remove {key}")
            return
        if finetuning_type != "lora":
            raise ValueError(f"pissa_init initialises LoRA adapters; it needs finetuning_type: lora, not "
                             f"{finetuning_type}")
        if getattr(self, "quantization_bit", None) is not None:
            raise ValueError(
                "pissa_init cannot initialise adapters on a quantized base (the SVD needs the full-precision "
                "weights, which it then changes); remove quantization_bit or pissa_init"
            )
        if getattr(self, "adapter_name_or_path", None):
            raise ValueError(
                "pissa_init initialises new adapters, but adapter_name_or_path loads a trained one; remove one of them"
            )
        if self.use_asft_loss:
            raise ValueError(
                "pissa_init cannot be used with use_asft_loss: its reference model is the policy with the adapter "
                "switched off, which PiSSA has changed into the residual weights; remove one of them"
            )
        references = stage == "kto" or (stage == "dpo" and getattr(self, "pref_loss", "sigmoid") not in
                                         ("orpo", "simpo"))
        if references and not (getattr(self, "ref_model", None) or getattr(self, "ref_model_adapters", None)):
            raise ValueError(
                f"pissa_init with stage: {stage} needs ref_model: the default reference, the policy with the "
                "adapter switched off, is what PiSSA has changed into the residual weights; set ref_model to the "
                "base model or remove pissa_init"
            )
        if self.pissa_convert and getattr(self, "use_dora", False):
            raise ValueError(
                "pissa_convert cannot convert DoRA adapters (the plain LoRA it writes has no magnitude vectors); "
                "remove use_dora or pissa_convert"
            )

    def _check_losses(self, stage: str, changed: set[str]) -> None:
        chosen = [key for key in _LOSSES if getattr(self, key)]
        if len(chosen) > 1:
            raise ValueError(f"{' and '.join(chosen)} are both true; choose one SFT loss")
        if chosen and stage != "sft":
            raise ValueError(f"{chosen[0]} is an SFT loss; it needs stage: sft, not {stage}")
        for alpha, flag in (("eaft_alpha", "use_eaft_loss"), ("asft_alpha", "use_asft_loss")):
            if alpha in changed and not getattr(self, flag):
                raise ValueError(f"{alpha} is set but {flag} is false; set {flag}: true or remove {alpha}")
