"""`tunesmith data inspect CONFIG|FILE`: what is in a dataset before any training is spent on it.

Per file: rows (read as the config stage's examples: conversations, preference pairs, feedback or raw-text
documents, see :mod:`.inspect_stages`), the detected format, and *every* malformed row with its location (``file:line N`` for JSON lines
and pretty-printed JSON lists, ``row N`` for CSV / parquet) — preprocessing stops at the first one, inspect lists
them all. With a tokenizer (the config's model, or ``--model`` for a bare file): token-length percentiles of the
untruncated samples, a histogram PNG, how many samples ``cutoff_len`` truncates or drops, and the packing
efficiency — the fraction of non-pad tokens in the batches the loader would build at the configured batch size,
one sample per row versus packed rows (:mod:`tunesmith.data.pack`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.config import Config
from tunesmith.config.load import check_output_folder
from tunesmith.config.schema import DataArgs
from tunesmith.data.conversation import Conversation
from tunesmith.data.formats import FormatSpec, RowError
from tunesmith.data.inspect_stages import (
    CONVERSATIONS,
    DOCUMENTS,
    RowKind,
    length_lines,
    row_kind,
    stage_lengths,
)
from tunesmith.data.sources import DatasetSource, _read_rows, _read_text, read_dataset_info, resolve_source
from tunesmith.errors import DataError

_HUGE = 1 << 40  # a cutoff nothing reaches: the untruncated lengths


@dataclass
class FileReport:
    path: Path
    rows: int = 0
    formatting: str | None = None
    problems: list[tuple[str, str]] = field(default_factory=list)  # (location, problem)
    examples: list[Any] = field(default_factory=list)  # conversations, pairs, feedback or documents
    kind: RowKind = CONVERSATIONS


def json_list_lines(text: str) -> list[int]:
    """Line number where each element of a top-level JSON list starts (for pretty-printed .json files)."""
    decoder = json.JSONDecoder()
    lines: list[int] = []
    at = text.index("[") + 1
    line, counted = 1, 0
    while True:
        while at < len(text) and text[at] in " \t\r\n,":
            at += 1
        if at >= len(text) or text[at] == "]":
            return lines
        line += text.count("\n", counted, at)
        counted = at
        lines.append(line)
        _, at = decoder.raw_decode(text, at)


def _json_list_lines_of(path: Path) -> list[int] | None:
    """Where each row of a pretty-printed .json list starts, or None (another file type, or not parseable)."""
    if path.suffix.lower() != ".json":
        return None
    text = _read_text(path)  # not UTF-8, unreadable: one DataError naming the file
    if not text.lstrip().startswith("["):
        return None
    try:
        return json_list_lines(text)
    except (ValueError, RecursionError):
        return None  # _read_rows reports the syntax error with its line


def inspect_source(source: DatasetSource, stage: str | None = None) -> list[FileReport]:
    """Every row of the source's files read as the stage's examples (see :func:`row_kind`)."""
    reports = []
    for path in source.files:
        report = FileReport(path, kind=row_kind(stage, source.spec))
        spec: FormatSpec | None = source.spec
        lines = _json_list_lines_of(path)
        for index, (where, row, problem) in enumerate(_read_rows(path)):
            report.rows += 1
            if lines is not None and index < len(lines):
                where = f"{path}:line {lines[index]} (row {index + 1})"
            if problem is None and spec is None:
                if stage is None:  # a bare file: its first row says what it holds
                    report.kind = row_kind(None, None, row)
                spec = report.kind.detect(row)
                if spec is None:
                    problem = f"cannot tell the format of these {report.kind.noun} from this row's keys"
            if problem is None and spec is not None:
                try:
                    report.examples.append(report.kind.convert(row, spec, where))
                except RowError as err:
                    problem = str(err)
            if problem is not None:
                report.problems.append((where, problem))
        report.formatting = spec.formatting if spec else None
        reports.append(report)
    return reports


def sources_for(target: str, data: DataArgs | None) -> list[DatasetSource]:
    if data is None:
        path = Path(target)
        if not path.is_file():
            raise DataError(f"{target} is neither a YAML config nor a data file")
        return [DatasetSource(path.name, [path], None)]
    dataset_dir = Path(data.dataset_dir).expanduser()
    info = read_dataset_info(dataset_dir)
    return [resolve_source(name, dataset_dir, info) for name in data.dataset or []]


def fill_rate(lengths: list[int], batch_size: int, order: list[int]) -> float:
    """Non-pad fraction of right-padded batches of ``batch_size`` taken in ``order``."""
    real = padded = 0
    for start in range(0, len(order), batch_size):
        group = [lengths[i] for i in order[start : start + batch_size]]
        real += sum(group)
        padded += max(group) * len(group)
    return real / max(padded, 1)


def token_stats(convs: list[Conversation], tokenizer: Any, cfg: Config) -> dict[str, Any]:
    """Lengths before truncation, truncated / dropped counts at cutoff_len, and the packing efficiency."""
    import torch

    from tunesmith.data.encode import encode_dataset, percentiles
    from tunesmith.data.pack import balanced_groups
    from tunesmith.data.templates import get_template

    template = get_template(cfg.template, tokenizer)
    untruncated = _with(cfg, cutoff_len=_HUGE, skip_bad_rows=True)
    full = [len(s.input_ids) for s in encode_dataset(convs, tokenizer, template, untruncated)[0]]
    truncated = sum(n > cfg.cutoff_len for n in full)
    kept, report = encode_dataset(convs, tokenizer, template, _with(cfg, skip_bad_rows=True))
    lengths = [len(s.input_ids) for s in kept]
    batch = cfg.per_device_train_batch_size
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    rows = [sum(lengths[i] for i in g) for g in balanced_groups(lengths, cfg.cutoff_len)] if lengths else []
    row_order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    return {
        "lengths": full,
        "percentiles": percentiles(full),
        "truncated": truncated,
        "dropped": report.dropped,
        "samples": len(lengths),
        "unpacked_fill": fill_rate(lengths, batch, order) if lengths else 0.0,
        "packed_rows": len(rows),
        "packed_fill": fill_rate(rows, batch, row_order) if rows else 0.0,
        "batch_size": batch,
        "cutoff_len": cfg.cutoff_len,
    }


def _with(cfg: Config, **changes: Any) -> Config:
    return cfg.model_copy(update=changes)


def plot_histogram(lengths: list[int], cutoff_len: int, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display needed: inspect runs on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(lengths, bins=min(50, max(5, len(set(lengths)))), color="#4878cf")
    ax.axvline(cutoff_len, color="#d65f5f", linestyle="--", label=f"cutoff_len={cutoff_len}")
    ax.set_xlabel("tokens per sample (before truncation)")
    ax.set_ylabel("samples")
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def inspect(target: str, cfg: Config | None, tokenizer: Any | None, plot: Path | None) -> tuple[str, int]:
    """The printed report and the number of malformed rows found."""
    out: list[str] = []
    examples: list[Any] = []
    kind = CONVERSATIONS
    bad = 0
    stage = cfg.stage if cfg is not None and Path(target).suffix.lower() in (".yaml", ".yml") else None
    for source in sources_for(target, cfg):
        for report in inspect_source(source, stage):
            examples += report.examples
            kind = report.kind
            bad += len(report.problems)
            holds = "" if report.kind is CONVERSATIONS else f" ({report.kind.noun})"
            formatting = report.formatting or "unknown"
            if report.kind is DOCUMENTS and formatting == "alpaca":
                formatting = "raw text"  # a text column, or the lines of a .txt file
            out.append(
                f"{report.path}: {report.rows} rows, format {formatting}{holds}, "
                f"{len(report.problems)} malformed"
            )
            out += [f"  {where}: {problem}" for where, problem in report.problems]
    if tokenizer is None or cfg is None:
        out.append("token stats skipped: give a config, or --model for a bare file, to count tokens")
        return "\n".join(out), bad
    if not examples:
        out.append(f"no valid {kind.noun}: nothing to count")
        return "\n".join(out), bad
    if plot is not None and plot.is_dir():  # checked before counting: where the histogram goes must work
        raise DataError(f"--plot {plot} is a folder; give the PNG file to write, such as {plot / 'token_lengths.png'}")
    if plot is not None and not plot.is_file():  # an earlier histogram may be replaced
        check_output_folder("--plot", plot, DataError)
    if kind is not CONVERSATIONS:
        lengths = stage_lengths(kind, examples, tokenizer, cfg)
        out += length_lines(kind, lengths, cfg)
        if plot is not None:
            out.append(f"histogram: {plot_histogram(lengths.lengths, cfg.cutoff_len, plot)}")
        return "\n".join(out), bad + len(lengths.long_prompts)
    stats = token_stats(examples, tokenizer, cfg)
    p = stats["percentiles"]
    out.append(
        f"tokens per sample (template {cfg.template}, before truncation): p50={p['p50']} p90={p['p90']} "
        f"p99={p['p99']} max={p['max']}"
    )
    out.append(
        f"cutoff_len={stats['cutoff_len']}: {stats['truncated']} of {len(stats['lengths'])} samples truncated, "
        f"{stats['dropped']} dropped (no reply token fits)"
    )
    out.append(
        f"batch size {stats['batch_size']}: {stats['unpacked_fill']:.1%} of the tokens are real (not padding) "
        f"unpacked ({stats['samples']} rows), {stats['packed_fill']:.1%} with packing: true "
        f"({stats['packed_rows']} rows)"
    )
    if plot is not None:
        out.append(f"histogram: {plot_histogram(stats['lengths'], cfg.cutoff_len, plot)}")
    return "\n".join(out), bad
