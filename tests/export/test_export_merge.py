"""export_model on the tiny Qwen2: merged logits, shards, tokenizer files, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from tunesmith.config.schema import Config
from tunesmith.errors import ModelError
from tunesmith.export.merge import EXPORT_MARKER, export_from_config, export_model

IDS = torch.tensor([[1, 7, 30, 99, 150, 2, 64]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter on every linear layer, with random (non-zero) B weights so merging changes the model."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    return out


def test_merged_export_matches_base_plus_adapter(tiny_model_dir, adapter_dir, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base_logits = _logits(base)
    expected = _logits(PeftModel.from_pretrained(base, adapter_dir))
    assert not torch.allclose(expected, base_logits, atol=1e-3), "the adapter should change the model"

    # 0.0002 GB = 200 kB shards: the ~500 kB tiny model must be split.
    out = export_model(str(tiny_model_dir), tmp_path / "merged", str(adapter_dir), export_size_gb=0.0002)
    assert out == tmp_path / "merged"
    assert (
        len(list(out.glob("model-*-of-*.safetensors"))) > 1
        and (out / "model.safetensors.index.json").is_file()
    )
    assert not list(tmp_path.glob(".*")), "temp folders were left behind"

    merged = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged), expected, atol=1e-4, rtol=0)

    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(tiny_model_dir).chat_template
    generation = json.loads((out / "generation_config.json").read_text())
    eos = generation["eos_token_id"]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])
    assert generation["pad_token_id"] == tokenizer.pad_token_id
    assert json.loads((out / EXPORT_MARKER).read_text())["adapter"] == str(adapter_dir.resolve())


def test_export_from_config_with_dtype_and_named_template(tiny_model_dir, tmp_path):
    templates = pytest.importorskip("tunesmith.data.templates")
    out_dir = tmp_path / "bf16"
    cfg = Config(model_name_or_path=str(tiny_model_dir), export_dir=str(out_dir), export_dtype="bfloat16")
    cfg.template = "chatml"
    out = export_from_config(cfg)
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        assert {fh.get_tensor(key).dtype for key in fh.keys()} == {torch.bfloat16}
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tokenizer.chat_template == templates.get_template("chatml", tokenizer).jinja()
    # Re-exporting over an earlier export is allowed (the CLI's "run it again" case).
    assert export_from_config(cfg) == out


def test_refuses_to_overwrite_foreign_folders(tiny_model_dir, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ModelError, match="not empty"):
        export_model(str(tiny_model_dir), tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelError, match="is a file"):
        export_model(str(tiny_model_dir), tmp_path / "file")


def test_refuses_mismatched_and_non_lora_adapters(tiny_model_dir, tmp_path):
    config = Qwen2Config.from_pretrained(tiny_model_dir)
    config.hidden_size, config.intermediate_size = 32, 64
    other = get_peft_model(Qwen2ForCausalLM(config), LoraConfig(r=2, target_modules=["q_proj"]))
    other.save_pretrained(tmp_path / "wrong-shape")
    config_file = tmp_path / "wrong-shape" / "adapter_config.json"
    config_file.write_text(
        json.dumps({**json.loads(config_file.read_text()), "base_model_name_or_path": "some/other-model"})
    )
    with pytest.raises(ModelError, match="trained on some/other-model") as err:
        export_model(str(tiny_model_dir), tmp_path / "out", str(tmp_path / "wrong-shape"))
    assert "q_proj" in str(err.value)

    prefix = tmp_path / "prefix"
    prefix.mkdir()
    (prefix / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(ModelError, match="LoRA and OFT adapters only"):
        export_model(str(tiny_model_dir), tmp_path / "out", str(prefix))
    assert not (tmp_path / "out").exists()


def test_training_default_system_becomes_the_exported_templates_default(tiny_model_dir, tmp_path):
    cfg = Config(model_name_or_path=str(tiny_model_dir), export_dir=str(tmp_path / "out"), template="chatml",
                 default_system="You are Ada, a careful assistant.")
    tokenizer = AutoTokenizer.from_pretrained(export_from_config(cfg))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are Ada, a careful assistant.<|im_end|>\n")
    explicit = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], tokenize=False
    )
    assert "careful" not in explicit and "Be brief." in explicit
