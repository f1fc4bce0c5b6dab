"""``tunesmith data convert CONFIG --to mindrecord --out X.mindrecord``: the config's datasets, read and encoded
exactly as training encodes them (any format, any template, the same label masks and truncation), written as
the MindRecord file MindFormers fine-tunes from.

The layout is that of guide 002's ``qwen1_5_preprocess.py`` (MindFormers ``research/qwen1_5``), so its
``finetune`` YAML reads the file unchanged:

* three int32 columns per row, ``input_ids``, ``target_ids`` and ``attention_mask`` (``--label-column labels``
  names the second ``labels``, as MindFormers' Llama configs list it in ``input_columns``);
* every row is ``seq_length + 1`` tokens long: MindFormers' causal LMs drop the last input token and the first
  label themselves (``input_ids[:, :-1]``, ``labels[:, 1:]``), so ``seq_length`` is the model's ``seq_length``;
* short rows are padded on the right with the tokenizer's pad token; padding has label -100 and attention 0.

Two things differ from the guide's script, both on purpose: the prompt tokens are masked with -100 the way
tunesmith trains (the script trains on the whole chat, prompt included; ``train_on_prompt: true`` gives that),
and a long conversation is truncated by tunesmith's ``cutoff_len`` rules (the reply keeps its tokens) instead
of being cut blindly at ``seq_length + 1``. The attention mask comes from each row's length, never from
comparing ids with the pad token, so a real eos token equal to the pad token keeps attention 1.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tunesmith.config import Config
from tunesmith.config.load import check_output_folder
from tunesmith.data.documents import encode_documents, read_documents
from tunesmith.data.encode import IGNORE_INDEX, EncodeReport, encode_dataset
from tunesmith.data.sources import BadRows, read_conversations
from tunesmith.data.templates import get_template
from tunesmith.errors import ConfigError, DataError

INSTALL = "pip install 'tunesmith[mindspore]'"
LABEL_COLUMNS = ("target_ids", "labels")
_BATCH = 1000  # rows per write_raw_data call: MindRecord pages rows itself, this only bounds memory


@dataclass
class MindrecordReport:
    path: Path
    rows: int
    seq_length: int
    report: EncodeReport
    label_column: str

    def describe(self) -> str:
        r = self.report
        return (
            f"wrote {self.rows} rows of {self.seq_length + 1} tokens (seq_length {self.seq_length} + 1) to {self.path} "
            f"and {self.path}.db: columns input_ids, {self.label_column}, attention_mask (int32); {r.truncated} "
            f"truncated, {r.dropped} dropped (no reply token fits), {r.bad_rows} bad rows skipped"
        )


def import_mindspore(purpose: str = "this command") -> Any:
    """``import mindspore``, leaving the process as it was: MindSpore's import sets process-wide limits for its own
    cluster tools (``csv.field_size_limit`` to 10 MiB, ``sys.setrecursionlimit(10000)``), which would silently
    change how everything else in the process reads CSV files (tunesmith names a cell over the csv module's
    128 KiB limit) and recurses. A missing package is one sentence."""
    import csv
    import sys

    field_limit, recursion_limit = csv.field_size_limit(), sys.getrecursionlimit()
    try:
        import mindspore
        import mindspore.mindrecord  # noqa: F401
    except ImportError:
        raise DataError(f"{purpose} needs MindSpore, which is not installed; install it with {INSTALL}") from None
    finally:
        csv.field_size_limit(field_limit)
        sys.setrecursionlimit(recursion_limit)
    return mindspore


def _file_writer() -> Any:
    return import_mindspore("writing MindRecord").mindrecord.FileWriter


def pad_row(input_ids: Any, labels: Any, length: int, pad_id: int) -> dict[str, np.ndarray]:
    """One sample as the three int32 columns of ``length`` tokens (right padding, label -100, attention 0)."""
    n = len(input_ids)
    ids = np.full(length, pad_id, dtype=np.int32)
    target = np.full(length, IGNORE_INDEX, dtype=np.int32)
    mask = np.zeros(length, dtype=np.int32)
    ids[:n] = np.asarray(input_ids, dtype=np.int32)
    target[:n] = np.asarray(labels, dtype=np.int32)
    mask[:n] = 1
    return {"input_ids": ids, "target_ids": target, "attention_mask": mask}


def encode_for_mindrecord(cfg: Config, tokenizer: Any, seq_length: int) -> tuple[list[Any], EncodeReport]:
    """The config's rows encoded as training encodes them, each at most ``seq_length + 1`` tokens."""
    if cfg.stage not in ("sft", "pt"):
        raise ConfigError(
            f"stage {cfg.stage}: MindRecord conversion writes supervised (sft) or pre-training (pt) rows; "
            "set stage: sft or stage: pt"
        )
    if cfg.packing or cfg.neat_packing:
        raise ConfigError("packing: MindRecord rows are one sample each (guide 002's layout); set packing: false")
    data = cfg.model_copy(update={"cutoff_len": seq_length + 1, "streaming": False})
    bad = BadRows(cfg.skip_bad_rows)
    if cfg.stage == "pt":
        samples, report = encode_documents(read_documents(data, bad), tokenizer, data)
    else:
        samples, report = encode_dataset(read_conversations(data, bad), tokenizer, get_template(cfg.template, tokenizer), data)
    report.bad_rows += bad.count
    if not samples:
        raise DataError(
            f"no rows left from dataset={','.join(cfg.dataset)} ({report.dropped} too long for seq_length "
            f"{seq_length}, {report.bad_rows} bad rows); raise --seq-length or fix the data"
        )
    return samples, report


def _rows(samples: list[Any], length: int, pad_id: int, label_column: str) -> Iterator[dict[str, np.ndarray]]:
    for sample in samples:
        row = pad_row(sample.input_ids, sample.labels, length, pad_id)
        if label_column != "target_ids":
            row[label_column] = row.pop("target_ids")
        yield row


def check_out(out: Path) -> None:
    if out.suffix != ".mindrecord":
        raise DataError(f"--out {out} must end in .mindrecord (MindFormers' dataset_dir names that file)")
    if out.is_dir():
        raise DataError(f"--out {out} is a folder; give the file to write, such as {out / 'train.mindrecord'}")
    check_output_folder("--out", out.parent, DataError)


def write_mindrecord(
    cfg: Config, tokenizer: Any, out: Path, seq_length: int | None = None, label_column: str = "target_ids"
) -> MindrecordReport:
    """Write the config's datasets to ``out`` (+ its ``.db`` index); ``seq_length`` defaults to cutoff_len."""
    if label_column not in LABEL_COLUMNS:
        raise DataError(f"--label-column {label_column}: use one of {', '.join(LABEL_COLUMNS)}")
    seq_length = seq_length or cfg.cutoff_len
    if seq_length < 2:
        raise DataError(f"--seq-length {seq_length} is too short; use the model's seq_length, such as 2048")
    check_out(out)
    FileWriter = _file_writer()
    samples, report = encode_for_mindrecord(cfg, tokenizer, seq_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in (out, Path(f"{out}.db")):  # an earlier output is replaced (MindRecord itself refuses to)
        if stale.is_file():
            os.remove(stale)
    writer = FileWriter(file_name=str(out), shard_num=1)
    schema = {column: {"type": "int32", "shape": [-1]} for column in ("input_ids", label_column, "attention_mask")}
    writer.add_schema(schema, "tunesmith")
    batch: list[dict[str, np.ndarray]] = []
    for row in _rows(samples, seq_length + 1, pad_id or 0, label_column):
        batch.append(row)
        if len(batch) == _BATCH:
            writer.write_raw_data(batch)
            batch = []
    if batch:
        writer.write_raw_data(batch)
    writer.commit()
    return MindrecordReport(out, len(samples), seq_length, report, label_column)
