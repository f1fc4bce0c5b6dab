"""GPTQ export (export_quantization_bit) on the tiny Qwen2, on CPU: calibration sampling, the quantized folder,
and the refusals.

The quantized exports are compared with the unquantized model on the same ids: relative logit error
‖q − ref‖ / ‖ref‖, measured on the tiny model (random weights, so every weight matters about equally and the
error is larger than on a trained model) 0.15 at 4 bits (group size 64), and 0.013 at 8 bits for the base merged
with the test's adapter (which itself moves the logits by 0.6). The bounds are about twice that, and a floor shows
the weights really were rounded. Quantizing takes ~10 s here once gptqmodel is imported;
GPTQMODEL_DISABLE_PACK_EXT keeps gptqmodel from compiling its C++ packing extension (~40 s on first use).
"""

from __future__ import annotations

import importlib.util
import json
import random

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

from tunesmith.cli import main
from tunesmith.config.schema import Config
from tunesmith.errors import ConfigError
from tunesmith.export.merge import EXPORT_MARKER, export_from_config
from tunesmith.export.quantize import GptqSpec, calibration_samples, group_size

IDS = torch.tensor([[1, 7, 30, 99, 150, 2, 64, 12, 88, 200, 31, 5]])
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
WORDS = ("the model reads a long text about rivers mountains cities and the people who live there while the sun "
         "rises over quiet fields and markets open").split()

needs_gptq = pytest.mark.skipif(
    importlib.util.find_spec("gptqmodel") is None or importlib.util.find_spec("optimum") is None,
    reason="gptqmodel / optimum are not installed (pip install 'tunesmith[gptq]')",
)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def _rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory):
    """dataset_dir with a dataset_info.json entry `calib`: 24 rows of ~80 words in a text column."""
    root = tmp_path_factory.mktemp("calib")
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.choice(WORDS) for _ in range(80))} for _ in range(24)]
    (root / "calib.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    (root / "dataset_info.json").write_text(json.dumps({"calib": {"file_name": "calib.jsonl"}}), encoding="utf-8")
    return root


@pytest.fixture(autouse=True)
def _no_pack_extension(monkeypatch):
    monkeypatch.setenv("GPTQMODEL_DISABLE_PACK_EXT", "1")


def test_calibration_samples_honour_nsamples_and_maxlen(tiny_tokenizer):
    texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(5)] + ["short"]
    spec = GptqSpec(bits=4, dataset="d", texts=texts, nsamples=7, maxlen=16, seed=1)
    samples = calibration_samples(tiny_tokenizer, spec)
    assert len(samples) == 7
    assert all(len(s["input_ids"]) == 1 and len(s["input_ids"][0]) == 16 == len(s["attention_mask"][0])
               for s in samples)
    assert samples == calibration_samples(tiny_tokenizer, spec), "seeded"
    # Windows of the long texts only (the 1-word text is never used while long ones exist), each in its text.
    encoded = [tiny_tokenizer(t)["input_ids"] for t in texts[:5]]
    for sample in samples:
        window = sample["input_ids"][0]
        assert any(window == ids[i : i + 16] for ids in encoded for i in range(len(ids)))
    # No text as long as maxlen: whole texts instead of nothing.
    short = calibration_samples(tiny_tokenizer, GptqSpec(4, "d", ["a b c", "d e"], nsamples=3, maxlen=512))
    whole = [tiny_tokenizer(t)["input_ids"] for t in ("a b c", "d e")]
    got = [s["input_ids"][0] for s in short]
    assert len(got) == 3 and all(ids in whole for ids in got) and got[0] != got[1]


def test_group_size_fits_every_linear_input():
    assert group_size(Qwen2Config(hidden_size=4096, intermediate_size=11008, num_attention_heads=32)) == 128
    assert group_size(Qwen2Config(hidden_size=64, intermediate_size=128, num_attention_heads=4)) == 64
    assert group_size(Qwen2Config(hidden_size=96, intermediate_size=160, num_attention_heads=4)) == 32


@needs_gptq
def test_gptq_4bit_export_loads_packed_and_close(tiny_model_dir, calib_dir, tmp_path):
    out_dir = tmp_path / "gptq4"
    cfg = Config(
        model_name_or_path=str(tiny_model_dir),
        export_dir=str(out_dir),
        dataset_dir=str(calib_dir),
        export_quantization_bit=4,
        export_quantization_dataset="calib",
        export_quantization_nsamples=8,
        export_quantization_maxlen=32,
    )
    out = export_from_config(cfg)
    assert out == out_dir and not list(tmp_path.glob(".*")), "temp folders were left behind"

    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (quant["quant_method"], quant["bits"], quant["group_size"]) == ("gptq", 4, 64)
    assert not quant.get("dataset"), "the calibration tokens must not be written into config.json"
    marker = json.loads((out / EXPORT_MARKER).read_text())
    assert marker["dtype"] == "float16"
    assert marker["quantization"] == {"method": "gptq", "bits": 4, "group_size": 64, "dataset": "calib",
                                      "nsamples": 8, "maxlen": 32}

    # Packed: every linear of every layer is int32 qweight / qzeros + fp16 scales, no full-precision weight.
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
        for layer in range(2):
            for name in LINEARS:
                prefix = f"model.layers.{layer}.{name}"
                assert f"{prefix}.weight" not in keys
                assert fh.get_tensor(f"{prefix}.qweight").dtype == torch.int32
                assert fh.get_tensor(f"{prefix}.scales").dtype == torch.float16
        # 4 bits: 8 values per int32 along the input dimension (down_proj: 128 inputs → 16 rows)
        assert fh.get_tensor("model.layers.0.mlp.down_proj.qweight").shape == (128 // 8, 64)
        assert fh.get_tensor("lm_head.weight").dtype == torch.float16  # not quantized, as in LLaMA-Factory

    quantized = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", local_files_only=True)
    assert hasattr(quantized.model.layers[0].self_attn.q_proj, "qweight")
    ref = _logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))
    error = _rel_error(_logits(quantized), ref)
    assert 0.02 < error < 0.3, error  # measured 0.15

    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(tiny_model_dir).chat_template
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])


@needs_gptq
def test_cli_merges_the_adapter_then_quantizes_8bit(tiny_model_dir, calib_dir, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged_ref = _logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                                   tmp_path / "adapter"))
    base_ref = _logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir))

    config = tmp_path / "export.yaml"
    config.write_text(
        f"model_name_or_path: {tiny_model_dir}\nadapter_name_or_path: {tmp_path / 'adapter'}\n"
        f"export_dir: {tmp_path / 'gptq8'}\ndataset_dir: {calib_dir}\nexport_quantization_bit: 8\n"
        f"export_quantization_dataset: {calib_dir / 'calib.jsonl'}\nexport_quantization_nsamples: 4\n"
        "export_quantization_maxlen: 24\n",
        encoding="utf-8",
    )
    assert main(["export", str(config)]) == 0
    out = tmp_path / "gptq8"
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 8
    got = _logits(AutoModelForCausalLM.from_pretrained(out, device_map="cpu", local_files_only=True))
    error = _rel_error(got, merged_ref)
    assert 1e-4 < error < 0.03, error  # measured 0.013
    assert _rel_error(got, base_ref) > 10 * error, "the adapter was merged before quantizing"


def test_quantization_bit_without_dataset_is_refused(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    config = tmp_path / "export.yaml"
    config.write_text(f"model_name_or_path: {tiny_model_dir}\nexport_dir: {out}\nexport_quantization_bit: 4\n")
    code = main(["export", str(config)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "export_quantization_bit: 4 needs export_quantization_dataset" in err
    assert not out.exists()


def test_missing_libraries_are_refused_before_merging(tiny_model_dir, calib_dir, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("gptqmodel", "optimum") else real(name, *a))
    out = tmp_path / "out"
    config = tmp_path / "export.yaml"
    config.write_text(f"model_name_or_path: {tiny_model_dir}\nexport_dir: {out}\nexport_quantization_bit: 4\n")
    code = main(["export", str(config), f"export_quantization_dataset={calib_dir / 'calib.jsonl'}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "export_quantization_bit needs the gptqmodel and optimum packages" in err
    assert "or export without export_quantization_bit" in err
    assert not out.exists()


def test_bad_calibration_dataset_and_reward_model_are_refused(tiny_model_dir, calib_dir, tmp_path):
    out = tmp_path / "out"
    common = {"model_name_or_path": str(tiny_model_dir), "export_dir": str(out), "dataset_dir": str(calib_dir),
              "export_quantization_bit": 4}
    if importlib.util.find_spec("gptqmodel") and importlib.util.find_spec("optimum"):
        with pytest.raises(Exception, match="neither a file nor a name"):
            export_from_config(Config(**common, export_quantization_dataset="nope"))
    with pytest.raises(ConfigError, match="stage: rm"):
        export_from_config(Config(**common, export_quantization_dataset="calib", stage="rm"))
    assert not out.exists()
