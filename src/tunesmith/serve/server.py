"""`tunesmith serve`: load a model (+ adapter) and run the OpenAI-compatible server with uvicorn."""

from __future__ import annotations

import ipaddress
import socket
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


def run_server(
    model_path: str,
    *,
    adapter: str | None = None,
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
    """Serve until interrupted; returns the exit code. ``limits``: ServerSettings fields (max_tokens_limit, ...);
    ``access_log``: uvicorn logs every request (`tunesmith -v serve`)."""
    import uvicorn

    from tunesmith.serve.chat import load_for_inference

    check_port_free(host, port)
    if not is_loopback(host) and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach this address can use the model; "
                    "set --api-key (or TUNESMITH_API_KEY)", host)
    if threads:
        import torch

        torch.set_num_threads(threads)
    model, tokenizer, chat_template = load_for_inference(model_path, adapter, template, cache_dir, device=device)
    settings = ServerSettings(
        model_id=model_id or default_model_id(model_path, adapter),
        api_key=api_key or None,
        context_length=context_length(model),
        **(limits or {}),
    )
    app = create_app(model, tokenizer, chat_template, settings)
    shown = f"[{host}]" if ":" in host else host
    log.info("serving %s at http://%s:%d/ (chat page) and http://%s:%d/v1 (OpenAI API)%s", settings.model_id,
             shown, port, shown, port, "; API key required" if settings.api_key else "")
    uvicorn.run(app, host=host, port=port, log_level="info" if access_log else "warning", timeout_graceful_shutdown=5)
    return 0
