"""stage: pt — raw text from every layout LLaMA-Factory reads (dataset_info.json ``columns: {prompt: text}``,
.txt one document per line, json/jsonl/parquet text columns, a chat row's first message) → EOS-separated
documents cut into blocks of cutoff_len (or one sample per document for packing), every token a target."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from file_helpers import write_json

from tunesmith.config import Config
from tunesmith.data import prepare_datasets
from tunesmith.data.documents import encode_documents, read_documents
from tunesmith.data.loader import collate
from tunesmith.data.pack import pack_samples
from tunesmith.data.sources import BadRows
from tunesmith.errors import DataError
from tunesmith.train.objectives import token_loss_sum

DOCS = [
    "The river runs past the mill and under the old stone bridge.",
    "Bread is made from flour, water, salt and yeast, then baked.",
    "A short one.",
    "Winter came early that year, and the lake froze by November, long before anyone expected it to.",
]


def _cfg(tmp_path: Path, dataset: str, **kw) -> Config:
    return Config(stage="pt", dataset=dataset, dataset_dir=str(tmp_path), cutoff_len=kw.pop("cutoff_len", 16), **kw)


def _texts(cfg: Config) -> list[str]:
    return [doc.text for doc in read_documents(cfg, BadRows(cfg.skip_bad_rows))]


def test_every_raw_text_layout_reads_as_documents(tmp_path):
    (tmp_path / "lines.txt").write_text("\n".join(DOCS[:2]) + "\n\n" + DOCS[2] + "\n", encoding="utf-8")
    (tmp_path / "c4.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS), encoding="utf-8")
    pq.write_table(pa.table({"text": DOCS}), tmp_path / "docs.parquet")
    write_json(tmp_path / "chat.json", [{"messages": [{"role": "user", "content": d}]} for d in DOCS[:2]])
    write_json(tmp_path / "alpaca.json", [{"instruction": "Title", "input": "Body", "output": ""}])
    write_json(tmp_path / "dataset_info.json", {
        "wiki": {"file_name": "lines.txt", "columns": {"prompt": "text"}},
        "c4": {"file_name": "c4.jsonl", "columns": {"prompt": "text"}},
    })
    assert _texts(_cfg(tmp_path, "wiki")) == DOCS[:3]  # blank lines are not documents
    assert _texts(_cfg(tmp_path, "c4")) == DOCS
    assert _texts(_cfg(tmp_path, str(tmp_path / "docs.parquet"))) == DOCS  # a file without an entry: column text
    assert _texts(_cfg(tmp_path, str(tmp_path / "lines.txt"))) == DOCS[:3]
    assert _texts(_cfg(tmp_path, str(tmp_path / "chat.json"))) == DOCS[:2]  # the first message's text
    assert _texts(_cfg(tmp_path, str(tmp_path / "alpaca.json"))) == ["Title\nBody"]  # instruction + input


@pytest.mark.parametrize("row, problem", [
    ({"text": ""}, "the text is empty"),
    ({"text": "   "}, "the text is empty"),
    ({"text": None}, "missing column 'text'"),
    ({"text": 3}, "column 'text' is a int"),
])
def test_a_row_without_text_is_a_bad_row_named_by_file_and_line(tmp_path, row, problem):
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"d\.jsonl:line 2: {problem}.*skip_bad_rows"):
        _texts(_cfg(tmp_path, str(tmp_path / "d.jsonl")))
    assert _texts(_cfg(tmp_path, str(tmp_path / "d.jsonl"), skip_bad_rows=True)) == ["fine"]


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_documents_are_joined_with_eos_and_cut_into_blocks_that_never_exceed_cutoff_len(tmp_path, tiny_tokenizer):
    from tunesmith.data.documents import Document

    cfg = _cfg(tmp_path, "unused", cutoff_len=16)
    samples, report = encode_documents([Document(d) for d in DOCS], tiny_tokenizer, cfg)
    stream = [t for d in DOCS for t in _tokens(tiny_tokenizer, d)]
    assert all(len(s.input_ids) <= 16 for s in samples)
    assert all(len(s.input_ids) == 16 for s in samples[:-1])  # only the last block is shorter
    assert [t for s in samples for t in s.input_ids] == stream  # nothing dropped, EOS after every document
    assert all(list(s.labels) == list(s.input_ids) for s in samples)  # every token is a target
    assert report.kept == len(samples)


def test_with_packing_each_document_is_its_own_sample_and_a_long_one_is_cut(tmp_path, tiny_tokenizer):
    from tunesmith.data.documents import Document

    cfg = _cfg(tmp_path, "unused", cutoff_len=16, packing=True)
    samples, _ = encode_documents([Document(d) for d in DOCS], tiny_tokenizer, cfg)
    expected = []
    for doc in DOCS:
        ids = _tokens(tiny_tokenizer, doc)
        expected += [ids[i : i + 16] for i in range(0, len(ids), 16) if len(ids[i : i + 16]) > 1]
    assert [list(s.input_ids) for s in samples] == expected


def test_packed_pt_loss_equals_the_documents_one_by_one(tmp_path, tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from tunesmith.data.documents import Document

    cfg = _cfg(tmp_path, "unused", cutoff_len=48, packing=True)
    pieces, _ = encode_documents([Document(d) for d in DOCS * 2], tiny_tokenizer, cfg)
    rows, _ = pack_samples(pieces, 48)
    assert any(len(r.seq_lens) > 1 for r in rows)  # the test must actually pack
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        packed = collate(rows, 0)
        packed_loss = float(token_loss_sum(model(**packed.model_inputs(), use_cache=False).logits, packed.labels))
        one_by_one = 0.0
        for piece in pieces:
            batch = collate([piece], 0)
            one_by_one += float(token_loss_sum(model(**batch.model_inputs(), use_cache=False).logits, batch.labels))
    assert packed.num_targets == sum(len(p.input_ids) - 1 for p in pieces)
    assert packed_loss / packed.num_targets == pytest.approx(one_by_one / packed.num_targets, abs=1e-5)


def test_prepare_datasets_for_pt_splits_blocks_and_caches_by_stage(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("TUNESMITH_DATA_CACHE", "0")
    (tmp_path / "c4.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS * 5), encoding="utf-8")
    cfg = _cfg(tmp_path, str(tmp_path / "c4.jsonl"), val_size=0.2, template="qwen")
    data = prepare_datasets(cfg, tiny_tokenizer)
    assert data.val and all(len(s.input_ids) <= 16 for s in [*data.train, *data.val])
    total = sum(len(_tokens(tiny_tokenizer, d)) for d in DOCS * 5)
    assert sum(len(s.input_ids) for s in [*data.train, *data.val]) == total


def test_sft_data_settings_and_pt_data_settings_never_share_a_cache(tmp_path, tiny_tokenizer):
    from tunesmith.data.cache import cache_key

    (tmp_path / "d.txt").write_text("some text\n", encoding="utf-8")
    sft = Config(dataset=str(tmp_path / "d.txt"), template="qwen")
    pt = Config(stage="pt", dataset=str(tmp_path / "d.txt"), template="qwen")
    assert cache_key(sft, tiny_tokenizer, "t") != cache_key(pt, tiny_tokenizer, "t")
