"""Config keys that make training faster or leaner without changing what it computes (within float tolerance):
the LM head only where there are targets, the chunked fused cross entropy, LLaMA-Factory's
``enable_liger_kernel`` and HF's ``torch_compile``; a section of :class:`~tunesmith.config.schema.Config`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tunesmith.config.section import Section


class SpeedArgs(Section):
    target_only_head: bool = Field(
        True,
        description="Run the LM head and the loss only on the positions whose next token is a target (prompt, "
        "padding and packing filler positions skip the vocabulary projection); the same loss and gradients as "
        "the full head. Causal-LM stages (sft, pt).",
    )
    loss_chunk_size: int = Field(
        0,
        ge=0,
        description="> 0: the LM head and the cross entropy run fused over chunks of this many target tokens, "
        "gradients made chunk by chunk, so the targets × vocabulary logits never exist at once (Liger's fused "
        "linear cross-entropy, in plain torch: CPU, CUDA, NPU). 0: off. Needs a plain Linear head and a model "
        "that does not rescale its logits, else the target-only head runs, saying so.",
    )
    fused_lora: bool = Field(
        True,
        description="LoRA layers accumulate the adapter's product into the base projection's GEMM output (and, in "
        "backward, into the input's gradient), so PEFT's two extra tokens × out_features tensors per layer are never "
        "made; the same arithmetic. Layers it does not cover (DoRA, quantized bases, ZeRO-3, tensor parallel) run "
        "PEFT's forward.",
    )
    enable_liger_kernel: bool = Field(
        False,
        description="LLaMA-Factory's key: on CUDA with liger-kernel installed, Liger's fused linear cross-entropy; "
        "elsewhere tunesmith's chunked loss (loss_chunk_size, 4096 when unset), saying so.",
    )

    torch_compile: bool = Field(
        False,
        description="Compile each decoder block's forward with torch.compile (dynamic shapes: packed rows of any "
        "length share one graph); the first step pays the compile time, which the log states. Off under "
        "DeepSpeed, or where the backend cannot compile here (the run continues eagerly, saying why).",
    )
    torch_compile_backend: str = Field(
        "inductor", description="torch.compile backend for torch_compile (HF's key): inductor, aot_eager, ..."
    )
    torch_compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None = (
        Field(None, description="torch.compile mode for torch_compile (HF's key); unset: torch's default.")
    )

    def resolved_chunk_size(self) -> int:
        """loss_chunk_size, or its default when enable_liger_kernel asks for a fused loss."""
        if self.loss_chunk_size == 0 and self.enable_liger_kernel:
            return 4096
        return self.loss_chunk_size
