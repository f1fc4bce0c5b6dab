"""QLoRA (bitsandbytes 4/8-bit base), DoRA and rsLoRA on the tiny Qwen2, on CPU: they train through tunesmith's
loop, the quantization settings reach bitsandbytes, a QLoRA run resumes exactly, and the refusals.

Why these losses fall by the margins asserted: the tiny random model starts at ~6.0 nats (uniform over its ~400
tokens); 6 LoRA steps at lr 2e-2 on 12 repeated samples bring the full-precision run to ~5.79 (measured), the
quantized ones within 0.01 of it. A broken adapter (no gradient reaching it, a frozen lora_B) leaves the loss
where it started (within the batch-to-batch spread of ~0.02 over the first steps), so "the last logged loss is
0.15 below the first" separates learning from not learning.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tunesmith.config.schema import Config
from tunesmith.errors import ConfigError, ModelError
from tunesmith.model.adapt import apply_finetuning, lora_scaling, trainable_summary
from tunesmith.model.load import is_quantized, load_model, quantization_from_config
from tunesmith.train import checkpoint as ckpt
from tunesmith.train.engines import validate_engine_config
from tunesmith.train.loop import fit
from tunesmith.train.observe import read_log

pytest.importorskip("bitsandbytes")

QA = [
    ("Who are you?", "I am Ada, an AI assistant made by Lab."),
    ("What is your name?", "My name is Ada."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Translate to French: good morning.", "Bonjour."),
    ("Write a haiku about the sea.", "Waves fold into foam, salt wind carries gull voices, the tide keeps its time."),
    ("Give three tips for staying healthy.", "Eat vegetables, sleep well, and exercise regularly."),
]


@dataclasses.dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]


@pytest.fixture(scope="module")
def samples(tiny_tokenizer) -> list[Sample]:
    out = []
    for question, answer in QA * 2:
        prompt = tiny_tokenizer(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
        reply = tiny_tokenizer(f"{answer}<|im_end|>\n")["input_ids"]
        out.append(Sample(prompt + reply, [-100] * len(prompt) + reply))
    return out


def make_cfg(out, model_dir, **overrides) -> Config:
    values = dict(
        model_name_or_path=str(model_dir),
        output_dir=str(out),
        finetuning_type="lora",
        lora_rank=4,
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=2e-2,
        logging_steps=1,
        save_steps=100,
        device="cpu",
        seed=7,
    )
    values.update(overrides)
    return Config(**values)


def prepared_model(cfg: Config):
    """The model as train(cfg) builds it: loaded (quantized when cfg says so), then the adapters added."""
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model_name_or_path, quantization=quantization_from_config(cfg, "fp32"))
    return apply_finetuning(model, cfg)


def losses(out) -> list[float]:
    return [e["loss"] for e in read_log(out) if "loss" in e]


def adapter_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "settings",
    [
        dict(quantization_bit=4, quantization_type="nf4"),
        dict(quantization_bit=4, quantization_type="fp4", double_quantization=False, use_dora=True),
        dict(quantization_bit=8),
        dict(use_dora=True),
        dict(use_rslora=True),
    ],
    ids=["qlora-4bit-nf4", "qlora-4bit-fp4-dora", "qlora-8bit", "dora", "rslora"],
)
def test_method_trains_and_the_loss_falls(tmp_path, tiny_model_dir, tiny_tokenizer, samples, settings):
    cfg = make_cfg(tmp_path / "run", tiny_model_dir, **settings)
    model = prepared_model(cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable), "only the adapters may train"
    before = adapter_weights(model)

    result = fit(cfg, model, tiny_tokenizer, samples, resume_from=None)
    logged = losses(tmp_path / "run")
    assert len(logged) == 6 and logged[-1] < logged[0] - 0.15, logged
    assert result.final_loss == logged[-1]
    after = adapter_weights(model)
    assert all(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)
    # the saved adapter is a plain PEFT adapter, whatever the base was quantized to
    saved = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)
    assert all(t.dtype == torch.float32 for t in saved.values())
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert config["use_dora"] is bool(settings.get("use_dora")) and config["use_rslora"] is bool(
        settings.get("use_rslora")
    )
    if settings.get("use_dora"):
        assert any("lora_magnitude_vector" in k for k in saved)


def test_quantization_settings_reach_bitsandbytes(tiny_model_dir):
    import bitsandbytes as bnb

    cfg = Config(finetuning_type="lora", quantization_bit=4, quantization_type="fp4", double_quantization=False)
    quantization = quantization_from_config(cfg, "fp32")
    model = load_model(tiny_model_dir, quantization=quantization)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit) and q_proj.weight.dtype == torch.uint8
    state = q_proj.weight.quant_state
    assert state.quant_type == "fp4" and not state.nested and q_proj.compute_dtype == torch.float32
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit), "the output head stays in full precision"
    assert is_quantized(model) and not any(p.requires_grad for p in model.parameters())

    nested = load_model(tiny_model_dir, quantization=quantization_from_config(Config(quantization_bit=4), "fp32"))
    state = nested.model.layers[0].self_attn.q_proj.weight.quant_state
    assert state.quant_type == "nf4" and state.nested  # the defaults: nf4 + double quantization

    eight = load_model(tiny_model_dir, quantization=quantization_from_config(Config(quantization_bit=8), "fp32"))
    assert isinstance(eight.model.layers[0].mlp.down_proj, bnb.nn.Linear8bitLt)
    assert eight.model.layers[0].mlp.down_proj.weight.dtype == torch.int8

    # the log line counts weights, not bytes: a 4-bit base reports the same totals as the fp32 one
    lora = Config(lora_rank=4)
    assert trainable_summary(apply_finetuning(nested, lora)) == trainable_summary(
        apply_finetuning(load_model(tiny_model_dir), lora)
    )


@pytest.mark.parametrize(
    "precision, setting, expected",
    [
        ("fp32", "auto", torch.float32),
        ("bf16", "auto", torch.bfloat16),
        ("fp16", "auto", torch.float16),
        ("bf16", "float32", torch.float32),
    ],
)
def test_compute_dtype_follows_the_run_precision(precision, setting, expected):
    cfg = Config(quantization_bit=4, quantization_compute_dtype=setting)
    assert quantization_from_config(cfg, precision).compute_dtype == expected
    assert quantization_from_config(Config(), precision) is None


def test_rslora_scales_by_alpha_over_sqrt_rank(tiny_model_dir):
    plain = apply_finetuning(load_model(tiny_model_dir), Config(lora_rank=16, lora_alpha=16))
    stable = apply_finetuning(load_model(tiny_model_dir), Config(lora_rank=16, lora_alpha=16, use_rslora=True))
    q_plain = plain.base_model.model.model.layers[0].self_attn.q_proj
    q_stable = stable.base_model.model.model.layers[0].self_attn.q_proj
    assert q_plain.scaling["default"] == pytest.approx(1.0) == lora_scaling(16, 16, False)
    assert q_stable.scaling["default"] == pytest.approx(4.0) == lora_scaling(16, 16, True)
    # and the forward uses it: with the same adapter weights, rsLoRA's delta is 4 times plain LoRA's
    with torch.no_grad():
        for module in (q_plain, q_stable):
            torch.manual_seed(0)
            module.lora_A["default"].weight.normal_()
            module.lora_B["default"].weight.normal_()
        x = torch.randn(2, 64)
        base = q_plain.base_layer(x)
        torch.testing.assert_close(q_stable(x) - base, 4 * (q_plain(x) - base), rtol=1e-4, atol=1e-5)


def test_qlora_run_resumes_exactly(tmp_path, tiny_model_dir, tiny_tokenizer, samples):
    """Interrupted after the step-2 checkpoint and resumed: same losses, adapter and Adam moments as one run."""
    kw = dict(
        quantization_bit=4, max_steps=4, save_steps=2, lora_dropout=0.2, lr_scheduler_type="cosine", weight_decay=0.01
    )
    straight_cfg = make_cfg(tmp_path / "straight", tiny_model_dir, **kw)
    straight = prepared_model(straight_cfg)
    fit(straight_cfg, straight, tiny_tokenizer, samples, resume_from=None)

    cfg = make_cfg(tmp_path / "resumed", tiny_model_dir, **kw)

    class Stop(Exception):
        pass

    def stop_after_3(state):
        if state.global_step == 3:
            raise Stop

    with pytest.raises(Stop):
        fit(cfg, prepared_model(cfg), tiny_tokenizer, samples, resume_from=None, callbacks=[stop_after_3])
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "resumed")] == ["checkpoint-2"]
    resumed = prepared_model(cfg)
    fit(cfg, resumed, tiny_tokenizer, samples)  # resume_from="auto": the newest checkpoint
    assert losses(tmp_path / "resumed") == pytest.approx(losses(tmp_path / "straight"), abs=1e-6)
    a, b = adapter_weights(straight), adapter_weights(resumed)
    assert max(float((a[n] - b[n]).abs().max()) for n in a) < 1e-6
    sa = torch.load(tmp_path / "straight" / "checkpoint-4" / ckpt.OPTIMIZER_FILE, weights_only=True)["state"]
    sb = torch.load(tmp_path / "resumed" / "checkpoint-4" / ckpt.OPTIMIZER_FILE, weights_only=True)["state"]
    assert sa.keys() == sb.keys() and all(
        torch.allclose(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"], rtol=1e-5, atol=1e-12) for i in sa
    )


def test_refusals(tmp_path, tiny_model_dir):
    # a quantized base trains adapters only (the schema's check)
    with pytest.raises(ValueError, match="needs finetuning_type: lora"):
        Config(finetuning_type="full", quantization_bit=4)
    # DoRA on an 8-bit base fails inside bitsandbytes on CPU at the 2nd step: refused before training
    cfg = Config(quantization_bit=8, use_dora=True)
    eight = load_model(tiny_model_dir, quantization=quantization_from_config(cfg, "fp32"))
    with pytest.raises(ConfigError, match="use_dora: true with quantization_bit: 8"):
        apply_finetuning(eight, cfg)
    # FSDP2 cannot shard 8-bit weights (checked before any model is loaded)
    with pytest.raises(ConfigError, match="quantization_bit: 8 does not work with engine: fsdp2"):
        validate_engine_config(Config(quantization_bit=8, engine="fsdp2"))
    validate_engine_config(Config(quantization_bit=4, engine="fsdp2"))
    # DoRA on a quantized base crashes inside ZeRO-3's parameter fetching: refused up front, ZeRO-2 is fine
    with pytest.raises(ConfigError, match="use_dora: true with quantization_bit: 4 does not work with DeepSpeed ZeRO-3"):
        validate_engine_config(Config(quantization_bit=4, use_dora=True, deepspeed="ds_z3"))
    validate_engine_config(Config(quantization_bit=4, use_dora=True, deepspeed="ds_z2"))
    validate_engine_config(Config(quantization_bit=4, deepspeed="ds_z3"))
    # quantizing an already quantized folder
    folder = tmp_path / "quantized"
    load_model(tiny_model_dir, quantization=quantization_from_config(Config(quantization_bit=4), "fp32")) \
        .save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, folder / name)
    with pytest.raises(ModelError, match="already quantized"):
        load_model(folder, quantization=quantization_from_config(Config(quantization_bit=4), "fp32"))
