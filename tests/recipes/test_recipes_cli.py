"""`tunesmith recipes list | show | copy`, the dry run of every recipe, and a real training run of the SmolLM2
LoRA CPU recipe."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tunesmith.cli import main
from tunesmith.recipes import copy_recipe, get_recipe, list_recipes, packaged_identity_dir, recipe_names

NAMES = recipe_names()


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_list_shows_every_recipe_with_its_hardware_method_and_engine(capsys):
    rc, out, _ = run(capsys, "recipes", "list")
    assert rc == 0
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert rows["NAME"].split()[:6] == ["NAME", "GUIDE", "HARDWARE", "METHOD", "ENGINE", "TITLE"]
    for recipe in list_recipes():
        row = rows[recipe.name]
        assert str(recipe.hardware) in row and recipe.title in row
    assert "001" in rows["qwen7b_chat_full_zero2_offload"]
    assert "deepspeed zero2 + offload optimizer" in rows["qwen7b_chat_full_zero2_offload"]
    assert "deepspeed zero3" in rows["qwen1_5_7b_full_ascend"]
    assert "8x32GB npu, 2 nodes" in rows["qwen1_5_7b_full_ascend"]
    assert "qlora 4-bit" in rows["internlm2_20b_qlora_zero2"]
    assert " ddp " in rows["qwen2_5_1_5b_lora_identity"]  # auto on 4 ranks
    assert " single " in rows["smollm2_lora_identity_cpu"]


def test_show_prints_the_recipe_yaml_and_its_path(capsys):
    recipe = get_recipe("internlm2_1_8b_qlora")
    rc, out, _ = run(capsys, "recipes", "show", "internlm2_1_8b_qlora")
    assert rc == 0 and out == recipe.text
    rc, out, _ = run(capsys, "recipes", "show", "internlm2-1_8b-qlora.yaml", "--path")  # - for _, .yaml: fine
    assert rc == 0 and out.strip() == str(recipe.path)


@pytest.mark.parametrize(
    ("name", "suggested"),
    [("qwen7b_chat_full", "qwen7b_chat_full_zero2_offload"), ("ascend", "qwen1_5_7b_lora_ascend"),
     ("intern2_20b_qlora", "internlm2_20b_qlora_zero2")],
)
def test_unknown_recipe_is_one_line_naming_close_ones(capsys, tmp_path, name, suggested):
    for command in (["show", name], ["copy", name, str(tmp_path / "x.yaml")]):
        rc, out, err = run(capsys, "recipes", *command)
        assert rc == 2 and out == ""
        assert err.count("\n") == 1 and f"unknown recipe {name!r}" in err and suggested in err
    assert not (tmp_path / "x.yaml").exists()


def test_unknown_recipe_with_nothing_close_points_at_list(capsys):
    rc, _, err = run(capsys, "recipes", "show", "zzzz")
    assert rc == 2 and "tunesmith recipes list" in err


def test_copy_into_a_folder_and_to_a_file(tmp_path, capsys):
    recipe = get_recipe("qwen7b_chat_full_zero2_offload")
    rc, out, _ = run(capsys, "recipes", "copy", recipe.name, str(tmp_path))
    written = tmp_path / f"{recipe.name}.yaml"
    assert rc == 0 and f"wrote {written}" in out
    assert written.read_text() == recipe.text
    assert f"tunesmith train {written} --nproc-per-node 4" in out  # the launch line, for the copy

    target = tmp_path / "nested" / "mine.yaml"
    rc, _, _ = run(capsys, "recipes", "copy", recipe.name, str(target))
    assert rc == 0 and target.read_text() == recipe.text

    rc, _, _ = run(capsys, "recipes", "copy", recipe.name, f"{tmp_path / 'new_folder'}/")
    assert rc == 0 and (tmp_path / "new_folder" / f"{recipe.name}.yaml").is_file()


def test_copy_never_overwrites_without_force(tmp_path, capsys):
    dest = tmp_path / "mine.yaml"
    dest.write_text("learning_rate: 3.0e-4  # my edits\n")
    rc, _, err = run(capsys, "recipes", "copy", "smollm2_full_alpaca_cpu", str(dest))
    assert rc == 2 and "already exists" in err and "--force" in err
    assert dest.read_text() == "learning_rate: 3.0e-4  # my edits\n"
    rc, _, _ = run(capsys, "recipes", "copy", "smollm2_full_alpaca_cpu", str(dest), "--force")
    assert rc == 0 and dest.read_text() == get_recipe("smollm2_full_alpaca_cpu").text


def _hardware_flags(name: str) -> list[str]:
    hw = get_recipe(name).hardware
    return ["--nproc-per-node", str(hw.count), *(["--nnodes", str(hw.nodes)] if hw.nodes > 1 else [])]


def _expected_engine(name: str) -> str:
    engine = get_recipe(name).engine.split(" (")[0]  # without the mesh: "fsdp2 (dp 4 × tp 2)"
    return "deepspeed" if engine.startswith("deepspeed") else engine


@pytest.mark.parametrize("name", NAMES)
def test_dry_run_resolves_the_launch_of_every_recipe(name, tmp_path, capsys):
    # What `tunesmith train RECIPE --dry-run` prints for the copy a user makes: the engine, world size and
    # global batch on the recipe's hardware; nothing is loaded or trained.
    copy = tmp_path / f"{name}.yaml"
    assert run(capsys, "recipes", "copy", name, str(copy))[0] == 0
    rc, out, err = run(capsys, "train", str(copy), "--dry-run", *_hardware_flags(name))
    assert rc == 0, err
    recipe = get_recipe(name)
    cfg_values = recipe.values
    world = recipe.hardware.world_size
    assert f"engine: {_expected_engine(name)}" in out
    assert f"world size: {world} " in out
    split = 1
    for key in ("sequence_parallel_size", "tensor_parallel_size", "pipeline_parallel_size"):
        split *= cfg_values.get(key, 1)
    assert f"mesh: dp {world // split} × " in out  # the ranks of a split group train the same rows
    batch = cfg_values.get("per_device_train_batch_size", 8) * cfg_values.get("gradient_accumulation_steps", 1)
    assert f"global batch: {batch * world // split} " in out
    assert not (tmp_path / "runs").exists() and not Path(cfg_values["output_dir"]).exists()


@pytest.mark.slow
def test_every_recipe_dry_runs_from_the_command_line(tmp_path):
    # The "dry-run in CI" of the issue: the real entry point, one process per recipe, two at a time (a dry run is
    # mostly Python's imports, on one core)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

    def dry_run(name: str) -> str | None:
        copy = copy_recipe(name, f"{tmp_path / name}/")  # `recipes copy` itself is tested above
        proc = subprocess.run(
            [sys.executable, "-m", "tunesmith.cli", "train", str(copy), "--dry-run", *_hardware_flags(name)],
            capture_output=True, text=True, timeout=300, cwd=copy.parent, env=env,
        )
        world = get_recipe(name).hardware.world_size
        if proc.returncode != 0 or f"engine: {_expected_engine(name)}" not in proc.stdout or (
            f"world size: {world} " not in proc.stdout
        ):
            return f"{name}: exit {proc.returncode}: {proc.stderr.strip()[-500:]}"
        return None

    with ThreadPoolExecutor(2) as pool:
        failures = [failure for failure in pool.map(dry_run, NAMES) if failure]
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_smollm2_lora_cpu_recipe_trains(tmp_path):
    # The recipe as a user runs it: copied (dataset_dir then points at the packaged identity data) and trained
    # by the real command, shortened to 2 steps with a small batch.
    copy = tmp_path / "recipe.yaml"
    cli = [sys.executable, "-m", "tunesmith.cli"]
    subprocess.run([*cli, "recipes", "copy", "smollm2_lora_identity_cpu", str(copy)], check=True, timeout=120)
    out = tmp_path / "run"
    proc = subprocess.run(
        [*cli, "train", str(copy), "max_steps=2", "per_device_train_batch_size=2", "save_steps=2",
         "plot_loss=false", f"output_dir={out}"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "train_results.json").read_text())
    assert results["global_step"] == 2 and math.isfinite(results["final_loss"])
    assert (out / "adapter_model.safetensors").is_file() and (out / "checkpoint-2").is_dir()
    resolved = (out / "config.yaml").read_text()
    assert str(packaged_identity_dir()) in resolved and "Tuney" in resolved


@pytest.mark.slow
@pytest.mark.parametrize("name, logged", [
    ("smollm2_lora_dpo_identity_cpu", "rewards/accuracies"),
    ("smollm2_lora_pretrain_cpu", "eval_perplexity"),
])
def test_smollm2_stage_recipes_train_on_the_packaged_data(tmp_path, name, logged):
    copy = tmp_path / "recipe.yaml"
    cli = [sys.executable, "-m", "tunesmith.cli"]
    subprocess.run([*cli, "recipes", "copy", name, str(copy)], check=True, timeout=120)
    out = tmp_path / "run"
    proc = subprocess.run(
        [*cli, "train", str(copy), "max_steps=2", "per_device_train_batch_size=2", "save_steps=2", "eval_steps=2",
         "logging_steps=1", "plot_loss=false", f"output_dir={out}"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert any(logged in entry for entry in log), log
    assert all(math.isfinite(entry["loss"]) for entry in log if "loss" in entry)
    assert (out / "adapter_model.safetensors").is_file()
