"""`tunesmith eval` for a reward model (``stage: rm``): score preference pairs.

Which pairs: ``eval_dataset`` when set; otherwise the validation split of ``dataset`` when ``val_size`` > 0 (the
split training held out, same seed); otherwise all of ``dataset``. The model: ``model_name_or_path`` (a trained
full / freeze reward model folder, or the base of a LoRA one) plus ``adapter_name_or_path`` (the LoRA adapter with
its head). Writes ``output_dir/generated_predictions.jsonl`` (prompt, chosen, rejected and their scores, as
LLaMA-Factory's reward predictions) and ``output_dir/predict_results.json`` (accuracy: the share of pairs whose
chosen reply scores higher; the mean scores and margin).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tunesmith.config import Config
from tunesmith.data import prepare_datasets
from tunesmith.data.loader import pad_token_id
from tunesmith.data.pairs import PairCollator, PairSample
from tunesmith.errors import DataError
from tunesmith.logging import get_logger

log = get_logger("eval")

PREDICTIONS_FILE = "generated_predictions.jsonl"
RESULTS_FILE = "predict_results.json"


def pairs_to_score(cfg: Config, tokenizer: Any) -> tuple[list[PairSample], str]:
    """(encoded pairs, where they come from)."""
    if cfg.eval_dataset:
        only_eval = {"dataset": cfg.eval_dataset, "eval_dataset": None, "val_size": 0.0}
        return list(prepare_datasets(cfg.model_copy(update=only_eval), tokenizer).train), \
            f"eval_dataset={','.join(cfg.eval_dataset)}"
    data = prepare_datasets(cfg, tokenizer)
    if cfg.val_size > 0:
        return list(data.val), f"the validation split (val_size={cfg.val_size:g}, seed {cfg.seed}) of dataset"
    return list(data.train), f"dataset={','.join(cfg.dataset)}"


def load_reward_model(cfg: Config, tokenizer: Any) -> torch.nn.Module:
    from tunesmith.model.adapt import load_adapter
    from tunesmith.model.load import RewardHead, load_model

    model = load_model(cfg.model_name_or_path, cache_dir=cfg.cache_dir, trust_remote_code=cfg.trust_remote_code,
                       allow_pickle=cfg.allow_pickle, device=cfg.device,
                       reward_head=RewardHead(pad_token_id(tokenizer), cfg.seed))
    if cfg.adapter_name_or_path:
        model = load_adapter(model, cfg.adapter_name_or_path, allow_pickle=cfg.allow_pickle)
    return model.eval()


def score_pairs(model: torch.nn.Module, samples: list[PairSample], pad_id: int, batch_size: int
                ) -> list[tuple[float, float]]:
    """(chosen score, rejected score) of each pair: the reward at each row's last real token."""
    collator, device = PairCollator(pad_id), next(model.parameters()).device
    scores: list[tuple[float, float]] = []
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            batch = collator.collate(samples[start : start + batch_size]).to(device)
            rewards = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.squeeze(-1)
            chosen, rejected = rewards.float().cpu().chunk(2)
            scores += list(zip(chosen.tolist(), rejected.tolist(), strict=True))
    return scores


def run_reward_eval(cfg: Config) -> dict[str, float]:
    from tunesmith.model.load import load_tokenizer

    tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.cache_dir, cfg.trust_remote_code)
    samples, where = pairs_to_score(cfg, tokenizer)
    if not samples:
        raise DataError(f"no pairs to score in {where}; check the dataset, max_samples and val_size")
    log.info("scoring %d preference pairs of %s", len(samples), where)
    model = load_reward_model(cfg, tokenizer)
    scores = score_pairs(model, samples, pad_token_id(tokenizer), cfg.per_device_eval_batch_size)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with (output_dir / PREDICTIONS_FILE).open("w", encoding="utf-8") as fh:
        for sample, (chosen, rejected) in zip(samples, scores, strict=True):
            row = {
                "prompt": tokenizer.decode(list(sample.prompt), skip_special_tokens=False),
                "chosen": tokenizer.decode(list(sample.chosen), skip_special_tokens=False),
                "rejected": tokenizer.decode(list(sample.rejected), skip_special_tokens=False),
                "chosen_score": chosen,
                "rejected_score": rejected,
            }
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    count = len(scores)
    results = {
        "predict_accuracy": sum(chosen > rejected for chosen, rejected in scores) / count,
        "predict_chosen_score": sum(chosen for chosen, _ in scores) / count,
        "predict_rejected_score": sum(rejected for _, rejected in scores) / count,
        "predict_margin": sum(chosen - rejected for chosen, rejected in scores) / count,
        "predict_samples": count,
    }
    (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    log.info("reward model: accuracy %.3f, mean margin %.4f over %d pairs -> %s", results["predict_accuracy"],
             results["predict_margin"], count, output_dir / RESULTS_FILE)
    return results
