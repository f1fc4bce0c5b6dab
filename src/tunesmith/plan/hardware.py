"""Devices a plan is checked against: ``--gpus 4x24GB`` specs and a small table of accelerators' memory and
peak dense 16-bit tensor FLOPs (for the tokens/s estimate)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from tunesmith.errors import ConfigError

GIB = 1024**3


@dataclass(frozen=True)
class Accelerator:
    name: str
    memory_gb: float
    peak_tflops: float  # dense bf16/fp16 tensor-core peak (vendor datasheets), no sparsity


# Keys are what --gpu-type accepts (case-insensitive, also without the memory suffix).
ACCELERATORS: dict[str, Accelerator] = {
    "h100": Accelerator("H100 SXM 80GB", 80, 989.0),
    "h800": Accelerator("H800 SXM 80GB", 80, 989.0),
    "h200": Accelerator("H200 141GB", 141, 989.0),
    "a100-80gb": Accelerator("A100 80GB", 80, 312.0),
    "a100-40gb": Accelerator("A100 40GB", 40, 312.0),
    "a800": Accelerator("A800 80GB", 80, 312.0),
    "4090": Accelerator("RTX 4090 24GB", 24, 165.2),
    "3090": Accelerator("RTX 3090 24GB", 24, 71.0),
    "a10": Accelerator("A10 24GB", 24, 125.0),
    "v100-32gb": Accelerator("V100 32GB", 32, 125.0),
    "v100-16gb": Accelerator("V100 16GB", 16, 125.0),
    "910b": Accelerator("Ascend 910B 64GB", 64, 313.0),
}
ALIASES = {"a100": "a100-80gb", "v100": "v100-32gb", "rtx4090": "4090", "rtx3090": "3090", "ascend910b": "910b"}
# When --gpus gives only a memory size: the accelerator assumed for the FLOPs estimate (stated in the report).
BY_MEMORY = {24: "4090", 16: "v100-16gb", 32: "v100-32gb", 40: "a100-40gb", 64: "910b", 80: "a100-80gb",
             141: "h200"}


@dataclass(frozen=True)
class DeviceSpec:
    """``count`` devices per node with ``memory_bytes`` each (``kind``: cuda, npu or cpu)."""

    count: int
    memory_bytes: float | None
    kind: str = "cuda"
    accelerator: Accelerator | None = None
    text: str = ""

    def describe(self) -> str:
        if self.kind == "cpu":
            mem = f"{self.memory_bytes / GIB:.1f} GiB RAM" if self.memory_bytes else "RAM unknown"
            return f"CPU ({mem})"
        mem = f"{self.memory_bytes / GIB:g} GiB" if self.memory_bytes else "? GiB"
        name = f" ({self.accelerator.name})" if self.accelerator else ""
        return f"{self.count} x {mem}{name}"


def accelerator(name: str, option: str = "--gpu-type") -> Accelerator:
    key = name.strip().lower().replace(" ", "").replace("_", "-")
    key = ALIASES.get(key, key)
    if key not in ACCELERATORS:
        raise ConfigError(
            f"{option} {name} is neither a memory size such as 24GB nor in the accelerator table; use one of "
            f"{', '.join(sorted(ACCELERATORS))}"
        )
    return ACCELERATORS[key]


_SPEC = re.compile(r"^\s*(?:(\d+)\s*[x×*]\s*)?([\w.-]+?)\s*$", re.IGNORECASE)
_MEM = re.compile(r"^(\d+(?:\.\d+)?)\s*(gb|g|gib)?$", re.IGNORECASE)


def parse_gpus(text: str, gpu_type: str | None = None) -> DeviceSpec:
    """``4x24GB``, ``8x64GB``, ``1x80GB``, ``24GB``, ``4xA100``, ``2x4090``: devices per node and their memory."""
    match = _SPEC.match(text or "")
    if not match:
        raise ConfigError(f"--gpus {text!r} is not COUNTxMEMORY such as 4x24GB (or COUNTxTYPE such as 8xA100)")
    count = int(match.group(1) or 1)
    what = match.group(2)
    mem_match = _MEM.match(what)
    acc = accelerator(gpu_type) if gpu_type else None
    if mem_match:
        value = float(mem_match.group(1))
        memory = value * GIB  # "24GB" cards have 24 GiB (24564 MiB): GPU memory is quoted in binary units
        if acc is None:
            key = BY_MEMORY.get(round(value))
            acc = ACCELERATORS[key] if key else None
    else:
        acc = accelerator(what, f"--gpus {text}:")
        memory = acc.memory_gb * GIB
    if count < 1:
        raise ConfigError(f"--gpus {text!r}: the device count must be at least 1")
    return DeviceSpec(count=count, memory_bytes=memory, kind="cuda", accelerator=acc, text=text)


def host_ram_bytes() -> float | None:
    """This machine's physical RAM (None where it cannot be read)."""
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def available_ram_bytes() -> float | None:
    """RAM available to a new process now (MemAvailable), else None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        return None
    return None
