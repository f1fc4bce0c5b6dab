"""One logger for the whole package; only rank 0 prints in distributed runs."""

from __future__ import annotations

import logging
import os
import sys

LOGGER_NAME = "tunesmith"


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def get_logger(name: str | None = None) -> logging.Logger:
    """Return the package logger (or a child of it, ``tunesmith.<name>``)."""
    return logging.getLogger(LOGGER_NAME if not name else f"{LOGGER_NAME}.{name}")


# torch's pytree warns at import time when torchao (installed for GPTQ export) registers an Enum the new way or the
# old; nothing a tunesmith user can act on
_QUIET_LOGGERS = ("torch.utils._pytree",)


def setup_logging(verbose: bool = False) -> None:
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    logger = logging.getLogger(LOGGER_NAME)
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[tunesmith] %(message)s"))
    logger.addHandler(handler)
    level = logging.DEBUG if verbose else logging.INFO
    logger.setLevel(level if is_main_process() else logging.WARNING)
    logger.propagate = False
