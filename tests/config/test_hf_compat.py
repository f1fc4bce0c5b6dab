"""HF TrainingArguments and LLaMA-Factory keys from LLaMA-Factory's example configs map onto tunesmith's own:
use_cpu → device cpu, do_eval: false → no validation, disable_gradient_checkpointing → gradient_checkpointing,
fsdp (full_shard auto_wrap) → engine fsdp2, ddp_find_unused_parameters → DDP's own flag; what needs hardware
this run lacks (fp8, use_v1_kernels on CPU) is refused in one sentence."""

from __future__ import annotations

import pytest

from tunesmith.config import Config, load_config
from tunesmith.errors import ConfigError


def test_keys_that_set_tunesmiths_own():
    cfg = Config(use_cpu=True, do_eval=False, disable_gradient_checkpointing=False,
                 fsdp="full_shard auto_wrap", fsdp_transformer_layer_cls_to_wrap="LlamaDecoderLayer")
    assert (cfg.device, cfg.eval_strategy, cfg.gradient_checkpointing, cfg.engine) == ("cpu", "no", True, "fsdp2")
    assert Config(disable_gradient_checkpointing=True).gradient_checkpointing is False
    assert Config(do_eval=True, val_size=0.1).eval_strategy == "steps"


@pytest.mark.parametrize("text, message", [
    ("fp8: true\n", "fp8: true needs FP8 matrix units"),
    ("gradient_checkpointing: true\ndisable_gradient_checkpointing: true\n", "contradict each other"),
    ("fsdp: full_shard auto_wrap offload\n", "fsdp: offload is not supported"),
    ("fsdp: full_shard\nengine: ddp\n", "fsdp is set but engine is ddp"),
])
def test_what_cannot_run_here_is_refused_with_the_file_line(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text("template: chatml\n" + text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_use_v1_kernels_on_cpu_is_refused_before_anything_loads():
    from tunesmith.train.engines import create_engine

    with pytest.raises(ConfigError, match="use_v1_kernels: true asks for LLaMA-Factory v1's fused"):
        create_engine(Config(use_v1_kernels=True, device="cpu"))


def test_ddp_find_unused_parameters_reaches_ddp():
    import torch

    from tunesmith.train.distributed import shutdown_distributed
    from tunesmith.train.engines import create_engine

    cfg = Config(engine="ddp", ddp_find_unused_parameters=True, device="cpu", finetuning_type="full")
    engine = create_engine(cfg)
    try:
        engine.setup(torch.nn.Linear(4, 4), cfg, total_steps=1)
        assert engine.model.find_unused_parameters is True
    finally:
        shutdown_distributed()
