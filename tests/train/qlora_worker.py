"""A QLoRA training worker for tests/train/test_qlora_engines.py: the tiny model loaded quantized, adapters added,
then tunesmith's loop on hand-encoded samples, on one process or under torchrun (any engine).

    python -m torch.distributed.run --nproc-per-node 2 qlora_worker.py MODEL_DIR OUTPUT_DIR [key=value ...]
"""

from __future__ import annotations

import sys

import torch
from train_helpers import encode_pairs, make_cfg, parse_value

from tunesmith.logging import setup_logging
from tunesmith.model.adapt import apply_finetuning
from tunesmith.model.load import load_model, load_tokenizer, quantization_from_config
from tunesmith.train.distributed import end_process, shutdown_distributed
from tunesmith.train.engines import create_engine
from tunesmith.train.loop import fit


def run(model_dir: str, output_dir: str, overrides: dict) -> None:
    values = dict(finetuning_type="lora", quantization_bit=4, lora_rank=4, learning_rate=2e-2, max_steps=6)
    values.update(overrides)
    cfg = make_cfg(output_dir, model_dir, **values)
    engine = create_engine(cfg, torch.device("cpu"))  # validates, joins the process group unless single
    tokenizer = load_tokenizer(model_dir)
    torch.manual_seed(cfg.seed)  # the adapters start identical on every rank
    quantization = quantization_from_config(cfg, engine.precision)
    model = apply_finetuning(load_model(model_dir, device=engine.device, quantization=quantization), cfg)
    fit(cfg, model, tokenizer, encode_pairs(tokenizer, repeat=2), engine=engine, resume_from=None)


if __name__ == "__main__":
    setup_logging()
    pairs = dict(arg.split("=", 1) for arg in sys.argv[3:])
    run(sys.argv[1], sys.argv[2], {k: parse_value(v) for k, v in pairs.items()})
    shutdown_distributed()
    end_process(0)  # a rank of a multi-rank job exits here (see end_process)
