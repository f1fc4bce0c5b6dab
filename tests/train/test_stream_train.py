"""Training with streaming: true: a run stopped and resumed from its checkpoint ends with the losses and weights
of an uninterrupted one (the checkpoint records the stream position), across a pass boundary, with and without
packing; the whole pipeline (train(cfg)) streams with a validation head; changed settings warn or refuse."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from train_helpers import make_cfg, max_diff, state_of, tiny_model

from tunesmith.data import StreamingData, prepare_datasets
from tunesmith.errors import TunesmithError
from tunesmith.train import fit
from tunesmith.train.observe import read_log
from tunesmith.train.state import TrainState


def _write_data(tmp_path, count: int = 14):
    rows = [
        {"instruction": f"Question {i}: what is {i} + {i}?", "input": "", "output": f"It is {2 * i}."}
        for i in range(count)
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _stream_cfg(out, model_dir, data, **kw):
    values = dict(
        dataset=[str(data)],
        template="chatml",
        cutoff_len=64,
        streaming=True,
        buffer_size=4,
        preprocessing_batch_size=3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        lr_scheduler_type="constant",
        learning_rate=5e-3,
        save_steps=2,
    )
    values.update(kw)
    return make_cfg(out, model_dir, **values)


def _run(cfg, model_dir, tokenizer, perturb: bool = False):
    model = tiny_model(model_dir, cfg)
    if perturb:  # only a real resume (weights from the checkpoint) can undo this
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.01)
    data = prepare_datasets(cfg, tokenizer)
    assert isinstance(data.train, StreamingData)
    result = fit(cfg, model, tokenizer, data.train, data.val)
    return result, model


@pytest.mark.parametrize("packing", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_streaming_resume_matches_an_uninterrupted_run(tmp_path, tiny_model_dir, tiny_tokenizer, packing):
    """14 rows, 4 samples a step: pass 0 ends in step 4; the run stops after step 3 (mid-pass, mid-batch) and
    resumes to step 5 (into pass 1, reshuffled). Packed: 6 rows a pass, 2 a step; it stops after step 2."""
    data = _write_data(tmp_path)
    stop = 2 if packing else 3
    whole_cfg = _stream_cfg(tmp_path / "whole", tiny_model_dir, data, max_steps=5, packing=packing, save_steps=stop,
                            per_device_train_batch_size=1 if packing else 2, cutoff_len=128 if packing else 64)
    _, whole = _run(whole_cfg, tiny_model_dir, tiny_tokenizer)
    first_cfg = whole_cfg.model_copy(update={"output_dir": str(tmp_path / "parts"), "max_steps": stop})
    _run(first_cfg, tiny_model_dir, tiny_tokenizer)
    saved = TrainState.load(tmp_path / "parts" / f"checkpoint-{stop}" / "trainer_state.json")
    assert saved.epoch == 0 and saved.sample_index > 0 and (saved.stream_rows, saved.stream_skip) != (0, 0)
    second_cfg = first_cfg.model_copy(update={"max_steps": 5})
    result, resumed = _run(second_cfg, tiny_model_dir, tiny_tokenizer, perturb=True)
    assert result.global_step == 5
    final = TrainState.load(tmp_path / "parts" / "checkpoint-5" / "trainer_state.json")
    assert final.epoch >= 1  # the stream ran out and a second pass started
    whole_log = [e["loss"] for e in read_log(tmp_path / "whole") if "loss" in e]
    parts_log = [e["loss"] for e in read_log(tmp_path / "parts") if "loss" in e]
    assert len(whole_log) == 5 and parts_log == pytest.approx(whole_log, abs=1e-5)
    assert max_diff(state_of(whole), state_of(resumed)) < 1e-5


def test_train_streams_with_a_validation_head(tmp_path, tiny_model_dir):
    from tunesmith.config import load_config
    from tunesmith.train import train

    data = _write_data(tmp_path, 20)
    values = dict(
        model_name_or_path=str(tiny_model_dir), template="chatml", dataset=str(data), output_dir=str(tmp_path / "r"),
        streaming=True, max_steps=8, val_size=4, eval_steps=4, buffer_size=5, per_device_train_batch_size=4,
        cutoff_len=64, logging_steps=1, save_steps=4, device="cpu", learning_rate=1e-2, finetuning_type="lora",
    )  # fmt: skip
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(values), encoding="utf-8")
    result = train(load_config(str(config)))
    assert result.global_step == 8 and result.eval_loss is not None
    losses = [e["loss"] for e in read_log(tmp_path / "r") if "loss" in e]
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2])
    state = TrainState.load(tmp_path / "r" / "checkpoint-8" / "trainer_state.json")
    assert state.epoch == 2 and state.signature["streaming"] is True  # 16 training rows = 4 steps a pass


def test_resume_refuses_a_streaming_switch_and_warns_on_changed_order(tmp_path, tiny_model_dir, tiny_tokenizer, caplog):
    data = _write_data(tmp_path)
    cfg = _stream_cfg(tmp_path / "run", tiny_model_dir, data, max_steps=2)
    _run(cfg, tiny_model_dir, tiny_tokenizer)
    plain = cfg.model_copy(update={"streaming": False, "max_steps": 4})
    with pytest.raises(TunesmithError, match="streaming=True but the config says streaming=False"):
        fit(plain, tiny_model(tiny_model_dir, plain), tiny_tokenizer, prepare_datasets(plain, tiny_tokenizer).train)
    changed = cfg.model_copy(update={"buffer_size": 64, "max_steps": 3})
    with caplog.at_level(logging.WARNING, logger="tunesmith"):
        _run(changed, tiny_model_dir, tiny_tokenizer)
    assert "changed buffer_size (4 → 64)" in caplog.text


@pytest.mark.slow
def test_streaming_on_two_ranks_matches_one_rank(tmp_path, tiny_model_dir):
    """DDP on 2 real ranks over the stream (each reads it all and trains its own micro-batches) gives the losses
    and weights of one rank with the same global batch; tolerances as in test_distributed.py."""
    from test_distributed import LOSS_TOL, WEIGHT_TOL, losses, tunesmith_train, weights_diff
    from test_pipeline import write_run_config

    rows = [{"instruction": f"What is {i} + {i}?", "input": "", "output": f"It is {2 * i}."} for i in range(18)]
    config = write_run_config(
        tmp_path, tiny_model_dir, rows, finetuning_type="full", max_steps=6, save_steps=100, streaming=True,
        buffer_size=5, preprocessing_batch_size=4, per_device_train_batch_size=2,
    )  # fmt: skip
    one = tunesmith_train(config, f"output_dir={tmp_path / 'one'}", "per_device_train_batch_size=4", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = tunesmith_train(
        config, "--nproc-per-node", "2", "engine=ddp", f"output_dir={tmp_path / 'two'}", cwd=tmp_path, timeout=300
    )
    assert two.returncode == 0, two.stderr[-3000:]
    ref, got = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert list(got) == list(range(1, 7)) and max(abs(ref[s] - got[s]) for s in ref) < LOSS_TOL, (ref, got)
    assert weights_diff(tmp_path / "one", tmp_path / "two") < WEIGHT_TOL
