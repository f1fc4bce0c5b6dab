"""Prediction: answer a dataset's prompts, score the answers against its replies, write both to output_dir.

Which rows: ``eval_dataset`` when set; otherwise the validation split of ``dataset`` when ``val_size`` > 0 —
the very rows training held out (same drops, same seeded split) — else all of ``dataset``. The prompt is the
conversation up to its last user turn, the label its last reply.

Writes ``generated_predictions.jsonl`` (``prompt``, ``predict``, ``label`` per row, LLaMA-Factory's format) and
``predict_results.json`` (``predict_bleu-4``, ``predict_rouge-1/2/l``, runtime).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from tunesmith.config import Config
from tunesmith.config.load import check_output_folder
from tunesmith.data.conversation import Conversation
from tunesmith.errors import ConfigError, DataError
from tunesmith.evaluate.metrics import compute_metrics
from tunesmith.logging import get_logger, is_main_process

log = get_logger("eval")

PREDICTIONS_FILE = "generated_predictions.jsonl"
RESULTS_FILE = "predict_results.json"
_BATCH = 2048  # conversations per tokenizer call, as encode_dataset


def kept_conversations(convs: list[Conversation], tokenizer: Any, template: Any, cfg: Config) -> list[Conversation]:
    """The conversations encode_dataset keeps (bad rows skipped, over-long ones dropped), in order: splitting
    these with the training seed gives the same validation rows as training's split of the encoded samples."""
    from tunesmith.data.encode import assemble

    kept = []
    for start in range(0, len(convs), _BATCH):
        batch = convs[start : start + _BATCH]
        for conv, turns in zip(batch, template.encode_many(tokenizer, batch, cfg.default_system), strict=True):
            if isinstance(turns, DataError):
                if not cfg.skip_bad_rows:
                    raise turns
                continue
            if assemble(turns, cfg.cutoff_len, cfg.train_on_prompt, cfg.mask_history)[0] is not None:
                kept.append(conv)
    return kept


def prediction_conversations(cfg: Config, tokenizer: Any, template: Any) -> tuple[list[Conversation], str]:
    """(conversations to predict on, a description of where they come from)."""
    from tunesmith.data.sources import load_conversations
    from tunesmith.data.split import split_train_val

    if cfg.eval_dataset:
        # eval_dataset is read whole, one after another: the training mix (and its probabilities) is not its own
        only_eval = {"dataset": cfg.eval_dataset, "mix_strategy": "concat", "interleave_probs": None}
        convs, _ = load_conversations(cfg.model_copy(update=only_eval))
        return convs, f"eval_dataset={','.join(cfg.eval_dataset)}"
    cfg.require("dataset")
    convs, _ = load_conversations(cfg)
    where = f"dataset={','.join(cfg.dataset)}"
    if cfg.val_size > 0:
        _, val = split_train_val(kept_conversations(convs, tokenizer, template, cfg), cfg.val_size, cfg.seed)
        return val, f"the validation split (val_size={cfg.val_size:g}, seed {cfg.seed}) of {where}"
    return convs, where


def run_predict(cfg: Config, model: Any = None, tokenizer: Any = None) -> dict[str, float]:
    """Generate, score and write the results (see the module docstring); returns predict_results.json's dict.

    ``model`` / ``tokenizer`` default to loading cfg's model (+ adapter)."""
    from tqdm.auto import tqdm

    from tunesmith.data.templates import get_template
    from tunesmith.model.generate import generate_reply

    cfg.require("model_name_or_path", "output_dir")
    if model is None or tokenizer is None:
        from tunesmith.model.load import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(cfg)
    template = get_template(cfg.template, tokenizer)
    convs, where = prediction_conversations(cfg, tokenizer, template)
    if not convs:
        raise DataError(f"no rows to predict on in {where}; check the dataset, max_samples and val_size")
    log.info("predicting %d rows of %s (max_new_tokens=%d, %s)", len(convs), where, cfg.max_new_tokens,
             f"sampling at temperature {cfg.temperature:g}" if cfg.do_sample else "greedy")

    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows, start = [], time.perf_counter()
    for conv in tqdm(convs, desc="predict", unit="row", file=sys.stderr, dynamic_ncols=True, mininterval=0.5):
        messages = conv.to_messages(cfg.default_system)
        prompt, label = messages[:-1], messages[-1]["content"]
        answer = generate_reply(
            model,
            tokenizer,
            template,
            prompt,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature if cfg.do_sample else 0.0,
            top_p=cfg.top_p,
            seed=cfg.seed,
        )
        rows.append({"prompt": template.prompt_text(tokenizer, prompt), "predict": answer, "label": label})
    runtime = time.perf_counter() - start

    with (output_dir / PREDICTIONS_FILE).open("w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    scores = compute_metrics([r["predict"] for r in rows], [r["label"] for r in rows])
    results = {f"predict_{name}": value for name, value in scores.items()}
    results.update(
        predict_samples=len(rows),
        predict_runtime=round(runtime, 4),
        predict_samples_per_second=round(len(rows) / max(runtime, 1e-9), 3),
    )
    (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    log.info(
        "predict: BLEU-4 %.2f  ROUGE-1 %.2f  ROUGE-2 %.2f  ROUGE-L %.2f over %d rows -> %s",
        scores["bleu-4"], scores["rouge-1"], scores["rouge-2"], scores["rouge-l"], len(rows),
        output_dir / RESULTS_FILE,
    )
    return results


def predict_after_training(cfg: Config) -> dict[str, float] | None:
    """``do_predict: true`` with ``tunesmith train``: predict with the model training just saved in output_dir
    (the adapter for lora, the whole model for full / freeze). Main process only; None elsewhere."""
    if not cfg.do_predict or not is_main_process():
        return None
    if cfg.finetuning_type in ("lora", "oft"):  # the adapter in output_dir
        trained = cfg.model_copy(update={"adapter_name_or_path": str(cfg.output_dir)})
    else:
        trained = cfg.model_copy(update={"model_name_or_path": str(cfg.output_dir), "adapter_name_or_path": None})
    if cfg.stage == "rm":
        from tunesmith.evaluate.rewards import run_reward_eval

        return run_reward_eval(trained)
    return run_predict(trained)


def check_predict_config(cfg: Config) -> None:
    """Fail early (before loading anything) when `tunesmith eval` cannot run with this config."""
    cfg.require("model_name_or_path", "output_dir")
    check_output_folder("output_dir", Path(cfg.output_dir or "."))
    if not cfg.eval_dataset and not cfg.dataset:
        raise ConfigError("tunesmith eval needs eval_dataset or dataset; set one in the YAML or as eval_dataset=...")
