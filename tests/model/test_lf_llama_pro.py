"""LLaMA Pro: `tunesmith llama-pro` interleaves zero-output copies of decoder blocks (the expanded model computes
what the original did), and use_llama_pro puts the training (freeze) or the adapters (lora, oft) on the copies
only, the blocks LLaMA-Factory picks."""

from __future__ import annotations

import json

import pytest
import torch
from bad_input_helpers import assert_refused, run_cli

from tunesmith.config.schema import Config
from tunesmith.errors import ModelError
from tunesmith.model.adapt import apply_finetuning
from tunesmith.model.llama_pro import expand_blocks, expand_model_folder, expanded_layer_ids
from tunesmith.model.load import load_model


@pytest.fixture(scope="module")
def expanded_dir(tmp_path_factory, tiny_model_dir):
    """The tiny 2-layer model expanded by 2 blocks (4 layers; copies at 1 and 3), as `tunesmith llama-pro` does.
    Not through the CLI in-process: main() would set the package logger up for the rest of the session."""
    return expand_model_folder(tiny_model_dir, tmp_path_factory.mktemp("pro") / "tiny-pro", 2)


IDS = torch.randint(3, 390, (2, 17), generator=torch.Generator().manual_seed(0))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_the_expanded_model_gives_the_original_logits_and_greedy_answers(tiny_model_dir, expanded_dir):
    original, expanded = load_model(tiny_model_dir), load_model(expanded_dir)
    ids = IDS
    assert len(expanded.model.layers) == 4
    assert torch.allclose(_logits(original, ids), _logits(expanded, ids), atol=1e-5)
    # the KV cache is indexed by the renumbered layers: cached generation agrees too
    assert torch.equal(original.generate(ids[:1], max_new_tokens=6, do_sample=False),
                       expanded.generate(ids[:1], max_new_tokens=6, do_sample=False))


def test_the_copies_zero_o_proj_and_down_proj_and_the_config_counts_them(tiny_model_dir, expanded_dir):
    config = json.loads((expanded_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and len(config["layer_types"]) == 4
    original, expanded = load_model(tiny_model_dir), load_model(expanded_dir)
    for new, old in ((0, 0), (1, 0), (2, 1), (3, 1)):  # a copy after each group of 2 / 2 = 1 layer
        block, source = expanded.model.layers[new], original.model.layers[old]
        assert torch.equal(block.self_attn.q_proj.weight, source.self_attn.q_proj.weight)
        copy = new in (1, 3)
        for module in (block.self_attn.o_proj, block.mlp.down_proj):
            assert torch.count_nonzero(module.weight).item() == 0 if copy else module.weight.abs().sum() > 0
    assert [layer.self_attn.layer_idx for layer in expanded.model.layers] == [0, 1, 2, 3]
    assert (expanded_dir / "tokenizer.json").is_file() and (expanded_dir / "chat_template.jinja").is_file()


@pytest.mark.parametrize(("layers", "expand", "added"), [(2, 1, [2]), (2, 2, [1, 3]), (6, 3, [2, 5, 8])])
def test_the_trainable_blocks_are_the_ones_the_expansion_added(layers, expand, added):
    """LLaMA-Factory's choice (stride = layers / trainable, ids stride - 1, 2 stride - 1, …) is exactly the copies."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                         num_attention_heads=2, num_key_value_heads=1))
    assert expand_blocks(model, expand) == added
    assert expanded_layer_ids(layers + expand, expand) == added


def test_freeze_with_use_llama_pro_trains_only_the_expanded_blocks(expanded_dir):
    cfg = Config(model_name_or_path=str(expanded_dir), finetuning_type="freeze", freeze_trainable_layers=2,
                 use_llama_pro=True)
    model = apply_finetuning(load_model(expanded_dir), cfg)
    trained = {name.split(".")[2] for name, param in model.named_parameters() if param.requires_grad}
    assert trained == {"1", "3"}  # not the last two (2, 3), which plain freeze would pick


@pytest.mark.parametrize("method", ["lora", "oft"])
def test_adapters_with_use_llama_pro_go_into_the_expanded_blocks_only(expanded_dir, method):
    cfg = Config(model_name_or_path=str(expanded_dir), finetuning_type=method, freeze_trainable_layers=2,
                 use_llama_pro=True, **{f"{method}_target": "q_proj,down_proj"})
    model = apply_finetuning(load_model(expanded_dir), cfg)
    targets = model.peft_config["default"].target_modules
    assert set(targets) == {f"model.layers.{i}.{m}" for i in (1, 3) for m in ("self_attn.q_proj", "mlp.down_proj")}
    adapted = {name.split(".")[4] for name, param in model.named_parameters() if param.requires_grad}
    assert adapted == {"1", "3"}


def test_use_llama_pro_refuses_a_layer_count_it_does_not_divide(expanded_dir):
    cfg = Config(model_name_or_path=str(expanded_dir), finetuning_type="freeze", freeze_trainable_layers=3,
                 use_llama_pro=True)
    with pytest.raises(ModelError, match="4 decoder layers, which freeze_trainable_layers 3 does not divide"):
        apply_finetuning(load_model(expanded_dir), cfg)


def test_the_command_refuses_a_count_that_does_not_divide_the_layers_and_a_used_folder(tmp_path, tiny_model_dir,
                                                                                      expanded_dir, capsys):
    message = assert_refused(["llama-pro", tiny_model_dir, tmp_path / "x", "--num-expand", "3"], capsys,
                             "--num-expand 3")
    assert "use one of 1, 2" in message and not (tmp_path / "x").exists()
    assert_refused(["llama-pro", tiny_model_dir, expanded_dir, "--num-expand", "1"], capsys, expanded_dir)


def test_the_command_writes_the_expanded_model_and_says_how_to_fine_tune_it(tmp_path, tiny_model_dir, capsys):
    code, out, _ = run_cli(["llama-pro", tiny_model_dir, tmp_path / "pro", "--num-expand", "1"], capsys)
    assert code == 0
    assert "freeze_trainable_layers: 1" in out and "use_llama_pro: true" in out
    assert json.loads((tmp_path / "pro" / "config.json").read_text())["num_hidden_layers"] == 3
    assert torch.allclose(_logits(load_model(tiny_model_dir), IDS), _logits(load_model(tmp_path / "pro"), IDS),
                          atol=1e-5)
