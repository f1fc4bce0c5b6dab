"""The per-device memory model of one tunesmith training setup (method × engine × ZeRO stage × offload ×
micro-batch × sequence length × precision), from architecture facts alone.

It follows what tunesmith actually allocates, item by item:

* **weights** — full/freeze keep float32 master weights (autocast computes in bf16/fp16); LoRA on a GPU keeps the
  frozen base in the autocast dtype (under fsdp2 float32; on a CPU float32 too, an upper bound: CPUs with bf16 in
  hardware keep it in bf16, and the planner sizes for a CPU kind, not this one) with float32 adapters; QLoRA stores the
  decoder layers' Linear weights in 4 or 8 bits plus their quantization constants (4-bit: one float32 absmax per
  64 weights, or with double quantization one 8-bit absmax per 64 plus one float32 per 256 blocks; 8-bit: one
  float32 scale per output row), embeddings and output head unquantized. DeepSpeed casts the module to
  bf16/fp16 and keeps float32 masters in its optimizer.
* **gradients** and **optimizer states** — AdamW: two float32 moments per trainable parameter; ZeRO adds a float32
  master copy and a float32 gradient partition. ZeRO-1 shards the optimizer, ZeRO-2 also the gradients, ZeRO-3 and
  fsdp2 also the weights; the model-state figures (weights + gradients + optimizer) equal DeepSpeed's own
  estimators (``estimate_zero2/3_model_states_mem_needs``: 2P + 18P/N, 4·largest layer + 18P/N, ...).
* **activations** — what autograd saves per decoder layer for a micro-batch of ``b × s`` tokens with SDPA
  (no s² attention scores, except the bf16 probabilities of short samples on a CPU under bf16 autocast): the two
  RMSNorms' float32 inputs and normalized values, the q/k/v, attention and MLP tensors; with gradient
  checkpointing only each layer's input plus one layer recomputed. The **logits** are listed apart:
  ``b × s × vocab`` in float32 for the loss, its log-softmax and their gradients are the largest tensors of a
  step for small models with big vocabularies. Mixed precision on float32 weights adds the
  bf16/fp16 weight copies autocast saves for backward.
* **communication buffers** — none for DDP (the gradients live in its reducer's buckets); ZeRO's
  reduce bucket (twice with ``overlap_comm``) and all-gather bucket; fsdp2 reduce-scatters one layer's float32
  gradients while the next is in flight.
* **runtime** — the CUDA context and library workspaces on a GPU; on a CPU the measured overhead of a run
  (tokenizer, data, kernel caches) beyond the imports, glibc's heap holes between the activations that the
  gradients do not refill, and the checkpoint pages a copying loader (QLoRA, DeepSpeed) leaves resident
  (all measured in ``bench/plan_accuracy.py``).

**The mesh** (``world = dp × sp × tp × pp``; see :func:`estimate`). Sequence parallel holds 1/sp of every row's
tokens (activations and logits fall by 1/sp); its attention runs sample by sample over the full rows and builds
no T×T mask (:mod:`tunesmith.model.segment_attention`; a model whose sliding window is shorter than a sample
builds a band mask for that sample, which is not modelled). Tensor parallel holds the facts of a model with 1/tp of the heads, the
MLP width and the vocabulary (:func:`~tunesmith.plan.arch.shard_view`): the attention/MLP/embedding/head weights,
their gradients, optimizer states and LoRA adapters, the activations inside the blocks and the vocabulary-parallel
logits fall by 1/tp; the norms and the block inputs stay whole, and so do the buffers its all-reduces allocate
(on a CPU, heap holes: ``CPU_TP_WHOLE_BUFFERS``); every rank still tokenizes with the whole vocabulary and, on
a CPU, keeps the checkpoint pages it split the weights out of. Pipeline parallel holds a stage's layers, the
first stage the embedding and up to pp micro-batches' activations in flight (1F1B), the last the norm, the head
and the loss; the peak is the larger of the two. fsdp2 shards over the rest of the mesh (dp × sp). The chunked
loss (``loss_chunk_size``) keeps chunk × vocab logits instead of tokens × vocab.

Gradients are freed after each optimizer step (``zero_grad(set_to_none=True)``), so with one micro-batch per
step the activations and the gradients do not peak together: peak = persistent states + max(activations +
first gradients, gradients + optimizer-step temporaries). With accumulation the gradients persist across
micro-batches and add up with the activations.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from tunesmith.plan.arch import ArchFacts, shard_view

GIB = 1024**3
CUDA_RUNTIME = 0.8 * GIB  # CUDA context + cuBLAS/cuDNN workspaces + NCCL, typical for one process
NPU_RUNTIME = 1.5 * GIB
# On a CPU, what a run holds beyond its imports besides the model's tensors: torch's first-op kernel caches,
# the encoded data and the tokenizer, whose in-memory size grows with its vocabulary. Fitted on the measured
# runs of bench/plan_accuracy.py (tiny model: 28 MiB; SmolLM2's 49K-token tokenizer: +22 MiB).
CPU_RUNTIME_BASE = 28 * 1024**2
CPU_RUNTIME_PER_VOCAB = 480
# glibc's malloc keeps the holes that freed forward temporaries leave between the saved activations (tensors
# under its 32 MiB mmap threshold live on the heap): the resident set grows by ~1.5× the saved activations
# (SmolLM2: 1.57× after the first forward). The gradients backward allocates fill those holes first, so only
# the rest adds up (this one rule fits LoRA, full, checkpointed and ZeRO runs from 256 to 2048 tokens).
CPU_ACTIVATION_SLACK = 0.5
# Tensor parallel on a CPU: per layer and token, the whole [tokens, hidden] float buffers its redistributions
# allocate and free, which glibc's heap keeps as holes like the forward temporaries above: the row-split
# projections' partial outputs and their all-reduced copies (o_proj, down_proj: 4), the column-split groups'
# partial input gradients and their all-reduced copies (attention, MLP: 4). Measured: TP2 on the tiny model at
# 1K-4K-token rows keeps ~4 KiB per token more than the split activations (hidden 64, 2 layers: 8 × 4 × 64 B).
CPU_TP_WHOLE_BUFFERS = 8
# ... and with LoRA, as many again: the row-split layers' whole lora_B outputs, their scaled copies and sums, the
# column-split layers' partial lora_A input gradients (measured: TP2 LoRA on the tiny model, 1K-4K-token rows,
# ~4 KiB per token over full TP2). DDP LoRA on long rows shows a similar gap that is not modelled here: SmolLM2
# LoRA at 256 tokens is predicted within 1 % without it.
CPU_TP_LORA_WHOLE_BUFFERS = 8
# DeepSpeed's own objects on a CPU (process groups, engine, bookkeeping), measured on the tiny model: +8 MiB.
CPU_DEEPSPEED_RUNTIME = 8 * 1024**2
# On a CPU under bf16 autocast, samples up to this many tokens attend as GEMMs and keep their bf16 probabilities for the
# backward (tunesmith.model.gemm_attention.MAX_LENGTH; a test keeps the two equal without importing torch here)
CPU_GEMM_ATTENTION_MAX_LENGTH = 512
FITS_HEADROOM = 0.95  # allocator fragmentation: a plan "fits" when its peak stays under 95 % of the memory


@dataclass(frozen=True)
class Setup:
    """One training configuration as the memory model sees it."""

    arch: ArchFacts
    method: str = "lora"  # full | freeze | lora
    quant_bits: int | None = None  # QLoRA: 4 or 8
    double_quant: bool = True
    lora_rank: int = 8
    lora_targets: list[str] | str = "all"
    freeze_layers: int = 2
    engine: str = "single"  # single | ddp | fsdp2 | deepspeed
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    reduce_bucket: float = 5e8  # elements
    allgather_bucket: float = 5e8
    overlap_comm: bool = False
    max_live_params: float = 1e9  # ZeRO-3: stage3_max_live_parameters
    micro_batch: int = 1
    rows_per_example: int = 1  # dpo / rm / kto: a pair (or an example and its KL completion) is two rows
    reference_copy: bool = False  # dpo / kto without LoRA: a frozen copy of the initial weights
    seq_len: int = 2048
    accumulation: int = 1
    grad_ckpt: bool = False
    precision: str = "fp32"  # fp32 | bf16 | fp16
    device: str = "cuda"  # cuda | npu | cpu
    world_size: int = 1
    ranks_per_node: int = 1
    sp: int = 1  # sequence_parallel_size
    tp: int = 1  # tensor_parallel_size
    pp: int = 1  # pipeline_parallel_size
    loss_chunk: int = 0  # loss_chunk_size (0: the whole tokens × vocab logits)
    lean_activations: bool = False  # norms and SwiGLU keep their inputs only (model/lean_activations.py)

    def with_changes(self, **changes: Any) -> Setup:
        return replace(self, **changes)

    @property
    def mixed(self) -> bool:
        return self.precision in ("bf16", "fp16")

    @property
    def deepspeed(self) -> bool:
        return self.engine == "deepspeed"

    @property
    def mesh(self) -> dict[str, int]:
        """{"dp", "sp", "tp", "pp"}: the mesh this setup's ranks form (dp rounds down when the rest does not
        divide the world size; :func:`tunesmith.plan.mesh.check_mesh` refuses that before a launch)."""
        model = self.sp * self.tp * self.pp
        return {"dp": max(self.world_size // model, 1), "sp": self.sp, "tp": self.tp, "pp": self.pp}


@dataclass
class Breakdown:
    """Bytes per device (``host_per_node``: RAM of one node for CPU-offloaded states and model loading)."""

    weights: float = 0.0
    quant_constants: float = 0.0  # part of weights
    gathered: float = 0.0  # ZeRO-3 / fsdp2 parameters all-gathered for the running layer(s)
    live_params: float = 0.0  # ZeRO-3: gathered parameters kept for reuse (stage3_max_live_parameters)
    loaded_copy: float = 0.0  # CPU only: the checkpoint's pages a copying loader leaves resident
    heap_slack: float = 0.0  # CPU only: heap holes between saved activations that gradients do not refill
    gradients: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    logits: float = 0.0
    autocast_copies: float = 0.0
    comm_buffers: float = 0.0
    runtime: float = 0.0
    step_temp: float = 0.0
    first_grads: float = 0.0  # gradients alive while the activations peak
    host_offload: float = 0.0  # per node
    host_load: float = 0.0  # per node, while loading the model
    trainable: int = 0
    total_params: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def model_states(self) -> float:
        """Weights + gradients + optimizer states (+ ZeRO-3's gathered layers): what DeepSpeed's estimators
        count."""
        return self.weights + self.gathered + self.gradients + self.optimizer

    @property
    def activation_total(self) -> float:
        return self.activations + self.heap_slack + self.logits + self.autocast_copies

    @property
    def peak(self) -> float:
        persistent = (self.weights + self.gathered + self.live_params + self.loaded_copy + self.optimizer
                      + self.comm_buffers + self.runtime)
        return persistent + max(self.activation_total + self.first_grads, self.gradients + self.step_temp)

    @property
    def host_per_node(self) -> float:
        return max(self.host_offload, self.host_load)

    def items(self) -> list[tuple[str, float]]:
        return [
            ("weights", self.weights),
            ("gathered parameters", self.gathered),
            ("ZeRO-3 live parameters", self.live_params),
            ("loaded checkpoint pages", self.loaded_copy),
            ("gradients", self.gradients),
            ("optimizer states", self.optimizer),
            ("activations", self.activations),
            ("heap slack (CPU)", self.heap_slack),
            ("logits + loss", self.logits),
            ("autocast weight copies", self.autocast_copies),
            ("communication buffers", self.comm_buffers),
            ("runtime", self.runtime),
        ]


def trainable_params(s: Setup) -> int:
    a = s.arch
    if s.method == "full":
        return a.total_params
    if s.method == "freeze":
        return min(abs(s.freeze_layers), a.num_layers) * a.layer_params
    return a.lora_params(s.lora_rank, s.lora_targets)


def _quantized_bytes(s: Setup) -> tuple[float, float]:
    """(bytes of the quantized Linear weights, of which quantization constants)."""
    q = s.arch.quantizable_params
    if s.quant_bits == 8:
        rows = s.arch.num_layers * sum(n_out for _, _, n_out in s.arch.linears())
        return q + 4.0 * rows, 4.0 * rows
    constants = q / 64 + 4.0 * q / (64 * 256) if s.double_quant else 4.0 * q / 64
    return q / 2 + constants, constants


def per_layer_activation_bytes(s: Setup) -> float:
    """Bytes autograd saves per token in one decoder layer (no checkpointing, SDPA, no dropout)."""
    a = s.arch
    act = 2 if s.mixed else 4  # matmul outputs under autocast (or a bf16 DeepSpeed module)
    h, kv, i = a.hidden_size, a.kv_size, a.intermediate_size
    q = a.num_heads * a.head_dim
    # RMSNorm in float32: its input and (unless lean) the normalized values
    norms = 2 * (4 * h if s.lean_activations else 8 * h)
    # the linears' inputs that lean modules make are kept as recipes (model/saved_recipes.py) in the train step's
    # forward (not in a checkpointed layer's recompute, nor in pipeline stages or tensor parallel layers); under
    # autocast a lean norm hands its projections the low-precision copy itself, so that is the recipe's too
    recipes = s.lean_activations and not s.grad_ckpt and s.pp == 1 and s.tp == 1
    norm_out = 0 if recipes else act * h
    attention = norm_out + act * ((q + 2 * kv) + q + q)  # q/k/v input, q/k/v after RoPE, SDPA output, o_proj input
    # MLP input; gate, up, (unless lean) silu(gate), (unless kept as a recipe) the product
    mlp = norm_out + act * (2 * i + (0 if s.lean_activations else i) + (0 if recipes else i))
    return norms + attention + mlp + _cpu_attention_probabilities(s)


def _cpu_attention_probabilities(s: Setup) -> float:
    """Per token and layer, the bf16 probabilities a CPU's GEMM attention keeps (model/gemm_attention.py; CPUs
    without bf16 in hardware do not take it, which the planner, sizing for a CPU kind, does not tell apart):
    heads × the sample's length.
    The planner sees rows, not samples, so it counts each token in a sample as long as a row (up to the bound):
    an upper bound for packed rows of shorter samples."""
    if s.device != "cpu" or s.precision != "bf16" or s.deepspeed:  # DeepSpeed casts the module: no autocast
        return 0.0
    return 2.0 * s.arch.num_heads * min(s.seq_len, CPU_GEMM_ATTENTION_MAX_LENGTH)


def estimate(s: Setup) -> Breakdown:
    """The per-device breakdown of ``s``: of the rank that peaks highest (with pipeline stages, the first stage's
    or the last's)."""
    if s.tp == 1 and s.pp == 1:
        return _estimate_rank(s)
    stages = (0,) if s.pp == 1 else (0, s.pp - 1)
    full = s.arch
    found = []
    for stage in stages:
        # a rank's share as a smaller model, sharded (fsdp2) over the ranks that hold the same share
        view = s.with_changes(arch=shard_view(full, s.tp, s.pp, stage),
                              world_size=max(s.world_size // (s.tp * s.pp), 1))
        b = _estimate_rank(view)
        b.host_load *= full.total_params / max(view.arch.total_params, 1)  # every rank loads the whole model
        if s.device == "cpu":  # every rank tokenizes with the whole vocabulary, and splits the whole checkpoint
            b.runtime = _cpu_runtime(s)
            b.loaded_copy = _cpu_loaded_copy(s)
        b.trainable, b.total_params = trainable_params(s), full.total_params
        if s.pp > 1:
            first = "first" if stage == 0 else "last"
            b.notes.append(f"pipeline: the {first} stage of {s.pp} peaks highest ({view.arch.num_layers} of "
                           f"{full.num_layers} layers{_stage_extras(view.arch)})")
        found.append(b)
    return max(found, key=lambda b: b.peak)


def _stage_extras(a: ArchFacts) -> str:
    extras = [name for name, held in (("the embedding", a.holds_embedding), ("the head and the loss",
                                                                               a.holds_head)) if held]
    return ", " + " and ".join(extras) if extras else ""


def _estimate_rank(s: Setup) -> Breakdown:
    b = Breakdown(total_params=s.arch.total_params)
    b.trainable = trainable_params(s)
    half = 2 if s.mixed else 4
    if s.deepspeed:
        _deepspeed_states(s, b, b.trainable, half, max(s.world_size, 1))
    else:
        _torch_states(s, b, half)
    if s.reference_copy:  # copied before the engine wraps the policy: whole on every rank, float32
        b.weights += s.arch.total_params * 4.0
        b.notes.append("the reference model is a frozen float32 copy of the weights (LoRA would need none)")
    _activations(s, b)
    b.runtime = {"cuda": CUDA_RUNTIME, "npu": NPU_RUNTIME}.get(s.device) or _cpu_runtime(s)
    return b


def _cpu_runtime(s: Setup) -> float:
    runtime = CPU_RUNTIME_BASE + CPU_RUNTIME_PER_VOCAB * s.arch.vocab_size
    return runtime + (CPU_DEEPSPEED_RUNTIME if s.deepspeed else 0.0)


def _cpu_loaded_copy(s: Setup) -> float:
    """Quantizing, and DeepSpeed's / fsdp2's flattening and sharding (tensor parallel's splitting too), copy the
    weights out of the memory-mapped checkpoint, whose pages stay resident; plain loading adopts them as the
    parameters."""
    if s.quant_bits or s.deepspeed or (s.engine == "fsdp2" and s.world_size > 1):
        return s.arch.total_params * s.arch.checkpoint_bytes
    return 0.0


def _torch_states(s: Setup, b: Breakdown, half: int) -> None:
    """Weights, gradients, optimizer and their side costs when tunesmith's AdamW steps (single, ddp, fsdp2)."""
    a, n, trainable, total = s.arch, max(s.world_size, 1), b.trainable, s.arch.total_params
    on_gpu_half = s.device != "cpu" and s.mixed and s.engine != "fsdp2"
    base_bytes = float(half if s.method == "lora" and on_gpu_half else 4.0)
    if s.quant_bits:
        qbytes, constants = _quantized_bytes(s)
        b.weights = qbytes + (total - a.quantizable_params) * base_bytes
        b.quant_constants = constants
    else:  # lora: the frozen base in its load dtype; full and freeze: float32 master weights, frozen ones included
        b.weights = total * (base_bytes if s.method == "lora" else 4.0)
    if s.method == "lora":
        b.weights += trainable * 4.0  # adapters: float32, trained
    b.gradients = 4.0 * trainable
    b.optimizer = 8.0 * trainable
    if s.engine == "fsdp2":
        b.weights, b.gradients, b.optimizer = b.weights / n, b.gradients / n, b.optimizer / n
        gather_bytes = 2 if s.precision == "bf16" else 4
        root = a.embedding_params + a.lm_head_params + a.hidden_size
        b.gathered = (root + 2 * a.layer_params) * gather_bytes  # root unit stays gathered; 2 layers in flight
        b.comm_buffers = 2 * a.layer_params * 4.0  # float32 reduce-scatter of a layer's gradients
    # ddp: no term. The gradients are views into the reducer's buckets (gradient_as_bucket_view), not a copy.
    # torch AdamW: foreach on GPUs allocates a temporary the size of the parameters; on CPU it loops
    b.step_temp = 4.0 * trainable if s.device != "cpu" else 8.0 * _largest_param(a, s)
    b.host_load = total * (base_bytes if s.method == "lora" else 4.0) * s.ranks_per_node
    if s.mixed and not (s.engine == "fsdp2" and s.precision == "bf16") and (s.method != "lora" or not on_gpu_half):
        # autocast casts float32 weights to 16 bits and keeps the copies that backward needs
        linear = 0 if s.quant_bits else a.layer_linear_params  # 4/8-bit weights dequantize per call
        head = a.head_weight_params
        layers = 1 if s.grad_ckpt else a.num_layers
        b.autocast_copies = 2.0 * (layers * linear + head)


def _activations(s: Setup, b: Breakdown) -> None:
    """Activations of a micro-batch (of each micro-batch in flight on a first pipeline stage), the logits and
    their loss, and the gradients alive at that peak."""
    a = s.arch
    tokens = -(-s.micro_batch * s.rows_per_example * s.seq_len // s.sp)  # sequence parallel: this rank's slice
    full_layer = per_layer_activation_bytes(s) * tokens
    if s.grad_ckpt:
        residual = 2 if (s.deepspeed and s.mixed) else 4
        b.activations = a.num_layers * residual * a.hidden_size * tokens + full_layer
    else:
        b.activations = a.num_layers * full_layer
    if s.pp > 1 and a.holds_embedding:
        b.activations *= min(s.pp, max(s.accumulation, 1))  # 1F1B: up to pp micro-batches in flight
    if s.device == "cpu":
        b.heap_slack = max(0.0, CPU_ACTIVATION_SLACK * b.activations - b.gradients)
        if s.tp > 1:  # (tunesmith runs tensor parallel without pipeline stages)
            whole = CPU_TP_WHOLE_BUFFERS + (CPU_TP_LORA_WHOLE_BUFFERS if s.method == "lora" else 0)
            b.heap_slack += whole * 4.0 * a.hidden_size * tokens * (1 if s.grad_ckpt else a.num_layers)
        b.loaded_copy = _cpu_loaded_copy(s)
    if s.sp > 1:
        b.activations += _sequence_parallel_attention(s)
    if a.holds_head:
        if s.loss_chunk:  # chunked loss: one chunk's logits at a time, and the hidden states' gradient
            b.logits = min(tokens, s.loss_chunk) * a.vocab_size * (18 if s.mixed else 16) + tokens * a.hidden_size * 4
        else:
            b.logits = tokens * a.vocab_size * (18 if s.mixed else 16)
    # gradients alive at the activation peak: all of them while accumulating, else the output head's
    if s.accumulation > 1:
        b.first_grads = b.gradients
    else:
        # full fine-tuning: the output head's gradient is the first one backward allocates
        per = b.gradients / max(b.trainable, 1)
        head = per * a.head_weight_params if s.method == "full" else 0.0
        b.first_grads = min(head, b.gradients)


def _sequence_parallel_attention(s: Setup) -> float:
    """What the all-to-all attention keeps per layer besides the slice's own activations: the full rows' queries,
    keys, values and output for this rank's H/sp heads, twice (the all-to-all's received buffer and its
    reordered copy), and on a CPU under autocast the float32 copies the attention computes in."""
    a = s.arch
    kv = a.num_kv_heads if a.num_kv_heads % s.sp == 0 else a.num_heads  # repeated up to the query heads
    per_token = a.head_dim * (2 * a.num_heads + 2 * kv) / s.sp
    element = 2 if s.mixed else 4
    per_token *= 2 * element + (4 if s.mixed and s.device == "cpu" else 0)
    layers = 1 if s.grad_ckpt else a.num_layers
    return s.micro_batch * s.rows_per_example * float(s.seq_len) * per_token * layers


def _largest_param(a: ArchFacts, s: Setup) -> int:
    if s.method == "lora":
        return max(s.lora_rank * max(n_in, n_out) for _, n_in, n_out in a.linears())
    return max(a.embedding_params, a.hidden_size * a.intermediate_size)


def _deepspeed_states(s: Setup, b: Breakdown, trainable: int, half: int, n: int) -> None:
    """ZeRO stages 0-3 with offload, counted as DeepSpeed's estimators count them."""
    a = s.arch
    total = a.total_params
    stage = s.zero_stage
    wb = float(half)  # DeepSpeed casts the module to bf16/fp16 (float32 without mixed precision)
    if s.quant_bits:
        qbytes, constants = _quantized_bytes(s)
        module = qbytes + (total - a.quantizable_params) * wb + trainable * wb
        b.quant_constants = constants
    else:
        module = total * wb + (trainable * wb if s.method == "lora" else 0.0)
    offload_param = s.offload_param and stage == 3
    if s.offload_param and stage != 3:
        b.notes.append(f"offload_param only applies to ZeRO-3; DeepSpeed ignores it at stage {stage}")
    if stage == 0:
        b.weights = module
        b.gradients = trainable * wb
        b.optimizer = trainable * (16.0 if s.mixed else 8.0)  # mixed: fp32 master + fp32 grads + 2 moments
    else:
        b.weights = module / n if stage == 3 else module
        # the 16-bit gradient partition (stage 2) / whole 16-bit gradients (stage 1), and ZeRO's fp32 one
        grads16 = trainable * wb / (n if stage == 2 else 1) if stage < 3 else 0.0
        b.gradients = grads16 + 4.0 * trainable / n
        b.optimizer = 12.0 * trainable / n  # fp32 master + exp_avg + exp_avg_sq, partitioned
        if stage == 3:
            b.gathered = 4.0 * a.largest_module_params * (wb / 2)  # 2 modules' 16-bit params in flight
        if s.offload_optimizer:
            b.host_offload = (12.0 + 4.0) * trainable / n * s.ranks_per_node
            b.optimizer = 0.0
            b.gradients = 0.0  # reduced straight into the CPU partition through the buckets
        if offload_param:
            b.host_offload += module / n * s.ranks_per_node
            b.weights = 0.0
    # tunesmith loads the float32 model on the CPU in every rank, then DeepSpeed moves its shard to the device
    b.host_load = total * 4.0 * s.ranks_per_node
    # A GPU reserves the reduce bucket whole (twice with overlap_comm); the all-gather writes into the weights in
    # place. On a CPU the measured runs show no resident bucket beyond the gradients themselves.
    if stage in (1, 2, 3) and s.device != "cpu":
        b.comm_buffers = s.reduce_bucket * wb * (2 if s.overlap_comm else 1)
    if stage == 3:
        # parameters gathered for the forward stay until backward while fewer than stage3_max_live_parameters
        live = min(total, s.max_live_params) * wb
        b.live_params = max(0.0, live - b.gathered)
    if s.device == "cpu":
        # on a CPU "offloaded" states live in the same RAM as everything else
        b.optimizer += b.host_offload / max(s.ranks_per_node, 1)
        b.weights += (module / n) if offload_param else 0.0
        b.host_offload = 0.0
    b.step_temp = 0.0
