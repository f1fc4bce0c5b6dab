"""`tunesmith env`: library versions and the devices torch can see (paste it into bug reports)."""

from __future__ import annotations

import importlib.metadata
import platform

LIBRARIES = ("torch", "transformers", "peft", "tokenizers", "safetensors", "gguf", "pydantic", "accelerate",
             "deepspeed", "bitsandbytes")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "tunesmith": _version("tunesmith")}
    for name in LIBRARIES:
        versions[name] = _version(name)
    return versions


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def devices() -> list[str]:
    import torch

    found = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            found.append(f"cuda:{i} {props.name} ({props.total_memory / 2**30:.0f} GiB)")
    npu = getattr(torch, "npu", None)
    if npu is not None and npu.is_available():  # only present when torch_npu is imported
        found.extend(f"npu:{i}" for i in range(npu.device_count()))
    import os

    found.append(f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)")
    return found


def environment_report() -> str:
    lines = [f"{name:14s} {version}" for name, version in library_versions().items()]
    lines.append(f"{'platform':14s} {platform.platform()}")
    lines.extend(f"{'device':14s} {d}" for d in devices())
    return "\n".join(lines)
