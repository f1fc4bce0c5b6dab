"""Raw text for continued pre-training (``stage: pt``): rows → documents → token blocks of ``cutoff_len``.

Where a document's text comes from (LLaMA-Factory's schema): the ``prompt`` column of an alpaca entry
(``columns: {prompt: text}``; with an ``input``/``query`` column it is joined after a newline), the first
message of a sharegpt / openai row, the ``text`` column of a file without a dataset_info.json entry, or a line
of a ``.txt`` file. An empty text is a bad row (file:line), as an empty reply is for SFT.

Every document is tokenised as the tokenizer tokenises plain text (its BOS first, where it adds one) and ends
with EOS, and every token is a target. Then:

* ``packing: false`` (LLaMA-Factory's behaviour): the documents are concatenated and cut into blocks of exactly
  ``cutoff_len`` tokens, so a block may hold the end of one document and the start of the next, and attention
  crosses that boundary. Unlike LLaMA-Factory, which drops the remainder of every 1000-row batch, only the
  dataset's last block is shorter, and nothing is dropped.
* ``packing: true`` / ``neat_packing: true``: each document is its own sample (a longer one is cut into pieces
  of ``cutoff_len``), and the training split is packed without cross-document attention
  (:mod:`tunesmith.data.pack`), so the loss equals that of the documents one by one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

from tunesmith.config import Config
from tunesmith.config.schema import DataArgs
from tunesmith.data.encode import Encoded, EncodeReport, TokenIds, percentiles
from tunesmith.data.formats import FormatSpec, RowError, detect_format, require_object, require_string
from tunesmith.data.sources import BadRows, DatasetSource, iter_examples, read_mixed
from tunesmith.errors import DataError
from tunesmith.logging import get_logger

logger = get_logger("data")
_BATCH = 1000  # documents per tokenizer call when the config has no preprocessing_batch_size


@dataclass
class Document:
    text: str
    source: str = ""


def detect_document_format(row: Any) -> FormatSpec | None:
    """A row with a ``text`` column is raw text; otherwise the chat formats' detection (first message)."""
    if isinstance(row, dict) and "text" in row:
        return FormatSpec.build("alpaca", {"prompt": "text"})
    return detect_format(row)


def row_to_document(row: Any, spec: FormatSpec, source: str = "") -> Document:
    """One row's text; raises RowError when there is none."""
    row = require_object(row)
    if spec.formatting == "alpaca":
        column = spec.columns["prompt"]
        if row.get(column) is None:
            raise RowError(f"missing column '{column}'")
        parts = [require_string(row[column], f"column '{column}'")]
        query = spec.columns.get("query")
        if query and row.get(query):
            parts.append(require_string(row[query], f"column '{query}'"))
        text = "\n".join(parts)
    else:
        column = spec.columns["messages"]
        messages = row.get(column)
        if not isinstance(messages, list) or not messages or not isinstance(messages[0], dict):
            raise RowError(f"column '{column}' must be a non-empty list of messages")
        content_key = spec.tags.get("content_tag", "content")
        first = messages[0]
        text = require_string(first.get(content_key, first.get("content")), "message 1 content")
    if not text.strip():
        raise RowError("the text is empty")
    return Document(text, source)


def read_documents(cfg: Config, bad: BadRows) -> Iterator[Document]:
    """The documents of ``cfg.dataset``, lazily, mixed as conversations are (see
    :func:`~tunesmith.data.sources.read_conversations`)."""

    def reader(source: DatasetSource, rows_bad: BadRows) -> Iterator[Document]:
        return iter_examples(source, cfg.max_samples, rows_bad, row_to_document, detect_document_format)

    return read_mixed(cfg, bad, reader, "documents")


def _tokenize(docs: list[Document], tokenizer: Any, bos: list[int], eos: list[int]) -> list[list[int]]:
    encoded = tokenizer([doc.text for doc in docs], add_special_tokens=False)["input_ids"]
    return [bos + ids + eos for ids in encoded]


def _special(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The BOS the tokenizer puts before plain text (none for Qwen), and EOS, which every document ends with."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos token, which pre-training puts between documents; use one that has")
    probe = tokenizer("a")["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id] else []
    return bos, [tokenizer.eos_token_id]


def tokenize_documents(docs: Iterable[Document], tokenizer: Any, batch: int) -> Iterator[list[int]]:
    bos, eos = _special(tokenizer)
    it = iter(docs)
    while chunk := list(islice(it, batch)):
        yield from _tokenize(chunk, tokenizer, bos, eos)


def _blocks(token_lists: Iterable[list[int]], size: int) -> Iterator[list[int]]:
    """Concatenate and cut into blocks of exactly ``size`` (the last one may be shorter)."""
    buffer: list[int] = []
    for ids in token_lists:
        buffer.extend(ids)
        while len(buffer) >= size:
            yield buffer[:size]
            del buffer[:size]
    if len(buffer) > 1:  # a single token predicts nothing
        yield buffer


def _pieces(token_lists: Iterable[list[int]], size: int) -> Iterator[list[int]]:
    """Each document on its own, a longer one cut into pieces of ``size``."""
    for ids in token_lists:
        for start in range(0, len(ids), size):
            piece = ids[start : start + size]
            if len(piece) > 1:
                yield piece


def encode_documents(docs: Iterable[Document], tokenizer: Any, data: DataArgs) -> tuple[list[Encoded], EncodeReport]:
    """Documents → samples whose every token is a target (see the module docstring); the report counts
    samples (blocks or pieces), documents cut across samples as truncated, and the documents' lengths."""
    lengths: list[int] = []

    def counted(token_lists: Iterable[list[int]]) -> Iterator[list[int]]:
        for ids in token_lists:
            lengths.append(len(ids))
            yield ids

    tokens = counted(tokenize_documents(docs, tokenizer, data.preprocessing_batch_size or _BATCH))
    cut = _pieces if data.packing or data.neat_packing else _blocks
    samples = [Encoded(TokenIds(ids), TokenIds(ids)) for ids in cut(tokens, data.cutoff_len)]
    split = sum(1 for n in lengths if n > data.cutoff_len)
    report = EncodeReport(kept=len(samples), dropped=0, truncated=split, bad_rows=0,
                          length_percentiles=percentiles(lengths), cutoff_len=data.cutoff_len)
    logger.info(
        "data: pt: %d documents, %d tokens → %d %s of at most cutoff_len=%d tokens (%d documents longer than "
        "cutoff_len %s)",
        len(lengths), sum(lengths), len(samples), "pieces" if cut is _pieces else "blocks", data.cutoff_len,
        split, "cut into pieces" if cut is _pieces else "span blocks",
    )
    return samples, report
