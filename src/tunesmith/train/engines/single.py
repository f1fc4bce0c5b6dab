"""``engine: single``: one process on one device (the default when not launched with several processes)."""

from __future__ import annotations

from typing import ClassVar

from tunesmith.config import Config
from tunesmith.errors import ConfigError
from tunesmith.train.engines.base import TorchEngine


class SingleDeviceEngine(TorchEngine):
    """Placement, autocast, backward and the optimizer step on one device; checkpoints in HF/PEFT format."""

    name: ClassVar[str] = "single"
    needs_process_group: ClassVar[bool] = False

    @classmethod
    def validate(cls, cfg: Config, world_size: int) -> None:
        if world_size > 1:
            raise ConfigError(
                f"engine: single trains in one process but this job runs {world_size} (WORLD_SIZE); "
                "use engine: auto, ddp, fsdp2 or deepspeed"
            )
