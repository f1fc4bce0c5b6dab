"""`tunesmith convert HF --to mindspore` / `CKPT --from mindspore`: MindSpore's own load_checkpoint reads exactly
the names, shapes and dtypes MindFormers' models expect (the table below is MindFormers' convert_weight.py
mapping written out by hand), and HF → MindSpore → HF gives back the same bytes."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from bad_input_helpers import assert_refused, run_cli
from safetensors.torch import load_file

from tunesmith.data.mindrecord import import_mindspore

if importlib.util.find_spec("mindspore") is None:
    pytest.skip("MindSpore is an optional extra: pip install 'tunesmith[mindspore]'", allow_module_level=True)
ms = import_mindspore()  # without MindSpore's process-wide limits (tunesmith.data.mindrecord.import_mindspore)


def mindformers_table(config: dict, qkv_bias: bool) -> dict[str, tuple[int, ...]]:
    """MindFormers LlamaForCausalLM parameter → shape (research/qwen1_5/convert_weight.py's renames)."""
    h, v, i = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    q, k = h, kv * h // heads
    table = {"model.tok_embeddings.embedding_weight": (v, h), "model.norm_out.weight": (h,), "lm_head.weight": (v, h)}
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        table |= {p + "attention.wq.weight": (q, h), p + "attention.wk.weight": (k, h),
                  p + "attention.wv.weight": (k, h), p + "attention.wo.weight": (h, q),
                  p + "feed_forward.w1.weight": (i, h), p + "feed_forward.w2.weight": (h, i),
                  p + "feed_forward.w3.weight": (i, h), p + "attention_norm.weight": (h,), p + "ffn_norm.weight": (h,)}
        if qkv_bias:
            table |= {p + "attention.wq.bias": (q,), p + "attention.wk.bias": (k,), p + "attention.wv.bias": (k,)}
    return table


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, tiny_model_dir) -> Path:
    """A tiny random Llama saved in bfloat16 with tied embeddings (the tokenizer of the Qwen2 fixture)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    for f in tiny_model_dir.iterdir():
        if f.name.startswith("tokenizer") or f.suffix == ".jinja":
            shutil.copy(f, out / f.name)
    config = LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(1)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    return out


def _loaded(path: Path) -> dict[str, tuple[tuple[int, ...], object]]:
    return {name: (tuple(p.shape), p.dtype) for name, p in ms.load_checkpoint(str(path)).items()}


def _convert(capsys, *argv: object) -> str:
    code, out, err = run_cli(["convert", *map(str, argv)], capsys)
    assert code == 0, err
    return out


def test_load_checkpoint_reads_exactly_mindformers_names_shapes_and_dtypes(tmp_path, tiny_model_dir, tiny_llama, capsys):
    qwen = tmp_path / "qwen2.ckpt"
    _convert(capsys, tiny_model_dir, "--to", "mindspore", "--out", qwen)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    expected = {n: (s, ms.float32) for n, s in mindformers_table(config, qkv_bias=True).items()}
    assert _loaded(qwen) == expected
    llama = tmp_path / "llama.ckpt"
    _convert(capsys, tiny_llama, "--to", "mindspore", "--out", llama)
    config = json.loads((tiny_llama / "config.json").read_text())
    table = mindformers_table(config, qkv_bias=False)
    assert _loaded(llama) == {n: (s, ms.bfloat16) for n, s in table.items()}  # the tied head is written too
    half = tmp_path / "half.ckpt"
    _convert(capsys, tiny_llama, "--to", "mindspore", "--out", half, "--dtype", "float16")
    assert {dtype for _, dtype in _loaded(half).values()} == {ms.float16}


@pytest.mark.parametrize("model", ["qwen2", "llama"])
def test_hf_to_mindspore_to_hf_round_trips_bit_identically(model, tmp_path, tiny_model_dir, tiny_llama, capsys):
    source = tiny_model_dir if model == "qwen2" else tiny_llama
    ckpt, back = tmp_path / "m.ckpt", tmp_path / "back"
    _convert(capsys, source, "--to", "mindspore", "--out", ckpt)
    _convert(capsys, ckpt, "--from", "mindspore", "--config-from", source, "--out", back)
    before, after = load_file(source / "model.safetensors"), load_file(back / "model.safetensors")
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name].view(torch.uint8), tensor.view(torch.uint8))
    assert json.loads((back / "config.json").read_text()) == json.loads((source / "config.json").read_text())
    assert (back / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()


def test_qwen_v1_fused_attention_is_split_for_mindformers_and_fused_again(tmp_path, capsys):
    from tunesmith.export.mindspore import write_safetensors

    src = tmp_path / "qwen1"
    src.mkdir()
    h, ff, v = 8, 12, 16
    config = {"architectures": ["QWenLMHeadModel"], "hidden_size": h, "intermediate_size": 2 * ff, "vocab_size": v,
              "num_hidden_layers": 1, "num_attention_heads": 2, "tie_word_embeddings": False}
    (src / "config.json").write_text(json.dumps(config))
    shapes = {"transformer.wte.weight": (v, h), "transformer.ln_f.weight": (h,), "lm_head.weight": (v, h),
              "transformer.h.0.ln_1.weight": (h,), "transformer.h.0.ln_2.weight": (h,),
              "transformer.h.0.attn.c_attn.weight": (3 * h, h), "transformer.h.0.attn.c_attn.bias": (3 * h,),
              "transformer.h.0.attn.c_proj.weight": (h, h), "transformer.h.0.mlp.w1.weight": (ff, h),
              "transformer.h.0.mlp.w2.weight": (ff, h), "transformer.h.0.mlp.c_proj.weight": (h, ff)}
    torch.manual_seed(0)
    weights = {n: torch.randn(s).numpy() for n, s in shapes.items()}
    write_safetensors({n: (a, "float32") for n, a in weights.items()}, src)
    ckpt = tmp_path / "q.ckpt"
    _convert(capsys, src, "--to", "mindspore", "--out", ckpt)
    loaded = ms.load_checkpoint(str(ckpt))
    wk = loaded["transformer.layers.0.attention.wk.weight"].asnumpy()
    assert (wk == weights["transformer.h.0.attn.c_attn.weight"][h : 2 * h]).all()
    assert "transformer.layers.0.feed_forward.w3.weight" in loaded and "transformer.wte.embedding_weight" in loaded
    _convert(capsys, ckpt, "--from", "mindspore", "--config-from", src, "--out", tmp_path / "back")
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert all((back[n].numpy() == a).all() for n, a in weights.items()) and back.keys() == weights.keys()


def test_bad_inputs_are_refused_in_one_sentence(tmp_path, tiny_model_dir, capsys):
    other = tmp_path / "gpt2"
    shutil.copytree(tiny_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    assert_refused(["convert", other, "--to", "mindspore", "--out", tmp_path / "a.ckpt"], capsys, "GPT2LMHeadModel")
    missing = tmp_path / "missing.ckpt"
    assert_refused(["convert", missing, "--from", "mindspore", "--config-from", tiny_model_dir, "--out",
                    tmp_path / "o"], capsys, missing)
    foreign = tmp_path / "foreign.ckpt"
    ms.save_checkpoint([{"name": "encoder.block.0.weight", "data": ms.Tensor([1.0, 2.0])}], str(foreign))
    assert_refused(["convert", foreign, "--from", "mindspore", "--config-from", tiny_model_dir, "--out",
                    tmp_path / "o"], capsys, "encoder.block.0.weight")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint at all")
    assert_refused(["convert", junk, "--from", "mindspore", "--config-from", tiny_model_dir, "--out",
                    tmp_path / "o"], capsys, junk)
    assert_refused(["convert", junk, "--from", "mindspore", "--out", tmp_path / "o"], capsys, "--config-from")
    assert_refused(["convert", tiny_model_dir, "--to", "mindspore", "--out", tmp_path / "a.bin"], capsys, "a.bin")
