"""Config keys that make training faster or leaner without changing what it computes (within float tolerance):
the LM head only where there are targets, the chunked fused cross entropy, LLaMA-Factory's
``enable_liger_kernel`` and HF's ``torch_compile``; a section of :class:`~tunesmith.config.schema.Config`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tunesmith.config.section import Section

# The fused loss's default chunk. On one H200 (Qwen2.5-0.5B's shape, 8 × 2,048 packed tokens, bf16) chunks of
# 4,096 made a LoRA step 1.17× faster than the unfused target-only head and took full fine-tuning's peak memory to
# 0.73× at the same speed. On a CPU with bf16 (SmolLM2-135M, 4 × 512 packed tokens, full fine-tuning) 512 ran a
# step as fast as 4,096 (7.82 against 8.22 s) at 0.52 GB less peak RSS: a chunk's float32 logits, their softmax
# and its bf16 copy are the largest tensors of the step's end. 512 targets × 152k vocabulary is 311 MB of float32.
DEFAULT_LOSS_CHUNK = 512


class SpeedArgs(Section):
    target_only_head: bool = Field(
        True,
        description="Run the LM head and the loss only on the positions whose next token is a target (prompt, "
        "padding and packing filler positions skip the vocabulary projection); the same loss and gradients as "
        "the full head. Causal-LM stages (sft, pt).",
    )
    loss_chunk_size: int = Field(
        DEFAULT_LOSS_CHUNK,
        ge=0,
        description="> 0: the LM head and the cross entropy run fused over chunks of this many target tokens, "
        "gradients made chunk by chunk, so the targets × vocabulary logits never exist at once (Liger's fused "
        "linear cross-entropy, in plain torch: CPU, CUDA, NPU); the same loss and gradients as the unfused head. "
        "0: off (the target-only head, unfused). A form of the target-only head: target_only_head: false turns "
        "it off too. sft's plain cross entropy and pt (the weighted SFT losses, DPO and KTO need "
        "the logits). Needs a plain Linear head and a model that does not rescale its logits, else the "
        "target-only head runs, saying so.",
    )
    fused_lora: bool = Field(
        True,
        description="LoRA layers accumulate the adapter's product into the base projection's GEMM output (and, in "
        "backward, into the input's gradient), so PEFT's two extra tokens × out_features tensors per layer are never "
        "made; the same arithmetic. Layers it does not cover (DoRA, quantized bases, ZeRO-3, tensor parallel) run "
        "PEFT's forward.",
    )
    lean_activations: bool = Field(
        True,
        description="Llama-style RMSNorms and SiLU MLPs (Llama, Qwen2/3, Mistral, Phi-3, ... as transformers "
        "writes them) keep only their inputs for the backward and recompute the normalized values and silu(gate) "
        "there; the linears that read their outputs keep a recipe instead of the output (recomputed in the "
        "backward, bitwise the same): about half the activation memory in full fine-tuning, the same gradients. "
        "Under bf16/fp16 autocast a decoder layer's norms hand their projections the autocast dtype themselves "
        "(one cast and one copy instead of one per projection; their gradients then add up in that dtype). "
        "Off under torch_compile (the compiler chooses what to keep).",
    )
    host_allocator: Literal["auto", "tcmalloc", "jemalloc", "system"] = Field(
        "auto",
        description="The C allocator a CPU training process runs under. auto: tcmalloc, else jemalloc, when "
        "installed (apt install libtcmalloc-minimal4) and the run trains on the CPU; glibc's malloc otherwise. "
        "`tunesmith train` starts its process again with the library preloaded (torchrun's workers inherit it). "
        "glibc's heap cannot hand back the holes a step's tensors of many sizes leave, so a full fine-tuning "
        "step's heap grows far past the bytes in use; tcmalloc reuses memory by size class (SmolLM2-135M full "
        "fine-tuning on CPU: peak RSS 5.05 → 3.85 GB, step 7.42 → 6.20 s). tcmalloc / jemalloc: preload that "
        "one whatever the device; system: glibc's malloc. Not found: glibc's, saying so. A restarted single "
        "process also keeps its OpenMP threads spinning between operations (OMP_WAIT_POLICY=active unless set; "
        "SmolLM2 LoRA on 2 cores: a step 14 % faster).",
    )
    enable_liger_kernel: bool = Field(
        False,
        description="LLaMA-Factory's key: on CUDA with liger-kernel installed, Liger's fused linear cross-entropy; "
        "elsewhere tunesmith's chunked loss (loss_chunk_size, 512 when 0), saying so.",
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
        """The chunk of the fused loss (0: unfused): loss_chunk_size with the target-only head, of which the fused
        loss is a form (target_only_head: false is the full head); 512 where enable_liger_kernel asks for a fused
        loss and loss_chunk_size is 0. From the values alone, so a dumped config (a Slurm job's, a run's
        config.yaml) resolves as the config it came from."""
        if self.enable_liger_kernel:
            return self.loss_chunk_size or DEFAULT_LOSS_CHUNK
        return self.loss_chunk_size if self.target_only_head else 0
