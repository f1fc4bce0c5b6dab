"""stage: rm — a reward model on preference pairs: its loss equals TRL's RewardTrainer, it separates a toy
preference set on held-out pairs, and what it saves loads as a standard AutoModelForSequenceClassification (full)
or a PEFT adapter with its head (LoRA) giving the same scores; LLaMA-Factory's qwen3_lora_reward.yaml runs
unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from preference_helpers import PlainCall, max_grad_diff
from test_dpo import write_preferences
from train_helpers import assert_lf_example_trains, make_cfg

from tunesmith.data import prepare_datasets
from tunesmith.data.loader import Batch
from tunesmith.data.pairs import PairCollator
from tunesmith.model.adapt import apply_finetuning
from tunesmith.model.load import RewardHead, load_model
from tunesmith.train import fit
from tunesmith.train.objectives import RewardObjective
from tunesmith.train.observe import read_log


def reward_model(model_dir, tokenizer, cfg):
    return apply_finetuning(load_model(model_dir, reward_head=RewardHead(tokenizer.pad_token_id, cfg.seed)), cfg)


def scores(model, batch: Batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.squeeze(-1)


def test_reward_loss_and_gradients_equal_trl(tiny_model_dir, tiny_tokenizer, tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    cfg = make_cfg(tmp_path / "unused", tiny_model_dir)
    model = reward_model(tiny_model_dir, tiny_tokenizer, cfg)
    ours = copy.deepcopy(model)
    rows = [{"prompt": f"Tell me about {i}.", "chosen": f" Sure, {i} is nice{'!' * i}.", "rejected": " No."}
            for i in range(4)]
    args = trl.RewardConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, gradient_checkpointing=False,
                            report_to="none", per_device_train_batch_size=4, max_length=64)
    trainer = trl.RewardTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                                processing_class=tiny_tokenizer)
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, dict(inputs))
    trl_loss.backward()
    trl_grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}

    batch = Batch(inputs["input_ids"], inputs["input_ids"].clone(), inputs["attention_mask"])
    objective = RewardObjective()
    ours.train()
    parts = objective.loss(PlainCall(ours), batch)
    loss = parts.loss / objective.units(batch)
    loss.backward()
    assert float(loss) == pytest.approx(float(trl_loss), abs=1e-5)
    our_grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert max_grad_diff(our_grads, trl_grads) < 1e-5


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_reward_model_separates_held_out_pairs_and_saves_a_standard_folder(
    tmp_path, tiny_model_dir, tiny_tokenizer, monkeypatch, method
):
    from transformers import AutoModelForSequenceClassification

    monkeypatch.setenv("TUNESMITH_DATA_CACHE", "0")
    extra = {"lora_rank": 4, "learning_rate": 1e-2} if method == "lora" else {"learning_rate": 1e-3}
    cfg = make_cfg(tmp_path / "run", tiny_model_dir, stage="rm", dataset=["prefs"], template="chatml",
                   dataset_dir=str(write_preferences(tmp_path / "data", 60)), cutoff_len=64, finetuning_type=method,
                   per_device_train_batch_size=4, max_steps=20, val_size=0.2, eval_steps=20,
                   per_device_eval_batch_size=4, **extra)
    data = prepare_datasets(cfg, tiny_tokenizer)
    model = reward_model(tiny_model_dir, tiny_tokenizer, cfg)
    fit(cfg, model, tiny_tokenizer, data.train, data.val, objective=RewardObjective(), resume_from=None)
    final = next(entry for entry in read_log(tmp_path / "run") if "eval_accuracy" in entry)
    assert final["eval_accuracy"] >= 0.9, final

    batch = PairCollator(tiny_tokenizer.pad_token_id).collate(data.val)
    trained = scores(model.eval(), batch)
    if method == "full":
        saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run")
    else:
        from peft import PeftModel

        base = AutoModelForSequenceClassification.from_pretrained(
            tiny_model_dir, num_labels=1, pad_token_id=tiny_tokenizer.pad_token_id)
        saved = PeftModel.from_pretrained(base, tmp_path / "run")
    assert torch.allclose(scores(saved.eval(), batch), trained, atol=1e-5)
    chosen, rejected = trained.chunk(2)
    assert float((chosen > rejected).float().mean()) >= 0.9


@pytest.mark.slow
def test_llama_factory_reward_example_runs_unchanged(tmp_path, tiny_model_dir, shared_dir):
    assert_lf_example_trains(shared_dir, "train_lora/qwen3_lora_reward.yaml", tiny_model_dir, tmp_path,
                             {"rewards/accuracies", "rewards/margins"}, "dpo_en_demo: 300 preference pairs")
