"""DPO on the real SmolLM2-135M-Instruct with LoRA, on CPU: a small preference set where the chosen replies talk
like a pirate and the rejected ones plainly. On held-out prompts (eval_dataset, topics never trained on) the
reward accuracy rises from chance — at step 0 the policy is its reference, every reward is 0 — to >= 0.9, and
the greedy answers to held-out questions, plain before training, take the chosen style after it.

pref_ftx adds the SFT term on the chosen replies (LLaMA-Factory's key; RPO in TRL): plain DPO only has to make
the rejected style less likely, and on this data it does so by drifting to a third style."""

from __future__ import annotations

import json

import pytest

from tunesmith.config import load_config
from tunesmith.train import train
from tunesmith.train.observe import read_log

pytestmark = pytest.mark.slow

THINGS = ["apples", "rivers", "violins", "bicycles", "mountains", "owls", "bread", "clocks", "rain", "chess",
          "bees", "lighthouses", "coffee", "trains", "maps", "volcanoes", "snow", "kites", "honey", "bridges",
          "whales", "candles", "forests", "pianos", "deserts", "tea", "rockets", "gardens", "shoes", "islands",
          "tigers", "books", "stars", "cheese", "storms", "boats", "mirrors", "wolves", "lamps", "caves"]
TRAINED, HELD_OUT = THINGS[:32], THINGS[32:]
PIRATE = "Ahoy"


def _pair(thing: str) -> dict:
    return {"instruction": f"Tell me one thing about {thing}.",
            "chosen": f"{PIRATE}, matey! {thing.capitalize()} be a fine treasure on the seven seas, arr!",
            "rejected": f"{thing.capitalize()} are interesting and have many uses."}


def _config(tmp_path) -> str:
    data = tmp_path / "data"
    data.mkdir()
    info = {}
    for name, things in (("prefs", TRAINED), ("held", HELD_OUT)):
        (data / f"{name}.json").write_text(json.dumps([_pair(thing) for thing in things]), encoding="utf-8")
        info[name] = {"file_name": f"{name}.json", "ranking": True}
    (data / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    config = tmp_path / "dpo.yaml"
    config.write_text(json.dumps({
        "model_name_or_path": "smollm2-135m-instruct", "stage": "dpo", "finetuning_type": "lora", "lora_rank": 8,
        "lora_target": "all", "pref_beta": 0.1, "pref_ftx": 1.0, "dataset": "prefs", "eval_dataset": "held",
        "dataset_dir": str(data), "template": "chatml", "cutoff_len": 128, "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8, "learning_rate": 5e-4, "lr_scheduler_type": "constant",
        "max_steps": 8, "logging_steps": 4, "eval_steps": 8, "eval_on_start": True, "save_strategy": "no",
        "evaluation_inputs": [f"Tell me one thing about {thing}." for thing in HELD_OUT[:4]],
        "max_new_tokens": 12, "output_dir": str(tmp_path / "out"), "device": "cpu", "seed": 0,
    }), encoding="utf-8")
    return str(config)


def test_dpo_on_smollm2_wins_held_out_pairs_and_moves_greedy_answers_to_the_chosen_style(tmp_path):
    train(load_config(_config(tmp_path)))
    log = read_log(tmp_path / "out")
    evals = {entry["step"]: entry for entry in log if "eval_rewards/accuracies" in entry}
    answers = {entry["step"]: [s["answer"] for s in entry["sample_generations"]]
               for entry in log if "sample_generations" in entry}
    assert sorted(evals) == sorted(answers) == [0, 8]
    assert evals[0]["eval_rewards/accuracies"] <= 0.5 and evals[0]["eval_rewards/margins"] == 0.0
    assert evals[8]["eval_rewards/accuracies"] >= 0.9, evals[8]
    assert evals[8]["eval_rewards/margins"] > 1.0
    assert not any(PIRATE in answer for answer in answers[0]), answers[0]
    assert sum(answer.startswith(PIRATE) for answer in answers[8]) >= 3, answers[8]
