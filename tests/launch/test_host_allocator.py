"""host_allocator: CPU training runs under tcmalloc (preloaded by `tunesmith train` restarting itself) where it is
installed, and under glibc's malloc, saying so, where it is not; accelerator runs are left alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from file_helpers import write_json

from tunesmith.launch import host_allocator
from tunesmith.launch.host_allocator import (
    PRELOADED_ENV,
    choose_allocator,
    preload_env,
    spinning_threads_env,
    trains_on_cpu,
)
from tunesmith.runenv import loaded_allocator


def test_auto_preloads_tcmalloc_for_a_cpu_run_on_this_machine():
    # scripts/setup.sh installs it (scripts/install-allocator.sh), so a missing library is a setup bug here
    choice = choose_allocator("auto", "cpu", {})
    assert choice.library is not None and "tcmalloc" in choice.library and not choice.note


def test_a_run_on_an_accelerator_or_with_system_or_an_allocator_already_preloaded_keeps_its_allocator(tmp_path):
    assert choose_allocator("system", "cpu", {}).library is None
    assert choose_allocator("auto", "cuda", {}).library is None
    assert choose_allocator("auto", "cpu", {"LD_PRELOAD": "/opt/lib/libjemalloc.so.2"}).library is None
    assert choose_allocator("auto", "cpu", {PRELOADED_ENV: "1"}).library is None  # never restarts twice
    gpu = tmp_path / "nvidiactl"
    assert trains_on_cpu("auto", (str(gpu),))
    gpu.touch()
    assert not trains_on_cpu("auto", (str(gpu),)) and trains_on_cpu("cpu", (str(gpu),))


def test_a_missing_allocator_falls_back_to_glibc_with_one_sentence_saying_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setattr(host_allocator.ctypes.util, "find_library", lambda name: None)
    monkeypatch.setattr(host_allocator.sys, "prefix", str(tmp_path))
    for setting, named in (("auto", "neither tcmalloc nor jemalloc"), ("jemalloc", "jemalloc is not")):
        choice = choose_allocator(setting, "cpu", {})
        assert choice.library is None
        assert named in choice.note and "apt install libtcmalloc-minimal4" in choice.note


def test_a_conda_environments_own_tcmalloc_is_found(monkeypatch, tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libtcmalloc_minimal.so.4").touch()
    monkeypatch.setattr(host_allocator.ctypes.util, "find_library", lambda name: None)
    monkeypatch.setattr(host_allocator.sys, "prefix", str(tmp_path))
    assert choose_allocator("tcmalloc", "cuda", {}).library == str(tmp_path / "lib" / "libtcmalloc_minimal.so.4")


def test_the_preloaded_library_goes_before_the_users_own_preloads():
    choice = choose_allocator("auto", "cpu", {})
    env = preload_env(choice, {"LD_PRELOAD": "/x/libfoo.so"})
    assert env["LD_PRELOAD"] == f"{choice.library}:/x/libfoo.so" and env[PRELOADED_ENV] == "1"


def test_the_restarted_process_spins_its_openmp_threads_unless_the_user_chose_or_they_would_oversubscribe():
    assert spinning_threads_env({})["OMP_WAIT_POLICY"] == "active"
    assert spinning_threads_env({"OMP_NUM_THREADS": "1"})["OMP_WAIT_POLICY"] == "active"
    assert spinning_threads_env({"OMP_WAIT_POLICY": "passive"})["OMP_WAIT_POLICY"] == "passive"
    assert "OMP_WAIT_POLICY" not in spinning_threads_env({"GOMP_SPINCOUNT": "1000"})
    assert "OMP_WAIT_POLICY" not in spinning_threads_env({"WORLD_SIZE": "2", "RANK": "0"})
    assert "OMP_WAIT_POLICY" not in spinning_threads_env({"OMP_NUM_THREADS": str(len(os.sched_getaffinity(0)) + 1)})


def test_a_process_started_with_the_preload_runs_under_tcmalloc():
    env = dict(preload_env(choose_allocator("auto", "cpu", {}), dict(os.environ)))
    code = "from tunesmith.runenv import loaded_allocator; print(loaded_allocator())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "tcmalloc"
    assert loaded_allocator() is None  # this test process: plain glibc


@pytest.mark.parametrize("setting", ["auto", "system"])
def test_tunesmith_train_on_cpu_restarts_itself_under_tcmalloc_unless_told_system(tmp_path, tiny_model_dir,
                                                                                  identity_rows, setting):
    write_json(tmp_path / "identity.json", identity_rows)
    (tmp_path / "dataset_info.json").write_text(json.dumps({"identity": {"file_name": "identity.json"}}))
    (tmp_path / "run.yaml").write_text(
        f"model_name_or_path: {tiny_model_dir}\ntemplate: chatml\ndataset: identity\ndataset_dir: {tmp_path}\n"
        "placeholders: {name: Ada, author: Lab}\ncutoff_len: 64\noutput_dir: out\nmax_steps: 2\n"
        f"logging_steps: 1\ndevice: cpu\nhost_allocator: {setting}\n",
        encoding="utf-8",
    )
    env = {key: value for key, value in os.environ.items() if key not in ("LD_PRELOAD", PRELOADED_ENV)}
    result = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", "run.yaml"], cwd=tmp_path,
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    speed = next(line for line in result.stderr.splitlines() if "speed: " in line)
    expected = ("host memory: tcmalloc; OpenMP threads spin between operations" if setting == "auto"
                else "host memory: glibc malloc")
    assert speed.endswith(expected)
    assert "training finished: step 2" in result.stderr
