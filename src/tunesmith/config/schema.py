"""The config schema: one flat YAML, one pydantic model per concern.

Key names follow LLaMA-Factory (and HF TrainingArguments) wherever the concept is the same, so their users'
configs run unchanged. Each field's ``description`` is its help text; README's config reference is generated
from it (``python -m tunesmith.config.reference``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tunesmith.config.hf_compat import HFCompatArgs
from tunesmith.config.lf_methods import LFMethodArgs
from tunesmith.config.optimizer_args import OptimizerArgs
from tunesmith.config.parallel import ParallelArgs
from tunesmith.config.section import Section
from tunesmith.config.speed import SpeedArgs
from tunesmith.errors import ConfigError


def _comma_list(value: Any) -> Any:
    """LLaMA-Factory writes lists as comma-separated strings (``dataset: a,b``); accept both shapes."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


_Section = Section


class ModelArgs(_Section):
    model_name_or_path: str | None = Field(
        None,
        description="HF model folder, a .gguf file (or a folder holding one), or a packaged alias such as "
        "`smollm2-135m-instruct`. Hub names are not downloaded: tunesmith is offline-first.",
    )
    adapter_name_or_path: str | None = Field(
        None, description="A PEFT adapter folder to load on top of the model (continue training, export, chat)."
    )
    trust_remote_code: bool = Field(
        False, description="Allow model folders to run their own Python code. Off unless you trust the folder."
    )
    allow_pickle: bool = Field(
        False,
        description="Allow loading pickled weights (*.bin / *.pt). Unpickling can run arbitrary code; "
        "safetensors is always preferred.",
    )
    cache_dir: str | None = Field(
        None,
        description="Where converted packaged/GGUF models are cached (default: $TUNESMITH_CACHE or "
        "~/.cache/tunesmith).",
    )
    flash_attn: Literal["auto", "disabled", "sdpa", "fa2"] = Field(
        "auto",
        description="Attention kernels (LLaMA-Factory's key): auto = SDPA sample by sample while training (each "
        "packed sample, or each padded row's tokens, attends to itself with causal SDPA and no T×T mask is built; "
        "on CUDA in bf16/fp16 one call of torch's variable-length flash attention per layer, also inside "
        "torch_compile's graphs; models outside transformers' attention interface, or that soft-cap scores, and "
        "torch_compile runs elsewhere get sdpa), sdpa = transformers' "
        "SDPA with a block-diagonal 4-D mask for packed rows, disabled (eager), fa2 (flash-attn 2 on CUDA: packed "
        "rows then go to its variable-length kernels, each sample's bounds read from where position_ids restart).",
    )


class MethodArgs(_Section):
    stage: Literal["sft", "pt", "rm", "dpo", "kto"] = Field(
        "sft",
        description="Training stage: `sft` (supervised fine-tuning on conversations: loss on the replies), `pt` "
        "(continued pre-training on raw text: loss on every token), `rm` (a reward model on chosen / rejected pairs: a "
        "scalar head, pairwise loss), `dpo` (preference tuning on chosen / "
        "rejected pairs, loss chosen by pref_loss) or `kto` (unpaired feedback: replies tagged desirable or not); "
        "see the README's section on each.",
    )
    pref_loss: Literal["sigmoid", "ipo", "hinge", "orpo", "simpo"] = Field(
        "sigmoid",
        description="dpo: the preference loss: `sigmoid` (DPO), `ipo`, `hinge`, `orpo` or `simpo` (the last two "
        "need no reference model).",
    )
    pref_beta: float = Field(0.1, gt=0.0, description="dpo / kto: beta, the strength of the preference term.")
    pref_ftx: float = Field(
        0.0, ge=0.0, description="dpo / kto: weight of an SFT term (mean log-likelihood loss of the chosen reply)."
    )
    kto_chosen_weight: float = Field(1.0, gt=0.0, description="kto: weight of the desirable examples' losses.")
    kto_rejected_weight: float = Field(1.0, gt=0.0, description="kto: weight of the undesirable examples' losses.")
    simpo_gamma: float = Field(0.5, description="dpo with pref_loss simpo: the target reward margin gamma.")
    ref_model: str | None = Field(
        None,
        description="dpo / kto: the reference model (a folder, .gguf or alias). Unset: the policy with its LoRA "
        "adapter switched off, or a frozen copy of the initial weights for full / freeze.",
    )
    precompute_ref_log_probs: bool = Field(
        False,
        description="dpo / kto: compute the reference log-probs of every example once before the first step; "
        "then no step runs the reference, and a frozen reference copy (full / freeze) is freed. The values are "
        "cached with the data (cache_dir/reference_logps), so a later run or a resume reuses them.",
    )
    ref_model_adapters: str | None = Field(
        None, description="dpo / kto: a LoRA adapter merged into ref_model (or into the base model when ref_model "
        "is unset), such as the SFT adapter the policy starts from."
    )
    dpo_label_smoothing: float = Field(
        0.0, ge=0.0, le=0.5, description="dpo with pref_loss sigmoid: label smoothing (conservative DPO), 0 to 0.5."
    )
    do_train: bool | None = Field(
        None,
        description="Whether `tunesmith train` trains. Unset: it trains, unless do_predict is true — a LLaMA-Factory "
        "predict config, which only predicts (as `tunesmith eval` does). false with do_predict: false is refused.",
    )
    finetuning_type: Literal["full", "freeze", "lora", "oft"] = Field(
        "lora",
        description="full: all weights; freeze: only the last N layers; lora: low-rank adapters via PEFT; oft: "
        "orthogonal fine-tuning adapters via PEFT.",
    )
    freeze_trainable_layers: int = Field(
        2,
        description="freeze: how many of the last decoder layers train (negative: the first N layers).",
    )
    freeze_trainable_modules: list[str] | str = Field(
        "all", description="freeze: module names inside the trainable layers that train (`all` or a list)."
    )
    lora_target: list[str] | str = Field(
        "all",
        description="lora: module names to adapt, `all` for every linear layer except the output head, "
        "or a comma list such as `q_proj,v_proj`.",
    )
    lora_rank: int = Field(8, ge=1, description="lora: rank r of the adapters.")
    lora_alpha: int | None = Field(None, description="lora: scaling alpha (default: 2 × lora_rank).")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="lora: dropout on the adapter input.")
    use_dora: bool = Field(
        False, description="lora: weight-decomposed adapters (DoRA): a learned magnitude per output channel."
    )
    use_rslora: bool = Field(
        False, description="lora: rank-stabilised scaling alpha / sqrt(r) instead of alpha / r (rsLoRA)."
    )
    quantization_bit: Literal[4, 8] | None = Field(
        None,
        description="QLoRA: load the frozen base quantized to 4 or 8 bits with bitsandbytes (finetuning_type: "
        "lora only). Runs on CPU too. `export` merges the adapter into the full-precision base.",
    )
    quantization_method: Literal["bitsandbytes", "bnb"] = Field(
        "bitsandbytes", description="QLoRA: the quantization library (only bitsandbytes)."
    )
    quantization_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="QLoRA 4-bit: the data type, NormalFloat4 (nf4) or FP4."
    )
    double_quantization: bool = Field(
        True, description="QLoRA 4-bit: also quantize the quantization constants (saves ~0.4 bit per weight)."
    )
    quantization_compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="QLoRA: dtype the dequantized weights compute in (`auto`: bfloat16 with bf16, float16 with "
        "fp16, else float32).",
    )

    @model_validator(mode="after")
    def _quantization_needs_lora(self) -> MethodArgs:
        if self.quantization_bit is not None and self.finetuning_type not in ("lora", "oft"):
            raise ValueError(
                f"quantization_bit: {self.quantization_bit} needs finetuning_type: lora or oft (a quantized base "
                f"cannot be trained {self.finetuning_type}); set finetuning_type: lora or remove quantization_bit"
            )
        return self

    @field_validator("lora_target", "freeze_trainable_modules", mode="before")
    @classmethod
    def _split_method_lists(cls, value: Any) -> Any:
        value = _comma_list(value)
        return "all" if value == ["all"] else value


class DataArgs(_Section):
    template: str = Field(
        "auto",
        description="Chat template: a registered one (qwen, chatml, qwen3, qwen3_nothink, llama3, internlm2, default, "
        "and LLaMA-Factory's llama2, llama4, mistral, gemma, gemma3, glm4, chatglm3, deepseek3, deepseekr1, phi, "
        "phi4, yi, baichuan2, intern2, internlm3, empty, alpaca, vicuna), or `auto` (the tokenizer's own jinja).",
    )
    dataset: list[str] | None = Field(
        None,
        description="Comma list of datasets: names in `dataset_dir/dataset_info.json`, or paths to "
        ".json / .jsonl / .csv / .parquet files.",
    )
    dataset_dir: str = Field("data", description="Folder holding dataset_info.json and relative data files.")
    cutoff_len: int = Field(2048, ge=8, description="Maximum tokens per sample; longer samples are truncated.")
    max_samples: int | None = Field(None, ge=1, description="Use at most this many rows of each dataset.")
    mix_strategy: Literal["concat", "interleave_under", "interleave_over"] = Field(
        "concat",
        description="How several datasets combine: concat (one after another, then shuffled), interleave_under "
        "(sample by interleave_probs until the first dataset runs out), interleave_over (until every dataset "
        "has been used up once; smaller ones repeat).",
    )
    interleave_probs: list[float] | None = Field(
        None,
        description="interleave_*: the probability of drawing from each dataset, in `dataset` order (comma "
        "list; default: equal).",
    )
    streaming: bool = Field(
        False,
        description="Read and encode the data lazily while training, for datasets larger than memory (needs "
        "max_steps; a checkpoint records the stream position, so resuming continues where it stopped).",
    )
    buffer_size: int = Field(
        16384, ge=1, description="streaming: rows held in the shuffle buffer (seeded, deterministic)."
    )
    val_size: float = Field(
        0.0, ge=0.0, description="Validation split: a fraction (< 1) or a row count (≥ 1) held out from training."
    )
    train_on_prompt: bool = Field(False, description="Also train on system and user tokens (not only replies).")
    mask_history: bool = Field(False, description="Train only on the last assistant turn of each conversation.")
    default_system: str | None = Field(
        None, description="System prompt used when a sample has none (overrides the template's default)."
    )
    placeholders: dict[str, str] = Field(
        default_factory=dict,
        description="Values for `{{name}}`-style placeholders in the data, e.g. `{name: Ada, author: Lab}`.",
    )
    packing: bool = Field(
        False,
        description="Pack several samples into each row of cutoff_len tokens (best-fit decreasing, deterministic). "
        "Unlike LLaMA-Factory's plain packing, samples never attend to each other: position ids restart per sample "
        "and a 4-D block-diagonal attention mask isolates them, so the loss equals that of the samples unpacked.",
    )
    neat_packing: bool = Field(
        False, description="LLaMA-Factory's contamination-free packing; the same as `packing: true` here."
    )
    skip_bad_rows: bool = Field(
        False, description="Skip malformed rows (and count them) instead of stopping at the first one."
    )
    preprocessing_num_workers: int | None = Field(
        None, ge=1, description="Processes that encode the data in parallel (default: one; the result is the same)."
    )
    preprocessing_batch_size: int = Field(
        1000, ge=1, description="Rows handed to the fast tokenizer per batch while preprocessing."
    )
    overwrite_cache: bool = Field(
        False, description="Re-run preprocessing even when a cached result matches (and replace the cache)."
    )
    tokenized_path: str | None = Field(
        None,
        description="Folder to save the preprocessed (encoded, packed) samples to and load them from. Unset: an "
        "automatic cache under cache_dir/datasets (`TUNESMITH_DATA_CACHE=0` turns it off). Either is keyed by a "
        "hash of the data files, tokenizer, template, data settings and tunesmith's version: anything changed "
        "rebuilds it, a stale cache is never used.",
    )

    @field_validator("dataset_dir")
    @classmethod
    def _local_dataset_dir(cls, value: str) -> str:
        if value.upper().startswith("REMOTE:"):
            raise ValueError(f"dataset_dir {value} names a folder on the hub, which tunesmith (offline-first) never "
                             "downloads; download it and set dataset_dir to the local folder")
        return value

    @field_validator("dataset", mode="before")
    @classmethod
    def _split_dataset(cls, value: Any) -> Any:
        return _comma_list(value)

    @field_validator("interleave_probs", mode="before")
    @classmethod
    def _split_probs(cls, value: Any) -> Any:
        return [float(part) for part in _comma_list(value)] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_mixing(self) -> DataArgs:
        if self.interleave_probs is not None:
            if any(p < 0 for p in self.interleave_probs) or sum(self.interleave_probs) <= 0:
                raise ValueError("interleave_probs must be non-negative and not all zero")
            if self.dataset is not None and len(self.interleave_probs) != len(self.dataset):
                raise ValueError(
                    f"interleave_probs has {len(self.interleave_probs)} values for {len(self.dataset)} datasets; "
                    "give one probability per dataset"
                )
        return self


class TrainArgs(_Section):
    output_dir: str | None = Field(None, description="Run folder: checkpoints, logs, resolved config.")
    overwrite_output_dir: bool = Field(False, description="Start fresh even if output_dir holds checkpoints.")
    num_train_epochs: float = Field(3.0, gt=0, description="Epochs to train (fractions allowed).")
    max_steps: int = Field(-1, description="Optimizer steps to train; > 0 overrides num_train_epochs.")
    per_device_train_batch_size: int = Field(8, ge=1, description="Samples per micro-batch per device.")
    per_device_eval_batch_size: int = Field(8, ge=1, description="Samples per validation batch per device.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate of AdamW.")
    lr_scheduler_type: Literal[
        "cosine", "linear", "constant", "constant_with_warmup", "cosine_with_min_lr", "cosine_with_restarts",
        "polynomial",
    ] = Field("linear", description="Learning-rate schedule after warm-up (HF's; options in lr_scheduler_kwargs).")
    warmup_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Warm-up as a fraction of all steps.")
    warmup_steps: int = Field(0, ge=0, description="Warm-up steps (overrides warmup_ratio when > 0).")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay (not applied to biases and norms).")
    adam_beta1: float = Field(0.9, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, description="AdamW beta2.")
    adam_epsilon: float = Field(1e-8, description="AdamW epsilon.")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Clip the global gradient norm to this (0: no clipping).")
    bf16: bool = Field(False, description="bfloat16 autocast where the device supports it.")
    fp16: bool = Field(False, description="float16 autocast with a loss scaler (CUDA only).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    logging_steps: int = Field(5, ge=1, description="Log loss / lr / throughput every N optimizer steps.")
    save_steps: int = Field(500, ge=1, description="Save a checkpoint every N optimizer steps (and at the end).")
    save_strategy: Literal["steps", "no"] = Field("steps", description="`no`: save only the final model.")
    save_total_limit: int | None = Field(None, ge=1, description="Keep only the newest N checkpoints.")
    eval_steps: int | None = Field(
        None, ge=1, description="Validation loss every N steps when val_size > 0 (default: logging_steps)."
    )
    eval_strategy: Literal["steps", "no"] = Field("steps", description="`no`: never compute validation loss.")
    eval_on_start: bool = Field(
        False, description="Validate (and answer evaluation_inputs) once before the first step, logged as step 0."
    )
    resume_from_checkpoint: str | None = Field(
        None,
        description="A checkpoint folder to resume from. Unset: resume from the newest checkpoint in output_dir.",
    )
    report_to: list[str] = Field(
        default_factory=lambda: ["none"], description="`none`, `tensorboard` or `all` (comma list allowed)."
    )
    logging_dir: str | None = Field(None, description="TensorBoard folder (default: output_dir/runs).")
    plot_loss: bool = Field(False, description="Write training_loss.png into output_dir at the end.")
    seed: int = Field(42, description="Seed for data order, initialisation and dropout.")
    run_name: str | None = Field(None, description="A name for this run in logs.")
    device: str = Field("auto", description="`auto` (CUDA, then NPU, then CPU) or a torch device string.")
    engine: Literal["auto", "single", "ddp", "fsdp2", "deepspeed"] = Field(
        "auto",
        description="How training uses several processes (launched by `tunesmith train --nproc-per-node N` or "
        "torchrun): `ddp` replicates the model and all-reduces gradients; `fsdp2` shards parameters, gradients "
        "and optimizer state (torch FSDP2 `fully_shard`); `deepspeed` runs DeepSpeed ZeRO as `deepspeed` "
        "configures it; `single` is one process. `auto`: deepspeed when `deepspeed` is set, else ddp with more "
        "than one process, else single.",
    )
    deepspeed: str | dict[str, Any] | None = Field(
        None,
        description="DeepSpeed config for engine: deepspeed (setting it selects that engine): a ds_config.json "
        "path as in LLaMA-Factory / the HF Trainer (its `\"auto\"` values are filled from this config, explicit "
        "values must agree with it), an inline mapping, or a preset: `ds_z0`, `ds_z1`, `ds_z2`, `ds_z2_offload`, "
        "`ds_z3`, `ds_z3_offload` (default with engine: deepspeed: `ds_z2`). Needs `pip install "
        "tunesmith[deepspeed]`.",
    )
    dataloader_num_workers: int = Field(
        0,
        ge=0,
        description="Collate the next micro-batches in a background thread while the model computes, up to this "
        "many windows ahead (0: collate in the loop). The data is tokenised before training, so no worker "
        "processes are needed; the batches and their order are the same either way.",
    )
    save_only_model: bool = Field(
        False,
        description="Checkpoints without the optimizer state (about a third of the size for full fine-tuning); "
        "such a checkpoint cannot resume a run, it can only start another (single and ddp engines).",
    )
    ddp_timeout: int | None = Field(
        None,
        ge=1,
        description="Seconds any collective may wait, e.g. ranks waiting while rank 0 loads/converts the model, "
        "before the job fails (default 1800).",
    )

    def resolved_engine(self, world_size: int) -> str:
        """``engine`` with ``auto`` resolved for a job of ``world_size`` processes: ddp with more than one, else
        single (a config with ``deepspeed`` set already says ``engine: deepspeed``); fsdp2 with tensor parallel,
        whose mesh it shards over."""
        if self.engine == "auto":
            if getattr(self, "tensor_parallel_size", 1) > 1:
                return "fsdp2"
            return "ddp" if world_size > 1 else "single"
        return self.engine

    @field_validator("save_strategy", "eval_strategy", mode="before")
    @classmethod
    def _yaml_no_is_false(cls, value: Any) -> Any:
        return "no" if value is False else value  # YAML 1.1 reads a bare `no` as false

    @field_validator("report_to", mode="before")
    @classmethod
    def _split_report_to(cls, value: Any) -> Any:
        if value is None:
            return ["none"]
        return _comma_list(value)

    @field_validator("report_to")
    @classmethod
    def _check_report_to(cls, value: list[str]) -> list[str]:
        allowed = {"none", "tensorboard", "all"}
        for item in value:
            if item not in allowed:
                raise ValueError(
                    f"not supported yet: report_to={item} (tunesmith is offline-first; use tensorboard or none)"
                )
        return value


class ExportArgs(_Section):
    export_dir: str | None = Field(None, description="Where `tunesmith export` writes the merged HF folder.")
    export_size: int = Field(5, ge=1, description="Largest safetensors shard, in GB.")
    export_device: Literal["cpu", "auto"] = Field("cpu", description="Device used for merging.")
    export_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the exported weights (`auto`: the base model's own dtype)."
    )
    export_quantization_bit: Literal[2, 3, 4, 8] | None = Field(
        None, description="GPTQ-quantize the exported model to this many bits (calibrated on "
        "export_quantization_dataset)."
    )
    export_quantization_dataset: str | None = Field(
        None, description="GPTQ calibration data: a dataset name of dataset_info.json or a file (its text is used)."
    )
    export_quantization_nsamples: int = Field(128, ge=1, description="GPTQ: calibration samples.")
    export_quantization_maxlen: int = Field(1024, ge=8, description="GPTQ: tokens per calibration sample.")
    export_legacy_format: bool = Field(
        False, description="Must stay false: tunesmith exports safetensors, never pickled .bin files."
    )
    export_format: Literal["hf", "gguf"] = Field(
        "hf",
        description="What `tunesmith export` writes: `hf` (a merged safetensors folder) or `gguf` (one .gguf file "
        "for llama.cpp / Ollama with the tokenizer and chat template inside, and an Ollama Modelfile beside it). "
        "In a training config, `gguf` makes `tunesmith train` check the model can be exported before it trains.",
    )
    export_quantization: Literal["f32", "f16", "bf16", "q8_0"] = Field(
        "f16", description="GGUF weight type (export_format: gguf): f32, f16, bf16 or q8_0 (8-bit blocks, about a "
        "quarter of f32's size); norms and biases stay f32."
    )

    @field_validator("export_legacy_format")
    @classmethod
    def _no_legacy(cls, value: bool) -> bool:
        if value:
            raise ValueError("not supported: pickled .bin export; set export_legacy_format: false (safetensors)")
        return value


class EvalArgs(_Section):
    do_predict: bool = Field(
        False,
        description="Generate answers for a dataset and score them (BLEU-4, ROUGE-1/2/L): `tunesmith eval CONFIG` "
        "does it; `tunesmith train` does it after training with do_train: true, and instead of training when do_train "
        "is unset (LLaMA-Factory's predict configs). Writes output_dir/generated_predictions.jsonl "
        "and predict_results.json.",
    )
    predict_with_generate: bool = Field(
        True, description="Accepted for LLaMA-Factory compatibility: prediction always generates (must stay true)."
    )
    eval_dataset: list[str] | None = Field(
        None,
        description="A separate validation set (same forms as `dataset`): the validation loss and metrics while "
        "training (instead of val_size), and the rows to predict on. Unset: the validation split of `dataset` "
        "when val_size > 0 (prediction: else all of `dataset`).",
    )
    max_new_tokens: int = Field(512, ge=1, description="Most tokens generated per answer (prediction).")
    do_sample: bool = Field(
        False,
        description="Sample answers with temperature / top_p instead of greedy decoding. Off by default so "
        "scores are reproducible (LLaMA-Factory samples by default).",
    )
    temperature: float = Field(0.95, gt=0.0, description="Sampling temperature when do_sample is true.")
    top_p: float = Field(0.7, gt=0.0, le=1.0, description="Nucleus sampling mass when do_sample is true.")
    evaluation_inputs: list[str] | None = Field(
        None,
        description="Questions answered during training every evaluation_freq steps (XTuner's name); the "
        "answers go to the console, trainer_log.jsonl and TensorBoard.",
    )
    evaluation_freq: int | None = Field(
        None, ge=1, description="Answer evaluation_inputs every N optimizer steps (default: eval_steps)."
    )

    @field_validator("eval_dataset", mode="before")
    @classmethod
    def _split_eval_dataset(cls, value: Any) -> Any:
        return _comma_list(value)

    @field_validator("evaluation_inputs", mode="before")
    @classmethod
    def _one_question(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value  # questions hold commas: never split a string

    @field_validator("predict_with_generate")
    @classmethod
    def _always_generate(cls, value: bool) -> bool:
        if not value:
            raise ValueError("not supported: predict_with_generate: false; tunesmith predicts by generating")
        return value


# Keys of LLaMA-Factory / HF TrainingArguments that tunesmith knows but does not implement yet: a config that
# sets one fails with "not supported yet: KEY" instead of being silently ignored.
NOT_SUPPORTED_YET: frozenset[str] = frozenset(
    """
    fsdp_config
    additional_target lora_modules_to_save
    new_special_tokens resize_vocab shift_attn rope_scaling use_unsloth
    upcast_layernorm export_hub_model_id push_to_hub
    hub_model_id reward_model booster
    ld_alpha infer_backend vllm_maxlen
    freeze_vision_tower image_max_pixels video_max_pixels media_dir
    moe_aux_loss_coef max_source_length max_target_length
    """.split()
)


class Config(
    ModelArgs, MethodArgs, LFMethodArgs, DataArgs, TrainArgs, ParallelArgs, SpeedArgs, OptimizerArgs, HFCompatArgs,
    EvalArgs, ExportArgs,
):
    """The whole tunesmith config: every section's keys at the top level, as in LLaMA-Factory."""

    @model_validator(mode="after")
    def _defaults(self) -> Config:
        if self.lora_alpha is None:
            self.lora_alpha = self.lora_rank * 2
        if self.eval_steps is None:
            self.eval_steps = self.logging_steps
        if "all" in self.report_to:
            self.report_to = ["tensorboard"]
        if self.fp16 and self.bf16:
            raise ValueError("bf16 and fp16 are both true; choose one")
        if self.deepspeed is not None and self.engine not in ("auto", "deepspeed"):
            raise ValueError(
                f"deepspeed is set but engine is {self.engine}; use engine: deepspeed (or auto), or remove deepspeed"
            )
        if self.deepspeed is not None and self.engine == "auto":
            self.engine = "deepspeed"
        if self.engine == "deepspeed" and self.deepspeed is None:
            self.deepspeed = "ds_z2"
        return self

    @model_validator(mode="after")
    def _apply_hf_keys(self) -> Config:
        """HF / LLaMA-Factory keys that set tunesmith's own (see config/hf_compat.py)."""
        # each assignment only when it changes something: assignments re-run the validators
        if self.use_cpu and self.device != "cpu":
            self.device = "cpu"
        if self.do_eval is False and self.eval_strategy != "no":
            self.eval_strategy = "no"
        if self.disable_gradient_checkpointing is not None:
            wanted = not self.disable_gradient_checkpointing
            if "gradient_checkpointing" in self.model_fields_set and self.gradient_checkpointing != wanted:
                raise ValueError("gradient_checkpointing and disable_gradient_checkpointing contradict each other; "
                                 "keep one of them")
            if self.gradient_checkpointing != wanted:
                self.gradient_checkpointing = wanted
        if self.fsdp:
            if "offload" in self.fsdp:
                raise ValueError("fsdp: offload is not supported by engine: fsdp2 here; remove offload from fsdp, "
                                 "or use deepspeed: ds_z3_offload")
            if self.engine not in ("auto", "fsdp2"):
                raise ValueError(f"fsdp is set but engine is {self.engine}; remove one of them")
            if self.engine != "fsdp2":
                self.engine = "fsdp2"
        return self

    @model_validator(mode="after")
    def _stage_supports(self) -> Config:
        if self.stage != "sft" and self.streaming:
            raise ValueError(f"streaming: true is not supported with stage: {self.stage} yet; set streaming: false")
        if self.stage == "rm" and self.evaluation_inputs:
            raise ValueError("evaluation_inputs needs a model that generates; a reward model (stage: rm) does not")
        if self.stage in ("rm", "dpo", "kto") and (self.packing or self.neat_packing):
            raise ValueError(
                f"packing is not supported with stage: {self.stage} (each example is one sample); set packing: false"
            )
        if self.ref_model or self.ref_model_adapters:
            key = "ref_model" if self.ref_model else "ref_model_adapters"
            if self.stage not in ("dpo", "kto"):
                raise ValueError(f"{key} is for stage: dpo and kto, which compare with a reference model; remove it")
            if self.stage == "dpo" and self.pref_loss in ("orpo", "simpo"):
                raise ValueError(f"{key} is set but pref_loss: {self.pref_loss} needs no reference model; remove it")
        return self

    @model_validator(mode="after")
    def _sequence_parallel_supports(self) -> Config:
        """What sequence parallel does not cover yet; the world size and head counts are checked with the job
        (tunesmith.train.sequence_parallel)."""
        size = self.sequence_parallel_size
        if size == 1:
            return self
        if self.stage not in ("sft", "pt"):
            raise ValueError(f"sequence_parallel_size: {size} works with stage: sft or pt, not stage: "
                             f"{self.stage} yet; set sequence_parallel_size: 1 or change the stage")
        if self.engine == "deepspeed":
            raise ValueError(f"sequence_parallel_size: {size} works with engine: ddp or fsdp2, not deepspeed yet; "
                             "remove deepspeed or set sequence_parallel_size: 1")
        if self.flash_attn == "fa2":
            raise ValueError(f"sequence_parallel_size: {size} runs its own all-to-all attention (SDPA inside), not "
                             "flash_attn: fa2; set flash_attn: auto or sdpa")
        if self.use_asft_loss:
            raise ValueError(f"use_asft_loss (its reference forward) does not work with sequence_parallel_size: "
                             f"{size} yet; set sequence_parallel_size: 1 or use another loss")
        return self

    def _model_parallel_common(self, key: str, size: int) -> None:
        """What neither tensor nor pipeline parallel runs (``key``: which of them, at ``size`` > 1)."""
        if self.stage not in ("sft", "pt"):
            raise ValueError(f"{key}: {size} works with stage: sft or pt, not stage: {self.stage} yet; set "
                             f"{key}: 1 or change the stage")
        if self.engine == "deepspeed":
            raise ValueError(f"{key}: {size} runs on torch's DeviceMesh (engine ddp or fsdp2), not deepspeed; "
                             f"remove deepspeed or set {key}: 1")
        if self.use_asft_loss:
            raise ValueError(f"use_asft_loss (its reference forward) does not work with {key}: {size}; set "
                             f"{key}: 1 or use another loss")

    @model_validator(mode="after")
    def _tensor_parallel_supports(self) -> Config:
        """What tensor parallel cannot run, refused before launch; the world size and head counts are checked
        with the job (tunesmith.train.tensor_parallel)."""
        tp = self.tensor_parallel_size
        if tp == 1:
            return self
        self._model_parallel_common("tensor_parallel_size", tp)
        if self.engine in ("ddp", "single"):
            raise ValueError(f"tensor_parallel_size: {tp} runs on engine fsdp2 (a data-parallel × tensor-parallel "
                             f"mesh), not engine: {self.engine}; set engine: fsdp2 or auto")
        if self.sequence_parallel_size > 1:
            raise ValueError(f"tensor_parallel_size: {tp} does not combine with sequence_parallel_size yet; set one "
                             "of them to 1")
        if self.quantization_bit or self.use_dora:
            key = "use_dora" if self.use_dora else "quantization_bit"
            raise ValueError(f"tensor_parallel_size: {tp} splits plain Linear layers and LoRA, not {key}; remove "
                             f"{key} or set tensor_parallel_size: 1")
        return self

    @model_validator(mode="after")
    def _pipeline_parallel_supports(self) -> Config:
        """What pipeline parallel cannot run, refused before launch (tunesmith.train.pipeline_parallel)."""
        pp = self.pipeline_parallel_size
        if pp == 1:
            return self
        self._model_parallel_common("pipeline_parallel_size", pp)
        others = [k for k, v in (("tensor_parallel_size", self.tensor_parallel_size),
                                 ("sequence_parallel_size", self.sequence_parallel_size)) if v > 1]
        if others:
            raise ValueError(f"pipeline_parallel_size: {pp} does not combine with {others[0]} yet; set one of "
                             "them to 1")
        if self.finetuning_type != "full" or self.quantization_bit:
            raise ValueError(f"pipeline_parallel_size: {pp} trains finetuning_type: full (no quantization_bit); "
                             "use tensor_parallel_size or fsdp2 to split a LoRA run")
        if self.engine == "fsdp2":
            raise ValueError(f"pipeline_parallel_size: {pp} runs with engine: ddp (each stage replicated over "
                             "data parallel), not fsdp2; set engine: ddp")
        if self.val_size > 0 or self.eval_dataset:
            raise ValueError(f"pipeline_parallel_size: {pp} does not run validation yet (val_size / eval_dataset); "
                             "remove them or set pipeline_parallel_size: 1")
        if self.fp16:
            raise ValueError(f"pipeline_parallel_size: {pp} does not run fp16 (its loss scaler does not span the "
                             "stages); use bf16: true or fp32")
        return self

    @model_validator(mode="after")
    def _one_validation_set(self) -> Config:
        training = self.do_train if self.do_train is not None else not self.do_predict
        if training and self.eval_dataset and self.val_size > 0:
            raise ValueError(
                "val_size and eval_dataset are both set; validate on a split of dataset (val_size) or on "
                "eval_dataset, not both: remove one"
            )
        return self

    @model_validator(mode="after")
    def _streaming_needs_max_steps(self) -> Config:
        if self.streaming and self.max_steps <= 0:
            raise ValueError(
                "streaming: true needs max_steps (a stream has no known length, so epochs cannot be counted); "
                "set max_steps: N"
            )
        return self

    def require(self, *keys: str) -> None:
        """Fail with a clear message when a key needed by the current command is unset."""
        for key in keys:
            if getattr(self, key) in (None, [], ""):
                raise ConfigError(f"config key {key} is required for this command; set it in the YAML or as {key}=...")

    @property
    def use_tensorboard(self) -> bool:
        return "tensorboard" in self.report_to


SECTIONS: dict[str, type[_Section]] = {
    "model": ModelArgs,
    "method": MethodArgs,
    "method extras": LFMethodArgs,
    "data": DataArgs,
    "train": TrainArgs,
    "parallel": ParallelArgs,
    "speed": SpeedArgs,
    "optimizer": OptimizerArgs,
    "HF / LLaMA-Factory compatibility": HFCompatArgs,
    "eval": EvalArgs,
    "export": ExportArgs,
}
