"""`tunesmith serve`: load a model (+ adapters) and run the OpenAI-compatible server with uvicorn, or hand the
same command line to vLLM (``--backend vllm``).

Several adapters share one copy of the base model: the first is attached with tunesmith's checked
``load_adapter``, the others are loaded into the same PeftModel under their own PEFT names; the worker switches
the active adapter per group of rows (tunesmith.serve.worker)."""

from __future__ import annotations

import importlib.util
import ipaddress
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

from tunesmith.errors import TunesmithError
from tunesmith.logging import get_logger
from tunesmith.serve.app import ServerSettings, create_app

log = get_logger("serve")


def default_model_id(model_path: str, adapter: str | None = None) -> str:
    """What /v1/models calls the model: the adapter's folder name, else the model's (an alias stays as is)."""
    name = Path(str(adapter or model_path).rstrip("/\\")).name
    return name or str(model_path)


def context_length(model: Any) -> int | None:
    config = getattr(model, "config", None)
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port_free(host: str, port: int) -> None:
    """Fail with a clear message before loading the model, not after, when the address is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise TunesmithError(f"cannot listen on {host}:{port} ({err.strerror}); pick another --port") from None


def load_served(
    model_path: str,
    adapter: str | None,
    adapters: list[tuple[str, str]],
    template: str,
    cache_dir: str | None,
    device: str,
    model_id: str | None,
) -> tuple[Any, Any, Any, dict[str, str | None]]:
    """(model, tokenizer, template, model id → PEFT adapter name). ``adapter``: the single unnamed adapter (served
    alone, as before named adapters existed); ``adapters``: (name, path) pairs, served beside the base model."""
    from tunesmith.serve.chat import load_for_inference

    model, tokenizer, chat_template = load_for_inference(model_path, adapter, template, cache_dir, device=device)
    if adapter:
        return model, tokenizer, chat_template, {model_id or default_model_id(model_path, adapter): "default"}
    served: dict[str, str | None] = {model_id or default_model_id(model_path): None}
    for i, (name, path) in enumerate(adapters):
        if name in served:
            raise TunesmithError(f"--adapter {name}={path}: the name {name!r} is taken (by the base model or "
                                 "another adapter); give each adapter its own name")
        peft_name = "default" if i == 0 else f"adapter_{i}"
        model = attach_adapter(model, path, peft_name, first=i == 0)
        served[name] = peft_name
    model.eval()
    return model, tokenizer, chat_template, served


def attach_adapter(model: Any, path: str, peft_name: str, first: bool) -> Any:
    """The first adapter wraps the base (checked by tunesmith's load_adapter); later ones join its PeftModel."""
    from tunesmith.errors import ModelError
    from tunesmith.model.adapt import load_adapter

    if first:
        return load_adapter(model, path, trainable=False)
    if not (Path(path) / "adapter_config.json").is_file():
        raise ModelError(f"--adapter {path} has no adapter_config.json; point it at a PEFT adapter folder "
                         "(a training run's output_dir or one of its checkpoints)")
    try:
        model.load_adapter(path, adapter_name=peft_name, is_trainable=False)
    except (RuntimeError, ValueError, KeyError, OSError) as err:
        raise ModelError(f"--adapter {path} does not fit this base model or the first adapter "
                         f"({str(err).splitlines()[0]}); serve adapters of one base model, of one kind "
                         "(LoRA or OFT)") from err
    log.info("loaded adapter %s as %s", path, peft_name)
    return model


def run_server(
    model_path: str,
    *,
    adapter: str | None = None,
    adapters: list[tuple[str, str]] | None = None,
    template: str = "auto",
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model_id: str | None = None,
    device: str = "auto",
    cache_dir: str | None = None,
    threads: int | None = None,
    limits: dict[str, int] | None = None,
    access_log: bool = False,
) -> int:
    """Serve until interrupted; returns the exit code. ``limits``: ServerSettings fields (max_tokens_limit,
    max_batch_size, ...); ``access_log``: uvicorn logs every request (`tunesmith -v serve`)."""
    import uvicorn

    check_port_free(host, port)
    if not is_loopback(host) and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach this address can use the model; "
                    "set --api-key (or TUNESMITH_API_KEY)", host)
    if threads:
        import torch

        torch.set_num_threads(threads)
    model, tokenizer, chat_template, served = load_served(
        model_path, adapter, adapters or [], template, cache_dir, device, model_id
    )
    settings = ServerSettings(
        model_id=next(iter(served)),
        api_key=api_key or None,
        context_length=context_length(model),
        models=served,
        **(limits or {}),
    )
    app = create_app(model, tokenizer, chat_template, settings)
    shown = f"[{host}]" if ":" in host else host
    log.info("serving %s at http://%s:%d/ (chat page) and http://%s:%d/v1 (OpenAI API)%s", ", ".join(served),
             shown, port, shown, port, "; API key required" if settings.api_key else "")
    uvicorn.run(app, host=host, port=port, log_level="info" if access_log else "warning", timeout_graceful_shutdown=5)
    return 0


_VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts


def vllm_command(
    model_path: str,
    adapters: list[tuple[str, str]],
    *,
    host: str,
    port: int,
    api_key: str | None,
    model_id: str | None,
    max_batch_size: int,
) -> list[str]:
    """The `vllm serve` command line that serves what `tunesmith serve` would: same address, key, model ids
    (``--served-model-name`` for the base, ``--lora-modules NAME=PATH`` per adapter) and batch size."""
    cmd = ["vllm", "serve", model_path, "--host", host, "--port", str(port), "--max-num-seqs", str(max_batch_size),
           "--served-model-name", model_id or default_model_id(model_path)]
    if api_key:
        cmd += ["--api-key", api_key]
    if adapters:
        cmd += ["--enable-lora", "--max-loras", str(len(adapters)), "--lora-modules",
                *(f"{name}={path}" for name, path in adapters)]
        rank = max(_adapter_rank(path) for _, path in adapters)
        cmd += ["--max-lora-rank", str(next((r for r in _VLLM_LORA_RANKS if r >= rank), rank))]
    return cmd


def _adapter_rank(path: str) -> int:
    import json

    try:
        return int(json.loads((Path(path) / "adapter_config.json").read_text(encoding="utf-8")).get("r") or 8)
    except (OSError, ValueError):
        raise TunesmithError(f"--adapter {path} has no readable adapter_config.json; point it at a PEFT "
                             "adapter folder") from None


def run_vllm(command: list[str]) -> int:
    """Run `vllm serve` in the foreground, or refuse in one sentence where vLLM is not installed."""
    if importlib.util.find_spec("vllm") is None or shutil.which("vllm") is None:
        raise TunesmithError("--backend vllm needs vLLM, which is not installed here (pip install vllm, on Linux "
                             "with a CUDA GPU); without --backend, tunesmith serves the same API itself")
    log.info("running %s", " ".join(command))
    return subprocess.call(command)
