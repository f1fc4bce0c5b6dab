"""Checkpoints: layout, rotation, atomic writes, resume (automatic / explicit / exact), overwrite, refusals."""

from __future__ import annotations

import json
import logging
import random
import shutil

import numpy as np
import pytest
import torch
from train_helpers import encode_pairs, make_cfg, max_diff, state_of, tiny_model

from tunesmith.errors import TunesmithError
from tunesmith.train import checkpoint as ckpt
from tunesmith.train import fit
from tunesmith.train.observe import read_log
from tunesmith.train.resume import find_resume_checkpoint


@pytest.fixture(scope="module")
def samples(tiny_tokenizer):
    """18 hand-encoded ChatML samples (prompt masked with -100), as tunesmith.data produces them."""
    return encode_pairs(tiny_tokenizer)


class Crash(Exception):
    pass


def crash_at(step: int):
    def callback(state):
        if state.global_step == step:
            raise Crash(f"crash at {step}")

    return callback


def _run(cfg, model_dir, tokenizer, samples, **kw):
    return fit(cfg, tiny_model(model_dir, cfg), tokenizer, samples, **kw)


def test_layout_rotation_and_final_adapter_at_the_root(tmp_path, tiny_model_dir, tiny_tokenizer, samples):
    out = tmp_path / "run"
    cfg = make_cfg(out, tiny_model_dir, finetuning_type="lora", max_steps=7, save_steps=2, save_total_limit=2)
    result = _run(cfg, tiny_model_dir, tiny_tokenizer, samples)
    assert [p.name for p in result.checkpoints] == [
        "checkpoint-6",
        "checkpoint-7",
    ]  # every 2 + the end, newest 2
    assert not list(out.glob(".tmp-*"))
    last = out / "checkpoint-7"
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer_config.json",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pt",
        "trainer_state.json",
        ckpt.COMPLETE_MARKER,
    ):
        assert (last / name).is_file(), name
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["global_step"] == 7 and (state["epoch"], state["batch_index"]) == (1, 2)  # 5 batches/epoch
    assert state["last_loss"] == pytest.approx(result.final_loss) and state["log_history"][-1]["step"] == 7
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pt"):
        torch.load(last / name, weights_only=True)  # plain data only, loadable without unpickling code
    # the final adapter sits at the root, so adapter_name_or_path: OUTPUT_DIR works
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    assert set(merged.peft_config["default"].target_modules) >= {"q_proj", "v_proj"}


def test_full_model_checkpoint_is_a_loadable_hf_folder(tmp_path, tiny_model_dir, tiny_tokenizer, samples):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    cfg = make_cfg(out, tiny_model_dir, finetuning_type="freeze", freeze_trainable_layers=1, max_steps=2)
    model = tiny_model(tiny_model_dir, cfg)
    fit(cfg, model, tiny_tokenizer, samples)
    for folder in (out, out / "checkpoint-2"):
        reloaded = AutoModelForCausalLM.from_pretrained(folder)
        assert max_diff(state_of(reloaded), state_of(model)) == 0.0


def test_interrupted_and_resumed_equals_uninterrupted(
    tmp_path, tiny_model_dir, tiny_tokenizer, samples, caplog
):
    """In-process version of the SIGKILL test (see test_resume_kill.py), with dropout so RNG restore matters,
    and accumulation + an odd batch count so the data position is mid-epoch."""
    kw = dict(
        finetuning_type="lora",
        lora_dropout=0.3,
        learning_rate=5e-3,
        max_steps=9,
        save_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        logging_steps=3,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        weight_decay=0.01,
    )
    straight = make_cfg(tmp_path / "straight", tiny_model_dir, **kw)
    ref_model = tiny_model(tiny_model_dir, straight)
    ref = fit(straight, ref_model, tiny_tokenizer, samples)

    cfg = make_cfg(tmp_path / "resumed", tiny_model_dir, **kw)
    with pytest.raises(Crash):
        _run(cfg, tiny_model_dir, tiny_tokenizer, samples, callbacks=[crash_at(6)])
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "resumed")] == ["checkpoint-4"]
    model = tiny_model(tiny_model_dir, cfg)
    with caplog.at_level(logging.INFO, logger="tunesmith"):
        result = fit(cfg, model, tiny_tokenizer, samples)
    assert "resuming from" in caplog.text and "checkpoint-4" in caplog.text
    assert result.final_loss == pytest.approx(ref.final_loss, abs=1e-5)
    assert max_diff(state_of(model), state_of(ref_model)) < 1e-5
    logged = [(e["step"], e["loss"]) for e in read_log(tmp_path / "resumed") if "loss" in e]
    expected = [(e["step"], e["loss"]) for e in read_log(tmp_path / "straight") if "loss" in e]
    assert [s for s, _ in logged] == [3, 6, 9]  # the crashed run's step-6 line was replaced, not duplicated
    assert [v for _, v in logged] == pytest.approx([v for _, v in expected], abs=1e-5)


def test_half_written_checkpoints_are_never_resumed(
    tmp_path, tiny_model_dir, tiny_tokenizer, samples, monkeypatch
):
    out = tmp_path / "run"
    cfg = make_cfg(out, tiny_model_dir, max_steps=4, save_steps=2)
    with pytest.raises(Crash):
        _run(cfg, tiny_model_dir, tiny_tokenizer, samples, callbacks=[crash_at(3)])
    # a crash while writing checkpoint-4: only the .tmp folder exists
    real_save = torch.save

    def dying_save(obj, path, *a, **k):
        if str(path).endswith("rng_state.pt"):
            raise Crash("killed mid-save")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(Crash):
        _run(cfg, tiny_model_dir, tiny_tokenizer, samples)
    monkeypatch.setattr(torch, "save", real_save)
    assert (out / ".tmp-checkpoint-4").is_dir() and not (out / "checkpoint-4").exists()
    # a folder without the completeness marker (e.g. copied by hand) is ignored too
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-9")
    (out / "checkpoint-9" / ckpt.COMPLETE_MARKER).unlink()
    assert find_resume_checkpoint(cfg) == out / "checkpoint-2"
    assert not (out / ".tmp-checkpoint-4").exists()  # leftovers are cleaned up


def test_explicit_resume_overwrite_and_refusals(tmp_path, tiny_model_dir, tiny_tokenizer, samples, caplog):
    out = tmp_path / "run"
    cfg = make_cfg(out, tiny_model_dir, finetuning_type="lora", max_steps=4, save_steps=2)
    _run(cfg, tiny_model_dir, tiny_tokenizer, samples)
    assert find_resume_checkpoint(cfg) == out / "checkpoint-4"
    picked = make_cfg(
        out, tiny_model_dir, finetuning_type="lora", max_steps=4, resume_from_checkpoint="checkpoint-2"
    )
    assert find_resume_checkpoint(picked) == out / "checkpoint-2"

    # a different finetuning_type cannot load these checkpoints: one clear error, nothing deleted
    full = make_cfg(out, tiny_model_dir, finetuning_type="full", max_steps=4)
    with pytest.raises(TunesmithError, match="finetuning_type"):
        _run(full, tiny_model_dir, tiny_tokenizer, samples)
    assert (out / "checkpoint-4").is_dir()

    # overwrite_output_dir: a failing start deletes nothing; a real start deletes (and says so)
    fresh = make_cfg(
        out, tiny_model_dir, finetuning_type="full", max_steps=3, save_steps=10, overwrite_output_dir=True
    )
    with pytest.raises(TunesmithError):
        fit(fresh, tiny_model(tiny_model_dir, fresh), tiny_tokenizer, [])
    assert (out / "checkpoint-4").is_dir()
    with caplog.at_level(logging.INFO, logger="tunesmith"):
        result = _run(fresh, tiny_model_dir, tiny_tokenizer, samples)
    assert "overwrite_output_dir: deleted 2 checkpoint(s)" in caplog.text
    assert [p.name for p in result.checkpoints] == ["checkpoint-3"]
    assert [e["step"] for e in read_log(out)] == [1, 2, 3]

    # a finished run without checkpoints is not silently overwritten
    done = make_cfg(tmp_path / "done", tiny_model_dir, max_steps=1, save_strategy="no")
    _run(done, tiny_model_dir, tiny_tokenizer, samples)
    with pytest.raises(TunesmithError, match="overwrite_output_dir"):
        find_resume_checkpoint(done)


def test_rng_state_round_trip(tmp_path):
    state = ckpt.capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    first = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    ckpt.restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == first


def test_save_only_model_writes_no_optimizer_state_and_such_a_checkpoint_does_not_resume(
    tmp_path, tiny_model_dir, tiny_tokenizer, samples
):
    from tunesmith.errors import TunesmithError

    cfg = make_cfg(tmp_path / "run", tiny_model_dir, finetuning_type="full", max_steps=4, save_steps=2,
                   save_only_model=True)
    with pytest.raises(Crash):
        _run(cfg, tiny_model_dir, tiny_tokenizer, samples, callbacks=[crash_at(3)])
    saved = tmp_path / "run" / "checkpoint-2"
    assert (saved / "model.safetensors").is_file() and not (saved / ckpt.OPTIMIZER_FILE).exists()
    with pytest.raises(TunesmithError, match="holds no optimizer state .* save_only_model: true"):
        _run(cfg, tiny_model_dir, tiny_tokenizer, samples)
