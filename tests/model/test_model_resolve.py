"""resolve_model_path: HF folders, refusals (hub ids, odd files), and the packaged GGUF alias conversion."""

from __future__ import annotations

import time

import pytest

from tunesmith.errors import ModelError
from tunesmith.model.resolve import SOURCE_MARKER, packaged_gguf_path, resolve_model_path


def test_hf_folder_resolves_to_itself(tiny_model_dir):
    assert resolve_model_path(str(tiny_model_dir)) == tiny_model_dir.resolve()


def test_hub_name_is_refused_with_offline_hint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match="offline-first") as err:
        resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct")
    assert "--local-dir" in str(err.value) and "smollm2-135m-instruct" in str(err.value)


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({}, "neither config.json nor a .gguf"),
        ({"a.gguf": b"", "b.gguf": b""}, "several .gguf files"),
    ],
)
def test_unusable_folders_are_refused(tmp_path, layout, message):
    for name, data in layout.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(ModelError, match=message):
        resolve_model_path(tmp_path)


def test_missing_path_and_non_gguf_file_are_refused(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_path(tmp_path / "nope")
    weights = tmp_path / "weights.txt"
    weights.write_text("x")
    with pytest.raises(ModelError, match="not a .gguf"):
        resolve_model_path(weights)


@pytest.mark.slow
def test_packaged_alias_converts_once_and_matches_the_gguf(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = packaged_gguf_path("smollm2-135m-instruct")
    start = time.perf_counter()
    folder = resolve_model_path("smollm2-135m-instruct", cache_dir=tmp_path)
    first = time.perf_counter() - start
    assert folder == tmp_path / "models" / "smollm2-135m-instruct"
    assert (folder / SOURCE_MARKER).is_file() and list(folder.glob("*.safetensors"))
    assert [p.name for p in folder.parent.iterdir()] == [folder.name], "temp folders were left behind"

    start = time.perf_counter()
    assert resolve_model_path("SmolLM2-135M-Instruct", cache_dir=tmp_path) == folder
    assert time.perf_counter() - start < 1.0 < first, "second resolve should be a cache hit"

    converted = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    input_ids = torch.tensor([tokenizer.encode(ids, add_special_tokens=False)])
    with torch.no_grad():
        assert torch.equal(converted(input_ids).logits, direct(input_ids).logits)
