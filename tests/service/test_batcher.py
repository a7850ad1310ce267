"""The batcher's semantics, proven with a fake model and a clock the test controls (no sleeps)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from service.batcher import Batcher, BatcherStopped, BatchFailed, DeadlineExceeded, QueueFull
from tests.support import FakeClock, eventually, settle


class RecordingModel:
    """Doubles its inputs; records every batch; can be made to fail on given items or to block."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.fail_on: set[int] = set()
        self.gate: threading.Event | None = None

    def __call__(self, items: list[int]) -> Sequence[int]:
        self.batches.append(list(items))
        if self.gate is not None:
            self.gate.wait(5)
        if self.fail_on & set(items):
            raise ValueError(f"bad item among {items}")
        return [2 * x for x in items]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def model() -> RecordingModel:
    return RecordingModel()


def make(model: RecordingModel, clock: FakeClock, **kw: object) -> Batcher[int, int]:
    args = {"max_batch_size": 4, "max_delay_s": 0.010, "max_queue_rows": 16, **kw}
    b: Batcher[int, int] = Batcher(model, clock=clock, **args)  # type: ignore[arg-type]
    b.start()
    return b


async def wait_done(futs: list[asyncio.Future[object]], timeout: float = 2.0) -> None:
    await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), timeout)


async def test_flushes_when_full_without_waiting(model: RecordingModel, clock: FakeClock) -> None:
    b = make(model, clock, max_delay_s=1000.0)
    futs = b.submit([1, 2, 3, 4])
    await wait_done(futs)  # the clock never moved: only the size can have closed the batch
    assert model.batches == [[1, 2, 3, 4]]
    assert [f.result().value for f in futs] == [2, 4, 6, 8]
    assert {f.result().batch_size for f in futs} == {4}
    await b.stop(1)


async def test_waits_for_delay_counted_from_oldest_row(model: RecordingModel, clock: FakeClock) -> None:
    b = make(model, clock, max_delay_s=0.010)
    first = b.submit([1])
    await clock.advance(0.006)
    second = b.submit([2])
    await settle()
    assert model.batches == []  # 6 ms of 10: still open
    await clock.advance(0.003)
    assert model.batches == []  # 9 ms
    await clock.advance(0.001)  # the oldest row has waited 10 ms; the newer one only 4 ms
    await wait_done(first + second)
    assert model.batches == [[1, 2]]
    assert first[0].result().queue_s == pytest.approx(0.010)
    assert second[0].result().queue_s == pytest.approx(0.004)
    await b.stop(1)


async def test_rows_accumulate_while_model_is_busy(model: RecordingModel, clock: FakeClock) -> None:
    b = make(model, clock, max_batch_size=8, max_delay_s=0.005, single_run_s=0.001)  # cheap beside the delay
    model.gate = threading.Event()
    f1 = b.submit([1])
    await clock.advance(0.005)
    await eventually(lambda: model.batches, what="the first batch inside the model, blocked on the gate")
    assert model.batches == [[1]]
    later = b.submit([2, 3]) + b.submit([4])
    await clock.advance(0.010)  # they are overdue, yet the busy model keeps them queued
    assert b.depth == 3
    model.gate.set()
    model.gate = None
    await wait_done(f1 + later)
    assert model.batches == [[1], [2, 3, 4]]
    await b.stop(1)


async def test_a_failing_row_fails_alone(model: RecordingModel, clock: FakeClock) -> None:
    b = make(model, clock, max_batch_size=4)
    model.fail_on = {3}
    futs = b.submit([1, 2, 3, 4])
    await wait_done(futs)
    assert [f.result().value for i, f in enumerate(futs) if i != 2] == [2, 4, 8]
    assert isinstance(futs[2].exception(), BatchFailed)
    assert model.batches[0] == [1, 2, 3, 4]  # then halves, then the failing quarter alone
    again = b.submit([5])  # the loop still runs
    await clock.advance(0.02)
    await wait_done(again)
    assert again[0].result().value == 10
    await b.stop(1)


async def test_cancelled_callers_are_skipped(model: RecordingModel, clock: FakeClock) -> None:
    b = make(model, clock)
    futs = b.submit([1, 2, 3])
    futs[1].cancel()
    await clock.advance(0.02)
    await wait_done([futs[0], futs[2]])
    assert model.batches == [[1, 3]]
    await b.stop(1)


async def test_expired_rows_never_reach_the_model(model: RecordingModel, clock: FakeClock) -> None:
    b = make(model, clock, max_delay_s=0.010)
    expiring = b.submit([1], deadline=0.005)
    keeping = b.submit([2], deadline=1.0)
    await clock.advance(0.010)
    await wait_done(expiring + keeping)
    assert isinstance(expiring[0].exception(), DeadlineExceeded)
    assert keeping[0].result().value == 4
    assert model.batches == [[2]]
    await b.stop(1)


async def test_queue_full_refuses_whole_request(model: RecordingModel, clock: FakeClock) -> None:
    b = make(model, clock, max_queue_rows=5, max_delay_s=1000.0, max_batch_size=100)
    b.submit([1, 2, 3])
    with pytest.raises(QueueFull):
        b.submit([4, 5, 6])
    assert b.depth == 3  # all or nothing
    b.submit([4, 5])
    await b.stop(1)


async def test_stop_drains_queued_rows_then_refuses(model: RecordingModel, clock: FakeClock) -> None:
    b = make(model, clock, max_delay_s=1000.0)
    futs = b.submit([1, 2])
    await b.stop(1)
    assert [f.result().value for f in futs] == [2, 4]
    assert model.batches == [[1, 2]]
    with pytest.raises(BatcherStopped):
        b.submit([3])


async def test_batches_never_exceed_the_bound(model: RecordingModel, clock: FakeClock) -> None:
    b = make(model, clock, max_batch_size=3, max_delay_s=0.001)
    futs = b.submit(list(range(10)))
    await clock.advance(0.002)
    await wait_done(futs)
    assert all(len(batch) <= 3 for batch in model.batches)
    assert sorted(x for batch in model.batches for x in batch) == list(range(10))
    assert [f.result().value for f in futs] == [2 * x for x in range(10)]
    await b.stop(1)


async def test_wrong_number_of_outputs_is_an_error(clock: FakeClock) -> None:
    b: Batcher[int, int] = Batcher(lambda items: [0], max_batch_size=2, max_delay_s=0.0, max_queue_rows=4,
                                   clock=clock)
    b.start()
    futs = b.submit([1, 2])
    await wait_done(futs)
    # the pair fails as a whole; each row alone then gets exactly one output
    assert [f.result().value for f in futs] == [0, 0]
    await b.stop(1)


async def test_idle_flush_when_no_rows_are_on_their_way(model: RecordingModel, clock: FakeClock) -> None:
    b = make(model, clock, max_delay_s=1000.0)
    b.flush_when_idle = True
    with b.incoming():
        first = b.submit([1])
        with b.incoming():
            await settle()
            assert model.batches == []  # another request is still decoding: wait for it
            second = b.submit([2])
        await settle()
        assert model.batches == []  # the outer request is still on its way
    await wait_done(first + second)  # nobody else is coming: no need to wait out the delay
    assert model.batches == [[1, 2]]
    await b.stop(1)


async def test_two_batches_in_flight_run_at_once_and_no_more(model: RecordingModel, clock: FakeClock) -> None:
    b2: Batcher[int, int] = Batcher(model, clock=clock, max_batch_size=2, max_delay_s=0.0, max_queue_rows=16,
                                    batches_in_flight=2)
    b2.start()
    model.gate = threading.Event()
    futs = b2.submit([1, 2]) + b2.submit([3, 4]) + b2.submit([5, 6])
    await eventually(lambda: len(model.batches) == 2)  # both slots busy, each in its own thread
    await settle()  # the batcher decides on the event loop: a third batch would be counted in running_rows
    assert model.batches == [[1, 2], [3, 4]]  # the third batch waits for a free slot
    assert b2.running_rows == 4 and b2.depth == 2
    model.gate.set()
    await wait_done(futs)
    assert model.batches == [[1, 2], [3, 4], [5, 6]]
    assert [f.result().value for f in futs] == [2, 4, 6, 8, 10, 12]
    assert b2.running_rows == 0
    await b2.stop(1)


async def test_stop_waits_for_every_batch_in_flight(model: RecordingModel, clock: FakeClock) -> None:
    b: Batcher[int, int] = Batcher(model, clock=clock, max_batch_size=1, max_delay_s=0.0, max_queue_rows=16,
                                   batches_in_flight=2)
    b.start()
    model.gate = threading.Event()
    futs = b.submit([1]) + b.submit([2]) + b.submit([3])
    await eventually(lambda: len(model.batches) == 2)
    stopping = asyncio.ensure_future(b.stop(5))
    await settle()
    assert not stopping.done()  # two rows still inside the model, one queued
    model.gate.set()
    await stopping
    assert [f.result().value for f in futs] == [2, 4, 6]


async def test_idle_flush_waits_for_the_delay_while_another_batch_runs(model: RecordingModel,
                                                                       clock: FakeClock) -> None:
    b: Batcher[int, int] = Batcher(model, clock=clock, max_batch_size=4, max_delay_s=0.010, max_queue_rows=16,
                                   batches_in_flight=2, flush_when_idle=True)
    b.start()
    model.gate = threading.Event()
    first = b.submit([1])  # the model is idle and nothing is coming: runs at once
    await eventually(lambda: len(model.batches) == 1)
    second = b.submit([2])  # a slot is free, but the model is busy: let more rows join, up to the delay
    await settle()
    assert model.batches == [[1]] and b.running_rows == 1 and b.depth == 1  # row 2 waits, not started
    third = b.submit([3])
    await clock.advance(0.010)
    await eventually(lambda: len(model.batches) == 2)
    assert model.batches == [[1], [2, 3]]
    model.gate.set()
    await wait_done(first + second + third)
    await b.stop(1)


async def test_waiting_batch_closes_as_soon_as_the_running_one_ends(model: RecordingModel, clock: FakeClock) -> None:
    b: Batcher[int, int] = Batcher(model, clock=clock, max_batch_size=4, max_delay_s=1000.0, max_queue_rows=16,
                                   batches_in_flight=2, flush_when_idle=True)
    b.start()
    model.gate = threading.Event()
    first = b.submit([1])
    await eventually(lambda: len(model.batches) == 1)
    second = b.submit([2])  # busy model, a 1000 s delay: only the end of the running batch can close it
    await settle()
    assert model.batches == [[1]] and b.running_rows == 1 and b.depth == 1
    model.gate.set()
    await wait_done(first + second)  # the clock never moved
    assert model.batches == [[1], [2]]
    await b.stop(1)


async def test_a_lone_row_runs_inline_only_when_idle_and_cheap(model: RecordingModel, clock: FakeClock) -> None:
    b = make(model, clock, max_delay_s=1000.0, inline_max_s=0.002, single_run_s=0.001)
    thread = threading.get_ident()
    ran_on: list[int] = []
    inner = b._run_batch
    b._run_batch = lambda items: (ran_on.append(threading.get_ident()), inner(items))[1]  # type: ignore[method-assign]
    r = b.run_inline(5)
    assert r is not None and r.value == 10 and r.batch_size == 1 and r.queue_s == 0.0
    assert ran_on == [thread]  # on the caller's thread, not the model executor
    with b.incoming():  # another request decoding: it could join a batch, so queue instead
        assert b.run_inline(6) is None
    queued = b.submit([7])
    assert b.run_inline(8) is None  # a row is queued ahead of it
    await clock.advance(1000.0)
    await wait_done(queued)
    b.single_run_s = 0.005  # the model got slower than the limit: always queue
    assert b.run_inline(9) is None
    assert model.batches == [[5], [7]]
    await b.stop(1)
    b.single_run_s = 0.001
    assert b.run_inline(10) is None  # stopped: no row runs, inline or not


async def test_inline_off_by_default_and_failure_is_the_rows_alone(model: RecordingModel, clock: FakeClock) -> None:
    off = make(model, clock, single_run_s=0.0001)
    assert off.run_inline(1) is None
    await off.stop(1)
    b = make(model, clock, inline_max_s=0.002, single_run_s=0.001)
    model.fail_on = {3}
    with pytest.raises(BatchFailed):
        b.run_inline(3)
    assert b.run_inline(4).value == 8  # type: ignore[union-attr]
    await b.stop(1)


async def test_single_run_time_follows_batches_of_one(model: RecordingModel, clock: FakeClock) -> None:
    b = make(model, clock, max_delay_s=0.0, inline_max_s=0.002)
    assert b.run_inline(1) is None  # never timed: unknown cost, so queue
    await wait_done(b.submit([1]))
    assert b.single_run_s == 0.0  # the fake clock did not move while it ran
    assert b.run_inline(2) is not None
    await b.stop(1)


def costly(model: RecordingModel, clock: FakeClock, **kw: object) -> Batcher[int, int]:
    """A model whose batch of one (50 ms) costs more than the 10-ms delay, as VGG16 on a CPU."""
    return make(model, clock, **{"single_run_s": 0.050, **kw})


async def test_only_a_model_dearer_than_a_nonzero_delay_is_costly(model: RecordingModel, clock: FakeClock) -> None:
    assert costly(model, clock).costly
    assert not costly(model, clock, single_run_s=0.001).costly  # cheaper than the delay
    assert not costly(model, clock, single_run_s=None).costly  # never timed
    assert not costly(model, clock, max_delay_s=0.0).costly  # the operator asked for no waiting


async def test_a_costly_model_counts_the_delay_from_when_it_became_free(model: RecordingModel,
                                                                        clock: FakeClock) -> None:
    b = costly(model, clock)
    model.gate = threading.Event()
    first = b.submit([1])
    await clock.advance(0.010)
    await eventually(lambda: model.batches == [[1]])
    later = b.submit([2, 3])
    await clock.advance(0.020)  # overdue, but the model is busy
    model.gate.set()
    await wait_done(first)
    await settle()
    assert model.batches == [[1]]  # the answer just went out: its caller may come back within the delay
    await clock.advance(0.009)
    assert model.batches == [[1]]
    await clock.advance(0.001)  # the delay, counted from the end of the batch
    await wait_done(later)
    assert model.batches == [[1], [2, 3]]
    await b.stop(1)


async def test_a_costly_model_waits_for_rows_on_their_way_up_to_one_batch_of_one(model: RecordingModel,
                                                                                 clock: FakeClock) -> None:
    b = costly(model, clock)
    with b.incoming():
        first = b.submit([1])
        await clock.advance(0.049)  # far past the delay, but a row is decoding
        assert model.batches == []
        await clock.advance(0.001)  # one batch of one: no longer
        await wait_done(first)
    assert model.batches == [[1]]
    with b.incoming():
        second = b.submit([2])
        await clock.advance(0.020)
        assert model.batches == [[1]]
    await wait_done(second)  # nothing on its way any more and past the delay: at once
    assert model.batches == [[1], [2]]
    await b.stop(1)


async def test_a_costly_partial_batch_does_not_start_beside_a_running_one(model: RecordingModel,
                                                                          clock: FakeClock) -> None:
    b = costly(model, clock, batches_in_flight=2)
    model.gate = threading.Event()
    full = b.submit([1, 2, 3, 4, 5, 6, 7, 8])  # more than a batch: two full ones, which may run side by side
    await eventually(lambda: len(model.batches) == 2)
    assert model.batches == [[1, 2, 3, 4], [5, 6, 7, 8]]
    lone = b.submit([9])
    await clock.advance(1.0)
    await settle()
    assert model.batches == [[1, 2, 3, 4], [5, 6, 7, 8]]  # a slot is free, yet it waits for the cores
    assert b.running_rows == 8 and b.depth == 1
    model.gate.set()
    await wait_done(full)
    await clock.advance(0.010)
    await wait_done(lone)
    assert model.batches[2:] == [[9]]
    await b.stop(1)


async def test_a_costly_model_splits_the_rows_into_two_batches_that_start_together(model: RecordingModel,
                                                                                    clock: FakeClock) -> None:
    b = costly(model, clock, max_batch_size=8, batches_in_flight=2)
    model.gate = threading.Event()
    futs = b.submit([1, 2, 3]) + b.submit([4, 5])
    await clock.advance(0.010)
    await eventually(lambda: len(model.batches) == 2)  # both halves inside the model at once
    assert model.batches == [[1, 2, 3], [4, 5]]
    assert b.running_rows == 5
    model.gate.set()
    await wait_done(futs)
    assert [f.result().value for f in futs] == [2, 4, 6, 8, 10]
    assert [f.result().batch_size for f in futs] == [3, 3, 3, 2, 2]
    one_slot = costly(RecordingModel(), clock, max_batch_size=8)
    assert [f.result().batch_size for f in await _run_all(one_slot, clock, [1, 2, 3, 4, 5])] == [5] * 5
    await b.stop(1)
    await one_slot.stop(1)


async def _run_all(b: Batcher[int, int], clock: FakeClock, items: list[int]) -> list[asyncio.Future[object]]:
    futs = b.submit(items)
    await clock.advance(0.010)
    await wait_done(futs)  # type: ignore[arg-type]
    return futs  # type: ignore[return-value]


async def test_a_costly_model_turns_idle_once_no_answer_went_out_within_the_delay(model: RecordingModel,
                                                                                  clock: FakeClock) -> None:
    b = costly(model, clock, flush_when_idle=True)
    await wait_done(b.submit([1]))  # idle for ever before it: at once, the clock never moved
    assert model.batches == [[1]]
    await settle()
    second = b.submit([2])  # an answer went out just now: another caller may be on its way back
    await clock.advance(0.009)
    assert model.batches == [[1]]
    await clock.advance(0.0011)  # (not 0.001: 0.009 + 0.001 < 0.010 in floating point)
    await wait_done(second)
    assert model.batches == [[1], [2]]
    await b.stop(1)
