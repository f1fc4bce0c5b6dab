"""``engine: single``: one process on one device (the default when not launched with several processes)."""

from __future__ import annotations

from tunesmith.train.engines.base import Engine


class SingleDeviceEngine(Engine):
    """Placement, autocast, backward and the optimizer step on one device; checkpoints in HF/PEFT format."""

    name = "single"
