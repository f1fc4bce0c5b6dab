"""``train(cfg)``: the whole run from a config — engine, tokenizer, datasets, model, fine-tuning method — then
:func:`tunesmith.train.loop.fit`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tunesmith.config import Config
from tunesmith.data.loader import pad_token_id
from tunesmith.model.adapt import apply_finetuning, load_adapter
from tunesmith.model.fused_lora import use_fused_lora
from tunesmith.model.lean_activations import use_lean_activations
from tunesmith.model.load import (
    RewardHead,
    attention_implementation,
    load_model,
    load_tokenizer,
    pick_device,
    quantization_from_config,
)
from tunesmith.model.segment_attention import use_segment_attention
from tunesmith.model.varlen_attention import varlen_runs_here
from tunesmith.train import resume
from tunesmith.train.distributed import main_process_first, prepare_datasets_once
from tunesmith.train.engines import Engine, create_engine
from tunesmith.train.host_memory import keep_freed_host_memory
from tunesmith.train.loop import StepCallback, TrainResult, fit, seed_everything
from tunesmith.train.objectives import create_objective


def train(cfg: Config, callbacks: Sequence[StepCallback] = ()) -> TrainResult:
    """The whole run: engine → tokenizer → datasets → model → fine-tuning method → :func:`fit`. Re-running the
    same config continues from the newest complete checkpoint in ``output_dir``.

    Distributed (under torchrun, or ``engine: ddp``/``fsdp2``/``deepspeed``): the engine joins the process group
    first; rank 0 loads (and, for packaged or GGUF models, converts into the cache) tokenizer and model, and
    preprocesses the data into the data cache, before the other ranks, which wait on the store without any
    timeout and then read the caches (with ``TUNESMITH_DATA_CACHE=0`` every rank preprocesses itself); :func:`fit`
    checks the ranks' data agree. With ``streaming: true`` every rank reads the whole stream while training and
    collates only its own micro-batches."""
    cfg.require("model_name_or_path", "dataset", "output_dir")
    attention = attention_implementation(cfg.flash_attn, pick_device(cfg.device))  # before the process group
    engine = create_engine(cfg)
    if engine.device.type == "cpu":
        keep_freed_host_memory()  # each step's large tensors reuse the last step's pages (host_memory.py)
    resume_from = resume.find_resume_checkpoint(cfg)  # fail before the slow part when the folder cannot continue
    seed_everything(cfg.seed)
    tokenizer = _load_tokenizer(cfg)
    data = prepare_datasets_once(cfg, tokenizer)
    objective = create_objective(cfg, lambda: _load_reference(cfg, engine, attention))
    head = RewardHead(pad_token_id(tokenizer), cfg.seed) if objective.model_head == "reward" else None
    model = _load_model(cfg, engine, attention, head)
    segments = _segment_inputs(cfg, engine)
    if segments and objective.attention == "mask" and use_segment_attention([model]):
        objective.attention = segments
    model = apply_finetuning(model, cfg)
    if cfg.fused_lora:
        use_fused_lora(model)
    if cfg.lean_activations and not cfg.torch_compile:
        use_lean_activations(model)
    return fit(cfg, model, tokenizer, data.train, data.val, engine=engine, objective=objective,
               resume_from=resume_from, callbacks=callbacks)


def _load_reference(cfg: Config, engine: Engine, attention: str | None) -> torch.nn.Module:
    """ref_model (default: the base model), with ref_model_adapters merged into it; never quantized."""
    with main_process_first("loading the reference model"):
        model = load_model(
            cfg.ref_model or cfg.model_name_or_path,
            dtype=engine.load_dtype(cfg),
            cache_dir=cfg.cache_dir,
            trust_remote_code=cfg.trust_remote_code,
            allow_pickle=cfg.allow_pickle,
            device=engine.load_device(quantized=False),
            attn_implementation=attention,
        )
    if cfg.ref_model_adapters:
        model = load_adapter(model, cfg.ref_model_adapters, allow_pickle=cfg.allow_pickle).merge_and_unload()
    if _segment_inputs(cfg, engine):
        use_segment_attention([model])  # it may be given the policy's segment ids (the ASFT loss)
    return model


def _segment_inputs(cfg: Config, engine: Engine) -> str | None:
    """How flash_attn: auto hands packed rows to the attention by segments (Batch.model_inputs), or None when it
    stays with the masked SDPA. On CUDA in half precision the batch brings the samples' offsets for the one
    variable-length kernel call per layer, which compiled blocks trace like any op ("segment_offsets"). Elsewhere
    the attention loops over the samples ("segments"), except under torch_compile: that loop would break every
    compiled block's graph in two, so the masked SDPA stays inside the graph there."""
    if cfg.flash_attn != "auto":
        return None
    if varlen_runs_here(engine.device, engine.precision):
        return "segment_offsets"
    return None if cfg.torch_compile else "segments"


def _load_tokenizer(cfg: Config) -> Any:
    with main_process_first("loading the tokenizer"):
        return load_tokenizer(cfg.model_name_or_path, cache_dir=cfg.cache_dir, trust_remote_code=cfg.trust_remote_code)


def _load_model(cfg: Config, engine: Engine, attention: str | None, head: RewardHead | None) -> torch.nn.Module:
    quantization = quantization_from_config(cfg, engine.precision)
    with main_process_first("loading the model"):
        return load_model(
            cfg.model_name_or_path,
            dtype=engine.load_dtype(cfg),
            cache_dir=cfg.cache_dir,
            trust_remote_code=cfg.trust_remote_code,
            allow_pickle=cfg.allow_pickle,
            device=engine.load_device(quantized=quantization is not None),
            quantization=quantization,
            attn_implementation=attention,
            reward_head=head,
        )
