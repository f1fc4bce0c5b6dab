"""Config keys that split one model's work over several ranks beyond data parallel: sequence, tensor and pipeline
parallel; a section of :class:`~tunesmith.config.schema.Config`. The ranks form the mesh
``world = data parallel × pipeline × sequence × tensor`` (:func:`mesh_sizes`)."""

from __future__ import annotations

from pydantic import Field

from tunesmith.config.section import Section


class ParallelArgs(Section):
    sequence_parallel_size: int = Field(
        1,
        ge=1,
        description="Sequence parallel, DeepSpeed-Ulysses style (XTuner's and LLaMA-Factory's key): each group of "
        "this many ranks trains the same rows, each rank holding 1/N of every (packed) row's tokens, and attention "
        "exchanges heads by all-to-all so each rank attends over the whole row for 1/N of the heads: activation "
        "memory per rank falls by about 1/N. The ranks form data parallel × N (the world size must be a multiple "
        "of N), N must divide the model's query heads; stage sft or pt, engine ddp or fsdp2. 1: off.",
    )
    tensor_parallel_size: int = Field(
        1,
        ge=1,
        description="Tensor parallel (Megatron style, through torch.distributed.tensor.parallel): each group of this "
        "many ranks splits every attention and MLP projection, column-wise then row-wise, and the vocabulary of the "
        "embeddings and LM head, so each rank holds 1/N of those weights and computes 1/N of their matmuls. With "
        "engine fsdp2 the other mesh dimension shards the rest (a 2-D mesh, data parallel × N). N must divide the "
        "model's query and key/value heads; families llama, qwen2, qwen3, internlm2 (and their look-alikes). 1: off.",
    )
    pipeline_parallel_size: int = Field(
        1,
        ge=1,
        description="Pipeline parallel through torch.distributed.pipelining: the decoder layers are cut into this "
        "many consecutive stages, one per rank of a pipeline group, and gradient_accumulation_steps micro-batches "
        "flow through them (schedule 1F1B). Full fine-tuning of the llama / qwen2 families, engine ddp. 1: off.",
    )


def mesh_sizes(world_size: int, args: ParallelArgs) -> dict[str, int]:
    """The mesh's dimensions for a world size: {"dp", "pp", "sp", "tp"}; raises ValueError with a sentence naming
    the keys when their product does not divide the world size."""
    model = args.pipeline_parallel_size * args.sequence_parallel_size * args.tensor_parallel_size
    if world_size % model:
        raise ValueError(
            f"pipeline_parallel_size {args.pipeline_parallel_size} × sequence_parallel_size "
            f"{args.sequence_parallel_size} × tensor_parallel_size {args.tensor_parallel_size} = {model} does not "
            f"divide the world size {world_size}; launch a multiple of {model} ranks or change those keys"
        )
    return {"dp": world_size // model, "pp": args.pipeline_parallel_size, "sp": args.sequence_parallel_size,
            "tp": args.tensor_parallel_size}


def format_mesh(sizes: dict[str, int]) -> str:
    """``dp 2 × sp 1 × tp 2 × pp 1``: how the launch and the dry run print the mesh."""
    return " × ".join(f"{name} {sizes[name]}" for name in ("dp", "sp", "tp", "pp"))
