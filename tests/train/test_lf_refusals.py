"""The LLaMA-Factory method keys: accepted with LLaMA-Factory's defaults, and every combination that cannot work
refused by `tunesmith train` in one sentence naming the key and its line, before anything is loaded (Mixture-of-Depths
always: its package does not run with transformers 5)."""

from __future__ import annotations

import pytest
from bad_input_helpers import assert_refused

from tunesmith.config import Config, dump_config, load_config


def _file(tmp_path, text: str):
    path = tmp_path / "cfg.yaml"
    path.write_text(f"model_name_or_path: {tmp_path / 'nowhere'}\ndataset: x\noutput_dir: {tmp_path / 'out'}\n{text}",
                    encoding="utf-8")
    return path


def test_the_keys_have_llama_factory_s_defaults():
    cfg = load_config(None)
    assert (cfg.oft_rank, cfg.oft_block_size, cfg.oft_target, cfg.module_dropout) == (0, 32, "all", 0.0)
    assert (cfg.pissa_init, cfg.pissa_iter, cfg.pissa_convert) == (False, 16, False)
    assert cfg.neftune_noise_alpha is None and cfg.mixture_of_depths is None and cfg.use_llama_pro is False
    assert (cfg.use_dft_loss, cfg.use_eaft_loss, cfg.eaft_alpha) == (False, False, 1.0)
    assert (cfg.use_asft_loss, cfg.asft_alpha) == (False, 0.1)


def test_llama_factory_s_example_configs_load(shared_dir):
    examples = shared_dir / "lf" / "examples" / "extras"
    for name in ("oft/llama3_oft_sft.yaml", "pissa/llama3_lora_sft.yaml", "llama_pro/llama3_freeze_sft.yaml",
                 "dft/qwen2_full_sft.yaml", "eaft/qwen25_05b_eaft_full.yaml", "asft/qwen2_full_asft.yaml"):
        cfg = load_config(examples / name)
        assert cfg.stage == "sft", name
    assert load_config(examples / "asft/qwen2_full_asft.yaml").asft_alpha == 0.05
    assert load_config(examples / "oft/llama3_oft_sft.yaml").finetuning_type == "oft"


def test_pissa_with_a_preference_stage_needs_a_separately_loaded_reference(tmp_path):
    cfg = load_config(None, ["stage=dpo", "pissa_init=true", f"ref_model={tmp_path}"])
    assert cfg.pissa_init and cfg.ref_model == str(tmp_path)
    assert load_config(None, ["stage=dpo", "pref_loss=orpo", "pissa_init=true"]).pissa_init  # no reference at all


@pytest.mark.parametrize("values", [{}, dict(finetuning_type="oft", oft_block_size=16),
                                    dict(pissa_init=True, pissa_iter=4, pissa_convert=True),
                                    dict(use_eaft_loss=True, eaft_alpha=0.5), dict(neftune_noise_alpha=5.0)])
def test_a_run_s_resolved_config_with_every_key_loads_again(tmp_path, values):
    """A run writes every key to config.yaml (re-runnable): keys left at their defaults are not 'set'."""
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(Config(**values)), encoding="utf-8")
    assert load_config(path).model_dump() == Config(**values).model_dump()


REFUSED = [
    # (config lines, the line the message points at, what it must name)
    ("use_dft_loss: true\nuse_asft_loss: true\n", 5, "use_dft_loss and use_asft_loss"),
    ("stage: pt\nuse_eaft_loss: true\n", 5, "use_eaft_loss"),
    ("stage: dpo\nuse_dft_loss: true\n", 5, "stage: sft"),
    ("eaft_alpha: 0.5\n", 4, "eaft_alpha"),
    ("use_eaft_loss: true\neaft_alpha: -1\n", 5, "eaft_alpha"),
    ("use_asft_loss: true\nasft_alpha: -0.1\n", 5, "asft_alpha"),
    ("finetuning_type: oft\noft_rank: 4\n", 5, "oft_block_size"),
    ("finetuning_type: oft\noft_block_size: 0\n", 5, "oft_rank"),
    ("finetuning_type: lora\noft_block_size: 16\n", 5, "oft_block_size"),
    ("finetuning_type: oft\nmodule_dropout: 1.5\n", 5, "module_dropout"),
    ("finetuning_type: freeze\npissa_init: true\n", 5, "pissa_init"),
    ("pissa_convert: true\n", 4, "pissa_convert"),
    ("pissa_init: true\npissa_iter: -2\n", 5, "pissa_iter"),
    ("stage: kto\npissa_init: true\n", 5, "ref_model"),
    ("stage: dpo\npissa_init: true\n", 5, "ref_model"),
    ("pissa_init: true\nuse_asft_loss: true\n", 5, "use_asft_loss"),
    ("quantization_bit: 4\npissa_init: true\n", 5, "quantization_bit"),
    ("pissa_init: true\npissa_convert: true\nuse_dora: true\n", 6, "use_dora"),
    ("finetuning_type: full\nuse_llama_pro: true\n", 5, "use_llama_pro"),
    ("finetuning_type: freeze\nfreeze_trainable_layers: -2\nuse_llama_pro: true\n", 6, "freeze_trainable_layers"),
    ("neftune_noise_alpha: -5\n", 4, "neftune_noise_alpha"),
    ("mixture_of_depths: convert\n", 4, "mixture_of_depths"),
    ("mixture_of_depths: load\n", 4, "mixture_of_depths"),
]


@pytest.mark.parametrize(("lines", "line", "named"), REFUSED, ids=[case[0].strip().replace("\n", ", ") for case in
                                                                    REFUSED])
def test_an_impossible_combination_is_refused_in_one_sentence(tmp_path, capsys, lines, line, named):
    path = _file(tmp_path, lines)
    assert_refused(["train", path], capsys, f"{path}:{line}", named)


def test_mixture_of_depths_says_why_it_is_refused(tmp_path, capsys):
    path = _file(tmp_path, "mixture_of_depths: convert\n")
    message = assert_refused(["train", path], capsys, "mixture-of-depth", "transformers 5")
    assert "remove the key" in message

