"""stage: dpo data — LLaMA-Factory's pairwise layouts (``ranking: true``; sharegpt as in dpo_en_demo, alpaca with
chosen / rejected strings) → one shared prompt and two replies within cutoff_len; malformed pairs named by
file:row."""

from __future__ import annotations

from pathlib import Path

import pytest
from file_helpers import write_json

from tunesmith.config import Config
from tunesmith.data import get_template, prepare_datasets
from tunesmith.data.loader import IGNORE_INDEX
from tunesmith.data.pairs import PairCollator, encode_pairs, read_pairs
from tunesmith.data.sources import BadRows
from tunesmith.errors import DataError

SHAREGPT_ROW = {
    "conversations": [{"from": "human", "value": "Name a colour."}],
    "chosen": {"from": "gpt", "value": "Blue."},
    "rejected": {"from": "gpt", "value": "I would rather not say."},
}
ALPACA_ROW = {"instruction": "Add the numbers.", "input": "2 and 3", "chosen": "5", "rejected": "23"}
INFO = {
    "prefs": {"file_name": "prefs.json", "ranking": True, "formatting": "sharegpt",
              "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
    "prefs_alpaca": {"file_name": "alpaca.json", "ranking": True,
                     "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}},
    "sft": {"file_name": "sft.json"},
}


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    write_json(tmp_path / "prefs.json", [SHAREGPT_ROW, {**SHAREGPT_ROW, "rejected": "Red, I think."}])
    write_json(tmp_path / "alpaca.json", [ALPACA_ROW])
    write_json(tmp_path / "sft.json", [{"instruction": "q", "input": "", "output": "a"}])
    write_json(tmp_path / "dataset_info.json", INFO)
    return tmp_path


def _cfg(data_dir: Path, dataset: str, **kw) -> Config:
    return Config(stage="dpo", dataset=dataset, dataset_dir=str(data_dir), template="qwen", **kw)


def _pairs(cfg: Config) -> list:
    return list(read_pairs(cfg, BadRows(cfg.skip_bad_rows)))


def test_sharegpt_and_alpaca_pairs_share_their_prompt(data_dir):
    pairs = _pairs(_cfg(data_dir, "prefs"))
    assert [t.content for t in pairs[0].chosen.turns] == ["Name a colour.", "Blue."]
    assert [t.content for t in pairs[0].rejected.turns] == ["Name a colour.", "I would rather not say."]
    assert pairs[1].rejected.turns[-1].content == "Red, I think."  # a bare string is the assistant's text
    (alpaca,) = _pairs(_cfg(data_dir, "prefs_alpaca"))
    assert [t.content for t in alpaca.chosen.turns] == ["Add the numbers.\n2 and 3", "5"]
    assert alpaca.rejected.turns[-1].content == "23"


def test_the_demo_file_of_llama_factory_reads_as_pairs(shared_dir):
    cfg = Config(stage="dpo", dataset="dpo_en_demo", dataset_dir=str(shared_dir / "lf" / "data"))
    pairs = _pairs(cfg)
    assert len(pairs) == 300
    assert all(p.chosen.turns[:-1] == p.rejected.turns[:-1] for p in pairs)


def test_encoded_pairs_keep_one_prompt_and_label_only_the_replies(data_dir, qwen_tokenizer):
    cfg = _cfg(data_dir, "prefs")
    template = get_template("qwen", qwen_tokenizer)
    samples, report = encode_pairs(_pairs(cfg), qwen_tokenizer, template, cfg)
    assert report.kept == 2
    batch = PairCollator(qwen_tokenizer.pad_token_id).collate(samples)
    assert batch.input_ids.size(0) == 4  # chosen rows first, then rejected
    for row, reply in enumerate(["Blue.", "Blue.", "I would rather not say.", "Red, I think."]):
        ids = [i for i in batch.input_ids[row].tolist()]
        targets = [t for t in batch.labels[row].tolist() if t != IGNORE_INDEX]
        assert qwen_tokenizer.decode(targets) == reply + "<|im_end|>\n"
        text = qwen_tokenizer.decode(ids[: int(batch.attention_mask[row].sum())])
        assert text.startswith("<|im_start|>system\n") and "<|im_start|>user\nName a colour.<|im_end|>" in text


def test_a_long_pair_is_cut_with_the_same_prompt_for_both_replies(data_dir, qwen_tokenizer):
    long_row = {**SHAREGPT_ROW, "chosen": {"from": "gpt", "value": "blue " * 200},
                "rejected": {"from": "gpt", "value": "red " * 50}}
    write_json(data_dir / "prefs.json", [long_row])
    cfg = _cfg(data_dir, "prefs", cutoff_len=64)
    samples, report = encode_pairs(_pairs(cfg), qwen_tokenizer, get_template("qwen", qwen_tokenizer), cfg)
    (sample,) = samples
    assert report.truncated == 1
    assert len(sample.prompt) + max(len(sample.chosen), len(sample.rejected)) <= 64
    budget = 64 - len(sample.prompt)
    assert len(sample.chosen) == budget  # the longer reply takes the budget the rule leaves it
    rejected = qwen_tokenizer("red " * 50 + "<|im_end|>\n")["input_ids"]
    assert list(sample.rejected) == rejected[:budget]  # the other is cut to the same budget (here: whole)


def test_a_pair_whose_prompt_alone_fills_cutoff_len_is_dropped_and_counted(data_dir, qwen_tokenizer):
    long_prompt = {**SHAREGPT_ROW, "conversations": [{"from": "human", "value": "word " * 400}]}
    write_json(data_dir / "prefs.json", [long_prompt, SHAREGPT_ROW])
    cfg = _cfg(data_dir, "prefs", cutoff_len=40, default_system="")
    samples, report = encode_pairs(_pairs(cfg), qwen_tokenizer, get_template("chatml", qwen_tokenizer), cfg)
    assert report.kept + report.dropped == 2


@pytest.mark.parametrize("row, problem", [
    ({k: v for k, v in SHAREGPT_ROW.items() if k != "rejected"}, "missing column 'rejected'"),
    ({**SHAREGPT_ROW, "chosen": None}, "missing column 'chosen'"),
    ({**SHAREGPT_ROW, "chosen": {"from": "gpt", "value": " "}}, "chosen: message 2 is an empty assistant reply"),
    ({**SHAREGPT_ROW, "rejected": 7}, "column 'rejected' is a int"),
])
def test_a_malformed_pair_is_named_by_file_and_row(data_dir, row, problem):
    write_json(data_dir / "prefs.json", [SHAREGPT_ROW, row])
    with pytest.raises(DataError, match=rf"prefs\.json:row 2: {problem}.*skip_bad_rows"):
        _pairs(_cfg(data_dir, "prefs"))
    assert len(_pairs(_cfg(data_dir, "prefs", skip_bad_rows=True))) == 1


def test_an_sft_entry_of_dataset_info_is_refused_for_dpo(data_dir):
    write_json(data_dir / "dataset_info.json", {**INFO, "sft": {"file_name": "sft.json", "columns": {"prompt": "q"}}})
    with pytest.raises(DataError, match=r"dataset_info\.json: dataset sft is not preference data; stage: dpo needs"):
        _pairs(_cfg(data_dir, "sft"))


def test_sft_refuses_pairs_and_dpo_refuses_sft_data_in_one_sentence(data_dir, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("TUNESMITH_DATA_CACHE", "0")
    with pytest.raises(DataError, match=r"dataset_info\.json: dataset prefs has ranking: true .* set stage: dpo"):
        prepare_datasets(Config(dataset="prefs", dataset_dir=str(data_dir), template="qwen"), tiny_tokenizer)
    with pytest.raises(DataError, match=r"sft\.json:row 1: cannot tell .*stage: dpo and rm need preference pairs"):
        prepare_datasets(_cfg(data_dir, "sft"), tiny_tokenizer)
