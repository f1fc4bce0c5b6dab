"""Loaded into every Python process of a test node (``PYTHONPATH`` names this folder): it widens the races of a
finishing multi-node job from microseconds to seconds, so that a test sees the ordering, not luck. Each delay is
off unless its variable is set.

- ``TUNESMITH_TEST_DELAY_CLOSE_S``: torchrun's agent waits this long before it closes the c10d rendezvous (what
  every agent does after the exit barrier, on the store its host holds).
- ``TUNESMITH_TEST_DELAY_WORKER_EXIT_S``: a torchrun worker waits this long before it exits, so its agent arrives
  at the exit barrier after the others.
- ``TUNESMITH_TEST_DELAY_LAST_WAIT_S``: the agent that arrives last at the exit barrier waits this long between
  waking the others and its own wait on the store.
"""

from __future__ import annotations

import atexit
import importlib.abc
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any


def _delay(name: str) -> float:
    return float(os.environ.get(name) or 0)


def _slow_close(module: ModuleType) -> None:
    handler = module.DynamicRendezvousHandler
    shutdown = handler.shutdown

    def slow_shutdown(self: Any) -> bool:
        time.sleep(_delay("TUNESMITH_TEST_DELAY_CLOSE_S"))
        return shutdown(self)

    handler.shutdown = slow_shutdown


def _slow_last_member(module: ModuleType) -> None:
    def barrier_nonblocking(store: Any, world_size: int, key_prefix: str) -> str:  # torch's, plus the delay
        last_member_key = key_prefix + module._LAST_MEMBER_CHECKIN
        if store.add(key_prefix + module._NUM_MEMBERS, 1) == world_size:
            store.set(last_member_key, "<val_ignored>")
            time.sleep(_delay("TUNESMITH_TEST_DELAY_LAST_WAIT_S"))
        return last_member_key

    module._barrier_nonblocking = barrier_nonblocking


PATCHES: dict[str, Callable[[ModuleType], None]] = {}
if _delay("TUNESMITH_TEST_DELAY_CLOSE_S"):
    PATCHES["torch.distributed.elastic.rendezvous.dynamic_rendezvous"] = _slow_close
if _delay("TUNESMITH_TEST_DELAY_LAST_WAIT_S"):
    PATCHES["torch.distributed.elastic.utils.store"] = _slow_last_member
if _delay("TUNESMITH_TEST_DELAY_WORKER_EXIT_S") and "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ:
    atexit.register(time.sleep, _delay("TUNESMITH_TEST_DELAY_WORKER_EXIT_S"))


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches a module of PATCHES right after it is first imported."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name not in PATCHES:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module: ModuleType) -> None:
            exec_module(module)
            PATCHES[name](module)

        spec.loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec


if PATCHES:
    sys.meta_path.insert(0, _PatchOnImport())
