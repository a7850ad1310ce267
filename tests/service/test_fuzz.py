"""Bounded fuzzing in CI: atheris on the decoder, and a property test of the batcher's bookkeeping."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
from collections.abc import Sequence

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.batcher import Batcher, BatcherStopped, BatchFailed, DeadlineExceeded, QueueFull
from tests.support import REPO, FakeClock, settle


def test_atheris_fuzzes_the_decoder() -> None:
    import atheris  # noqa: F401 - a dev dependency: missing, this fails instead of skipping

    # the run count the fuzzer's own usage says CI runs
    runs = int(re.search(r"-runs=(\d+) +# what CI runs", (REPO / "fuzz" / "fuzz_decode.py").read_text()).group(1))  # type: ignore[union-attr]
    r = subprocess.run([sys.executable, "fuzz/fuzz_decode.py", f"-runs={runs}", "-rss_limit_mb=2048", "-seed=20261202",
                        "-artifact_prefix=/tmp/imgserve-fuzz-"], cwd=REPO, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"Done {runs} runs" in r.stderr


class Model:
    """Returns (item, 'ok'); fails on items divisible by 7; can be slow."""

    def __init__(self, max_batch: int) -> None:
        self.max_batch = max_batch
        self.batches: list[list[int]] = []
        self.slow = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, items: list[int]) -> Sequence[tuple[int, str]]:
        with self.lock:
            self.batches.append(list(items))
        if self.slow.is_set():
            self.slow.wait(0.002)
        if any(i % 7 == 0 for i in items):
            raise ValueError("model error")
        return [(i, "ok") for i in items]


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("submit"), st.integers(1, 5), st.sampled_from([None, 0.001, 0.02, 1.0])),
        st.tuples(st.just("cancel"), st.integers(0, 50), st.none()),
        st.tuples(st.just("advance"), st.sampled_from([0.0005, 0.002, 0.01]), st.none()),
        st.tuples(st.just("slow"), st.booleans(), st.none()),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS, st.integers(1, 6), st.integers(4, 20), st.integers(1, 3))
def test_batcher_property_every_caller_one_answer(ops: list[tuple[str, object, object]], max_batch: int,
                                                 max_queue: int, in_flight: int) -> None:
    asyncio.run(_program(ops, max_batch, max_queue, in_flight))


async def _program(ops: list[tuple[str, object, object]], max_batch: int, max_queue: int, in_flight: int) -> None:
    clock = FakeClock()
    model = Model(max_batch)
    b: Batcher[int, tuple[int, str]] = Batcher(model, max_batch_size=max_batch, max_delay_s=0.005,
                                               max_queue_rows=max_queue, clock=clock, batches_in_flight=in_flight)
    b.start()
    futures: list[tuple[int, asyncio.Future[object]]] = []
    counter = 1
    for op, a, c in ops:
        if op == "submit":
            items = list(range(counter, counter + int(a)))  # type: ignore[call-overload]
            counter += int(a)  # type: ignore[call-overload]
            deadline = None if c is None else clock.now() + float(c)  # type: ignore[arg-type]
            queued = b.depth
            try:
                futs = b.submit(items, deadline)
            except QueueFull:
                assert queued + len(items) > max_queue, "refused though the rows fit"
                continue
            assert queued + len(items) <= max_queue, "accepted past the queue bound"
            assert b.depth == queued + len(items), "every accepted row is queued"
            futures.extend(zip(items, futs, strict=True))
        elif op == "cancel" and futures:
            futures[int(a) % len(futures)][1].cancel()  # type: ignore[call-overload]
        elif op == "advance":
            await clock.advance(float(a))  # type: ignore[arg-type]
        elif op == "slow":
            (model.slow.set if a else model.slow.clear)()
        await settle()
    model.slow.clear()
    await clock.advance(10)
    await b.stop(5)
    for item, fut in futures:
        assert fut.done(), "every caller gets an answer"
        if fut.cancelled():
            continue
        exc = fut.exception()
        if exc is None:
            value = fut.result().value  # type: ignore[attr-defined]
            assert value == (item, "ok"), "answers never cross between callers"
        else:
            assert isinstance(exc, BatchFailed | DeadlineExceeded | BatcherStopped), exc
            if isinstance(exc, BatchFailed):
                assert item % 7 == 0, "only the failing row errs"
    assert all(len(batch) <= max_batch for batch in model.batches)
    ran = [i for batch in model.batches for i in batch]
    answered_ok = {i for i, f in futures if not f.cancelled() and f.exception() is None}
    assert answered_ok <= set(ran)
    expired = {i for i, f in futures if not f.cancelled() and isinstance(f.exception(), DeadlineExceeded)}
    assert not expired & set(ran), "an expired row never reaches the model"
