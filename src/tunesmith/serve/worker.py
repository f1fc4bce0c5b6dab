"""The generation worker: iteration-level (continuous) batching behind a bounded waiting line.

One engine thread owns the model. Each iteration it (1) admits waiting requests while the batch has free slots
(``max_batch_size`` rows in all) and their prompts fit ``prefill_tokens`` (at least one), prefills them together and samples their first token, merging their KV cache
rows into the running batch (tunesmith.serve.batch), then (2) runs one decode step for every running row. A row
whose request is finished (stop token, stop string, max_tokens) or cancelled (its client went away) leaves the
batch at once, so a request that arrives while others are generating starts within one step, not after them.

Every request keeps its own sampling: temperature, top_p and a private torch.Generator seeded from its ``seed``,
its own stop strings and max_tokens. Greedy rows are not affected by their neighbours: in fp32 a batched reply is
token for token the single-request reply (padding is masked; positions are per row).

Adapters: several LoRA adapters share one copy of the base model (PEFT adapters loaded under names). Rows are
grouped by adapter: each adapter (and the base model without adapter) has its own running batch, and an
iteration steps each group in turn after ``activate(adapter)`` switches PEFT's active adapter, so rows of
different adapters never share a forward pass (correct for every adapter kind; the price is one forward per
active adapter per step).

Text reaches each request's asyncio queue through one ``call_soon_threadsafe`` per iteration: ("text", str)
pieces, then exactly one ("done", finish_reason) or ("error", exception).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from tunesmith.logging import get_logger
from tunesmith.model.detokenize import IncrementalDecoder
from tunesmith.model.generate import GenerationStats, Sampler
from tunesmith.serve.batch import DecodeBatch

log = get_logger("serve")


class QueueFull(Exception):
    """More requests are waiting than the server accepts (the client should retry later)."""


@dataclass
class GenerationJob:
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str] = field(default_factory=list)
    adapter: str | None = None  # the PEFT adapter name; None: the base model (or the only model)
    stop_token_ids: set[int] | None = None  # None: the chat template's stop tokens
    cancel: threading.Event = field(default_factory=threading.Event)
    stats: GenerationStats = field(default_factory=GenerationStats)
    finish_reason: str | None = None  # set by the response once the job is done
    events: asyncio.Queue = field(default_factory=asyncio.Queue)


class StopMatcher:
    """Cuts the text at the first stop string, holding back any tail that could still become one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.text = ""
        self.sent = 0
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add generated text; return what can be shown now."""
        self.text += piece
        longest = max((len(s) for s in self.stops), default=0)
        window = max(self.sent - longest, 0)  # a stop cannot start before text already shown, minus its length
        hits = [i for i in (self.text.find(s, window) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._advance(min(hits))
        held = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        return self._advance(len(self.text) - held)

    def flush(self) -> str:
        """At the end: the held-back tail was not a stop after all."""
        return "" if self.stopped else self._advance(len(self.text))

    def _advance(self, end: int) -> str:
        out = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out


@dataclass
class _Row:
    """A request while it is in the batch."""

    job: GenerationJob
    sampler: Sampler
    decoder: IncrementalDecoder
    matcher: StopMatcher
    stops: set[int]
    generated: int = 0
    pending: int = 0  # the last sampled token: the next step's input


def adapter_switch(model: Any) -> Callable[[str | None], AbstractContextManager]:
    """``activate(name)`` for the worker: PEFT's named adapter, or the bare base model for None."""
    if not hasattr(model, "peft_config"):
        return lambda name: nullcontext()

    def activate(name: str | None) -> AbstractContextManager:
        if name is None:
            return model.disable_adapter()
        if model.active_adapter != name:
            model.set_adapter(name)
        return nullcontext()

    return activate


def _deliver(events: list[tuple[GenerationJob, tuple[str, Any]]]) -> None:
    for job, event in events:
        job.events.put_nowait(event)


class GenerationWorker:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        template: Any,
        max_queue: int = 64,
        max_batch_size: int = 16,
        activate: Callable[[str | None], AbstractContextManager] | None = None,
        prefill_tokens: int = 256,
    ) -> None:
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.max_queue, self.max_batch_size = max_queue, max_batch_size
        self.prefill_tokens = prefill_tokens  # prompt tokens admitted per iteration (at least one prompt)
        self.activate = activate or adapter_switch(model)
        self.waiting: deque[GenerationJob] = deque()
        self.cond = threading.Condition()
        self.batches: dict[str | None, DecodeBatch] = {}
        self.running = 0
        self.completed = 0
        self.cancelled = 0
        self.closing = False
        self._outbox: list[tuple[GenerationJob, tuple[str, Any]]] = []  # events of this iteration
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.closing = False
        self.thread = threading.Thread(target=self._run, name="tunesmith-generation-worker", daemon=True)
        self.thread.start()

    async def stop(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        if self.thread is not None:
            await asyncio.to_thread(self.thread.join, 30)
            self.thread = None

    @property
    def queued(self) -> int:
        return len(self.waiting)

    @property
    def busy(self) -> bool:
        return self.running > 0

    def submit(self, job: GenerationJob) -> GenerationJob:
        self.submit_all([job])
        return job

    def submit_all(self, jobs: list[GenerationJob]) -> None:
        """Queue every job or none (a request with n choices); QueueFull when the line is too long."""
        with self.cond:
            if len(self.waiting) + len(jobs) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting")
            self.waiting.extend(jobs)
            self.cond.notify()

    # --- the engine thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while (jobs := self._take()) is not None:
                if jobs:
                    self._admit(jobs)
                    self._flush()
                self._step_all()
                self._flush()
        except Exception:  # noqa: BLE001 - a bug here must not leave clients waiting forever
            log.exception("the generation worker stopped")
            self._fail_everything(RuntimeError("the generation worker stopped"))
            self._flush()

    def _take(self) -> list[GenerationJob] | None:
        """Waiting jobs for the free slots (blocks while there is nothing to do); None once stopping."""
        with self.cond:
            while not self.closing and not self.waiting and self.running == 0:
                self.cond.wait()
            if self.closing:
                return None
            free, budget, taken = self.max_batch_size - self.running, self.prefill_tokens, []
            # A burst is prefilled a few prompts an iteration, with decode steps between: the first prompts'
            # tokens start flowing while the rest wait, instead of everyone waiting for one huge prefill.
            while self.waiting and len(taken) < free and (not taken or len(self.waiting[0].prompt_ids) <= budget):
                budget -= len(self.waiting[0].prompt_ids)
                taken.append(self.waiting.popleft())
            return taken

    def _admit(self, jobs: list[GenerationJob]) -> None:
        groups: dict[str | None, list[_Row]] = {}
        for job in jobs:
            if job.cancel.is_set():  # the client left while waiting
                self.cancelled += 1
                self._emit(job, "done", "cancelled")
                continue
            groups.setdefault(job.adapter, []).append(self._new_row(job))
        for adapter, rows in groups.items():
            batch = self.batches.get(adapter)
            if batch is None:
                batch = self.batches[adapter] = DecodeBatch(self.model, self._pad_id(), self._chat_prefix())
            before = len(batch)
            try:
                with self.activate(adapter):
                    logits = batch.add([row.job.prompt_ids for row in rows], rows)
            except Exception as err:  # noqa: BLE001 - reported to these requests' clients; the server goes on
                log.exception("prefill failed")
                for row in rows:
                    self._emit(row.job, "error", err)
                continue
            self.running += len(rows)
            advanced = [self._advance(row, row_logits) for row, row_logits in zip(rows, logits, strict=True)]
            batch.keep([True] * before + advanced)
            self._count()

    def _step_all(self) -> None:
        for adapter, batch in self.batches.items():
            batch.keep([not row.job.cancel.is_set() or self._finish(row, "cancelled") for row in batch.rows])
            if not batch.rows:
                continue
            try:
                with self.activate(adapter):
                    logits = batch.step([row.pending for row in batch.rows])
            except Exception as err:  # noqa: BLE001 - reported to these requests' clients; the server goes on
                log.exception("generation failed")
                for row in batch.rows:
                    self._emit(row.job, "error", err)
                batch.keep([False] * len(batch))
                continue
            batch.keep([self._advance(row, row_logits) for row, row_logits in zip(batch.rows, logits, strict=True)])
        self._count()

    def _new_row(self, job: GenerationJob) -> _Row:
        job.stats.prompt_tokens, job.stats.completion_tokens = len(job.prompt_ids), 0
        stops = job.stop_token_ids if job.stop_token_ids is not None else self._template_stops()
        return _Row(job, Sampler(self.model, job.temperature, job.top_p, job.seed),
                    IncrementalDecoder(self.tokenizer), StopMatcher(job.stop), stops)

    def _advance(self, row: _Row, logits: Any) -> bool:
        """Sample the row's next token and send its text; False when the row is finished."""
        token = row.sampler(logits)
        row.generated += 1
        if token in row.stops:
            return self._finish(row, "stop")
        row.job.stats.completion_tokens += 1
        piece = row.decoder.add(token)
        shown = row.matcher.feed(piece) if piece else ""
        if shown:
            self._emit(row.job, "text", shown)
        if row.matcher.stopped:
            return self._finish(row, "stop")
        if row.generated >= row.job.max_new_tokens:
            return self._finish(row, "length")
        row.pending = token
        return True

    def _finish(self, row: _Row, reason: str) -> bool:
        row.job.stats.finish_reason = reason
        if reason == "cancelled":
            self.cancelled += 1
        else:
            rest = row.matcher.flush()
            if rest:
                self._emit(row.job, "text", rest)
            self.completed += 1
        self._emit(row.job, "done", reason)
        return False

    def _count(self) -> None:
        self.running = sum(len(batch) for batch in self.batches.values())

    def _emit(self, job: GenerationJob, kind: str, value: Any) -> None:
        self._outbox.append((job, (kind, value)))

    def _flush(self) -> None:
        """Hand the step's events to the event loop in one wake-up (not one per token: with 16 streams the
        wake-ups would keep preempting the CPU threads that run the next step)."""
        if self._outbox:
            assert self.loop is not None
            events, self._outbox = self._outbox, []
            self.loop.call_soon_threadsafe(_deliver, events)

    def _fail_everything(self, err: Exception) -> None:
        with self.cond:
            waiting, self.waiting = list(self.waiting), deque()
        for job in [*waiting, *(row.job for batch in self.batches.values() for row in batch.rows)]:
            self._emit(job, "error", err)
        self.batches.clear()
        self.running = 0

    def _template_stops(self) -> set[int]:
        if not hasattr(self, "_stops"):
            self._stops = set(self.template.stop_token_ids(self.tokenizer))
        return self._stops

    def _chat_prefix(self) -> list[int]:
        """The token ids every chat prompt of the template starts with (those of two different messages share)."""
        try:
            one, two = (self.template.encode_prompt(self.tokenizer, [{"role": "user", "content": text}])
                        for text in ("a", "b"))
        except Exception:  # noqa: BLE001 - no shared prefix is only slower
            return []
        size = next((i for i, (x, y) in enumerate(zip(one, two, strict=False)) if x != y), min(len(one), len(two)))
        return list(one[:size])

    def _pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return int(pad) if pad is not None else 0
