"""TrainState: everything about a run's progress that is not a tensor, saved as ``trainer_state.json``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tunesmith.config import Config
from tunesmith.data.loader import DataPosition

LOG_HISTORY_TAIL = 100

# Config keys whose change makes a checkpoint impossible to load (different trainable weights) ...
SIGNATURE_HARD_KEYS = (
    "finetuning_type",
    "lora_rank",
    "lora_target",
    "freeze_trainable_layers",
    "freeze_trainable_modules",
    "use_dora",  # DoRA adds magnitude vectors: the adapter's weights differ
    "streaming",  # a stream position and an epoch position cannot stand in for each other
    # LLaMA-Factory's other adapters and optimizers: their weights or optimizer state have another shape
    "oft_rank",
    "oft_block_size",
    "oft_target",
    "pissa_init",
    "use_llama_pro",
    "optim",
    "use_galore",
    "use_apollo",
    "use_badam",
    "use_adam_mini",
    "use_muon",
    "galore_layerwise",
    "apollo_layerwise",
)
# ... and keys whose change still loads but no longer reproduces the interrupted run (warned about).
SIGNATURE_SOFT_KEYS = (
    "model_name_or_path",
    "adapter_name_or_path",
    "lora_alpha",
    "use_rslora",
    "quantization_bit",
    "quantization_type",
    "dataset",
    "seed",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "cutoff_len",
    "template",
    "learning_rate",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "loraplus_lr_ratio",
    "pure_bf16",
    "module_dropout",
    "pissa_iter",
    "pissa_convert",
    "neftune_noise_alpha",
    "use_dft_loss",
    "use_eaft_loss",
    "use_asft_loss",
    "eaft_alpha",
    "asft_alpha",
    # the sample order
    "packing",
    "neat_packing",
    "mix_strategy",
    "interleave_probs",
    "max_samples",
    "val_size",
    "buffer_size",
    "preprocessing_batch_size",
)
# Keys that only shape the order of a stream: recorded as None without streaming, so changing them then is silent.
STREAM_ONLY_KEYS = ("buffer_size", "preprocessing_batch_size")


def run_signature(cfg: Config) -> dict[str, Any]:
    """The config values a checkpoint depends on (compared on resume)."""
    keys = SIGNATURE_HARD_KEYS + SIGNATURE_SOFT_KEYS
    signature = {key: getattr(cfg, key) for key in keys}
    if not cfg.streaming:
        signature.update(dict.fromkeys(STREAM_ONLY_KEYS))
    return signature


@dataclass
class TrainState:
    """Progress of a run. The data position is ``(epoch, sample_index)``: how many samples of epoch ``epoch``'s
    permutation are consumed, counted in the global order shared by all ranks, so it means the same on any number
    of ranks. ``batch_index`` / ``batches_per_epoch`` count micro-batch rounds (``per_device_train_batch_size ×
    world_size`` samples) for display (``epoch_float``); checkpoints written before ``sample_index`` existed
    (single process) hold only ``batch_index``, see :meth:`samples_consumed`. With ``streaming: true``, ``epoch``
    is the pass over the stream and ``(stream_rows, stream_skip)`` its cursor (:mod:`tunesmith.data.stream`).
    """

    global_step: int = 0
    total_steps: int = 0
    epoch: int = 0
    batch_index: int = 0
    batches_per_epoch: int = 0
    sample_index: int | None = None
    samples_per_epoch: int = 0
    world_size: int = 1
    global_batch_size: int = 0
    stream_rows: int = 0
    stream_skip: int = 0
    last_loss: float | None = None
    best_loss: float | None = None
    last_eval_loss: float | None = None
    best_eval_loss: float | None = None
    # The current logging interval (steps since the last log line), kept so a resumed run logs the same numbers.
    interval_loss_sum: float = 0.0
    interval_steps: int = 0
    log_history: list[dict[str, Any]] = field(default_factory=list)
    signature: dict[str, Any] = field(default_factory=dict)

    @property
    def epoch_float(self) -> float:
        """Epochs done, as a float (2.5 = halfway through the third epoch)."""
        if self.batches_per_epoch <= 0:
            return float(self.epoch)
        return self.epoch + self.batch_index / self.batches_per_epoch

    def samples_consumed(self) -> int:
        """``sample_index``, or for an older checkpoint its micro-batches × the batch size it was trained with."""
        if self.sample_index is not None:
            return self.sample_index
        batch_size = int(self.signature.get("per_device_train_batch_size") or 1)
        consumed = self.batch_index * batch_size
        return min(consumed, self.samples_per_epoch) if self.samples_per_epoch else consumed

    def position(self) -> DataPosition:
        return DataPosition(self.epoch, self.samples_consumed(), self.stream_rows, self.stream_skip)

    def move_to(self, position: DataPosition, per_round: int) -> None:
        """Record the data position after a step; ``per_round`` samples make one micro-batch round."""
        self.epoch, self.sample_index = position.epoch, position.samples
        self.stream_rows, self.stream_skip = position.stream_rows, position.stream_skip
        self.batch_index = -(-position.samples // per_round)

    def advance(self, position: DataPosition, per_round: int, loss: float) -> None:
        """Count one optimizer step that ended at ``position`` with mean token loss ``loss``."""
        self.global_step += 1
        self.move_to(position, per_round)
        self.last_loss = loss
        self.best_loss = loss if self.best_loss is None else min(self.best_loss, loss)
        self.interval_loss_sum += loss
        self.interval_steps += 1

    def record(self, entry: dict[str, Any]) -> None:
        self.log_history.append(entry)
        del self.log_history[:-LOG_HISTORY_TAIL]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["epoch_float"] = round(self.epoch_float, 6)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> TrainState:
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
