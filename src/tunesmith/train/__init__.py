"""Training: ``train(cfg)`` runs the whole pipeline; ``fit`` is the loop on an already prepared model."""

from tunesmith.train.loop import SingleDeviceEngine, TrainResult, fit, train
from tunesmith.train.state import TrainState

__all__ = ["SingleDeviceEngine", "TrainResult", "TrainState", "fit", "train"]
