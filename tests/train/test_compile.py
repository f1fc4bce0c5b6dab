"""torch_compile: each decoder block's forward compiled (dynamic shapes), the same losses as eager within float
tolerance, packed rows of varying length without a recompile per length, unchanged state-dict keys, and a
fallback with one sentence wherever compiling cannot work."""

from __future__ import annotations

import logging

import pytest
import torch
from test_pipeline import write_run_config
from transformers import AutoModelForCausalLM

from tunesmith.config import load_config
from tunesmith.config.schema import Config
from tunesmith.train import train
from tunesmith.train.compile import compile_blocks
from tunesmith.train.observe import read_log


def _run(folder, tiny_model_dir, rows, caplog, **keys) -> tuple[list[float], str]:
    folder.mkdir(parents=True, exist_ok=True)
    config = write_run_config(folder, tiny_model_dir, rows, **keys)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tunesmith"):
        train(load_config(config))
    return [e["loss"] for e in read_log(load_config(config).output_dir) if "loss" in e], caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_compiled_blocks_train_to_the_eager_losses_and_compile_once_for_all_lengths(
    tmp_path, tiny_model_dir, identity_rows, caplog, method
):
    common = dict(finetuning_type=method, max_steps=4, packing=True, cutoff_len=96, logging_steps=1)
    eager, _ = _run(tmp_path / "eager", tiny_model_dir, identity_rows * 3, caplog, **common)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled, log_text = _run(tmp_path / "compiled", tiny_model_dir, identity_rows * 3, caplog, torch_compile=True,
                              **common)
    assert compiled == pytest.approx(eager, abs=2e-5)
    assert "torch.compile of 2 decoder blocks (inductor, dynamic shapes)" in log_text
    assert "torch.compile warm-up: the first optimizer step took" in log_text
    # the blocks share one compiled forward, whatever the packed rows' lengths: the setup's probe, then a graph for
    # the first block (under LoRA its input needs no grad: the embeddings are frozen) and one for the rest
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == {"full": 2, "lora": 3}[method]
    assert not torch._dynamo.utils.counters["graph_break"]


def test_compiling_keeps_the_state_dict_keys(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    keys = list(model.state_dict())
    compiled = compile_blocks(model, Config(torch_compile=True), "single", torch.device("cpu"))
    assert compiled.blocks == model.config.num_hidden_layers
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize(
    "engine, backend, reason",
    [("deepspeed", "inductor", "not under engine deepspeed: its ZeRO parameter hooks break every compiled graph"),
     ("single", "no_such_backend", "the no_such_backend backend cannot compile on cpu here")],
)
def test_where_compiling_cannot_work_the_run_goes_on_eagerly_saying_why(tiny_model_dir, caplog, engine, backend,
                                                                        reason):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    forward = model.model.layers[0].forward
    with caplog.at_level(logging.WARNING, logger="tunesmith"):
        compiled = compile_blocks(model, Config(torch_compile=True, torch_compile_backend=backend), engine,
                                  torch.device("cpu"))
    assert compiled.blocks == 0 and model.model.layers[0].forward == forward
    assert f"torch_compile: {reason}" in caplog.text and "training continues without it" in caplog.text
    assert compiled.feature().startswith("no torch.compile (")


def test_without_torch_compile_nothing_is_compiled(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert compile_blocks(model, Config(), "single", torch.device("cpu")).feature() == "no torch.compile"


@pytest.mark.parametrize(
    ("device", "precision", "torch_compile", "expected"),
    [("cuda", "bf16", True, "segment_offsets"),  # one varlen op per layer: compiled blocks trace it (model tests)
     ("cuda", "bf16", False, "segment_offsets"),
     ("cuda", "fp32", True, None),  # no half-precision kernel: the masked SDPA stays inside the graph
     ("cpu", "bf16", True, None),  # the per-sample loop would break every compiled block's graph in two
     ("cpu", "bf16", False, "segments")],
)
def test_compiled_blocks_attend_by_samples_where_the_varlen_kernel_runs(monkeypatch, device, precision,
                                                                          torch_compile, expected):
    from types import SimpleNamespace

    from tunesmith.model import varlen_attention
    from tunesmith.train.pipeline import _segment_inputs

    monkeypatch.setattr(varlen_attention, "varlen_kernel", lambda: (object(), True))
    engine = SimpleNamespace(device=torch.device(device), precision=precision)
    assert _segment_inputs(Config(torch_compile=torch_compile), engine) == expected
    assert _segment_inputs(Config(torch_compile=torch_compile, flash_attn="sdpa"), engine) is None
