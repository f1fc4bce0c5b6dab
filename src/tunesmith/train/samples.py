"""Answers to fixed questions during training (XTuner's ``evaluation_inputs`` / ``evaluation_freq``).

Watching a few answers change is often the quickest sign that a fine-tune works (or has started to forget).
Each call answers every question greedily and logs the answers to the console, to ``trainer_log.jsonl`` (one
entry ``{"step", "sample_generations": [{"question", "answer"}]}``) and, given a writer, to TensorBoard's
Text tab. Generation runs wherever it is called; only the main process writes and prints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunesmith.config import Config
from tunesmith.logging import get_logger, is_main_process
from tunesmith.model.generate import generate_reply, get_chat_template

log = get_logger("train")

# The training loop's log file (train/observe.py LOG_FILE): the samples sit beside the losses of the same step.
LOG_FILE = "trainer_log.jsonl"
TB_TAG = "eval/sample_generations"


def sample_every(cfg: Config) -> int:
    """Steps between answers to evaluation_inputs: evaluation_freq, else eval_steps, else logging_steps."""
    return cfg.evaluation_freq or cfg.eval_steps or cfg.logging_steps


def sample_generation_due(cfg: Config, step: int, total_steps: int) -> bool:
    """True at the steps where the loop should call log_sample_generations: every evaluation_freq steps
    (default eval_steps) and at the last step, when evaluation_inputs is set."""
    if not cfg.evaluation_inputs:
        return False
    return step % sample_every(cfg) == 0 or step == total_steps


def log_sample_generations(
    model: Any,
    tokenizer: Any,
    template: Any,
    questions: list[str],
    step: int,
    output_dir: str | Path,
    tb_writer: Any = None,
    *,
    system: str | None = None,
    max_new_tokens: int = 128,
) -> list[dict[str, str]]:
    """Answer each question (greedy, so runs compare) and log the answers; returns [{question, answer}].

    ``template``: a Template or a template name; ``tb_writer``: a torch SummaryWriter (or None)."""
    chat_template = get_chat_template(template, tokenizer)
    samples = []
    for question in questions:
        answer = generate_reply(
            model,
            tokenizer,
            chat_template,
            [{"role": "user", "content": question}],
            system=system,
            max_new_tokens=max_new_tokens,
            temperature=0.0,
        )
        samples.append({"question": question, "answer": answer})
    if not is_main_process():
        return samples

    for sample in samples:
        log.info("step %d sample: %s\n  -> %s", step, sample["question"], sample["answer"])
    path = Path(output_dir)
    path.mkdir(parents=True, exist_ok=True)
    with (path / LOG_FILE).open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({"step": step, "sample_generations": samples}, ensure_ascii=False) + "\n")
    if tb_writer is not None:
        # Markdown, which the Text tab renders: one bold Q / A pair per question.
        text = "\n\n".join(f"**Q:** {s['question']}\n\n**A:** {s['answer']}" for s in samples)
        tb_writer.add_text(TB_TAG, text, step)
        tb_writer.flush()
    return samples
