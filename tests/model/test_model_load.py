"""load_model / load_tokenizer / pick_device on the tiny model: safetensors-first, pickle only when allowed."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tunesmith.errors import ModelError
from tunesmith.model.load import load_model, load_tokenizer, pick_device


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert pick_device("auto").type == "cuda"
    elif importlib.util.find_spec("torch_npu") is None:
        assert pick_device("auto") == torch.device("cpu")
    with pytest.raises(ModelError, match="not a torch device"):
        pick_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            pick_device("cuda")


def test_load_model_safetensors_and_dtype(tiny_model_dir):
    model = load_model(str(tiny_model_dir))
    assert next(model.parameters()).dtype == torch.float32
    assert load_model(tiny_model_dir, dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(ModelError, match="dtype int8"):
        load_model(tiny_model_dir, dtype="int8")


def test_pickled_weights_need_allow_pickle(tiny_model_dir, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")

    with pytest.raises(ModelError, match="allow_pickle: true"):
        load_model(folder)
    pickled = load_model(folder, allow_pickle=True)
    reference = load_model(tiny_model_dir)
    ids = torch.tensor([[1, 5, 9, 14]])
    with torch.no_grad():
        assert torch.equal(pickled(ids).logits, reference(ids).logits)


def test_folder_without_weights_is_refused(tiny_model_dir, tmp_path):
    folder = tmp_path / "empty"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="has no weights"):
        load_model(folder)


def test_tokenizer_gets_a_pad_token(tiny_model_dir, tmp_path):
    assert load_tokenizer(str(tiny_model_dir)).pad_token == "<|im_end|>"
    folder = tmp_path / "nopad"
    shutil.copytree(tiny_model_dir, folder)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["pad_token"] = None
    config["eos_token"] = "<|endoftext|>"
    config_file.write_text(json.dumps(config))
    tokenizer = load_tokenizer(folder)
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == tokenizer.eos_token_id
