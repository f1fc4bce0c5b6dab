"""flash_attn (LLaMA-Factory's key): which attention kernels the model gets, fa2 refused where it cannot run, and
the packed inputs fa2 receives: position ids whose restarts are exactly the samples transformers' variable-length
path will cut the rows into."""

from __future__ import annotations

import pytest
import torch

from tunesmith.config import Config, load_config
from tunesmith.data.encode import TokenIds
from tunesmith.data.loader import collate
from tunesmith.data.pack import pack_samples
from tunesmith.errors import ConfigError
from tunesmith.model.load import attention_implementation, load_model


class Enc:
    def __init__(self, n: int, first: int) -> None:
        self.input_ids = TokenIds(range(first, first + n))
        self.labels = TokenIds([-100] * (n // 2) + list(range(first + n // 2, first + n)))


@pytest.mark.parametrize("flash_attn, expected", [("auto", "sdpa"), ("sdpa", "sdpa"), ("disabled", "eager")])
def test_flash_attn_picks_the_kernels(tiny_model_dir, flash_attn, expected):
    cpu = torch.device("cpu")
    model = load_model(tiny_model_dir, attn_implementation=attention_implementation(flash_attn, cpu))
    assert model.config._attn_implementation == expected


def test_fa2_is_refused_without_cuda_in_one_sentence(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match=r"flash_attn: fa2 needs a CUDA device.*set flash_attn: sdpa"):
        attention_implementation("fa2", torch.device("cpu"))
    from tunesmith.train import train

    cfg = Config(model_name_or_path=str(tiny_model_dir), dataset=["missing.json"], output_dir=str(tmp_path / "run"),
                 flash_attn="fa2", device="cpu")
    with pytest.raises(ConfigError, match="flash_attn: fa2"):  # before any data is read (missing.json)
        train(cfg)
    assert load_config(None, ["flash_attn=auto"]).flash_attn == "auto"  # a LLaMA-Factory config's value is valid


def test_varlen_inputs_cut_the_rows_into_exactly_the_packed_samples():
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    lengths = [37, 55, 20, 61, 12, 44, 9]
    samples = [Enc(n, 10 * i) for i, n in enumerate(lengths)]
    rows, _ = pack_samples(samples, 128)
    batch = collate(rows, pad_token_id=0)
    assert batch.packed and "attention_mask" in batch.model_inputs()
    varlen = batch.model_inputs("varlen")
    assert set(varlen) == {"input_ids", "position_ids"}  # no 4-D mask: flash-attention cannot take one

    (cu_seqlens, _), _ = prepare_fa_kwargs_from_position_ids(varlen["position_ids"])
    # expected: every row's samples in order, then each pad position alone (as the 4-D mask isolates it)
    width = batch.input_ids.shape[1]
    bounds, start = [0], 0
    for row in rows:
        for n in row.seq_lens:
            start += n
            bounds.append(start)
        pads = width - sum(row.seq_lens)
        bounds += [start + k for k in range(1, pads + 1)]
        start += pads
    assert cu_seqlens.tolist() == bounds
    # and each cut holds one sample's tokens, unchanged
    flat = batch.input_ids.reshape(-1).tolist()
    cut = [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    for sample in samples:
        assert sample.input_ids.tolist() in cut
