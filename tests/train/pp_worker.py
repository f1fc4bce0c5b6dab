"""Pipeline-parallel workers for tests/train/test_pipeline_parallel.py, run under torchrun on CPU (gloo) or alone.

    python -m torch.distributed.run --nproc-per-node 2 pp_worker.py MODEL_DIR "OUTPUT_DIR key=value ..." ...

Each quoted argument is one run of tunesmith's loop on hand-encoded samples (``packing=true``: packed rows), as
sp_worker.py trains them, one after the other in the same processes (the process group is joined once: each
launch costs more than a run of the tiny model). The model is the tiny Llama of :func:`build_llama` (4 decoder
layers, so 2 stages hold 2 each).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from train_helpers import encode_pairs, make_cfg, parse_value, tiny_model

from tunesmith.data.pack import pack_samples
from tunesmith.logging import setup_logging
from tunesmith.model.load import load_tokenizer
from tunesmith.train.distributed import end_process, shutdown_distributed
from tunesmith.train.engines import create_engine
from tunesmith.train.loop import fit


def build_llama(out_dir: Path, tokenizer_dir: Path, layers: int = 4) -> Path:
    """A tiny random LlamaForCausalLM (``layers`` decoder layers, untied head) with the tiny model's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.save_pretrained(out_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out_dir, safe_serialization=True)
    for name in ("generation_config.json",):  # the tokenizer folder's own, if any
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out_dir / name)
    return out_dir


def train(model_dir: str, output_dir: str, overrides: dict) -> None:
    values = dict(max_steps=6, learning_rate=1e-2, per_device_train_batch_size=2, save_steps=100)
    values.update(overrides)
    packing = bool(values.get("packing"))
    cfg = make_cfg(output_dir, model_dir, **values)
    engine = create_engine(cfg, torch.device("cpu"))  # validates, joins the process group unless single
    tokenizer = load_tokenizer(model_dir)
    model = tiny_model(model_dir, cfg)  # seeded: the same weights on every rank
    samples = encode_pairs(tokenizer, repeat=2)
    if packing:  # rows of several samples
        samples, _ = pack_samples(samples, cutoff_len=96)
    fit(cfg, model, tokenizer, samples, engine=engine, resume_from=cfg.resume_from_checkpoint)


if __name__ == "__main__":
    setup_logging()
    for run in sys.argv[2:]:
        output_dir, *overrides = run.split()
        pairs = dict(arg.split("=", 1) for arg in overrides)
        train(sys.argv[1], output_dir, {k: parse_value(v) for k, v in pairs.items()})
    shutdown_distributed()
    end_process(0)  # a rank of a multi-rank job exits here (see end_process)
