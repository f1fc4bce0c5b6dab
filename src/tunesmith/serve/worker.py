"""One generation worker behind an asyncio queue: requests wait their turn, every client is answered.

On a CPU one generation at a time uses the cores fully (a second concurrent one would only slow both down and
double the memory), so the server queues requests instead of running them side by side. The worker takes the
next job from the queue and runs its token loop in a thread, so the event loop keeps accepting requests and
streaming other output. Text reaches the job's own asyncio queue through ``call_soon_threadsafe``.

A job whose client has gone (``job.cancel`` set) is skipped if still queued, and stops before its next token
if running, so the slot frees at once.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

from tunesmith.logging import get_logger
from tunesmith.model.generate import GenerationStats, generate_stream

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
    cancel: threading.Event = field(default_factory=threading.Event)
    stats: GenerationStats = field(default_factory=GenerationStats)
    finish_reason: str | None = None  # set by the response once the job is done
    # ("text", str) pieces, then exactly one ("done", finish_reason) or ("error", exception)
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


class GenerationWorker:
    def __init__(self, model: Any, tokenizer: Any, template: Any, max_queue: int = 64) -> None:
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.max_queue = max_queue
        self.queue: asyncio.Queue[GenerationJob] | None = None
        self.task: asyncio.Task | None = None
        self.busy = False
        self.completed = 0
        self.cancelled = 0

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._run(), name="tunesmith-generation-worker")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
            self.task = None

    @property
    def queued(self) -> int:
        return self.queue.qsize() if self.queue is not None else 0

    def submit(self, job: GenerationJob) -> GenerationJob:
        if self.queue is None:
            raise RuntimeError("GenerationWorker.start() was not awaited")
        if self.queued >= self.max_queue:
            raise QueueFull(f"{self.queued} requests are already waiting")
        self.queue.put_nowait(job)
        return job

    async def _run(self) -> None:
        assert self.queue is not None
        loop = asyncio.get_running_loop()
        while True:
            job = await self.queue.get()
            if job.cancel.is_set():  # the client left while waiting
                self.cancelled += 1
                job.events.put_nowait(("done", "cancelled"))
                continue
            self.busy = True
            try:
                # The thread is awaited even if this task is cancelled (server shutdown): set the flag so it ends.
                await asyncio.shield(asyncio.to_thread(self._generate, job, loop))
            except asyncio.CancelledError:
                job.cancel.set()
                raise
            finally:
                self.busy = False

    def _generate(self, job: GenerationJob, loop: asyncio.AbstractEventLoop) -> None:
        """The token loop, in a worker thread; every event goes back to the event loop thread."""

        def emit(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(job.events.put_nowait, (kind, value))

        matcher = StopMatcher(job.stop)
        stream = generate_stream(
            self.model,
            self.tokenizer,
            self.template,
            [],
            max_new_tokens=job.max_new_tokens,
            temperature=job.temperature,
            top_p=job.top_p,
            seed=job.seed,
            prompt_ids=job.prompt_ids,
            stats=job.stats,
            cancel=job.cancel,
        )
        try:
            for piece in stream:
                shown = matcher.feed(piece)
                if shown:
                    emit("text", shown)
                if matcher.stopped:
                    break
            stream.close()  # a stop string ended it early: release the KV cache now
            rest = matcher.flush()
            if rest:
                emit("text", rest)
        except Exception as err:  # noqa: BLE001 - reported to this request's client; the server goes on
            log.exception("generation failed")
            emit("error", err)
            return
        reason = "stop" if matcher.stopped else job.stats.finish_reason
        if reason == "cancelled":
            self.cancelled += 1
        else:
            self.completed += 1
        emit("done", reason)
