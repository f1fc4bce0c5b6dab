"""GPU smoke run: tunesmith's real command line on whatever accelerator ``device: auto`` finds (CUDA here).

    python bench/gpu_smoke.py --tokenizer DIR --data FILE [--out DIR] [--steps 40] [--hidden 512] [--layers 6]
                              [--cases lora_bf16_packed,ddp_1proc,...]

Builds a small random Qwen2 (``--hidden``, ``--layers``) around the real Qwen tokenizer in ``--tokenizer`` and runs,
each as its own ``tunesmith`` process on the alpaca rows of ``--data``:

* ``lora_bf16_packed``: LoRA, bf16, packing; the loss must go down. ``lora_bf16_compile``: the same with
  ``torch_compile: true`` (compiled blocks around the varlen attention).
* ``full_bf16`` straight for 2·S steps, and ``full_bf16_resumed``: S steps, then the same command with 2·S resumes
  from checkpoint-S; both runs' step-2·S losses are printed side by side.
* ``full_fp16``: float16 autocast with the loss scaler (CUDA only).
* ``ddp_1proc`` / ``fsdp2_1proc``: ``--nproc-per-node 1`` with engine ddp / fsdp2 (nccl on CUDA).
* ``export`` of the LoRA run, then ``chat --prompt`` on the merged model.

One line per case (seconds, first / last logged loss, the device the log names, exit status) and a JSON summary in
``--out``. Nothing is downloaded; nothing here is CUDA-specific, so it also runs (slowly) on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def build_model(tokenizer_dir: Path, out: Path, hidden: int, layers: int, **shape: object) -> Path:
    """A random-weight Qwen2 around the tokenizer in ``tokenizer_dir``, saved to ``out``; ``shape``: other
    Qwen2Config fields (bench/gpu_speed.py's Qwen2.5-0.5B shape)."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    fields = {"vocab_size": len(tok), "intermediate_size": 2 * hidden, "num_attention_heads": 8,
              "num_key_value_heads": 2, "max_position_embeddings": 4096, **shape}
    config = Qwen2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        tie_word_embeddings=True,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.pad_token_id,
        **fields,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def tunesmith(args: list[str], cwd: Path, log: Path, timeout: int) -> tuple[int, float, str, str]:
    """(exit status, seconds, stdout + stderr, stdout) of one tunesmith command; both streams go to ``log``."""
    cmd = [sys.executable, "-m", "tunesmith.cli", *args]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        rc, out, text = done.returncode, done.stdout, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        rc, out, text = 124, "", f"{err.stdout or ''}{err.stderr or ''}\ntimed out after {timeout} s"
    seconds = time.perf_counter() - start
    with log.open("a", encoding="utf-8") as fh:
        fh.write(f"\n$ tunesmith {' '.join(args)}  (rc={rc}, {seconds:.1f} s)\n{text}")
    return rc, seconds, text, out


def losses(run_dir: Path) -> list[tuple[int, float]]:
    path = run_dir / "trainer_log.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def named_device(text: str) -> str:
    for word in ("cuda", "npu", "cpu"):
        if f"device {word}" in text or f"on {word}" in text or f"{word}:" in text:
            return word
    return "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--out", type=Path, default=Path("gpu-smoke"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--timeout", type=int, default=240, help="seconds per tunesmith command")
    parser.add_argument("--cases", help="comma list of the cases to run (default: all, in order)")
    args = parser.parse_args()

    work = args.out.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log = work / "commands.log"
    os.environ.setdefault("TUNESMITH_CACHE", str(work / "cache"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    model = build_model(args.tokenizer, work / "model", args.hidden, args.layers)
    (work / "data").mkdir()
    shutil.copy(args.data, work / "data" / "alpaca.json")
    s = args.steps
    base = (
        f"model_name_or_path: {model}\ntemplate: qwen\ndataset: data/alpaca.json\ncutoff_len: 512\n"
        f"per_device_train_batch_size: 8\nlogging_steps: 1\nsave_steps: {s}\nlearning_rate: 1.0e-3\n"
        "lr_scheduler_type: constant\nwarmup_steps: 0\n"
    )
    (work / "base.yaml").write_text(base, encoding="utf-8")

    cases: list[tuple[str, list[str], str]] = [  # (name, tunesmith arguments, run folder)
        ("lora_bf16_packed", ["train", "base.yaml", "finetuning_type=lora", "bf16=true", "packing=true",
                              f"max_steps={s}", "output_dir=lora"], "lora"),
        ("lora_bf16_compile", ["train", "base.yaml", "finetuning_type=lora", "bf16=true", "packing=true",
                               "torch_compile=true", f"max_steps={s}", "output_dir=lora_compile"], "lora_compile"),
        ("full_bf16", ["train", "base.yaml", "finetuning_type=full", "bf16=true", "learning_rate=1.0e-4",
                       f"max_steps={2 * s}", "output_dir=full"], "full"),
        ("full_bf16_first_half", ["train", "base.yaml", "finetuning_type=full", "bf16=true",
                                  "learning_rate=1.0e-4", f"max_steps={s}", "output_dir=resumed"], "resumed"),
        ("full_bf16_resumed", ["train", "base.yaml", "finetuning_type=full", "bf16=true", "learning_rate=1.0e-4",
                               f"max_steps={2 * s}", "output_dir=resumed"], "resumed"),
        ("full_fp16", ["train", "base.yaml", "finetuning_type=full", "fp16=true", "learning_rate=1.0e-4",
                       f"max_steps={s}", "output_dir=fp16"], "fp16"),
        ("ddp_1proc", ["train", "base.yaml", "--nproc-per-node", "1", "engine=ddp", "finetuning_type=full",
                       "bf16=true", "learning_rate=1.0e-4", f"max_steps={s // 2}", "output_dir=ddp"], "ddp"),
        ("fsdp2_1proc", ["train", "base.yaml", "--nproc-per-node", "1", "engine=fsdp2", "finetuning_type=full",
                         "bf16=true", "learning_rate=1.0e-4", f"max_steps={s // 2}", "output_dir=fsdp2"], "fsdp2"),
        ("export", ["export", "base.yaml", "adapter_name_or_path=lora", "export_dir=merged"], ""),
        ("chat", ["chat", "merged", "--prompt", "Give three tips for staying healthy.", "--max-new-tokens",
                  "24"], ""),
    ]
    if args.cases:
        wanted = args.cases.split(",")
        cases = [case for case in cases if case[0] in wanted]
    results = []
    print(f"{'case':<22} {'rc':>3} {'seconds':>8} {'first':>8} {'last':>8} {'steps':>5} device")
    for name, cmd, run in cases:
        rc, seconds, text, out = tunesmith(cmd, work, log, args.timeout)
        logged = losses(work / run) if run else []
        row = {
            "case": name,
            "rc": rc,
            "seconds": round(seconds, 1),
            "first_loss": logged[0][1] if logged else None,
            "last_loss": logged[-1][1] if logged else None,
            "last_step": logged[-1][0] if logged else None,
            "device": named_device(text),
            "tail": text.strip().splitlines()[-3:] if rc else [],
        }
        if name == "chat":
            row["answer"] = out.strip()
        results.append(row)
        first = f"{row['first_loss']:.4f}" if logged else "-"
        last = f"{row['last_loss']:.4f}" if logged else "-"
        print(f"{name:<22} {rc:>3} {seconds:>8.1f} {first:>8} {last:>8} {row['last_step'] or '-':>5} {row['device']}")
        for line in row["tail"]:
            print(f"    {line[:200]}")
    straight = losses(work / "full")
    resumed = losses(work / "resumed")
    if straight and resumed:
        print(f"resume: step {straight[-1][0]} loss straight {straight[-1][1]:.5f} vs resumed {resumed[-1][1]:.5f}")
    (work / "summary.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
