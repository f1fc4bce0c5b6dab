"""The loop: loss normalisation over the accumulation window, clipping, precision, checkpointing of activations,
determinism, validation, and that training lowers the loss for every finetuning_type."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from train_helpers import encode_pairs, make_cfg, max_diff, state_of, tiny_model

from tunesmith.config import load_config
from tunesmith.train import fit, precision
from tunesmith.train.engines import clip_and_step
from tunesmith.train.observe import read_log
from tunesmith.train.precision import resolve_precision


@pytest.fixture(scope="module")
def samples(tiny_tokenizer):
    """18 hand-encoded ChatML samples (prompt masked with -100), as tunesmith.data produces them."""
    return encode_pairs(tiny_tokenizer)


def _losses(out_dir) -> list[float]:
    return [e["loss"] for e in read_log(out_dir) if "loss" in e]


@pytest.mark.parametrize(
    "method, extra",
    [
        ("full", {}),
        ("freeze", {"freeze_trainable_layers": 1, "learning_rate": 5e-3}),
        ("lora", {"learning_rate": 2e-2, "lora_rank": 4}),
    ],
)
def test_training_lowers_the_loss(tmp_path, tiny_model_dir, tiny_tokenizer, samples, method, extra):
    cfg = make_cfg(tmp_path / "run", tiny_model_dir, finetuning_type=method, max_steps=30, **extra)
    model = tiny_model(tiny_model_dir, cfg)
    before = state_of(model)
    result = fit(cfg, model, tiny_tokenizer, samples)
    losses = _losses(tmp_path / "run")
    assert result.global_step == 30 and len(losses) == 30
    assert sum(losses[-3:]) / 3 < losses[0] - 0.4, losses
    after = state_of(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    if method == "freeze":  # only the last decoder layer trained
        assert changed and all(k.startswith("model.layers.1.") for k in changed)
    if method == "lora":  # base weights untouched, adapters trained
        assert changed and all("lora_" in k for k in changed)


def test_accumulation_normalises_by_all_targets_of_the_window(
    tmp_path, tiny_model_dir, tiny_tokenizer, samples
):
    """2 micro-batches × 2 accumulated == 1 batch of 4: same losses and weights, although the micro-batches hold
    different numbers of target tokens (a per-micro-batch mean would weigh them wrongly)."""
    common = dict(max_steps=4, learning_rate=1e-3, lr_scheduler_type="constant", max_grad_norm=0.0)
    big_cfg = make_cfg(tmp_path / "big", tiny_model_dir, per_device_train_batch_size=4, **common)
    acc_cfg = make_cfg(
        tmp_path / "acc",
        tiny_model_dir,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        **common,
    )
    big, acc = tiny_model(tiny_model_dir, big_cfg), tiny_model(tiny_model_dir, acc_cfg)
    fit(big_cfg, big, tiny_tokenizer, samples)
    fit(acc_cfg, acc, tiny_tokenizer, samples)
    assert _losses(tmp_path / "acc") == pytest.approx(_losses(tmp_path / "big"), abs=1e-5)
    assert max_diff(state_of(big), state_of(acc)) < 1e-5
    first_window = [samples[i] for i in range(len(samples))]  # the micro-batches differ in target count
    assert len({sum(x != -100 for x in s.labels) for s in first_window}) > 1


def test_clipping_caps_the_update_and_reports_the_raw_norm():
    param = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([param], lr=1.0)
    (param * torch.tensor([30.0, 40.0, 0.0])).sum().backward()
    norm = clip_and_step(opt, [param], max_grad_norm=0.5)
    assert norm == pytest.approx(50.0)
    assert float(param.detach().norm()) == pytest.approx(0.5, rel=1e-4) and param.grad is None


def test_precision_on_cpu(tmp_path, tiny_model_dir, tiny_tokenizer, samples, caplog):
    cpu = torch.device("cpu")
    assert resolve_precision(make_cfg(tmp_path, bf16=True), cpu) == "bf16"
    with caplog.at_level(logging.WARNING, logger="tunesmith"):
        assert resolve_precision(make_cfg(tmp_path, fp16=True), cpu) == "fp32"
    assert "fp16" in caplog.text and "float32" in caplog.text
    cfg = make_cfg(tmp_path / "bf16", tiny_model_dir, bf16=True, max_steps=8)
    result = fit(cfg, tiny_model(tiny_model_dir, cfg), tiny_tokenizer, samples)
    losses = _losses(tmp_path / "bf16")
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]
    assert result.final_loss == pytest.approx(losses[-1])


@pytest.mark.parametrize("fast", [True, False])
def test_bf16_on_a_cpu_without_bf16_hardware_runs_and_says_it_is_emulated(tmp_path, caplog, monkeypatch, fast):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: fast)
    with caplog.at_level(logging.WARNING, logger="tunesmith"):
        assert resolve_precision(make_cfg(tmp_path, bf16=True), torch.device("cpu")) == "bf16"
    assert ("emulated" in caplog.text and "bf16: false trains faster here" in caplog.text) is not fast


def test_gradient_checkpointing_gives_the_same_losses(tmp_path, tiny_model_dir, tiny_tokenizer, samples):
    plain_cfg = make_cfg(tmp_path / "plain", tiny_model_dir, finetuning_type="lora", max_steps=3)
    ckpt_cfg = make_cfg(
        tmp_path / "gc", tiny_model_dir, finetuning_type="lora", max_steps=3, gradient_checkpointing=True
    )
    model = tiny_model(tiny_model_dir, plain_cfg)  # set up without it: fit turns it on
    fit(ckpt_cfg, model, tiny_tokenizer, samples)
    assert any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    fit(plain_cfg, tiny_model(tiny_model_dir, plain_cfg), tiny_tokenizer, samples)
    assert _losses(tmp_path / "gc") == pytest.approx(_losses(tmp_path / "plain"), abs=1e-5)


def test_seeded_runs_are_identical_even_with_dropout(tmp_path, tiny_model_dir, tiny_tokenizer, samples):
    kw = dict(finetuning_type="lora", lora_dropout=0.2, max_steps=5, learning_rate=5e-3)
    cfg_a, cfg_b = (
        make_cfg(tmp_path / "a", tiny_model_dir, **kw),
        make_cfg(tmp_path / "b", tiny_model_dir, **kw),
    )
    a, b = tiny_model(tiny_model_dir, cfg_a), tiny_model(tiny_model_dir, cfg_b)
    fit(cfg_a, a, tiny_tokenizer, samples)
    fit(cfg_b, b, tiny_tokenizer, samples)
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    assert max_diff(state_of(a), state_of(b)) == 0.0


def test_logs_eval_tensorboard_plot_and_run_info(tmp_path, tiny_model_dir, tiny_tokenizer, samples, capsys):
    out = tmp_path / "run"
    cfg = make_cfg(
        out,
        tiny_model_dir,
        max_steps=6,
        logging_steps=2,
        eval_steps=3,
        report_to="tensorboard",
        plot_loss=True,
        per_device_eval_batch_size=2,
    )
    result = fit(cfg, tiny_model(tiny_model_dir, cfg), tiny_tokenizer, samples[:14], samples[14:])
    entries = read_log(out)
    train_entries = [e for e in entries if "loss" in e]
    assert [e["step"] for e in train_entries] == [2, 4, 6]
    assert set(train_entries[0]) == {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed"}
    assert train_entries[0]["tokens_per_s"] > 0 and train_entries[-1]["epoch"] == pytest.approx(6 / 4)
    evals = [e for e in entries if "eval_loss" in e]
    assert [e["step"] for e in evals] == [3, 6] and result.eval_loss == pytest.approx(evals[-1]["eval_loss"])
    assert list((out / "runs").glob("events.out.tfevents.*"))
    assert (out / "training_loss.png").stat().st_size > 1000
    assert load_config(out / "config.yaml").model_dump() == cfg.model_dump()
    versions = json.loads((out / "versions.json").read_text())
    assert {"python", "torch", "transformers", "peft", "tunesmith"} <= set(versions)
    err = capsys.readouterr().err
    assert "6/6" in err and "loss=" in err and "lr=" in err and "tok_s=" in err  # the progress bar

    other = tmp_path / "tb"
    cfg2 = make_cfg(tmp_path / "run2", tiny_model_dir, max_steps=1, report_to="all", logging_dir=str(other))
    fit(cfg2, tiny_model(tiny_model_dir, cfg2), tiny_tokenizer, samples)
    assert list(other.glob("events.out.tfevents.*")) and not (tmp_path / "run2" / "runs").exists()
