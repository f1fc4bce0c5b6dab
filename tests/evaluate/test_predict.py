"""`tunesmith eval CONFIG`: predictions on the validation split (the rows training holds out) or eval_dataset,
generated_predictions.jsonl + predict_results.json; and sample answers during training (evaluation_inputs)."""

from __future__ import annotations

import json
import logging

import pytest
import yaml
from file_helpers import write_json
from model_helpers import QUESTION, REPLY, speaking_model_fixture

from tunesmith.cli import main as commands_main
from tunesmith.config import load_config
from tunesmith.errors import ConfigError
from tunesmith.evaluate.metrics import compute_metrics
from tunesmith.model.detokenize import decode_complete
from tunesmith.model.generate import generate_reply
from tunesmith.train.samples import log_sample_generations, sample_generation_due


def write_config(tmp_path, tiny_model_dir, rows, **extra) -> str:
    data = write_json(tmp_path / "identity.json", rows)
    cfg = {
        "model_name_or_path": str(tiny_model_dir),
        "template": "chatml",
        "dataset": str(data),
        "placeholders": {"name": "Ada", "author": "Lab"},
        "cutoff_len": 128,
        "output_dir": str(tmp_path / "run"),
        "max_new_tokens": 8,
        **extra,
    }
    path = tmp_path / "predict.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return str(path)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_eval_command_predicts_the_validation_split(tmp_path, tiny_model_dir, identity_rows):
    from tunesmith.data import prepare_datasets
    from tunesmith.model.load import load_model, load_tokenizer

    path = write_config(tmp_path, tiny_model_dir, identity_rows, val_size=2, do_predict=True)
    assert commands_main(["eval", path]) == 0
    run = tmp_path / "run"
    rows = read_jsonl(run / "generated_predictions.jsonl")
    results = json.loads((run / "predict_results.json").read_text())

    # the rows are the ones training holds out: each label is the reply inside a validation sample
    cfg = load_config(path)
    tokenizer = load_tokenizer(tiny_model_dir)
    val = prepare_datasets(cfg, tokenizer).val
    assert len(rows) == len(val) == 2
    for row, sample in zip(rows, val, strict=True):
        assert set(row) == {"prompt", "predict", "label"}
        assert row["prompt"] + row["label"] in tokenizer.decode(sample.input_ids)
        assert row["prompt"].endswith("<|im_start|>assistant\n")

    # answers are greedy generations of the model; scores are the metrics of those answers
    model = load_model(tiny_model_dir)
    user = [{"role": "user", "content": row["prompt"].split("<|im_start|>user\n")[1].split("<|im_end|>")[0]}
            for row in rows]
    assert [r["predict"] for r in rows] == [
        generate_reply(model, tokenizer, "chatml", [u], max_new_tokens=8) for u in user
    ]
    expected = compute_metrics([r["predict"] for r in rows], [r["label"] for r in rows])
    assert {k: results[f"predict_{k}"] for k in expected} == expected
    assert results["predict_samples"] == 2 and results["predict_runtime"] > 0


def test_eval_dataset_and_config_checks(tmp_path, tiny_model_dir, identity_rows):
    other = write_json(tmp_path / "other.json", identity_rows[:1])
    path = write_config(tmp_path, tiny_model_dir, identity_rows, eval_dataset=str(other))
    assert commands_main(["eval", path, "max_new_tokens=4"]) == 0
    rows = read_jsonl(tmp_path / "run" / "generated_predictions.jsonl")
    assert [r["label"] for r in rows] == ["I am Ada, an AI assistant made by Lab."]

    with pytest.raises(ConfigError, match="predict_with_generate"):
        load_config(path, ["predict_with_generate=false"])
    assert commands_main(["eval", path, "output_dir=null"]) == 2  # a user error: message, no traceback


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_sample_generations_go_to_console_jsonl_and_tensorboard(tmp_path, tiny_model_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from tunesmith.model.load import load_model, load_tokenizer

    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    model.train()
    questions = ["Who are you?", "你是谁？"]
    writer = SummaryWriter(log_dir=str(tmp_path / "runs"))
    # A handler on tunesmith's own logger: the CLI's setup_logging stops propagation, so caplog may see nothing.
    records, logger = _Records(), logging.getLogger("tunesmith.train")
    level = logger.level
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    try:
        samples = log_sample_generations(
            model, tokenizer, "chatml", questions, step=3, output_dir=tmp_path, tb_writer=writer, max_new_tokens=6
        )
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    writer.close()
    assert model.training  # generation left the training mode as it found it

    expected = [generate_reply(model, tokenizer, "chatml", [{"role": "user", "content": q}], max_new_tokens=6)
                for q in questions]
    assert samples == [{"question": q, "answer": a} for q, a in zip(questions, expected, strict=True)]
    assert read_jsonl(tmp_path / "trainer_log.jsonl") == [{"step": 3, "sample_generations": samples}]
    console = "\n".join(records.lines)
    assert all(q in console and a in console for q, a in zip(questions, expected, strict=True))
    assert "step 3" in console

    events = EventAccumulator(str(tmp_path / "runs"))
    events.Reload()
    (text_event,) = events.Tensors("eval/sample_generations/text_summary")
    assert text_event.step == 3
    shown = text_event.tensor_proto.string_val[0].decode()
    assert "你是谁？" in shown and "Who are you?" in shown


def test_sample_generation_schedule(tmp_path, tiny_model_dir, identity_rows):
    path = write_config(tmp_path, tiny_model_dir, identity_rows, evaluation_inputs="Who are you, really?",
                        evaluation_freq=4)
    cfg = load_config(path)
    assert cfg.evaluation_inputs == ["Who are you, really?"]  # one question, commas and all
    assert [s for s in range(1, 11) if sample_generation_due(cfg, s, total_steps=10)] == [4, 8, 10]
    assert not sample_generation_due(load_config(path, ["evaluation_inputs=null"]), 4, 10)
    assert [s for s in range(1, 7) if sample_generation_due(load_config(path, ["evaluation_freq=null",
                                                                                "eval_steps=3"]), s, 6)] == [3, 6]


def test_do_predict_after_training_uses_the_trained_adapter(tmp_path, tiny_model_dir, identity_rows):
    from tunesmith.evaluate.predict import predict_after_training
    from tunesmith.model.adapt import load_adapter
    from tunesmith.model.load import load_model, load_tokenizer
    from tunesmith.train import train

    path = write_config(tmp_path, tiny_model_dir, identity_rows, finetuning_type="lora", max_steps=2,
                        learning_rate=0.05, per_device_train_batch_size=2, val_size=1, save_strategy="no",
                        device="cpu", max_new_tokens=6)
    cfg = load_config(path)
    assert predict_after_training(cfg) is None  # do_predict is off
    train(cfg)
    results = predict_after_training(cfg.model_copy(update={"do_predict": True}))
    assert results["predict_samples"] == 1
    (row,) = read_jsonl(tmp_path / "run" / "generated_predictions.jsonl")

    tokenizer = load_tokenizer(tiny_model_dir)
    trained = load_adapter(load_model(tiny_model_dir), str(tmp_path / "run"), trainable=False)
    question = row["prompt"].split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
    answer = generate_reply(trained, tokenizer, "chatml", [{"role": "user", "content": question}], max_new_tokens=6)
    assert row["predict"] == answer
    base = generate_reply(load_model(tiny_model_dir), tokenizer, "chatml", [{"role": "user", "content": question}],
                          max_new_tokens=6)
    assert base != answer  # so the prediction did come from the trained adapter, not the base model


def test_training_logs_answers_to_evaluation_inputs(tmp_path, tiny_model_dir, identity_rows):
    """The loop's hook: evaluation_inputs are answered every evaluation_freq steps and at the end."""
    from tunesmith.config import load_config
    from tunesmith.train import train

    data = write_json(tmp_path / "id.json", identity_rows * 2)
    cfg = load_config(None, [
        f"model_name_or_path={tiny_model_dir}", f"dataset={data}", "template=chatml",
        f"output_dir={tmp_path / 'run'}", "max_steps=5", "per_device_train_batch_size=4", "logging_steps=1",
        'evaluation_inputs=["Who are you?", "你是谁？"]', "evaluation_freq=2", "max_new_tokens=4",
        "save_strategy=no", "report_to=tensorboard", "placeholders.name=Ada", "placeholders.author=Lab",
    ])
    train(cfg)
    entries = [json.loads(line) for line in (tmp_path / "run" / "trainer_log.jsonl").read_text().splitlines()]
    samples = [e for e in entries if "sample_generations" in e]
    assert [e["step"] for e in samples] == [2, 4, 5]
    assert [s["question"] for s in samples[0]["sample_generations"]] == ["Who are you?", "你是谁？"]


def test_train_with_a_llamafactory_predict_config_only_predicts(tmp_path, tiny_model_dir, identity_rows):
    """LLaMA-Factory's rule: do_train decides, and unset it is false there, so a predict config (do_predict: true,
    no do_train) run by `tunesmith train` predicts with the configured model and trains nothing; do_train: false
    with nothing to predict is one sentence and exit 2."""
    from tunesmith.cli import main as cli_main

    path = write_config(tmp_path, tiny_model_dir, identity_rows, val_size=2, do_predict=True, device="cpu")
    assert cli_main(["train", path]) == 0
    run = tmp_path / "run"
    assert len(read_jsonl(run / "generated_predictions.jsonl")) == 2
    assert not (run / "trainer_log.jsonl").exists() and not list(run.glob("checkpoint-*"))

    assert cli_main(["train", path, "do_train=true", "max_steps=1", "save_strategy=no"]) == 0
    assert (run / "trainer_log.jsonl").exists()  # do_train: true trains, then predicts

    plain = write_config(tmp_path, tiny_model_dir, identity_rows, do_train=False)
    assert cli_main(["train", plain]) == 2


speaking_model_dir = speaking_model_fixture()


def test_predictions_cut_inside_a_character_hold_no_half_character(tmp_path, speaking_model_dir):
    """max_new_tokens ends the answer inside a character: `predict` (and the file) stop before it."""
    from tunesmith.evaluate.predict import run_predict
    from tunesmith.model.load import load_model, load_tokenizer

    model, tokenizer = load_model(speaking_model_dir), load_tokenizer(speaking_model_dir)
    ids = tokenizer.encode(REPLY, add_special_tokens=False)
    cuts = [n for n in range(1, len(ids) + 1) if tokenizer.decode(ids[:n]).endswith("\ufffd")]
    path = write_config(tmp_path, speaking_model_dir, [{"instruction": QUESTION, "output": REPLY}], template="auto")
    for n in [*cuts[::5], len(ids) + 1]:
        run_predict(load_config(path, [f"max_new_tokens={n}"]), model, tokenizer)
        (row,) = read_jsonl(tmp_path / "run" / "generated_predictions.jsonl")
        assert row["predict"] == decode_complete(tokenizer, ids[:n]) and "\ufffd" not in row["predict"], n
        assert REPLY.startswith(row["predict"]) and row["label"] == REPLY
    assert row["predict"] == REPLY
