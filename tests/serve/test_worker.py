"""The generation worker's parts: stop strings split across pieces, the queue limit, cancelled jobs skipped."""

from __future__ import annotations

import asyncio

import pytest

from tunesmith.serve.worker import GenerationJob, GenerationWorker, QueueFull, StopMatcher


def run_matcher(stops: list[str], pieces: list[str]) -> tuple[list[str], bool]:
    matcher = StopMatcher(stops)
    shown = []
    for piece in pieces:
        shown.append(matcher.feed(piece))
        if matcher.stopped:
            break
    shown.append(matcher.flush())
    return [s for s in shown if s], matcher.stopped


def test_stop_string_split_across_pieces_is_never_shown():
    shown, stopped = run_matcher(["</end>"], ["Hello </", "en", "d> ignored"])
    assert shown == ["Hello "] and stopped


def test_held_back_text_is_released_when_it_is_not_a_stop():
    shown, stopped = run_matcher(["</end>"], ["a </", "b", " c"])
    assert "".join(shown) == "a </b c" and not stopped
    assert shown[0] == "a "  # "</" waited until it could no longer start "</end>"


def test_the_earliest_of_several_stops_wins():
    shown, stopped = run_matcher(["xyz", "b"], ["aaxy", "zb"])
    assert "".join(shown) == "aa" and stopped
    assert run_matcher([], ["a", "b"]) == (["a", "b"], False)


def test_queue_limit_and_cancelled_jobs():
    async def scenario() -> None:
        worker = GenerationWorker(model=None, tokenizer=None, template=None, max_queue=2)
        jobs = [GenerationJob([1], 4, 0.0, 1.0, None) for _ in range(2)]
        for job in jobs:
            job.cancel.set()  # both clients already gone: the worker must skip them without generating
            worker.submit(job)  # (before start: the jobs wait until the engine runs)
        with pytest.raises(QueueFull):
            worker.submit(GenerationJob([1], 4, 0.0, 1.0, None))
        await worker.start()
        for job in jobs:
            assert await asyncio.wait_for(job.events.get(), 5) == ("done", "cancelled")
        assert (worker.queued, worker.cancelled, worker.completed) == (0, 2, 0)
        await worker.stop()

    asyncio.run(scenario())
