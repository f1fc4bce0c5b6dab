"""Training: ``train(cfg)`` runs the whole pipeline; ``fit`` is setup → loop → finish on a prepared model."""

from tunesmith.train.loop import TrainResult, fit
from tunesmith.train.pipeline import train
from tunesmith.train.state import TrainState

__all__ = ["TrainResult", "TrainState", "fit", "train"]
