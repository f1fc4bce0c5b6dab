"""NEFTune (neftune_noise_alpha): uniform noise of half-width alpha / sqrt(L × d) on the input embeddings of the
forwards that train, from the global generator; clean embeddings in evaluation and in no-grad passes."""

from __future__ import annotations

import math

import pytest
import torch

from tunesmith.config.schema import Config
from tunesmith.model.adapt import apply_finetuning
from tunesmith.model.load import load_model
from tunesmith.model.neftune import noise_magnitude

IDS = torch.randint(3, 390, (3, 21), generator=torch.Generator().manual_seed(2))


def _clean(model) -> torch.Tensor:
    with torch.no_grad():
        return model.get_input_embeddings()(IDS)


def _embeddings(model) -> torch.Tensor:
    captured = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, a, out: captured.append(out.detach()))
    try:
        model(input_ids=IDS)
    finally:
        handle.remove()
    return captured[0]


@pytest.fixture(scope="module", params=["lora", "full"])
def noisy(request, tiny_model_dir):
    cfg = Config(model_name_or_path=str(tiny_model_dir), finetuning_type=request.param, neftune_noise_alpha=5.0)
    return apply_finetuning(load_model(tiny_model_dir), cfg)


def test_training_forwards_get_uniform_noise_of_alpha_over_sqrt_length_times_hidden(noisy):
    clean = _clean(noisy)
    noise = _embeddings(noisy.train()) - clean
    bound = noise_magnitude(5.0, 21, 64)
    assert bound == pytest.approx(5.0 / math.sqrt(21 * 64))
    assert noise.abs().max() <= bound * (1 + 1e-5)
    # uniform on [-m, m]: mean about 0, standard deviation m / sqrt(3)
    assert abs(float(noise.mean())) < bound * 0.05
    assert float(noise.std()) == pytest.approx(bound / math.sqrt(3), rel=0.05)


def test_no_noise_in_evaluation_or_in_passes_without_gradient(noisy):
    clean = _clean(noisy)
    assert torch.equal(_embeddings(noisy.eval()), clean)
    with torch.no_grad():  # a reference pass, KTO's KL estimate
        assert torch.equal(_embeddings(noisy.train()), clean)
    noisy.train()


def test_the_noise_comes_from_the_global_generator(noisy):
    noisy.train()
    torch.manual_seed(11)
    first = _embeddings(noisy)
    second = _embeddings(noisy)
    torch.manual_seed(11)
    assert torch.equal(_embeddings(noisy), first) and not torch.equal(first, second)


def test_without_the_key_the_embeddings_stay_clean(tiny_model_dir):
    model = apply_finetuning(load_model(tiny_model_dir), Config(model_name_or_path=str(tiny_model_dir)))
    assert torch.equal(_embeddings(model.train()), _clean(model))
