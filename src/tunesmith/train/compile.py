"""``torch_compile: true``: each decoder block's forward compiled with torch.compile (inductor by default), with
dynamic shapes, so packed rows of any length reuse one compiled graph instead of recompiling per length.

Per block, as torchtitan does, rather than the whole model: the blocks are identical, so one graph serves them all
and compiling stays quick; the embeddings, the LM head (our target-only / chunked head) and the loss stay eager.
Only ``forward`` is compiled, not the module call, so the hooks of DDP, FSDP2, PEFT and activation checkpointing
keep running eagerly around it and the state dict keeps its keys (checkpoints move freely between compiled and
eager runs). A device where compiling cannot work falls back to eager with one sentence; it never fails the run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunesmith.config.speed import SpeedArgs
from tunesmith.logging import get_logger
from tunesmith.model.eager import keep_eager_only_methods_eager
from tunesmith.train.engines.fsdp2 import decoder_layers

log = get_logger("train")


@dataclass
class Compiled:
    """What ``compile_blocks`` did: the blocks compiled (0: eager) and why not, for the 'speed:' line, and the
    warm-up time of the first optimizer step, logged once."""

    blocks: int = 0
    backend: str = ""
    reason: str = ""  # why compiling is off although torch_compile asked for it
    warmed_up: bool = False

    def feature(self) -> str:
        if self.blocks:
            return f"torch.compile of {self.blocks} decoder blocks ({self.backend}, dynamic shapes)"
        return f"no torch.compile ({self.reason})" if self.reason else "no torch.compile"

    def after_first_step(self, seconds: float) -> None:
        if self.blocks and not self.warmed_up:
            self.warmed_up = True
            log.info("torch.compile warm-up: the first optimizer step took %.1f s (compiling the blocks' forward "
                     "and backward); later steps reuse the graphs", seconds)


def compile_blocks(model: torch.nn.Module, speed: SpeedArgs, engine_name: str, device: torch.device) -> Compiled:
    """Compile every decoder block's forward in place, when ``speed.torch_compile`` asks and this setup allows."""
    if not speed.torch_compile:
        return Compiled()
    reason = _why_not(model, engine_name, device, speed.torch_compile_backend)
    if reason:
        log.warning("torch_compile: %s; training continues without it", reason)
        return Compiled(reason=reason.split(":")[0])
    # A block dynamo cannot trace runs eagerly instead of failing the run (a feature never fails the run).
    torch._dynamo.config.suppress_errors = True
    keep_eager_only_methods_eager()  # the attention's Python loop over samples: never traced
    blocks = decoder_layers(model)
    for block in blocks:
        block.forward = torch.compile(block.forward, backend=speed.torch_compile_backend, dynamic=True,
                                      mode=speed.torch_compile_mode)
    return Compiled(blocks=len(blocks), backend=speed.torch_compile_backend)


def _why_not(model: torch.nn.Module, engine_name: str, device: torch.device, backend: str) -> str:
    if engine_name == "deepspeed":
        return "not under engine deepspeed: its ZeRO parameter hooks break every compiled graph"
    if not decoder_layers(model):
        return f"no decoder blocks found in {type(model).__name__} (it lists none in _no_split_modules)"
    return _backend_fails(backend, device)


def _backend_fails(backend: str, device: torch.device) -> str:
    """'' when ``backend`` compiles a small function on ``device``; else why (e.g. inductor on CPU needs a C++
    compiler; on CUDA, Triton)."""
    try:
        probe = torch.compile(lambda x: torch.nn.functional.silu(x) * 2, backend=backend, dynamic=True)
        probe(torch.ones(4, device=device))
    except Exception as err:  # whatever the backend raises: we fall back, naming it
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        return f"the {backend} backend cannot compile on {device.type} here: {first_line}"
    finally:
        torch._dynamo.reset()
    return ""
