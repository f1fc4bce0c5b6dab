"""The preprocessing cache for pairs (dpo, rm) and feedback examples (kto): a second run loads the very samples of
the first from the cache without reading the data, a changed data file builds a new cache, and the reference
log-probs a sample carries later (precompute_ref_log_probs) are never saved with it."""

from __future__ import annotations

import pytest
from file_helpers import write_json

import tunesmith.data as data_mod
from tunesmith.config import Config
from tunesmith.data import prepare_datasets
from tunesmith.data.cache import load_cached, samples_fingerprint, save_cache
from tunesmith.data.feedback import FeedbackSample
from tunesmith.data.pairs import PairSample

PAIRS = [{"instruction": f"Tell me about topic {i}.", "input": "", "chosen": f"Sure! Topic {i} is fun{'!' * (i % 4)}",
          "rejected": "No." if i % 2 else f"I will not talk about {i}."} for i in range(12)]
FEEDBACK = [{"instruction": f"Question {i}?", "input": "", "output": f"Answer number {i}{'.' * (i % 3)}",
             "kto_tag": i % 3 != 1} for i in range(12)]
INFO = {
    "pairs": {"file_name": "pairs.json", "ranking": True,
              "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}},
    "feedback": {"file_name": "feedback.json", "columns": {"prompt": "instruction", "query": "input",
                                                           "response": "output", "kto_tag": "kto_tag"}},
}
STAGES = {"dpo": ("pairs", "read_pairs", PairSample), "rm": ("pairs", "read_pairs", PairSample),
          "kto": ("feedback", "read_feedback", FeedbackSample)}


pytestmark = pytest.mark.usefixtures("cache_root")  # a cache of this test's own (conftest)


def _write_data(folder, pairs=PAIRS, feedback=FEEDBACK):
    write_json(folder / "pairs.json", pairs)
    write_json(folder / "feedback.json", feedback)
    write_json(folder / "dataset_info.json", INFO)


def _cfg(tmp_path, stage: str) -> Config:
    return Config(stage=stage, dataset=[STAGES[stage][0]], dataset_dir=str(tmp_path), template="chatml",
                  cutoff_len=48, val_size=3)


def _counting_reader(monkeypatch, name: str) -> list:
    calls: list = []
    real = getattr(data_mod, name)
    monkeypatch.setattr(data_mod, name, lambda cfg, bad: calls.append(1) or real(cfg, bad))
    return calls


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_second_run_loads_the_same_samples_from_the_cache(tmp_path, tiny_tokenizer, cache_root, monkeypatch,
                                                            stage):
    _, reader, kind = STAGES[stage]
    _write_data(tmp_path)
    cold = prepare_datasets(_cfg(tmp_path, stage), tiny_tokenizer)
    assert len(list((cache_root / "datasets").iterdir())) == 1
    calls = _counting_reader(monkeypatch, reader)
    warm = prepare_datasets(_cfg(tmp_path, stage), tiny_tokenizer)
    assert not calls  # nothing read: every sample came from the cache
    assert warm.train == cold.train and warm.val == cold.val and len(warm.val) == 3
    assert all(type(s) is kind for s in warm.train + warm.val)
    assert warm.report == cold.report
    if stage == "kto":  # both tags survive, as bools
        assert {s.desirable for s in warm.train} == {True, False}
        assert all(isinstance(s.desirable, bool) for s in warm.train)
    assert samples_fingerprint(warm.train) == samples_fingerprint(cold.train)


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_changed_data_file_builds_a_new_cache(tmp_path, tiny_tokenizer, cache_root, monkeypatch, stage):
    _, reader, _ = STAGES[stage]
    _write_data(tmp_path)
    first = prepare_datasets(_cfg(tmp_path, stage), tiny_tokenizer)
    _write_data(tmp_path, [{**r, "chosen": r["chosen"] + " Yes."} for r in PAIRS],
                [{**r, "output": r["output"] + " Yes."} for r in FEEDBACK])
    calls = _counting_reader(monkeypatch, reader)
    second = prepare_datasets(_cfg(tmp_path, stage), tiny_tokenizer)
    assert calls and second.train + second.val != first.train + first.val
    assert len(list((cache_root / "datasets").iterdir())) == 2
    assert samples_fingerprint(second.train) != samples_fingerprint(first.train)


def test_the_reference_log_probs_of_a_sample_are_not_saved_with_it(tmp_path, tiny_tokenizer):
    _write_data(tmp_path)
    for stage in ("dpo", "kto"):
        prepared = prepare_datasets(_cfg(tmp_path, stage), tiny_tokenizer)
        before = samples_fingerprint(prepared.train)
        for sample in prepared.train:
            sample.reference = (-1.5, -2.5)
        assert samples_fingerprint(prepared.train) == before  # the fingerprint is of the tokens only
        save_cache(tmp_path / f"saved-{stage}", "k", prepared.train, prepared.val, prepared.report)
        train, val, _ = load_cached(tmp_path / f"saved-{stage}", "k")
        assert all(s.reference is None for s in train + val)
        assert [(s.prompt, s.input_ids, s.labels) for s in train] == [
            (s.prompt, s.input_ids, s.labels) for s in prepared.train]
