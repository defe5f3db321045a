"""The serving batcher: batches formed when the model is free, bounded, failures per batch."""

import asyncio

import pytest

from ldmflow.serving.batcher import Batcher


class Model:
    """A fake model's batch call: records each batch, takes ``seconds``, fails on "boom"."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds, self.batches = seconds, []

    async def __call__(self, items):
        self.batches.append(list(items))
        await asyncio.sleep(self.seconds)
        if "boom" in items:
            raise RuntimeError("the model failed")
        return [f"result {item}" for item in items]


def test_requests_that_queue_while_a_batch_runs_make_the_next_batch_whole():
    async def scenario():
        model = Model(seconds=0.3)
        batcher = Batcher(model, max_batch_size=16, wait_s=0.01)
        first = asyncio.create_task(batcher(0))
        await asyncio.sleep(0.1)  # the first batch is running: these nine queue meanwhile
        rest = [asyncio.create_task(batcher(i)) for i in range(1, 10)]
        results = await asyncio.gather(first, *rest)
        return model.batches, results

    batches, results = asyncio.run(scenario())
    assert batches == [[0], list(range(1, 10))]
    assert results == [f"result {i}" for i in range(10)]


def test_batches_stop_at_the_maximum_and_keep_arrival_order():
    async def scenario():
        model = Model(seconds=0.05)
        batcher = Batcher(model, max_batch_size=8, wait_s=0.01)
        results = await asyncio.gather(*(batcher(i) for i in range(20)))
        return model.batches, results

    batches, results = asyncio.run(scenario())
    assert [len(b) for b in batches] == [8, 8, 4] and sum(batches, []) == list(range(20))
    assert results == [f"result {i}" for i in range(20)]


def test_a_failed_batch_fails_its_requests_and_the_next_batch_runs():
    async def scenario():
        model = Model(seconds=0.05)
        batcher = Batcher(model, max_batch_size=4, wait_s=0.01)
        failed = await asyncio.gather(batcher("boom"), batcher("x"), return_exceptions=True)
        return failed, await batcher("y")

    failed, after = asyncio.run(scenario())
    assert all(isinstance(outcome, RuntimeError) and "model failed" in str(outcome) for outcome in failed)
    assert after == "result y"


def test_a_request_whose_caller_left_is_not_run():
    async def scenario():
        model = Model(seconds=0.2)
        batcher = Batcher(model, max_batch_size=8, wait_s=0.01)
        running = asyncio.create_task(batcher("a"))
        await asyncio.sleep(0.05)
        gone = asyncio.create_task(batcher("gone"))
        kept = asyncio.create_task(batcher("kept"))
        await asyncio.sleep(0.01)
        gone.cancel()
        await asyncio.gather(running, kept)
        with pytest.raises(asyncio.CancelledError):
            await gone
        return model.batches

    assert asyncio.run(scenario()) == [["a"], ["kept"]]
