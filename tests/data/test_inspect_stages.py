"""`tunesmith data inspect` and `data preview` read a config's rows as its stage does: preference pairs (dpo, rm),
tagged feedback (kto) and raw text (pt), listing every malformed row and every example whose prompt alone is
longer than cutoff_len with its file:line; a bare file is read as what its first row holds."""

from __future__ import annotations

import json

import yaml

from tunesmith.cli import main

PAIR = {"instruction": "Say hi.", "input": "", "chosen": "Hi there!", "rejected": "No."}
FEEDBACK = {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}],
            "label": True}


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    return path


def _config(tmp_path, model_dir, stage: str, dataset: str, **extra) -> str:
    path = tmp_path / f"{stage}.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": str(model_dir), "stage": stage, "dataset": dataset,
                                    "dataset_dir": str(tmp_path), "template": "chatml", "cutoff_len": 48,
                                    **extra}))
    return str(path)


def test_inspect_of_a_dpo_config_lists_broken_pairs_and_prompts_longer_than_cutoff_len(tmp_path, tiny_model_dir,
                                                                                        capsys):
    long_prompt = {**PAIR, "instruction": "Please say hi. " * 40}
    _jsonl(tmp_path / "prefs.jsonl", [PAIR, {"instruction": "q", "chosen": "a"}, long_prompt, PAIR,
                                      {**PAIR, "chosen": ["not", "a", "message"]}])
    (tmp_path / "dataset_info.json").write_text(json.dumps({"prefs": {"file_name": "prefs.jsonl", "ranking": True}}))
    assert main(["data", "inspect", _config(tmp_path, tiny_model_dir, "dpo", "prefs"), "--no-plot"]) == 1
    out = capsys.readouterr().out
    assert "5 rows, format alpaca (preference pairs), 2 malformed" in out
    assert "prefs.jsonl:line 2: missing column 'rejected' (a preference pair needs chosen and rejected)" in out
    assert "prefs.jsonl:line 5: column 'chosen' is a list, expected a string" in out
    assert "prefs.jsonl:line 3: the prompt alone is" in out and "more than cutoff_len=48" in out
    assert "cutoff_len=48: 1 of 3 preference pairs truncated" in out


def test_inspect_of_a_kto_config_lists_rows_without_a_boolean_tag_and_counts_both_tags(tmp_path, tiny_model_dir,
                                                                                       capsys):
    _jsonl(tmp_path / "fb.jsonl", [FEEDBACK, {**FEEDBACK, "label": False}, {**FEEDBACK, "label": "yes"}, FEEDBACK])
    info = {"fb": {"file_name": "fb.jsonl", "formatting": "sharegpt",
                   "columns": {"messages": "messages", "kto_tag": "label"},
                   "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                            "assistant_tag": "assistant"}}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    assert main(["data", "inspect", _config(tmp_path, tiny_model_dir, "kto", "fb"), "--no-plot"]) == 1
    out = capsys.readouterr().out
    assert "fb.jsonl:line 3: column 'label' is a str, expected true or false (the kto_tag)" in out
    assert "kto_tag: 2 desirable, 1 undesirable" in out


def test_inspect_of_a_pt_config_lists_empty_documents_and_counts_blocks(tmp_path, tiny_model_dir, capsys):
    _jsonl(tmp_path / "docs.jsonl", [{"text": "A first document. " * 10}, {"text": "  "}, {"text": "Short."}])
    assert main(["data", "inspect", _config(tmp_path, tiny_model_dir, "pt", "docs.jsonl"), "--no-plot"]) == 1
    out = capsys.readouterr().out
    assert "3 rows, format raw text (documents), 1 malformed" in out
    assert "docs.jsonl:line 2: the text is empty" in out
    assert "2 documents," in out and "blocks of cutoff_len=48; 1 documents span more than one" in out


def test_inspect_reads_a_bare_pairs_file_as_pairs(tmp_path, capsys):
    data = _jsonl(tmp_path / "prefs.jsonl", [PAIR, {"instruction": "q", "chosen": "a", "rejected": None}])
    assert main(["data", "inspect", str(data), "--no-plot"]) == 1
    out = capsys.readouterr().out
    assert "2 rows, format alpaca (preference pairs), 1 malformed" in out
    assert "prefs.jsonl:line 2: missing column 'rejected'" in out


def test_preview_of_a_dpo_config_shows_the_prompt_once_and_both_replies_as_targets(tmp_path, tiny_model_dir,
                                                                                  capsys, monkeypatch):
    monkeypatch.setenv("TUNESMITH_DATA_CACHE", "0")
    _jsonl(tmp_path / "prefs.jsonl", [PAIR])
    (tmp_path / "dataset_info.json").write_text(json.dumps({"prefs": {"file_name": "prefs.jsonl", "ranking": True}}))
    assert main(["data", "preview", _config(tmp_path, tiny_model_dir, "dpo", "prefs")]) == 0
    out = capsys.readouterr().out
    assert out.count("Say hi.") == 1
    assert "chosen:   [[Hi there!<|im_end|>" in out and "rejected: [[No.<|im_end|>" in out
