"""`tunesmith eval` with stage: rm scores preference pairs with a trained reward model (a full folder, or the base
plus a LoRA adapter with its head): per pair the chosen and rejected score, the same as the model loaded with
transformers' AutoModelForSequenceClassification gives, and the accuracy over the held-out pairs. do_predict after
`tunesmith train` does the same with the model just trained."""

from __future__ import annotations

import json

import pytest
import torch

from tunesmith.cli import main

TOPICS = ["cats", "rain", "maps", "tea", "owls", "jazz"]


def write_preferences(folder, count: int):
    """Separable pairs: a cheerful on-topic reply is always chosen over a refusal."""
    folder.mkdir(parents=True)
    rows = [{"instruction": f"Tell me about {TOPICS[i % 6]} number {i}.", "input": "",
             "chosen": f"Sure! Here is a happy fact about {TOPICS[i % 6]}.", "rejected": "No. I will not."}
            for i in range(count)]
    (folder / "prefs.json").write_text(json.dumps(rows))
    (folder / "dataset_info.json").write_text(json.dumps({"prefs": {"file_name": "prefs.json", "ranking": True}}))
    return folder


def _config(tmp_path, model_dir, method: str) -> str:
    extra = {"lora_rank": 4, "learning_rate": 1e-2} if method == "lora" else {"learning_rate": 1e-3}
    path = tmp_path / "rm.yaml"
    path.write_text(json.dumps({
        "model_name_or_path": str(model_dir), "stage": "rm", "finetuning_type": method, "dataset": "prefs",
        "dataset_dir": str(write_preferences(tmp_path / "data", 60)), "template": "chatml", "cutoff_len": 64,
        "per_device_train_batch_size": 4, "max_steps": 20, "val_size": 0.2, "eval_strategy": "no",
        "save_steps": 100, "output_dir": str(tmp_path / "run"), "device": "cpu", "seed": 7, "do_train": True,
        "do_predict": True, **extra,
    }))
    return str(path)


def _predictions(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "generated_predictions.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_eval_scores_held_out_pairs_with_a_trained_reward_model(tmp_path, tiny_model_dir, monkeypatch, capsys,
                                                                 method):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    monkeypatch.setenv("TUNESMITH_DATA_CACHE", "0")
    config = _config(tmp_path, tiny_model_dir, method)
    assert main(["train", config]) == 0  # do_predict: scored right after training
    after_training = json.loads((tmp_path / "run" / "predict_results.json").read_text())
    assert after_training["predict_samples"] == 12 and after_training["predict_accuracy"] >= 0.9

    where = ["output_dir=" + str(tmp_path / "eval")]
    if method == "full":
        where.append(f"model_name_or_path={tmp_path / 'run'}")
        model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run")
    else:
        from peft import PeftModel

        where.append(f"adapter_name_or_path={tmp_path / 'run'}")
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1,
                                                                  pad_token_id=tokenizer.pad_token_id)
        model = PeftModel.from_pretrained(base, tmp_path / "run")
    assert main(["eval", config, *where]) == 0
    results = json.loads((tmp_path / "eval" / "predict_results.json").read_text())
    assert results == pytest.approx(after_training)
    rows = _predictions(tmp_path / "eval")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model.eval()
    for row in rows[:3]:  # the scores transformers gives the same texts
        for side in ("chosen", "rejected"):
            ids = tokenizer(row["prompt"] + row[side], add_special_tokens=False, return_tensors="pt").input_ids
            with torch.no_grad():
                assert float(model(input_ids=ids).logits[0, 0]) == pytest.approx(row[f"{side}_score"], abs=1e-4)
    assert sum(row["chosen_score"] > row["rejected_score"] for row in rows) / len(rows) == results["predict_accuracy"]


def test_a_lora_reward_model_exports_to_a_standard_folder_with_the_same_scores(tmp_path, tiny_model_dir,
                                                                              monkeypatch):
    from transformers import AutoModelForSequenceClassification

    monkeypatch.setenv("TUNESMITH_DATA_CACHE", "0")
    config = _config(tmp_path, tiny_model_dir, "lora")
    assert main(["train", config]) == 0
    merged = tmp_path / "merged"
    assert main(["export", config, f"adapter_name_or_path={tmp_path / 'run'}", f"export_dir={merged}"]) == 0
    exported = AutoModelForSequenceClassification.from_pretrained(merged)  # no PEFT, no num_labels to pass
    assert exported.config.num_labels == 1 and exported.config.pad_token_id is not None
    assert main(["eval", config, f"model_name_or_path={merged}", f"output_dir={tmp_path / 'eval'}"]) == 0
    before = _predictions(tmp_path / "run")
    after = _predictions(tmp_path / "eval")
    assert [row["chosen_score"] for row in after] == pytest.approx([row["chosen_score"] for row in before], abs=1e-5)
    assert [row["rejected_score"] for row in after] == pytest.approx([row["rejected_score"] for row in before],
                                                                     abs=1e-5)
