"""Bad configs and overrides: one sentence that names the file:line (or the command line) and the key, exit 2,
no traceback, and an earlier run's checkpoints left byte for byte as they were.

Every case runs ``tunesmith train`` in-process through :func:`bad_input_helpers.assert_refused`; most are refused
while the config is read, so they take milliseconds. The cases that need a valid run around the bad key
(conflicts found later, re-runs over a trained folder) use the tiny model.
"""

from __future__ import annotations

import os

import pytest
from bad_input_helpers import (
    assert_refused,
    assert_refused_subprocess,
    copy_run,
    make_run,
    run_cli,
    snapshot,
    trained_run,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunesmith.config import load_config
from tunesmith.config.schema import SECTIONS


def _file(tmp_path, data: bytes | str, name: str = "cfg.yaml"):
    path = tmp_path / name
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


# ------------------------------------------------------------------------------------ the file itself

# (id, file bytes, what the message must name besides the path)
FILE_CASES = [
    ("binary-junk", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x80\x81\xfe", ["not UTF-8"]),
    ("utf-16", "model_name_or_path: x\n".encode("utf-16"), ["UTF-16"]),
    ("gbk-encoded", "model_name_or_path: x\ndefault_system: 你是谁\n".encode("gbk"), [":2:", "not UTF-8"]),
    ("latin-1", "run_name: café\n".encode("latin-1"), [":1:", "not UTF-8"]),
    ("empty", b"", ["is empty"]),
    ("only-comments", b"# a config\n# to be written\n", ["is empty"]),
    ("only-whitespace", b"\n   \n\n", ["is empty"]),
    ("explicit-null", b"~\n", ["not null"]),
    ("a-yaml-list", b"- model_name_or_path: x\n- dataset: y\n", ["not a list"]),
    ("a-yaml-scalar", b"just some words\n", ["not a str"]),
    ("unclosed-bracket", b"template: chatml\nlora_target: [q_proj, v_proj\n", [":3:", "invalid YAML"]),
    ("tab-indent", b"placeholders:\n\tname: Ada\n", [":2:", "invalid YAML"]),
    ("nul-byte", b"model_name_or_path: a\x00b\n", ["invalid YAML"]),
    ("two-documents", b"template: chatml\n---\ntemplate: qwen\n", ["invalid YAML"]),
    ("python-tag", b"learning_rate: !!python/object/apply:os.system [ls]\n", [":1:", "invalid YAML"]),
    ("nested-too-deep", b"placeholders: " + b"[" * 5000 + b"]" * 5000 + b"\n", ["nested too deeply"]),
    ("integer-key", b"template: chatml\n1: 2\n", [":2:", "not a key name"]),
    ("null-key", b"~: 3\n", [":1:", "not a key name"]),
    ("boolean-key", b"yes: 3\n", [":1:", "not a key name"]),
    ("list-key", b"? [a, b]\n: c\n", [":1:", "invalid YAML"]),
    ("duplicate-key", b"learning_rate: 1.0e-4\ntemplate: chatml\nlearning_rate: 5.0e-4\n", [":3:", "learning_rate"]),
]


@pytest.mark.parametrize(("data", "named"), [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_a_broken_config_file_is_named(tmp_path, capsys, data, named):
    path = _file(tmp_path, data)
    message = assert_refused(["train", path], capsys, path, *named)
    assert "model_name_or_path is required" not in message


def test_an_empty_config_says_empty_not_a_missing_key(tmp_path, capsys):
    path = _file(tmp_path, b"")
    message = assert_refused(["train", path], capsys, path)
    assert message.startswith(f"the config file {path} is empty")


def test_a_folder_as_config(tmp_path, capsys):
    assert_refused(["train", tmp_path], capsys, tmp_path, "is a folder")


def test_a_missing_config(tmp_path, capsys):
    assert_refused(["train", tmp_path / "nope.yaml"], capsys, tmp_path / "nope.yaml", "does not exist")


def test_a_config_symlink_loop(tmp_path, capsys):
    loop = tmp_path / "loop.yaml"
    os.symlink(loop, loop)
    assert_refused(["train", loop], capsys, loop)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file anyway (the simulated case runs)")
def test_an_unreadable_config(tmp_path, capsys):
    path = _file(tmp_path, "template: chatml\n")
    path.chmod(0)
    try:
        assert_refused(["train", path], capsys, path, "cannot read")
    finally:
        path.chmod(0o644)


def test_an_unreadable_config_simulated(tmp_path, capsys, monkeypatch):
    """What a non-root user meets with a chmod 000 file, made to happen as root too: the OS refuses the read."""
    from pathlib import Path

    path = _file(tmp_path, "template: chatml\n")
    real = Path.read_bytes

    def refuse(self):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", refuse)
    assert_refused(["train", path], capsys, path, "Permission denied")


def test_a_utf8_bom_simply_works(tmp_path):
    path = _file(tmp_path, "\ufefftemplate: qwen\ncutoff_len: 512\n".encode())
    cfg = load_config(path)
    assert cfg.template == "qwen" and cfg.cutoff_len == 512


def test_yaml_merge_keys_still_work(tmp_path):
    path = _file(tmp_path, "<<: {cutoff_len: 256}\ntemplate: qwen\n")
    assert load_config(path).cutoff_len == 256


# ------------------------------------------------------------------------------------ wrong types

# (key, YAML value): each is written as line 2 of the file, so the message must say cfg.yaml:2 and the key
WRONG_TYPES = [
    ("cutoff_len", "long"),
    ("cutoff_len", "1.5"),
    ("cutoff_len", "true"),
    ("cutoff_len", "4"),  # below the minimum of 8
    ("learning_rate", "fast"),
    ("learning_rate", "true"),
    ("learning_rate", "[1.0e-4]"),
    ("learning_rate", ".inf"),
    ("learning_rate", ".nan"),
    ("learning_rate", "-1.0e-4"),
    ("num_train_epochs", "0"),
    ("num_train_epochs", ".inf"),
    ("max_steps", "yes"),
    ("max_steps", "ten"),
    ("per_device_train_batch_size", "0"),
    ("per_device_train_batch_size", "8x"),
    ("gradient_accumulation_steps", "{a: 1}"),
    ("lora_rank", "0"),
    ("lora_rank", "on"),
    ("lora_alpha", "x"),
    ("lora_dropout", "1.5"),
    ("finetuning_type", "qlora"),
    ("stage", "ppo"),  # dpo was the example until stage: dpo landed; ppo is not a stage (yet)
    ("template", "[qwen]"),
    ("template", "3"),
    ("dataset", "3"),
    ("dataset", "{a: b}"),
    ("output_dir", "3"),
    ("output_dir", "[runs]"),
    ("model_name_or_path", "7"),
    ("bf16", "maybe"),
    ("fp16", "3"),
    ("seed", "1.5"),
    ("seed", "x"),
    ("val_size", "-1"),
    ("warmup_ratio", "2"),
    ("lr_scheduler_type", "cosin"),
    ("engine", "horovod"),
    ("flash_attn", "fa3"),
    ("quantization_bit", "3"),
    ("quantization_bit", "true"),
    ("export_size", "0"),
    ("export_dtype", "int8"),
    ("export_device", "gpu"),
    ("export_legacy_format", "true"),
    ("predict_with_generate", "false"),
    ("max_new_tokens", "0"),
    ("temperature", "0"),
    ("top_p", "2"),
    ("report_to", "wandb"),
    ("save_strategy", "epoch"),
    ("run_name", "2024-01-01"),
    ("default_system", "[a]"),
    ("trust_remote_code", "sure"),
    ("ddp_timeout", "0"),
    ("adam_beta1", ".nan"),
    ("max_grad_norm", "-1"),
    ("weight_decay", "-0.1"),
    ("mix_strategy", "random"),
    ("buffer_size", "0"),
    ("preprocessing_batch_size", "0"),
    ("save_total_limit", "0"),
    ("logging_steps", "false"),
]


@pytest.mark.parametrize(("key", "value"), WRONG_TYPES, ids=[f"{k}={v}" for k, v in WRONG_TYPES])
def test_a_wrong_type_names_file_line_and_key(tmp_path, capsys, key, value):
    path = _file(tmp_path, f"# line 1 is a comment\n{key}: {value}\n")
    assert_refused(["train", path], capsys, f"{path}:2", key)


# ------------------------------------------------------------------------------------ nested wrong types

NESTED = [
    ("placeholders", "{name: [1]}"),
    ("placeholders", "{name: {first: Ada}}"),
    ("placeholders", "{name: 3}"),
    ("placeholders", "abc"),
    ("placeholders", "[name, Ada]"),
    ("interleave_probs", "[a]"),
    ("interleave_probs", "a,b"),
    ("interleave_probs", "[true, 1]"),
    ("interleave_probs", "[.inf, 1]"),
    ("interleave_probs", "[-1, 2]"),
    ("deepspeed", "{zero_optimization: 3}"),
    ("deepspeed", "{zero_optimization: {stage: 2, offload_optimizer: cpu}}"),
    ("deepspeed", "{optimizer: {type: AdamW, params: 3}}"),
    ("deepspeed", "{fp16: true}"),
    ("deepspeed", "[ds_z2]"),
    ("lora_target", "[1, 2]"),
    ("lora_target", "{q_proj: 1}"),
    ("freeze_trainable_modules", "[1]"),
    ("eval_dataset", "[[a.json]]"),
    ("evaluation_inputs", "[[1]]"),
    ("evaluation_inputs", "{q: 1}"),
    ("report_to", "[[none]]"),
    ("dataset", "[[a.json]]"),
]


@pytest.mark.parametrize(("key", "value"), NESTED, ids=[f"{k}={v}" for k, v in NESTED])
def test_a_nested_wrong_type_names_file_line_and_key(tmp_path, capsys, key, value):
    path = _file(tmp_path, f"# line 1 is a comment\n{key}: {value}\n")
    assert_refused(["train", path], capsys, f"{path}:2", key)


def test_a_billion_laughs_config_is_refused_without_expanding_it(tmp_path, capsys):
    lines = ["deepspeed:", "  l0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"  l{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]  # 9**10 values
    path = _file(tmp_path, "\n".join(lines) + "\n")
    assert_refused(["train", path], capsys, f"{path}:1", "deepspeed", "anchors and aliases")


@pytest.mark.parametrize("where", ["file", "command-line"])
def test_a_value_nested_too_deep_for_the_run_folder_config_is_refused(tmp_path, capsys, where):
    nested = "{a: " * 40 + "1" + "}" * 40
    path = _file(tmp_path, f"deepspeed: {nested}\n" if where == "file" else "template: chatml\n")
    argv = ["train", path] if where == "file" else ["train", path, f"deepspeed={nested}"]
    assert_refused(argv, capsys, f"{path}:1" if where == "file" else "command line", "nested 40 levels")


def test_a_deepspeed_section_that_is_not_a_mapping_says_how_to_write_it(tmp_path, capsys):
    path = _file(tmp_path, "deepspeed: {zero_optimization: 3}\n")
    message = assert_refused(["train", path], capsys, f"{path}:1", "deepspeed.zero_optimization")
    assert "{zero_optimization: {stage: 3}}" in message


# ------------------------------------------------------------------------------------ unknown keys

# one misspelt key per section of schema.py, and the key the hint must suggest
UNKNOWN = [
    ("model", "model_name_or_pth", "model_name_or_path"),
    ("model", "trust_remote_cod", "trust_remote_code"),
    ("method", "lora_rnak", "lora_rank"),
    ("method", "finetuning_typ", "finetuning_type"),
    ("data", "cutof_len", "cutoff_len"),
    ("data", "datset", "dataset"),
    ("train", "learnig_rate", "learning_rate"),
    ("train", "num_train_epoch", "num_train_epochs"),
    ("eval", "max_new_token", "max_new_tokens"),
    ("eval", "do_predit", "do_predict"),
    ("export", "export_dri", "export_dir"),
    ("export", "export_sise", "export_size"),
]


@pytest.mark.parametrize(("section", "typo", "meant"), UNKNOWN, ids=[f"{s}-{t}" for s, t, _ in UNKNOWN])
def test_an_unknown_key_in_each_section_gets_the_closest_key(tmp_path, capsys, section, typo, meant):
    assert meant in SECTIONS[section].model_fields  # the case really belongs to that section
    path = _file(tmp_path, f"template: chatml\n{typo}: 1\n")
    message = assert_refused(["train", path], capsys, f"{path}:2", repr(typo))
    assert f"did you mean {meant}?" in message


@pytest.mark.parametrize(("section", "typo", "meant"), UNKNOWN[::2], ids=[f"{s}-{t}" for s, t, _ in UNKNOWN[::2]])
def test_an_unknown_override_in_each_section_gets_the_closest_key(tmp_path, capsys, section, typo, meant):
    path = _file(tmp_path, "template: chatml\n")
    message = assert_refused(["train", path, f"{typo}=1"], capsys, f"command line ({typo}=1)")
    assert f"did you mean {meant}?" in message


def test_an_unknown_key_without_a_close_match_points_at_the_reference(tmp_path, capsys):
    path = _file(tmp_path, "zzz_qqq: 1\n")
    assert_refused(["train", path], capsys, f"{path}:1", "'zzz_qqq'", "README.md")


def test_a_known_but_unimplemented_key(tmp_path, capsys):
    path = _file(tmp_path, "template: chatml\nuse_unsloth: true\n")
    assert_refused(["train", path], capsys, f"{path}:2", "not supported yet: use_unsloth")


# ------------------------------------------------------------------------------------ conflicting keys

# refused while the config is read: (id, YAML, the key whose line is named, more words the message holds)
CONFLICTS_AT_LOAD = [
    ("bf16-and-fp16", "bf16: true\nfp16: true\n", ":2:", ["bf16", "fp16"]),
    ("quantization-with-full", "finetuning_type: full\nquantization_bit: 4\n", ":2:", ["finetuning_type: lora"]),
    ("quantization-with-freeze", "quantization_bit: 8\nfinetuning_type: freeze\n", ":2:", ["quantization_bit"]),
    ("deepspeed-with-ddp", "deepspeed: ds_z2\nengine: ddp\n", ":2:", ["engine", "deepspeed"]),
    ("deepspeed-with-fsdp2", "engine: fsdp2\ndeepspeed: {zero_optimization: {stage: 3}}\n", ":2:", ["deepspeed"]),
    ("streaming-without-max-steps", "streaming: true\n", ":1:", ["max_steps"]),
    ("probs-for-other-datasets", "dataset: a.json,b.json\ninterleave_probs: 0.5,0.3,0.2\n", ":2:", ["3 values"]),
    ("probs-all-zero", "interleave_probs: 0,0\n", ":1:", ["not all zero"]),
]


@pytest.mark.parametrize(
    ("text", "line", "words"), [c[1:] for c in CONFLICTS_AT_LOAD], ids=[c[0] for c in CONFLICTS_AT_LOAD]
)
def test_conflicting_keys_name_the_file_and_line(tmp_path, capsys, text, line, words):
    path = _file(tmp_path, text)
    assert_refused(["train", path], capsys, f"{path}{line}", *words)


def test_a_conflict_made_on_the_command_line_names_the_override(tmp_path, capsys):
    path = _file(tmp_path, "template: chatml\nbf16: true\n")
    assert_refused(["train", path, "fp16=true"], capsys, "command line (fp16=true)", "choose one")


# refused once the run starts, before anything is loaded or written (each on a complete config)
CONFLICTS_AT_START = [
    ("overwrite-and-resume", {"overwrite_output_dir": True, "resume_from_checkpoint": "checkpoint-1"},
     ["overwrite_output_dir", "resume_from_checkpoint"]),
    ("fa2-on-cpu", {"flash_attn": "fa2"}, ["flash_attn: fa2"]),
    ("nothing-to-do", {"do_train": False, "do_predict": False}, ["do_train", "do_predict"]),
    ("resume-from-nowhere", {"resume_from_checkpoint": "no-such-checkpoint"}, ["no-such-checkpoint"]),
    ("eval-without-output-dir", {"do_predict": True, "output_dir": None}, ["output_dir"]),
]


@pytest.mark.parametrize(
    ("values", "words"), [c[1:] for c in CONFLICTS_AT_START], ids=[c[0] for c in CONFLICTS_AT_START]
)
def test_conflicts_found_when_the_run_starts(tmp_path, capsys, tiny_model_dir, values, words):
    config = make_run(tmp_path, tiny_model_dir, **values)
    assert_refused(["train", config], capsys, *words)
    assert not (tmp_path / "run").exists()  # refused before anything was written


# ------------------------------------------------------------------------------------ folders the run writes

# the keys that name a folder a run writes into (each refused before anything is read or written)
FOLDER_KEYS = {
    "output_dir": {},
    "logging_dir": {"report_to": "tensorboard"},
    "tokenized_path": {},
    "cache_dir": {},
}


@pytest.mark.parametrize("where", ["a-file", "below-a-file", "a-dangling-link"])
@pytest.mark.parametrize("key", list(FOLDER_KEYS))
def test_a_folder_key_that_cannot_be_a_folder(tmp_path, capsys, tiny_model_dir, key, where):
    blocker = tmp_path / "blocker"
    if where == "a-dangling-link":
        os.symlink(tmp_path / "gone", blocker)
    else:
        blocker.write_text("keep me")
    folder = blocker / "sub" if where == "below-a-file" else blocker
    config = make_run(tmp_path, tiny_model_dir, **{key: str(folder), **FOLDER_KEYS[key]})
    assert_refused(["train", config], capsys, key, folder if key != "cache_dir" or where != "below-a-file" else blocker)
    if where != "a-dangling-link":
        assert blocker.read_text() == "keep me"
    if key != "output_dir":
        assert not (tmp_path / "run").exists()


def test_tokenized_path_at_a_folder_of_the_users_is_refused_and_left_alone(tmp_path, capsys, tiny_model_dir):
    """The cache replaces its folder when it saves: pointed at a folder of the user's, that would delete it."""
    mine = tmp_path / "my-notes"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    config = make_run(tmp_path, tiny_model_dir, tokenized_path=str(mine))
    assert_refused(["train", config], capsys, "tokenized_path", mine, "not a tunesmith data cache")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"


def test_eval_output_dir_that_is_a_file(tmp_path, capsys, tiny_model_dir):
    blocker = tmp_path / "blocker"
    blocker.write_text("keep me")
    config = make_run(tmp_path, tiny_model_dir, output_dir=str(blocker), max_samples=1, max_new_tokens=2)
    assert_refused(["eval", config], capsys, "output_dir", blocker)


# ------------------------------------------------------------------------------------ bad override syntax

OVERRIDES = [
    ("learning_rate", "not KEY=VALUE"),
    ("=3", "no key"),
    (" =1", "no key"),
    (".=x", "empty name"),
    ("placeholders.=x", "empty name"),
    ("placeholders..name=x", "empty name"),
    ("lora_target=[q_proj", "not a valid YAML list or map"),
    ("placeholders={name: Ada", "not a valid YAML list or map"),
    ("learning_rate.x=1", "learning_rate is not a map"),
    ("dataset.first=a.json", "dataset is not a map"),
    ("placeholders.name.first=Ada", "placeholders"),
    ("learnig_rate=1", "did you mean learning_rate?"),
    ("max_steps=true", "expects a number"),
    ("learning_rate=.inf", "not a finite number"),
    ("learning_rate=nan", "learning_rate"),
    ("cutoff_len=1e400", "cutoff_len"),
    ("run_name=\udcff\udcfe", "not valid UTF-8"),
    ("lora_rank=" + "[" * 3000 + "]" * 3000, "lora_rank"),
    ("deepspeed={zero_optimization: 3}", "deepspeed.zero_optimization"),
    ("placeholders=3", "placeholders"),
]


@pytest.mark.parametrize(("override", "named"), OVERRIDES, ids=[o[:40] for o, _ in OVERRIDES])
def test_a_bad_override_is_named(tmp_path, capsys, override, named):
    path = _file(tmp_path, "template: chatml\n")
    assert_refused(["train", path, override], capsys, named)


def test_a_dotted_override_into_a_preset_string_is_refused_not_silently_replacing_it(tmp_path, capsys):
    path = _file(tmp_path, "deepspeed: ds_z3\n")
    message = assert_refused(["train", path, "deepspeed.train_batch_size=4"], capsys, "deepspeed", "'ds_z3'")
    assert "not a map" in message


def test_an_unknown_option_is_a_usage_error(tmp_path, capsys):
    path = _file(tmp_path, "template: chatml\n")
    assert_refused(["train", path, "--learning-rate=1"], capsys, "--learning-rate=1")


# ------------------------------------------------------------------------------------ property-based


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.binary(max_size=300))
def test_junk_bytes_as_a_config_file_never_give_a_traceback(tmp_path, capsys, junk):
    path = _file(tmp_path, junk, "junk.yaml")
    code, out, err = run_cli(["train", str(path)], capsys)
    assert code == 2 and "Traceback" not in out + err, (junk, err)
    lines = [line for line in err.splitlines() if line.startswith("tunesmith: error")]
    assert len(lines) == 1 and (str(path) in lines[0] or "is required" in lines[0]), (junk, err)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(override=st.text(max_size=60).filter(lambda text: not text.startswith("-")))  # "-h" is an option
def test_junk_overrides_never_give_a_traceback(tmp_path, capsys, override):
    path = _file(tmp_path, "template: chatml\n", "base.yaml")  # no model: a valid override still stops at "required"
    code, out, err = run_cli(["train", str(path), override], capsys)
    assert code == 2 and "Traceback" not in out + err, (override, err)
    assert len([line for line in err.splitlines() if line.startswith("tunesmith: error")]) == 1, (override, err)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    key=st.sampled_from(sorted({k for section in SECTIONS.values() for k in section.model_fields})),
    value=st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
        st.lists(st.one_of(st.integers(), st.text(max_size=5)), max_size=3),
        st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=5)), max_size=2),
    ),
)
def test_any_value_for_any_key_is_accepted_or_refused_in_one_sentence(tmp_path, key, value):
    """load_config either returns a config or raises ConfigError naming the file, never anything else."""
    import json

    from tunesmith.errors import ConfigError

    path = tmp_path / "any.yaml"
    path.write_text(json.dumps({key: value}), encoding="utf-8")
    try:
        load_config(path)
    except ConfigError as err:
        assert str(path) in str(err) or key in str(err), str(err)
        assert "\n" not in str(err)


# ------------------------------------------------------------------------------------ a subprocess, as a shell user


def test_a_binary_config_in_a_real_process(tmp_path):
    path = _file(tmp_path, bytes(range(256)))
    assert_refused_subprocess(["train", path], path, "not UTF-8")


# ------------------------------------------------------------------------------------ no earlier checkpoint harmed

RERUN_BREAKS = [
    ("typo-key", {"learnig_rate": 1.0e-4}, ["did you mean learning_rate?"]),
    ("wrong-type", {"cutoff_len": "long"}, ["cutoff_len"]),
    ("conflict", {"bf16": True, "fp16": True}, ["choose one"]),
    ("overwrite-and-resume", {"overwrite_output_dir": True, "resume_from_checkpoint": "checkpoint-1"},
     ["overwrite_output_dir"]),
    ("changed-method", {"finetuning_type": "full"}, ["finetuning_type"]),
    ("output-dir-is-a-file", {"output_dir": "FILE"}, ["output_dir", "is a file"]),
]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_model_dir):
    return trained_run(tmp_path_factory, tiny_model_dir)


@pytest.mark.parametrize(("values", "words"), [c[1:] for c in RERUN_BREAKS], ids=[c[0] for c in RERUN_BREAKS])
def test_a_refused_rerun_leaves_the_checkpoints_alone(tmp_path, capsys, reference_run, tiny_model_dir, values, words):
    root = tmp_path / "copy"
    if values.get("output_dir") == "FILE":
        values = {**values, "output_dir": str(root / "data" / "identity.json")}
    config = copy_run(reference_run, root, tiny_model_dir, **values)
    before = snapshot(root)
    assert_refused(["train", config], capsys, *words)
    assert snapshot(root) == before


def test_a_config_broken_into_junk_leaves_the_checkpoints_alone(tmp_path, capsys, reference_run, tiny_model_dir):
    root = tmp_path / "copy"
    config = copy_run(reference_run, root, tiny_model_dir)
    config.write_bytes(b"\xff\xfe\x00\x01junk" * 10)
    before = snapshot(root)
    assert_refused(["train", config], capsys, config)
    assert snapshot(root) == before


# ------------------------------------------------------------------------------------ a ds_config.json file

DS_FILES = [
    ("not-utf8", b'{"zero_optimization": {"stage": 2}, "x": "\xff\xfe"}', "not UTF-8"),
    ("too-deep", b"[" * 100_000 + b"]" * 100_000, "cannot be read as JSON"),
    ("section-not-a-mapping", b'{"zero_optimization": 3}', "deepspeed.zero_optimization"),
    ("truncated", b'{"zero_optimization": {"stage": 2', "not valid JSON"),
    ("a-list", b"[1, 2]", "not an object"),
]


@pytest.mark.parametrize("content, words", [c[1:] for c in DS_FILES], ids=[c[0] for c in DS_FILES])
def test_a_broken_ds_config_file_is_named(tmp_path, capsys, tiny_model_dir, content, words):
    ds = tmp_path / "ds_config.json"
    ds.write_bytes(content)
    config = make_run(tmp_path, tiny_model_dir, deepspeed=str(ds))
    message = assert_refused(["train", config], capsys, ds)
    assert words in message
    assert_refused(["plan", config, "--gpus", "1x24GB"], capsys, ds)  # the planner reads it the same way


def test_a_json_config_with_escaped_characters_beyond_the_bmp_loads(tmp_path):
    """json.dumps writes 😀 as the escaped pair \\ud83d\\ude00; a JSON (= YAML) config must read it back as 😀."""
    import json

    path = tmp_path / "astral.yaml"
    path.write_text(json.dumps({"default_system": "You are 😀 𐀀", "placeholders": {"name": "Ada 🤗"}}), encoding="utf-8")
    assert "\\ud83d" in path.read_text(encoding="utf-8")
    cfg = load_config(path)
    assert cfg.default_system == "You are 😀 𐀀" and cfg.placeholders == {"name": "Ada 🤗"}


def test_a_lone_surrogate_is_refused_on_one_line(tmp_path, capsys):
    path = _file(tmp_path, 'default_system: "a\\n\\ud800"\n')
    message = assert_refused(["train", path], capsys, f"{path}:1", "default_system")
    assert "\n" not in message
