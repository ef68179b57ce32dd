"""The hf and vllm engines run their calls one at a time in a worker thread, and llm.timeout_s limits
a call's own run (serve/engines.py, OneCallAtATime): a call queued behind a long one is not failed by
its wait, and a call that times out keeps the engine until its thread ends. Real threads, real sleeps."""

import asyncio
import threading
import time

import pytest

from sip.serve.engines import OneCallAtATime


class Engine:
    """Work that takes the engine for a while and records when it ran and how many ran at once."""

    def __init__(self):
        self.spans: dict[str, tuple[float, float]] = {}
        self.busy = self.most_at_once = 0
        self.count = threading.Lock()

    def work(self, name: str, seconds: float, error: Exception | None = None) -> str:
        with self.count:
            self.busy += 1
            self.most_at_once = max(self.most_at_once, self.busy)
        start = time.monotonic()
        time.sleep(seconds)
        self.spans[name] = (start, time.monotonic())
        with self.count:
            self.busy -= 1
        if error is not None:
            raise error
        return name


def test_a_call_queued_behind_long_ones_is_timed_from_when_it_gets_the_engine():
    engine, calls = Engine(), OneCallAtATime(timeout_s=2.0)

    async def main():
        return await asyncio.gather(*(calls.run(engine.work, name, 1.2) for name in "abc"))

    # 3.6 s in all, each call 1.2 s of its own: the third waited 2.4 s, past the timeout, and still ran
    assert asyncio.run(main()) == ["a", "b", "c"]
    assert engine.most_at_once == 1


def test_a_call_that_times_out_keeps_the_engine_until_its_thread_ends():
    engine, calls = Engine(), OneCallAtATime(timeout_s=0.5)

    async def main():
        slow = asyncio.ensure_future(calls.run(engine.work, "slow", 1.5))
        await asyncio.sleep(0.05)
        quick = asyncio.ensure_future(calls.run(engine.work, "quick", 0.1))
        with pytest.raises(asyncio.TimeoutError):
            await slow
        assert not quick.done()  # the slow run still holds the engine
        return await quick

    assert asyncio.run(main()) == "quick"
    assert engine.spans["quick"][0] >= engine.spans["slow"][1]
    assert engine.most_at_once == 1


def test_a_failing_run_tells_its_caller_and_frees_the_engine_even_after_its_caller_timed_out():
    engine, calls = Engine(), OneCallAtATime(timeout_s=0.3)

    async def main():
        with pytest.raises(ValueError, match="bad batch"):
            await calls.run(engine.work, "fails", 0.05, ValueError("bad batch"))
        with pytest.raises(asyncio.TimeoutError):
            await calls.run(engine.work, "fails late", 0.6, ValueError("after its caller left"))
        return await calls.run(engine.work, "next", 0.05)

    assert asyncio.run(main()) == "next"
    assert engine.spans["next"][0] >= engine.spans["fails late"][1]
