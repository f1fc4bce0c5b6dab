"""The recipe catalog: YAML configs for the seed guides' setups, shipped in ``tunesmith/resources/recipes/``.

Each recipe is a plain tunesmith config whose leading comment block says what it is, machine-readably::

    # Qwen-7B-Chat full fine-tune, ...             <- the title (first line)
    # guide: 001 (...)                              <- which seed guide it reproduces
    # hardware: 4x24GB                              <- devices per node x memory [npu] [, N nodes] | cpu
    # launch: tunesmith train NAME.yaml --nproc-per-node 4
    # edit: model_name_or_path (...), dataset (...)
    # data: packaged identity                       <- optional: dataset_dir is tunesmith's packaged data

``copy`` writes a recipe where the user wants it; for ``data: packaged`` recipes it points ``dataset_dir`` at the
installed identity data, so the copy trains as it is.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from tunesmith.errors import ConfigError

HEADER_KEYS = ("guide", "hardware", "launch", "edit")
_HARDWARE = re.compile(
    r"^(?:(?P<count>\d+)x(?P<mem>\d+(?:\.\d+)?)GB(?:\s+(?P<kind>gpu|npu))?|(?P<cpu>cpu))"
    r"(?:,\s*(?P<nodes>\d+)\s+nodes?)?$"
)
_DATASET_DIR_LINE = re.compile(r"^dataset_dir:.*$", re.MULTILINE)


@dataclass(frozen=True)
class Hardware:
    """What a recipe is planned for: ``count`` devices of ``memory_gb`` on each of ``nodes`` machines."""

    device: str  # gpu | npu | cpu
    count: int  # devices (processes) per node; 1 for cpu
    memory_gb: float | None  # per device; None for cpu
    nodes: int = 1

    @property
    def world_size(self) -> int:
        return self.count * self.nodes

    def __str__(self) -> str:
        if self.device == "cpu":
            text = "cpu"
        else:
            mem = f"{self.memory_gb:g}"
            text = f"{self.count}x{mem}GB" + (" npu" if self.device == "npu" else "")
        return text + (f", {self.nodes} nodes" if self.nodes > 1 else "")


def parse_hardware(text: str) -> Hardware:
    """``4x24GB`` / ``8x32GB npu, 2 nodes`` / ``cpu`` → :class:`Hardware`."""
    match = _HARDWARE.match(text.strip())
    if not match:
        raise ConfigError(
            f"hardware {text!r} is not COUNTxMEMGB [npu] [, N nodes] or cpu; write it like 4x24GB or "
            "8x32GB npu, 2 nodes"
        )
    nodes = int(match["nodes"] or 1)
    if match["cpu"]:
        return Hardware("cpu", 1, None, nodes)
    return Hardware(match["kind"] or "gpu", int(match["count"]), float(match["mem"]), nodes)


def recipes_dir() -> Path:
    return Path(str(resources.files("tunesmith") / "resources" / "recipes"))


def packaged_identity_dir() -> Path:
    """The identity dataset `tunesmith demo` trains on (dataset_info.json + identity.json)."""
    return Path(str(resources.files("tunesmith") / "resources" / "demo"))


def _parse_header(text: str, where: str) -> tuple[str, dict[str, str]]:
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    if not lines or not lines[0]:
        raise ConfigError(f"{where}: a recipe must start with a '# title' comment line")
    header: dict[str, str] = {}
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        if sep and key in (*HEADER_KEYS, "data") and key not in header:
            header[key] = value.strip()
    missing = [key for key in HEADER_KEYS if key not in header]
    if missing:
        raise ConfigError(f"{where}: the header comment lacks '# {missing[0]}: ...'; add it")
    return lines[0], header


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path
    title: str
    guide: str
    hardware: Hardware
    launch: str
    edit: str
    data: str | None  # "packaged identity" when dataset_dir should point at tunesmith's identity data
    text: str

    @cached_property
    def values(self) -> dict[str, Any]:
        """The YAML's keys as written (not validated; :func:`tunesmith.config.load_config` validates)."""
        return yaml.safe_load(self.text) or {}

    @property
    def guide_number(self) -> str:
        number = self.guide.split()[0] if self.guide else "none"
        return "-" if number == "none" else number

    @property
    def method(self) -> str:
        values = self.values
        kind = values.get("finetuning_type", "lora")
        bits = values.get("quantization_bit")
        method = f"qlora {bits}-bit" if bits else kind
        stage = values.get("stage", "sft")
        return method if stage == "sft" else f"{method} {stage}"

    @property
    def engine(self) -> str:
        """The engine this recipe trains with on its own hardware (``auto`` resolved as training resolves it)."""
        values = self.values
        engine = values.get("engine", "auto")
        if values.get("deepspeed") is not None or engine == "deepspeed":
            zero = _ds_values(values.get("deepspeed")).get("zero_optimization", {})
            stage = zero.get("stage", 0)
            offload = [k.split("_")[1] for k in ("offload_optimizer", "offload_param")
                       if isinstance(zero.get(k), dict) and zero[k].get("device", "none") != "none"
                       and (k == "offload_optimizer" or stage == 3)]
            return f"deepspeed zero{stage}" + (f" + offload {'/'.join(offload)}" if offload else "")
        if engine == "auto":
            engine = "fsdp2" if values.get("tensor_parallel_size", 1) > 1 else (
                "ddp" if self.hardware.world_size > 1 else "single")
        return engine + self.mesh_text

    @property
    def mesh_text(self) -> str:
        """`` (dp 4 × tp 2)``: the dimensions of the mesh this recipe splits the model over, on its hardware."""
        values = self.values
        sizes = {dim: int(values.get(key, 1) or 1) for dim, key in (
            ("sp", "sequence_parallel_size"), ("tp", "tensor_parallel_size"), ("pp", "pipeline_parallel_size"))}
        split = sizes["sp"] * sizes["tp"] * sizes["pp"]
        if split == 1:
            return ""
        dims = [f"dp {self.hardware.world_size // split}"] + [f"{d} {n}" for d, n in sizes.items() if n > 1]
        return f" ({' × '.join(dims)})"

    def text_for_copy(self) -> str:
        """The recipe as ``copy`` writes it: a ``data: packaged`` recipe gets the installed data folder."""
        if not (self.data or "").startswith("packaged"):
            return self.text
        folder = packaged_identity_dir()
        line = f"dataset_dir: {folder}   # tunesmith's packaged identity data; or a folder of your own"
        return _DATASET_DIR_LINE.sub(lambda _: line, self.text, count=1)


def _ds_values(value: Any) -> dict[str, Any]:
    """A recipe's DeepSpeed config: inline, or a preset read straight from the package (tunesmith.train's own
    reader would import torch, which `recipes list` has no need for)."""
    if isinstance(value, dict):
        return value
    name = value or "ds_z2"
    path = Path(str(resources.files("tunesmith") / "resources" / "deepspeed" / f"{name}.json"))
    if not path.is_file():
        path = Path(name).expanduser()
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _read(path: Path) -> Recipe:
    text = path.read_text(encoding="utf-8")
    title, header = _parse_header(text, str(path))
    return Recipe(
        name=path.stem,
        path=path,
        title=title,
        guide=header["guide"],
        hardware=parse_hardware(header["hardware"]),
        launch=header["launch"],
        edit=header["edit"],
        data=header.get("data"),
        text=text,
    )


def recipe_names() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def list_recipes() -> list[Recipe]:
    return [_read(recipes_dir() / f"{name}.yaml") for name in recipe_names()]


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name`` (``.yaml`` optional); an unknown name fails naming the closest ones."""
    name = name.removesuffix(".yaml").removesuffix(".yml").replace("-", "_")
    names = recipe_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.4)
        if not close:  # a fragment such as "qwen" or "ascend": the names that contain it
            close = [n for n in names if name.lower() in n][:3]
        hint = f"did you mean {', '.join(close)}?" if close else "see `tunesmith recipes list`"
        raise ConfigError(f"unknown recipe {name!r}; {hint}")
    return _read(recipes_dir() / f"{name}.yaml")


def copy_recipe(name: str, dest: str | Path, force: bool = False) -> Path:
    """Write recipe ``name`` to ``dest`` (a file, or a folder that gets NAME.yaml); never overwrite an existing
    file unless ``force``. Returns the written path."""
    recipe = get_recipe(name)
    as_folder = str(dest).endswith(("/", "\\"))  # Path() drops a trailing slash: look before converting
    dest = Path(dest).expanduser()
    if dest.is_dir() or as_folder:
        dest = dest / f"{recipe.name}.yaml"
    if dest.is_dir():
        raise ConfigError(f"{dest} is a folder; give a file path or a folder without a {dest.name} folder in it")
    if dest.exists() and not force:
        raise ConfigError(f"{dest} already exists; pass --force to overwrite it, or choose another destination")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(recipe.text_for_copy(), encoding="utf-8")
    return dest


def plan_recipe(recipe: Recipe, overrides: list[str] | None = None) -> Any:
    """The memory plan (:class:`tunesmith.plan.PlanReport`) of ``recipe`` on the hardware its header names; on a
    ``cpu`` recipe, this machine's RAM."""
    from tunesmith.config import load_config
    from tunesmith.plan import plan_config
    from tunesmith.plan.hardware import GIB, DeviceSpec

    cfg = load_config(recipe.path, overrides)
    hw = recipe.hardware
    if hw.device == "cpu":
        return plan_config(cfg)
    if hw.device == "npu":  # the plan's --gpus specs are CUDA cards; an NPU spec is built directly
        devices = DeviceSpec(count=hw.count, memory_bytes=(hw.memory_gb or 0) * GIB, kind="npu", text=str(hw))
        return plan_config(cfg, nodes=hw.nodes, devices=devices)
    return plan_config(cfg, gpus=f"{hw.count}x{hw.memory_gb:g}GB", nodes=hw.nodes)
