"""LLaMA Pro and NEFTune trained end to end: they learn, an interrupted run ends as the uninterrupted one (NEFTune's
noise comes from the generator the checkpoint restores), LLaMA Pro changes only the expanded blocks and NEFTune
changes what a step computes."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file
from test_lf_adapter_training import assert_learns, assert_resumes_exactly, logged, run

from tunesmith.model.llama_pro import expand_model_folder


@pytest.fixture(autouse=True)
def _no_data_cache(monkeypatch):
    monkeypatch.setenv("TUNESMITH_DATA_CACHE", "0")


@pytest.fixture(scope="module")
def expanded_dir(tmp_path_factory, tiny_model_dir):
    return expand_model_folder(tiny_model_dir, tmp_path_factory.mktemp("pro") / "tiny-pro", 2)


def test_llama_pro_learns_resumes_exactly_and_changes_only_the_expanded_blocks(tmp_path, expanded_dir,
                                                                                identity_rows):
    values = dict(finetuning_type="freeze", freeze_trainable_layers=2, use_llama_pro=True, learning_rate=1e-3)
    straight = assert_resumes_exactly(tmp_path, expanded_dir, identity_rows * 4, **values)
    assert_learns(straight)
    before, after = load_file(expanded_dir / "model.safetensors"), load_file(straight / "model.safetensors")
    changed = {key for key in before if not (before[key] == after[key]).all()}
    assert changed and {key.split(".")[2] for key in changed} == {"1", "3"}, sorted(changed)
    assert all(key.startswith("model.layers.") for key in changed)


def test_neftune_learns_and_resumes_exactly_with_the_same_noise(tmp_path, tiny_model_dir, identity_rows):
    values = dict(finetuning_type="full", learning_rate=1e-3, neftune_noise_alpha=5.0)
    straight = assert_resumes_exactly(tmp_path, tiny_model_dir, identity_rows * 4, **values)
    assert_learns(straight)
    clean = run(tmp_path / "clean", tiny_model_dir, identity_rows * 4, finetuning_type="full", learning_rate=1e-3)
    first_noisy, first_clean = logged(straight)[0], logged(clean)[0]
    assert first_noisy != pytest.approx(first_clean, abs=1e-6)  # the noise reached the first forward
