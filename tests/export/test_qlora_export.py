"""Exporting a QLoRA adapter: it merges into the full-precision base, and export refuses a quantized base.

Tolerance of the merge. The adapter was trained against dequantized 4-bit weights, but the merge writes
W_fp32 + s·B·A, so the reference is the fp32 base with the adapter applied unmerged (PEFT): the two compute the
same function and differ only by float32 rounding (x·(W + s·BA) versus x·W + s·(x·A)·B), measured 4.8e-7 (LoRA)
and 1.8e-7 (DoRA) on logits of magnitude ~1. We allow 1e-5 (float32 epsilon × the few hundred terms of a dot
product, with margin); merging into the quantized base instead, or dropping the adapter's scaling, moves the
logits by 1e-2 to 1.

How far the quantized base + adapter (what training saw) is from that reference is reported, not asserted equal:
it is the 4-bit quantization error, measured 0.038 (LoRA) and 0.039 (DoRA) on the tiny model, against 0.11
between the fp32 and the 4-bit base without adapter. It is asserted to stay within twice the base's own error.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tunesmith.cli import main
from tunesmith.config.schema import Config
from tunesmith.errors import ModelError
from tunesmith.export.merge import export_from_config, export_model
from tunesmith.model.adapt import apply_finetuning
from tunesmith.model.load import load_model, quantization_from_config
from tunesmith.train.loop import fit

pytest.importorskip("bitsandbytes")

MERGE_TOL = 1e-5
QA = [
    ("Who are you?", "I am Ada, an AI assistant made by Lab."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Give three tips for staying healthy.", "Eat vegetables, sleep well, and exercise regularly."),
]


@dataclasses.dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]


def _samples(tokenizer) -> list[Sample]:
    out = []
    for question, answer in QA * 3:
        prompt = tokenizer(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
        reply = tokenizer(f"{answer}<|im_end|>\n")["input_ids"]
        out.append(Sample(prompt + reply, [-100] * len(prompt) + reply))
    return out


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _quantize(model_dir, bits: int = 4):
    return load_model(model_dir, quantization=quantization_from_config(Config(quantization_bit=bits), "fp32"))


def train_qlora(model_dir, tokenizer, out, **settings) -> Config:
    cfg = Config(
        model_name_or_path=str(model_dir), output_dir=str(out), finetuning_type="lora", lora_rank=4,
        quantization_bit=4, max_steps=6, per_device_train_batch_size=3, learning_rate=5e-2, logging_steps=1,
        save_steps=100, device="cpu", seed=3, **settings,
    )
    torch.manual_seed(cfg.seed)
    model = apply_finetuning(_quantize(model_dir), cfg)
    fit(cfg, model, tokenizer, _samples(tokenizer), resume_from=None)
    return cfg


@pytest.mark.parametrize("use_dora", [False, True], ids=["qlora", "qlora-dora"])
def test_qlora_adapter_merges_into_the_full_precision_base(tiny_model_dir, tiny_tokenizer, tmp_path, use_dora):
    run = tmp_path / "run"
    cfg = train_qlora(tiny_model_dir, tiny_tokenizer, run, use_dora=use_dora)
    ids = torch.tensor([_samples(tiny_tokenizer)[0].input_ids])

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base_logits = _logits(base, ids)
    reference = _logits(PeftModel.from_pretrained(base, run), ids)  # fp32 base + adapter, unmerged
    assert (reference - base_logits).abs().max() > 0.1, "the trained adapter should change the model"

    # exported with the training config: quantization_bit is set, the merge still uses the fp32 base
    export_cfg = cfg.model_copy(update={"adapter_name_or_path": str(run), "export_dir": str(tmp_path / "merged")})
    out = export_from_config(export_cfg)
    saved = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in saved and saved["dtype"] == "float32"
    merged = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    merged_logits = _logits(merged, ids)
    merge_error = float((merged_logits - reference).abs().max())
    assert merge_error < MERGE_TOL

    # what training saw: the 4-bit base + the adapter; off by the quantization error, reported here
    quantized_base = _quantize(tiny_model_dir)
    quantization_error = float((_logits(quantized_base, ids) - base_logits).abs().max())
    trained_view = _logits(PeftModel.from_pretrained(quantized_base, run), ids)
    distance = float((trained_view - reference).abs().max())
    print(f"merge error {merge_error:.2e}; 4-bit base + adapter vs fp32 base + adapter {distance:.4f}; "
          f"4-bit base vs fp32 base {quantization_error:.4f}")
    assert MERGE_TOL < distance < 2 * quantization_error


def test_export_refuses_to_merge_into_a_quantized_model(tiny_model_dir, tiny_tokenizer, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=2, target_modules=["q_proj"])) \
        .save_pretrained(adapter)
    quantized = tmp_path / "quantized"
    _quantize(tiny_model_dir).save_pretrained(quantized)  # config.json gets a quantization_config
    tiny_tokenizer.save_pretrained(quantized)

    with pytest.raises(ModelError, match="is quantized .*bitsandbytes 4-bit.* full-precision model"):
        export_model(str(quantized), tmp_path / "out", str(adapter))
    assert not (tmp_path / "out").exists()

    code = main(["export", "--model", str(quantized), "--adapter", str(adapter), "--out", str(tmp_path / "cli")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("tunesmith: error:")][0].count("quantized") >= 1
