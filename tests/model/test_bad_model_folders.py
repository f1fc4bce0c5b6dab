"""Broken model folders (and adapters): one sentence naming the folder or the file in it, exit 2, no traceback, and
an earlier run's checkpoints left byte for byte as they were.

Each case copies the tiny model, breaks the copy one way and runs ``tunesmith train`` on it in-process (the other
commands that load a model share the same loader: a few cases run ``export``, ``chat`` and ``data preview``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from bad_input_helpers import (
    assert_refused,
    assert_refused_subprocess,
    copy_run,
    make_run,
    snapshot,
    trained_run,
    write_config,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunesmith.errors import ModelError
from tunesmith.model.load import check_model_config, check_safetensors


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is _DROP:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


_DROP = object()


def _write(name: str, data: bytes):
    return lambda folder: (folder / name).write_bytes(data)


def _remove(*names: str):
    def remove(folder: Path) -> None:
        for name in names:
            (folder / name).unlink()

    return remove


def _cut(fraction: float):
    def cut(folder: Path) -> None:
        path = folder / "model.safetensors"
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * fraction)])

    return cut


def _replace_with_folder(name: str):
    def replace(folder: Path) -> None:
        (folder / name).unlink()
        (folder / name).mkdir()

    return replace


def _loop(name: str):
    def loop(folder: Path) -> None:
        (folder / name).unlink()
        os.symlink(folder / name, folder / name)

    return loop


def _sharded(weight_map_file: str | None, index_text: str | None = None):
    def shard(folder: Path) -> None:
        (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
        index = index_text if index_text is not None else json.dumps(
            {"metadata": {}, "weight_map": {"lm_head.weight": weight_map_file}}
        )
        (folder / "model.safetensors.index.json").write_text(index)

    return shard


def _pickled(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")


# (id, how to break the copy, the file the message names ("" = the folder), more words it holds)
BREAKS = [
    ("config-json-missing", _remove("config.json"), "", ["neither config.json"]),
    ("config-json-not-json", _write("config.json", b'{"model_type": "qwen2",'), "config.json", ["not valid JSON"]),
    ("config-json-binary", _write("config.json", b"\x89\xff\x00\x81"), "config.json", ["not UTF-8"]),
    ("config-json-empty", _write("config.json", b""), "config.json", ["not valid JSON"]),
    ("config-json-a-list", _write("config.json", b"[1, 2]"), "config.json", ["JSON list"]),
    ("config-json-too-deep", _write("config.json", b"[" * 100_000 + b"]" * 100_000), "config.json", []),
    ("config-json-a-folder", _replace_with_folder("config.json"), "", ["config.json"]),
    ("config-json-symlink-loop", _loop("config.json"), "", ["config.json"]),
    ("unknown-architecture", lambda f: _edit_config(f, model_type="nosuchmodel", architectures=["NoSuchForCausalLM"]),
     "config.json", ["'nosuchmodel'"]),
    ("no-model-type", lambda f: _edit_config(f, model_type=_DROP), "config.json", ["no model_type"]),
    ("remote-code-architecture", lambda f: _edit_config(f, model_type="mine", auto_map={"AutoConfig": "x.Config"}),
     "config.json", ["trust_remote_code"]),
    ("config-value-wrong-type", lambda f: _edit_config(f, hidden_size="big"), "config.json", ["hidden_size"]),
    ("config-value-null", lambda f: _edit_config(f, num_hidden_layers=None), "config.json", ["num_hidden_layers"]),
    ("config-value-impossible", lambda f: _edit_config(f, hidden_size=-64), "config.json", ["cannot be built"]),
    ("config-of-another-size", lambda f: _edit_config(f, hidden_size=128), "model.safetensors", ["config.json"]),
    ("config-of-another-vocab", lambda f: _edit_config(f, vocab_size=10), "model.safetensors", ["[10, 64]"]),
    ("config-of-other-heads", lambda f: _edit_config(f, num_attention_heads=8, num_key_value_heads=8),
     "model.safetensors", ["config.json"]),
    ("safetensors-truncated-half", _cut(0.5), "model.safetensors", ["truncated"]),
    ("safetensors-truncated-in-header", _cut(0.0001), "model.safetensors", ["truncated"]),
    ("safetensors-one-byte-short", _cut(0.99999), "model.safetensors", ["truncated"]),
    ("safetensors-empty", _write("model.safetensors", b""), "model.safetensors", []),
    ("safetensors-junk", _write("model.safetensors", os.urandom(4096)), "model.safetensors", []),
    ("safetensors-header-not-json", _write("model.safetensors", (16).to_bytes(8, "little") + b"not json at all!"),
     "model.safetensors", ["not a safetensors file"]),
    ("safetensors-a-folder", _replace_with_folder("model.safetensors"), "model.safetensors", ["a folder"]),
    ("safetensors-symlink-loop", _loop("model.safetensors"), "model.safetensors", ["symbolic link"]),
    ("weights-missing", _remove("model.safetensors"), "", ["no weights"]),
    ("weights-only-pickled", _pickled, "", ["allow_pickle"]),
    ("shard-missing", _sharded("model-00002-of-00002.safetensors"), "model.safetensors.index.json",
     ["model-00002-of-00002.safetensors"]),
    ("shard-index-not-json", _sharded(None, "{junk"), "model.safetensors.index.json", []),
    ("tokenizer-files-missing", _remove("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"), "",
     ["tokenizer"]),
    ("tokenizer-json-missing", _remove("tokenizer.json"), "", ["tokenizer.json"]),
    ("tokenizer-json-not-json", _write("tokenizer.json", b"{not json"), "", ["tokenizer"]),
    ("tokenizer-json-binary", _write("tokenizer.json", b"\xff\xfe\x00junk"), "", ["tokenizer"]),
    ("tokenizer-config-not-json", _write("tokenizer_config.json", b"{not json"), "", ["tokenizer"]),
]


@pytest.mark.parametrize("template", ["{% for %}", "{{ messages[0]['content'] ", "{% if x %}no end"])
def test_a_chat_template_that_is_not_jinja_with_template_auto(tmp_path, capsys, broken_copy, template):
    folder = broken_copy(_write("chat_template.jinja", template.encode()))
    config = make_run(tmp_path, folder, template="auto")
    assert_refused(["train", config], capsys, folder, "not valid jinja")


def test_a_chat_template_that_refuses_a_row_names_the_row(tmp_path, capsys, broken_copy):
    """Valid jinja that raises for some conversations (its own raise_exception): the row is named, and
    skip_bad_rows skips it."""
    refusing = (
        "{% for m in messages %}{% if 'forbidden' in m['content'] %}{{ raise_exception('no forbidden words') }}"
        "{% endif %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    folder = broken_copy(_write("chat_template.jinja", refusing.encode()))
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{"instruction": "hi", "output": "hello"}, {"instruction": "forbidden", "output": "x"}]))
    config = make_run(tmp_path, folder, template="auto", dataset=str(rows))
    assert_refused(["train", config], capsys, f"{rows}:row 2", "no forbidden words", "skip_bad_rows=true")


@pytest.fixture
def broken_copy(tmp_path, tiny_model_dir):
    def make(break_it) -> Path:
        folder = tmp_path / "model"
        shutil.copytree(tiny_model_dir, folder)
        break_it(folder)
        return folder

    return make


@pytest.mark.parametrize(("break_it", "file", "words"), [c[1:] for c in BREAKS], ids=[c[0] for c in BREAKS])
def test_a_broken_model_folder_is_named(tmp_path, capsys, broken_copy, break_it, file, words):
    folder = broken_copy(break_it)
    config = make_run(tmp_path, folder)
    assert_refused(["train", config], capsys, folder / file if file else folder, *words)
    assert not (tmp_path / "run").exists()


def test_a_model_path_that_does_not_exist(tmp_path, capsys, tiny_model_dir):
    config = make_run(tmp_path, tiny_model_dir, model_name_or_path=str(tmp_path / "nope"))
    assert_refused(["train", config], capsys, tmp_path / "nope", "does not exist")


def test_a_hub_id_is_not_downloaded(tmp_path, capsys, tiny_model_dir):
    config = make_run(tmp_path, tiny_model_dir, model_name_or_path="someone/some-model")
    assert_refused(["train", config], capsys, "someone/some-model", "offline-first")


@pytest.mark.parametrize("kind", ["a-text-file", "junk-gguf", "empty-gguf", "two-ggufs"])
def test_a_file_or_gguf_that_is_not_a_model(tmp_path, capsys, tiny_model_dir, kind):
    folder = tmp_path / "m"
    folder.mkdir()
    target = folder / ("notes.txt" if kind == "a-text-file" else "model.gguf")
    target.write_bytes(b"GGUF" + os.urandom(64) if kind != "empty-gguf" else b"")
    if kind == "two-ggufs":
        (folder / "other.gguf").write_bytes(b"GGUF")
        target = folder
    config = make_run(tmp_path, tiny_model_dir, model_name_or_path=str(target), cache_dir=str(tmp_path / "cache"))
    assert_refused(["train", config], capsys, target)


# ------------------------------------------------------------------------------------ adapters


def _adapter(tmp_path: Path, source: Path) -> Path:
    """The LoRA adapter the reference run saved, copied so it can be broken."""
    adapter = tmp_path / "adapter"
    shutil.copytree(source / "run" / "checkpoint-2", adapter)
    return adapter


ADAPTER_BREAKS = [
    ("no-adapter-config", lambda a: (a / "adapter_config.json").unlink(), "", ["adapter_config.json"]),
    ("adapter-config-not-json", lambda a: (a / "adapter_config.json").write_text("{junk"), "adapter_config.json", []),
    ("adapter-config-a-list", lambda a: (a / "adapter_config.json").write_text("[]"), "adapter_config.json", []),
    ("adapter-config-binary", lambda a: (a / "adapter_config.json").write_bytes(b"\xff\x00"), "adapter_config.json", []),
    ("adapter-weights-truncated", lambda a: (a / "adapter_model.safetensors").write_bytes(
        (a / "adapter_model.safetensors").read_bytes()[:100]), "adapter_model.safetensors", ["truncated"]),
    ("adapter-weights-missing", lambda a: (a / "adapter_model.safetensors").unlink(), "", ["adapter_model"]),
]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_model_dir):
    return trained_run(tmp_path_factory, tiny_model_dir)


@pytest.mark.parametrize(
    ("break_it", "file", "words"), [c[1:] for c in ADAPTER_BREAKS], ids=[c[0] for c in ADAPTER_BREAKS]
)
def test_a_broken_adapter_is_named(tmp_path, capsys, tiny_model_dir, reference_run, break_it, file, words):
    adapter = _adapter(tmp_path, reference_run)
    break_it(adapter)
    config = make_run(tmp_path, tiny_model_dir, adapter_name_or_path=str(adapter))
    assert_refused(["train", config], capsys, adapter / file if file else adapter, *words)


# ------------------------------------------------------------------------------------ the other commands


def test_export_from_a_truncated_model(tmp_path, capsys, broken_copy):
    folder = broken_copy(_cut(0.5))
    out = tmp_path / "merged"
    assert_refused(["export", "--model", folder, "--out", out], capsys, folder / "model.safetensors", "truncated")
    assert not out.exists()


def test_convert_of_a_checkpoint_with_truncated_weights(tmp_path, capsys, reference_run):
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(reference_run / "run" / "checkpoint-2", checkpoint)
    weights = checkpoint / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "converted"
    assert_refused(["convert", checkpoint, "--out", out], capsys, weights, "truncated")
    assert not out.exists()


def test_plan_with_a_config_json_that_is_not_utf8(tmp_path, capsys, broken_copy):
    folder = broken_copy(lambda f: (f / "config.json").write_bytes(b"\xff\xfe\x00junk"))
    config = write_config(tmp_path / "p.yaml", model_name_or_path=str(folder), dataset=["x"])
    assert_refused(["plan", config, "--gpus", "1x24GB"], capsys, "model_name_or_path", folder)


def test_export_into_a_path_below_a_file(tmp_path, capsys, tiny_model_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    out = blocker / "merged"
    assert_refused(["export", "--model", tiny_model_dir, "--out", out], capsys, "export_dir", out, blocker)
    assert blocker.read_text() == "keep me"


def test_chat_with_a_model_without_tokenizer(capsys, broken_copy):
    folder = broken_copy(_remove("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"))
    assert_refused(["chat", folder, "--prompt", "hi"], capsys, folder, "tokenizer")


def test_data_preview_with_a_config_json_that_is_not_json(tmp_path, capsys, broken_copy):
    folder = broken_copy(_write("config.json", b"{"))
    config = make_run(tmp_path, folder)
    assert_refused(["data", "preview", config], capsys, folder / "config.json", "not valid JSON")


def test_a_truncated_model_in_a_real_process(tmp_path, broken_copy):
    folder = broken_copy(_cut(0.5))
    config = make_run(tmp_path, folder)
    assert_refused_subprocess(["train", config], folder / "model.safetensors", "truncated")


def test_check_safetensors_accepts_the_real_file(tiny_model_dir):
    shapes = check_safetensors(tiny_model_dir / "model.safetensors")
    assert shapes["model.embed_tokens.weight"][1] == 64


# ------------------------------------------------------------------------------------ property-based


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(head=st.binary(max_size=64), cut=st.integers(min_value=0, max_value=600_000))
def test_any_damaged_safetensors_is_a_model_error(tmp_path, tiny_model_dir, head, cut):
    """Junk in front of, or any truncation of, a real safetensors file: ModelError naming it, or (untouched and
    whole) its shapes."""
    data = (tiny_model_dir / "model.safetensors").read_bytes()
    path = tmp_path / "model.safetensors"
    path.write_bytes(head + data[:cut])
    try:
        check_safetensors(path)
    except ModelError as err:
        assert str(path) in str(err) and "\n" not in str(err)
    else:
        assert not head and cut >= len(data)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_junk_as_config_json_is_a_model_error(tmp_path, junk):
    (tmp_path / "config.json").write_bytes(junk)
    with pytest.raises(ModelError) as err:
        check_model_config(tmp_path)
    assert str(tmp_path / "config.json") in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------------ no earlier checkpoint harmed

RERUN_BREAKS = [
    ("safetensors-truncated", _cut(0.5), "model.safetensors"),
    ("tokenizer-missing", _remove("tokenizer.json"), ""),
    ("config-json-not-json", _write("config.json", b"{"), "config.json"),
    ("config-of-another-size", lambda f: _edit_config(f, hidden_size=128), "model.safetensors"),
]


@pytest.mark.parametrize("overwrite", [False, True], ids=["resume", "overwrite_output_dir"])
@pytest.mark.parametrize(("break_it", "file"), [c[1:] for c in RERUN_BREAKS], ids=[c[0] for c in RERUN_BREAKS])
def test_a_refused_rerun_leaves_the_checkpoints_alone(
    tmp_path, capsys, reference_run, tiny_model_dir, broken_copy, break_it, file, overwrite
):
    """The run's model folder broke meanwhile: the same command again is refused, and the run folder is byte for
    byte what it was (with overwrite_output_dir: true too, which would otherwise clear it)."""
    folder = broken_copy(break_it)
    config = copy_run(reference_run, tmp_path / "copy", folder, overwrite_output_dir=overwrite or None)
    before = snapshot(tmp_path / "copy" / "run")
    assert_refused(["train", config], capsys, folder / file if file else folder)
    assert snapshot(tmp_path / "copy" / "run") == before
