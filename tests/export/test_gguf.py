"""GGUF export: the tiny Qwen2 through the CLI, the refusals, and (slow) SmolLM2 + LoRA read back by transformers'
GGUF loader and run by llama.cpp itself."""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from tunesmith.cli import main
from tunesmith.errors import ModelError
from tunesmith.export.gguf import check_gguf_support
from tunesmith.export.gguf_vocab import pre_tokenizer_name

IDS = torch.tensor([[1, 7, 30, 99, 150, 2, 64]])


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _random_adapter(model, out, std: float, rank: int = 4):
    """A LoRA adapter on every linear layer with random non-zero B, so merging changes the model."""
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                                  task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, std)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_dir, tmp_path_factory):
    return _random_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path_factory.mktemp("a"), 0.2)


def _one_sentence_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("tunesmith: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_tiny_qwen2_exports_through_the_cli_and_loads_in_transformers_gguf_loader(
    tiny_model_dir, tiny_adapter, tmp_path
):
    import gguf

    out = tmp_path / "tiny-gguf"
    code = main(["export", "--model", str(tiny_model_dir), "--adapter", str(tiny_adapter), "--out", str(out),
                 "--format", "gguf", "--quantization", "f32", "--template", "qwen"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "tiny-gguf-f32.gguf", "tunesmith_export.json"]

    fields = gguf.GGUFReader(out / "tiny-gguf-f32.gguf").fields
    assert fields["general.architecture"].contents() == "qwen2"
    assert fields["tokenizer.ggml.pre"].contents() == "qwen2"  # transformers' Qwen2 tokenizer splits with Qwen2's regex
    assert "You are Qwen" in fields["tokenizer.chat_template"].contents()  # the qwen template's default system

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    expected = _logits(PeftModel.from_pretrained(base, tiny_adapter))
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file="tiny-gguf-f32.gguf", dtype=torch.float32)
    torch.testing.assert_close(_logits(loaded), expected, atol=1e-4, rtol=0)

    modelfile = (out / "Modelfile").read_text(encoding="utf-8")
    assert modelfile.startswith("FROM ./tiny-gguf-f32.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert 'SYSTEM "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."' in modelfile
    assert '{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n<|im_start|>assistant\n' in modelfile


def _with_architecture(model_dir, tmp_path, arch: str):
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "architectures": [arch]}))
    return copy


def test_an_unsupported_architecture_is_refused_in_one_sentence(tiny_model_dir, tmp_path):
    with pytest.raises(ModelError, match=r"architecture GPT2LMHeadModel, and GGUF export supports .*Qwen2ForCausalLM"):
        check_gguf_support(_with_architecture(tiny_model_dir, tmp_path, "GPT2LMHeadModel"))
    with pytest.raises(ModelError, match="InternLM2's fused wqkv"):
        check_gguf_support(_with_architecture(tiny_model_dir, tmp_path / "b", "InternLM2ForCausalLM"))


def test_a_training_config_with_export_format_gguf_is_refused_before_training(
    tiny_model_dir, tmp_path, capsys, identity_rows
):
    model = _with_architecture(tiny_model_dir, tmp_path, "GPT2LMHeadModel")
    (tmp_path / "data.json").write_text(json.dumps(identity_rows))
    run = tmp_path / "run"
    code = main(["train", _write_config(tmp_path, model, run)])
    assert code == 2
    assert "names architecture GPT2LMHeadModel" in _one_sentence_error(capsys)
    assert not run.exists(), "nothing may be trained or written before the refusal"


def _write_config(tmp_path, model, run) -> str:
    config = tmp_path / "train.yaml"
    config.write_text(
        f"model_name_or_path: {model}\ndataset: {tmp_path / 'data.json'}\noutput_dir: {run}\n"
        "finetuning_type: lora\nmax_steps: 1\nexport_format: gguf\n", encoding="utf-8"
    )
    return str(config)


def test_a_bad_export_quantization_is_one_sentence(tiny_model_dir, tmp_path, capsys):
    config = tmp_path / "export.yaml"
    config.write_text(f"model_name_or_path: {tiny_model_dir}\nexport_dir: {tmp_path / 'x'}\nexport_format: gguf\n"
                      "export_quantization: q4_k\n", encoding="utf-8")
    assert main(["export", str(config)]) == 2
    assert "export_quantization expects" in _one_sentence_error(capsys)
    assert not (tmp_path / "x").exists()


def test_sentencepiece_and_unknown_pre_tokenizers_are_refused():
    spm = {"model": {"type": "BPE", "byte_fallback": True}, "normalizer": {"type": "Sequence"},
           "pre_tokenizer": None}
    with pytest.raises(ModelError, match="SentencePiece-style"):
        pre_tokenizer_name(spm, "tokenizer.json")
    odd = {"model": {"type": "BPE"}, "pre_tokenizer": {"type": "Whitespace"}}
    with pytest.raises(ModelError, match=r"pre-tokenizer \(Whitespace\) is not one"):
        pre_tokenizer_name(odd, "tokenizer.json")


# -- SmolLM2-135M-Instruct + a LoRA adapter: transformers' GGUF loader and llama.cpp -------------------------------

PROMPTS = ("Who are you?", "What is the capital of France?", "Write a short poem about the sea.")
GREEDY_TOKENS = 16
# Measured: q8_0's greedy continuations keep 87.5% of the first 16 tokens of the 3 prompts as a common prefix
# with the merged model's (42 of 48; one prompt parts ways at token 10); f16 and f32 keep all 48. Below 60%
# something other than 8-bit rounding is wrong.
Q8_0_MIN_AGREEMENT = 0.6


@pytest.fixture(scope="module")
def fast_gguf_reader():
    """transformers' GGUF loader parses the file twice and rebuilds gguf's tensor-name map once per tensor (~400
    times for SmolLM2); cache both for this module, which loads several files."""
    import functools

    import gguf

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map))
        mp.setattr(gguf, "GGUFReader", functools.lru_cache(maxsize=4)(gguf.GGUFReader))
        yield


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """SmolLM2 + a random LoRA adapter: the f32 export through export_model, the merged reference model, and f16 /
    q8_0 files written from that same merged model."""
    from tunesmith.data.templates import get_template
    from tunesmith.export.gguf import write_gguf
    from tunesmith.export.merge import export_model
    from tunesmith.model.load import load_tokenizer
    from tunesmith.model.resolve import resolve_model_path

    base_dir = resolve_model_path("smollm2-135m-instruct")
    root = tmp_path_factory.mktemp("smol")
    adapter = _random_adapter(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), root / "adapter",
                              std=0.02, rank=8)
    files = {"f32": export_model("smollm2-135m-instruct", root / "f32", str(adapter), dtype="float32",
                                 template="chatml", gguf_quantization="f32") / "f32-f32.gguf"}
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()
    tokenizer = load_tokenizer(base_dir)
    template = get_template("chatml", tokenizer)
    tokenizer.chat_template = template.jinja()
    for quantization in ("f16", "q8_0"):
        files[quantization] = root / f"smol-{quantization}.gguf"
        write_gguf(merged, tokenizer, files[quantization], quantization, base_dir, template.stop_token_ids(tokenizer))
    prompts = [template.encode_prompt(tokenizer, [{"role": "user", "content": q}]) for q in PROMPTS]
    return {"files": files, "merged": merged, "tokenizer": tokenizer, "prompts": prompts, "adapter": adapter,
            "base": base_dir}


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens, never stopping at eos (llama.cpp's generate does not stop either)."""
    ids, past, out = torch.tensor([prompt]), None, []
    with torch.no_grad():
        for _ in range(n):
            step = model(input_ids=ids, past_key_values=past, use_cache=True)
            past, token = step.past_key_values, int(step.logits[0, -1].argmax())
            out.append(token)
            ids = torch.tensor([[token]])
    return out


@contextmanager
def _llama_cpp(path):
    try:
        from llama_cpp import Llama
    except ImportError:
        pytest.fail("llama-cpp-python is not installed; run scripts/setup.sh")
    llm = Llama(model_path=str(path), n_ctx=256, logits_all=False, verbose=False, seed=0, n_threads=2)
    try:
        yield llm
    finally:
        llm.close()  # now, not in __del__ at interpreter exit, when llama.cpp's library may be gone


def _llama_greedy(llm, prompt: list[int], n: int) -> list[int]:
    out = []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(token)
        if len(out) == n:
            break
    return out


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of tokens in the common greedy prefix: after the first difference the texts part ways anyway."""
    def prefix(x: list[int], y: list[int]) -> int:
        return next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), min(len(x), len(y)))
    return sum(prefix(x, y) for x, y in zip(a, b, strict=True)) / sum(len(x) for x in a)


@pytest.mark.slow
def test_f32_and_f16_gguf_logits_match_the_merged_model(smol, fast_gguf_reader):
    ids = torch.tensor([smol["prompts"][0]])
    expected = _logits(smol["merged"], ids)
    f32 = AutoModelForCausalLM.from_pretrained(smol["files"]["f32"].parent, gguf_file=smol["files"]["f32"].name,
                                               dtype=torch.float32)
    torch.testing.assert_close(_logits(f32, ids), expected, atol=1e-4, rtol=0)

    # f16 holds the merged weights rounded to half precision (norms stay f32): the merged model with exactly that
    # rounding is what it must reproduce; against the unrounded model the logits move by ~0.04 at most.
    f16 = AutoModelForCausalLM.from_pretrained(smol["files"]["f16"].parent, gguf_file=smol["files"]["f16"].name,
                                               dtype=torch.float32)
    rounded = {k: (v.half().float() if v.ndim > 1 else v) for k, v in smol["merged"].state_dict().items()}
    f32.load_state_dict(rounded, strict=False)  # reuse f32's module as the rounded reference
    torch.testing.assert_close(_logits(f16, ids), _logits(f32, ids), atol=2e-2, rtol=0)
    assert (_logits(f16, ids) - expected).abs().max() < 0.1


@pytest.mark.slow
def test_llama_cpp_greedy_continuations_equal_the_merged_models_f32_and_mostly_q8_0(smol):
    expected = [_hf_greedy(smol["merged"], p, GREEDY_TOKENS) for p in smol["prompts"]]
    with _llama_cpp(smol["files"]["f32"]) as llm:
        text = smol["tokenizer"].decode(smol["prompts"][1])
        # vocabulary, merges and pre-tokenizer: llama.cpp splits the templated prompt into the same ids
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == smol["prompts"][1]
        assert [_llama_greedy(llm, p, GREEDY_TOKENS) for p in smol["prompts"]] == expected
    with _llama_cpp(smol["files"]["q8_0"]) as llm:
        q8 = [_llama_greedy(llm, p, GREEDY_TOKENS) for p in smol["prompts"]]
    rate = _agreement(q8, expected)
    print(f"q8_0 greedy agreement with the merged model: {rate:.0%} of the first {GREEDY_TOKENS} tokens")
    assert rate >= Q8_0_MIN_AGREEMENT


@pytest.mark.slow
def test_the_identity_demos_adapter_exported_to_gguf_answers_with_the_new_name_under_llama_cpp(tmp_path, demo_run):
    """The demo's adapter (`tunesmith demo`, run once per session), exported to q8_0 GGUF, asked through llama.cpp's
    chat API: the chat template comes from the file, as in Ollama or llama-server."""
    from tunesmith.demo import demo_config
    from tunesmith.export.merge import export_model

    result, run = demo_run
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = demo_config("Orla", "Acme Lab", None, str(run))
    out = export_model(cfg.model_name_or_path, tmp_path / "orla", str(run), template=cfg.template,
                       default_system=cfg.default_system, gguf_quantization="q8_0")
    with _llama_cpp(out / "orla-q8_0.gguf") as llm:
        reply = llm.create_chat_completion([{"role": "user", "content": "Who are you?"}], temperature=0.0,
                                           max_tokens=48)["choices"][0]["message"]["content"]
    assert "Orla" in reply, reply
    assert 'PARAMETER stop "<|im_end|>"' in (out / "Modelfile").read_text(encoding="utf-8")


def test_modelfile_templates_follow_the_registry_templates_turn_by_turn():
    from types import SimpleNamespace

    from tunesmith.data.templates import TEMPLATES
    from tunesmith.export.modelfile import go_template

    tok = SimpleNamespace(bos_token="<bos>", eos_token="<eos>")
    gemma = go_template(TEMPLATES["gemma"], tok)  # no system role: the system text opens the first user turn
    assert "<bos>" in gemma and "<start_of_turn>user\n{{ if and $first $system }}{{ $system }}\n\n{{ end }}" in gemma
    assert "{{ .Content }}<end_of_turn>\n<start_of_turn>model\n" in gemma
    qwen3 = go_template(TEMPLATES["qwen3"], tok)  # non-thinking: an empty think block after the last header only
    assert "<|im_start|>assistant\n{{ if $last }}<think>\n\n</think>\n\n{{ end }}" in qwen3
