"""Config keys that make training faster or leaner without changing what it computes (within float tolerance):
the LM head only where there are targets, the chunked fused cross entropy, and LLaMA-Factory's
``enable_liger_kernel``; a section of :class:`~tunesmith.config.schema.Config`."""

from __future__ import annotations

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
    enable_liger_kernel: bool = Field(
        False,
        description="LLaMA-Factory's key: on CUDA with liger-kernel installed, Liger's fused linear cross-entropy; "
        "elsewhere tunesmith's chunked loss (loss_chunk_size, 4096 when unset), saying so.",
    )

    def resolved_chunk_size(self) -> int:
        """loss_chunk_size, or its default when enable_liger_kernel asks for a fused loss."""
        if self.loss_chunk_size == 0 and self.enable_liger_kernel:
            return 4096
        return self.loss_chunk_size
