"""Methods that torch.compile must never trace, marked without importing ``torch._dynamo``.

``torch.compiler.disable`` imports dynamo (about 2 s on a CPU) the moment a class is defined with it, so every
process that merely imports the attention classes (the launcher that checks a config before starting torchrun, a
worker that never compiles) would pay for it. ``eager_only`` records the method instead, and
:func:`keep_eager_only_methods_eager` wraps each recorded method in ``torch.compiler.disable`` just before anything
is compiled (``train/compile.py``), which is the only time the mark matters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

_RECORDED: list[tuple[type, str]] = []


class eager_only:  # noqa: N801 - used as a decorator, named like one
    """Method decorator: the method runs eagerly, as a graph break, in compiled code (see the module docstring)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __set_name__(self, owner: type, name: str) -> None:
        setattr(owner, name, self.fn)  # the plain function: no descriptor left on the class
        _RECORDED.append((owner, name))


def keep_eager_only_methods_eager() -> None:
    """Wrap every method marked :class:`eager_only` in ``torch.compiler.disable`` (once; later calls do nothing)."""
    for owner, name in _RECORDED:
        method = owner.__dict__[name]
        if not getattr(method, "_torchdynamo_disable", False):
            setattr(owner, name, torch.compiler.disable(method))
