"""`tunesmith demo`: SmolLM2-135M-Instruct learns a new identity with LoRA, offline, in minutes on a CPU.

It answers three questions before and after training — two identity questions (English and Chinese) and a
general one — so you can see the new identity land while general knowledge stays.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from tunesmith.config import Config, load_config
from tunesmith.logging import get_logger

log = get_logger("demo")

QUESTIONS = ("Who are you?", "你是谁？", "What is the capital of France?")


def demo_dir() -> Path:
    return Path(str(resources.files("tunesmith") / "resources" / "demo"))


def demo_config(name: str, author: str, steps: int | None, output_dir: str | None,
                overrides: list[str] | None = None) -> Config:
    extra = [f"dataset_dir={demo_dir()}", f"output_dir={output_dir or 'runs/demo'}"]
    if steps is not None:
        extra.append(f"max_steps={steps}")
    cfg = load_config(demo_dir() / "demo.yaml", [*extra, *(overrides or [])])
    cfg.placeholders = {"name": name, "author": author, **cfg.placeholders}
    return cfg


def _answers(model, tokenizer, template, system: str | None) -> list[str]:
    from tunesmith.model.generate import generate_reply

    return [
        generate_reply(model, tokenizer, template, [{"role": "user", "content": q}], system=system,
                       max_new_tokens=48).strip()
        for q in QUESTIONS
    ]


def _show(title: str, answers: list[str]) -> None:
    print(f"\n=== {title} ===", flush=True)
    for question, answer in zip(QUESTIONS, answers, strict=True):
        print(f"Q: {question}\nA: {answer}\n", flush=True)


def run_demo(name: str = "Tuney", author: str = "the tunesmith team", steps: int | None = None,
             output_dir: str | None = None, overrides: list[str] | None = None) -> int:
    import torch
    from peft import PeftModel

    from tunesmith.data.templates import get_template
    from tunesmith.model.load import load_model, load_tokenizer
    from tunesmith.train import train

    start = time.perf_counter()
    cfg = demo_config(name, author, steps, output_dir, overrides)
    tokenizer = load_tokenizer(cfg.model_name_or_path, cache_dir=cfg.cache_dir)
    template = get_template(cfg.template, tokenizer)
    base = load_model(cfg.model_name_or_path, dtype=torch.float32, cache_dir=cfg.cache_dir)
    _show(f"before training ({cfg.model_name_or_path})", _answers(base, tokenizer, template, cfg.default_system))

    result = train(cfg)

    tuned = PeftModel.from_pretrained(base, str(result.output_dir))
    tuned.eval()
    _show(f"after {result.global_step} LoRA steps (new identity: {name}, by {author})",
          _answers(tuned, tokenizer, template, cfg.default_system))
    minutes = (time.perf_counter() - start) / 60
    print(f"demo finished in {minutes:.1f} min; run folder: {result.output_dir}")
    print("next: tunesmith export --model smollm2-135m-instruct "
          f"--adapter {result.output_dir} --template {cfg.template} --out {result.output_dir}/merged")
    print(f"      tunesmith chat {result.output_dir}/merged")
    return 0
