"""Every text-model example config of LLaMA-Factory (../shared/lf/examples, read from there) runs the way a user
switching from LLaMA-Factory would run it: `tunesmith train --dry-run` (`tunesmith export` for merge_lora) accepts
it, and a real one-step run on a tiny model with LLaMA-Factory's demo data (../shared/lf/data) trains, predicts or
exports. Swapped, and only these: the model (a tiny one whose tokenizer has every template's special tokens; for
llama_pro one expanded by `tunesmith llama-pro`, as the example expects), dataset_dir, output_dir / export_dir and
the length of the run (max_steps; max_samples for predicting; the calibration size for GPTQ). Two more swaps are
differences on purpose: identity.json's {{name}} / {{author}} get values (placeholders; LLaMA-Factory trains on the
braces), and adapter_name_or_path points at an adapter the sft example just trained (the examples name folders of
a training run that does not exist here).

Refused, each with its sentence: FP8 and flash-attention-2 examples (hardware this machine lacks),
Mixture-of-Depths (its library does not import with transformers 5), and the two ASFT examples, whose datasets
(`med`, `math`) are in neither LLaMA-Factory's dataset_info.json nor its demo data (they run with one that is).
The multimodal examples (Qwen3.5) are out of scope."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from concurrent.futures import Future
from pathlib import Path

import pytest

from tunesmith.cli import main
from tunesmith.model.llama_pro import expand_model_folder
from tunesmith.train.observe import read_log

pytestmark = pytest.mark.slow

MULTIMODAL = {"ascend/qwen3_5_full_sft_fsdp2.yaml", "ascend/qwen3_5moe_lora_sft_fsdp2.yaml"}
FA2 = "flash_attn: fa2 needs a CUDA device and the flash-attn package"
FP8 = "fp8: true needs FP8 matrix units (Hopper-class GPUs)"
REFUSED = {
    "ascend/qwen3_full_sft_fsdp2.yaml": FA2,
    "ascend/qwen3moe_full_sft_fsdp.yaml": FA2,
    "extras/fp8/llama3_fp8_deepspeed_sft.yaml": FP8,
    "extras/fp8/llama3_fp8_fsdp_sft.yaml": FP8,
    "extras/mod/llama3_full_sft.yaml": "mixture_of_depths: convert is not supported: it needs the mixture-of-depth",
    "extras/asft/llama2_full_asft.yaml": "dataset med is neither a file nor a name in",
    "extras/asft/qwen2_full_asft.yaml": "dataset math is neither a file nor a name in",
}
PLACEHOLDERS = ["placeholders.name=Tuney", "placeholders.author=the tunesmith team"]


def _examples(shared: Path) -> list[str]:
    root = shared / "lf" / "examples"
    found = sorted(str(path.relative_to(root)) for path in root.rglob("*.yaml"))
    return [name for name in found if name not in MULTIMODAL]


def _shared() -> Path:
    return Path(__file__).resolve().parents[3] / "shared"


EXAMPLES = _examples(_shared()) if (_shared() / "lf" / "examples").is_dir() else []


def _with_every_template_token(base: Path, out: Path, layers: int | None = None) -> Path:
    """The tiny model (optionally with more layers) whose tokenizer also holds every registered template's special
    tokens and a bos, so LLaMA-Factory's llama3 / qwen3 / llama2 … templates all find theirs."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from tunesmith.data.templates import TEMPLATES

    tokenizer = AutoTokenizer.from_pretrained(base)
    special = sorted({token for template in TEMPLATES.values() for token in template.special_tokens})
    tokenizer.add_special_tokens({"bos_token": "<s>", "additional_special_tokens": special})
    if layers is None:
        model = AutoModelForCausalLM.from_pretrained(base)
    else:
        config = AutoConfig.from_pretrained(base)
        config.num_hidden_layers, config.layer_types = layers, [config.layer_types[0]] * layers
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("lf-models")
    plain = _with_every_template_token(tiny_model_dir, root / "tiny")
    eight = _with_every_template_token(tiny_model_dir, root / "tiny8", layers=8)
    # the function behind `tunesmith llama-pro` (main() here, outside a test, would leave its logging set up)
    expand_model_folder(eight, root / "tiny-pro", 8)
    return {"plain": plain, "pro": root / "tiny-pro"}


def _tunesmith(shared: Path, *args: str, timeout: int = 600, threads: int | None = None
               ) -> subprocess.CompletedProcess:
    env = {**os.environ, "TUNESMITH_DATA_CACHE": "0", "GPTQMODEL_DISABLE_PACK_EXT": "1"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.run([sys.executable, "-m", "tunesmith.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=shared / "lf", env=env)  # cwd: examples/deepspeed/… resolve


@pytest.fixture(scope="module")
def sft_adapter(shared_dir, models, tmp_path_factory):
    """The adapter of train_lora/qwen3_lora_sft.yaml (what merge_lora and nlg_eval point at)."""
    out = tmp_path_factory.mktemp("lf-sft") / "run"
    result = _tunesmith(shared_dir, "train", "examples/train_lora/qwen3_lora_sft.yaml",
                        f"model_name_or_path={models['plain']}", f"dataset_dir={shared_dir / 'lf' / 'data'}",
                        f"output_dir={out}", "max_steps=1", *PLACEHOLDERS)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _swaps(example: str, shared: Path, models: dict, out: Path, adapter: Path | None) -> tuple[str, list[str]]:
    """(command, KEY=VALUE swaps) for one example."""
    model = models["pro"] if "llama_pro" in example else models["plain"]
    swaps = [f"model_name_or_path={model}", f"dataset_dir={shared / 'lf' / 'data'}"]
    if adapter is not None:
        swaps.append(f"adapter_name_or_path={adapter}")
    if example.startswith("merge_lora/"):
        swaps.append(f"export_dir={out}")
        if "gptq" in example:
            swaps += ["export_quantization_nsamples=8", "export_quantization_maxlen=64"]
        return "export", swaps
    swaps += [f"output_dir={out}", *PLACEHOLDERS]
    swaps += ["max_samples=2"] if "predict" in example else ["max_steps=1"]
    return "train", swaps


NEEDS_ADAPTER = ("merge_lora/qwen3_lora_sft.yaml", "extras/nlg_eval/llama3_lora_predict.yaml")
MAY_LAUNCH_RANKS = ("deepspeed", "fsdp", "ray")  # examples that may start torchrun, which picks a master port


@pytest.fixture(scope="module")
def example_runs(shared_dir, models, sft_adapter, tmp_path_factory, request):
    """Every example's real run ((output folder, Future of the finished process)), started in the background in two
    lanes, one process each (with one thread each: 2 cores): most of a run is the start-up of Python, torch and
    transformers, which uses one core. The examples that may start torchrun share a lane, so two launches never
    pick a free master port at the same moment. Only the examples this session selected run."""
    root = tmp_path_factory.mktemp("lf-runs")
    runs: dict[str, tuple[Path, Future]] = {}
    lanes: tuple[list[tuple[str, list[str]]], ...] = ([], [])
    selected = {item.callspec.params["example"] for item in request.session.items
                if getattr(item, "originalname", "") == "test_llama_factory_example_runs_or_is_refused_for_a_reason"}
    for number, example in enumerate(e for e in EXAMPLES if e in selected):
        out = root / f"{number:02d}"
        command, swaps = _swaps(example, shared_dir, models, out, sft_adapter if example in NEEDS_ADAPTER else None)
        runs[example] = (out, Future())
        ranks = any(word in (shared_dir / "lf" / "examples" / example).read_text() for word in MAY_LAUNCH_RANKS)
        lane = 0 if ranks else min((1, 0), key=lambda i: len(lanes[i]))
        lanes[lane].append((example, [command, f"examples/{example}", *swaps]))

    def work(jobs: list[tuple[str, list[str]]]) -> None:
        for example, args in jobs:
            future = runs[example][1]
            try:
                future.set_result(_tunesmith(shared_dir, *args, threads=1))
            except BaseException as error:  # the test of that example reports it
                future.set_exception(error)

    threads = [threading.Thread(target=work, args=(jobs,), daemon=True) for jobs in lanes]
    for thread in threads:
        thread.start()
    yield runs
    for thread in threads:
        thread.join()


@pytest.mark.parametrize("example", EXAMPLES)
def test_llama_factory_example_runs_or_is_refused_for_a_reason(example, shared_dir, models, sft_adapter, tmp_path,
                                                                example_runs, monkeypatch, capsys):
    command, swaps = _swaps(example, shared_dir, models, tmp_path / "out",
                            sft_adapter if example in NEEDS_ADAPTER else None)
    config = f"examples/{example}"
    if command == "train":  # the dry run, in this process (fast): the config and its launch are accepted
        monkeypatch.chdir(shared_dir / "lf")
        code = main(["train", config, "--dry-run", *swaps])
        said = capsys.readouterr()
        if example in REFUSED and code != 0:
            assert REFUSED[example] in said.err and "Traceback" not in said.err
            return
        assert code == 0, said.err[-2000:]
    out, run = example_runs[example]
    result = run.result(timeout=1800)
    if example in REFUSED:
        assert result.returncode != 0 and REFUSED[example] in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        return
    assert result.returncode == 0, result.stderr[-3000:]
    if command == "export":
        assert (out / "config.json").is_file() and (out / "tunesmith_export.json").is_file()
    elif "predict" in example:
        assert (out / "generated_predictions.jsonl").is_file() and (out / "predict_results.json").is_file()
    else:
        steps = [entry for entry in read_log(out) if "loss" in entry]
        assert steps and steps[-1]["step"] == 1 and steps[-1]["loss"] == steps[-1]["loss"]  # not NaN


@pytest.mark.parametrize("example", ["extras/asft/qwen2_full_asft.yaml"])
def test_the_asft_example_trains_with_a_dataset_that_exists(example, shared_dir, models, tmp_path):
    out = tmp_path / "out"
    _, swaps = _swaps(example, shared_dir, models, out, None)
    result = _tunesmith(shared_dir, "train", f"examples/{example}", *swaps, "dataset=alpaca_en_demo")
    assert result.returncode == 0, result.stderr[-3000:]
    assert any("kl" in entry for entry in read_log(out))
