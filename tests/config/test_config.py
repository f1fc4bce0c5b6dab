"""Config: YAML + overrides, errors that name the key, LLaMA-Factory compatibility, the README reference."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tunesmith.config import load_config
from tunesmith.config.reference import render_reference
from tunesmith.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_overrides_beat_the_file_and_parse_as_yaml(tmp_path):
    path = _yaml(tmp_path, "learning_rate: 1.0e-4\ndataset: a,b\nlora_target: q_proj,v_proj\n")
    cfg = load_config(path, ["learning_rate=5e-4", "num_train_epochs=3", "placeholders.name=Ada"])
    assert cfg.learning_rate == 5e-4
    assert cfg.num_train_epochs == 3
    assert cfg.dataset == ["a", "b"]
    assert cfg.lora_target == ["q_proj", "v_proj"]
    assert cfg.placeholders == {"name": "Ada"}
    assert cfg.lora_alpha == 2 * cfg.lora_rank


def test_unknown_key_names_it_its_line_and_the_closest_key(tmp_path):
    path = _yaml(tmp_path, "template: qwen\nlearnig_rate: 1.0e-4\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml:2: unknown config key 'learnig_rate'; did you mean learning_rate"):
        load_config(path)


def test_unknown_override_names_the_command_line():
    with pytest.raises(ConfigError, match=r"command line \(lora_rnak=4\).*did you mean lora_rank"):
        load_config(None, ["lora_rnak=4"])


def test_an_unclosed_list_or_map_override_is_refused_not_taken_as_text():
    for override in ("lora_target=[q_proj", "dataset=[a.json,b.json", "placeholders={name: Ada"):
        with pytest.raises(ConfigError, match=r"command line \(.*\): .* is not a valid YAML list or map"):
            load_config(None, [override])
    # other text YAML cannot parse stays the plain string it looks like
    assert load_config(None, ["default_system=@ answer briefly"]).default_system == "@ answer briefly"


def test_wrong_type_names_key_expected_type_and_value(tmp_path):
    path = _yaml(tmp_path, "cutoff_len: long\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "cfg.yaml:1" in message and "cutoff_len expects int" in message and "'long'" in message


def test_known_but_unimplemented_key_is_refused_not_ignored(tmp_path):
    path = _yaml(tmp_path, "use_unsloth: true\n")
    with pytest.raises(ConfigError, match="not supported yet: use_unsloth"):
        load_config(path)


def test_invalid_yaml_names_the_line(tmp_path):
    path = _yaml(tmp_path, "template: qwen\ncutoff_len: [1, 2\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml:\d+: invalid YAML"):
        load_config(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def _guide_004_config(shared_dir: Path) -> str:
    """The LLaMA-Factory training YAML of guide 004, with its shell variables filled in."""
    text = (shared_dir / "seeds" / "004_55f1c68eda0d42da.txt").read_text(encoding="utf-8")
    block = re.search(r'echo "(model_name_or_path: \$SCOW_AI_MODEL_PATH.*?)" > /app/config.yaml', text, re.S)
    assert block, "guide 004 changed: its config block was not found"
    return block.group(1).replace("$SCOW_AI_MODEL_PATH", "/models/qwen").replace("${WORK_DIR}/${RANK}", "/tmp/w")


def test_guide_004_llamafactory_config_validates_unchanged(tmp_path, shared_dir):
    cfg = load_config(_yaml(tmp_path, _guide_004_config(shared_dir)))
    assert cfg.finetuning_type == "lora" and cfg.lora_target == "all"
    assert cfg.dataset == ["identity"] and cfg.template == "qwen" and cfg.cutoff_len == 1024
    assert cfg.num_train_epochs == 20.0 and cfg.lr_scheduler_type == "cosine"
    assert cfg.resume_from_checkpoint is None and cfg.logging_dir == "./logs/tensorboard"


def test_guide_004_export_config_validates(tmp_path):
    text = (
        "model_name_or_path: /models/qwen\nadapter_name_or_path: /w/0/out\ntemplate: qwen\n"
        "trust_remote_code: true\nexport_dir: /w/merged\nexport_size: 5\nexport_device: auto\n"
        "export_legacy_format: false\n"
    )
    cfg = load_config(_yaml(tmp_path, text))
    assert cfg.export_size == 5 and cfg.export_device == "auto" and cfg.trust_remote_code


def test_readme_config_reference_is_current():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert render_reference() in readme, "README's config reference is stale: run `make reference`"
