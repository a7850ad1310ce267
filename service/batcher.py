"""A dynamic micro-batcher: rows in, batches out. It knows nothing of HTTP, TensorFlow or images.

A batch closes when it holds `max_batch_size` rows or when its oldest row has waited `max_delay_s`.
While the model runs, rows accumulate, so under load batches fill without added delay. With
`flush_when_idle`, callers announce rows that are on their way (`incoming()`, e.g. while a request
decodes); when none are and no batch is running, waiting longer cannot fill the batch and the model
would idle, so it closes at once (reason `idle`). Rows whose
caller went away (future cancelled) or whose deadline passed are dropped before they cost compute;
a batch that raises is split in halves and retried so that only the failing rows err.

With `inline_max_s`, a lone row that finds the batcher idle (nothing queued, running or on its way)
is run at once on the caller's thread by `run_inline` when the model's batch of one has taken at
most that long: for a cheap model the hand-off to the model thread and back costs about as much as
the model, and nothing could have joined the batch (reason `inline`). The pipeline asks
`may_run_inline` first and also requires that no other request be in progress in the process.

`batches_in_flight` batches may run at once (each in its own executor thread). With 2, the next
batch is formed and started while one runs: on a GPU that overlaps host work and transfers with
compute; on a CPU it keeps the shared intra-op thread pool busy while one call waits on a straggler.

A model whose batch of one takes longer than `max_delay_s` (`single_run_s`: VGG16 on a CPU, not a
small model nor most models on a GPU) is batched for efficiency, since waiting a few milliseconds is
small beside its run: a batch of one or two runs it at about 80% of the rate of a batch of eight,
and the answers of a batch bring its callers back over more than the delay. So for such a model:
- the delay counts from when the model became free (the later of the oldest row's arrival and the
  end of the last batch), and while rows are on their way it stretches up to one batch-of-one time;
- a batch that is not full does not start beside a running one (the cores are busy; it waits for
  that batch to end, as with one slot, and takes the rows that arrive meanwhile);
- with two or more slots and nothing running, the rows are split into two halves that start
  together, so that two balanced batches share the cores and end together (reasons as usual).
With a delay of 0 none of this applies: the operator asked for no waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class QueueFull(Exception):
    """The queue cannot take the rows of this request."""


class DeadlineExceeded(Exception):
    """The row's deadline passed before the model ran it."""


class BatcherStopped(Exception):
    """The batcher is stopping or stopped and takes no new rows."""


class BatchFailed(Exception):
    """The model call failed for this row (the cause is chained)."""


class Clock(Protocol):
    def now(self) -> float: ...

    async def wait(self, event: asyncio.Event, timeout: float) -> None:
        """Return when `event` is set or `timeout` seconds of this clock have passed."""


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()

    async def wait(self, event: asyncio.Event, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)


class BatchObserver(Protocol):
    def on_batch(self, size: int, reason: str, queue_waits_s: Sequence[float], run_s: float) -> None: ...

    def on_drop(self, reason: str, count: int) -> None: ...

    def on_depth(self, depth: int) -> None: ...


@dataclass(frozen=True)
class RowResult(Generic[R]):
    value: R
    queue_s: float
    run_s: float
    batch_size: int


@dataclass
class _Row(Generic[T]):
    item: T
    future: asyncio.Future[Any]
    enqueued: float
    deadline: float | None


class Batcher(Generic[T, R]):
    """Batches rows for `run_batch(list[T]) -> Sequence[R]`, a blocking call run in `executor`."""

    def __init__(
        self,
        run_batch: Callable[[list[T]], Sequence[R]],
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_queue_rows: int,
        clock: Clock | None = None,
        executor: Executor | None = None,
        observer: BatchObserver | None = None,
        name: str = "batcher",
        flush_when_idle: bool = False,
        batches_in_flight: int = 1,
        inline_max_s: float = 0.0,
        single_run_s: float | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue_rows < 1 or max_delay_s < 0 or batches_in_flight < 1:
            raise ValueError("max_batch_size, max_queue_rows and batches_in_flight must be >= 1 and "
                             "max_delay_s >= 0")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue_rows = max_queue_rows
        self._clock: Clock = clock or MonotonicClock()
        self._own_executor = executor is None
        self.batches_in_flight = batches_in_flight
        self._executor = executor or ThreadPoolExecutor(batches_in_flight, thread_name_prefix=f"{name}-model")
        self._observer = observer
        self.name = name
        self.flush_when_idle = flush_when_idle
        self._incoming = 0
        self._pending: deque[_Row[T]] = deque()
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self.running_rows = 0
        self._freed_at = float("-inf")  # when the last running batch ended (batcher clock)
        self._rest_of: str | None = None  # the reason of a split batch whose second half closes next
        self.inline_max_s = inline_max_s
        self.single_run_s = single_run_s  # how long a batch of one takes (warm-up, then every such batch)

    @property
    def depth(self) -> int:
        """Rows waiting in the queue (not counting the batch being run)."""
        return len(self._pending)

    @property
    def accepting(self) -> bool:
        return self._task is not None and not self._stopping

    @contextlib.contextmanager
    def incoming(self) -> Iterator[None]:
        """Announce that rows are on their way (submitted before the block ends, or never)."""
        self._incoming += 1
        try:
            yield
        finally:
            self._incoming -= 1
            self._wakeup.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=self.name)

    def submit(self, items: Sequence[T], deadline: float | None = None) -> list[asyncio.Future[RowResult[R]]]:
        """Queue every item as one row; all or none are accepted. Returns one future per row.

        Raises QueueFull when the rows do not fit and BatcherStopped when stopping. `deadline` is a
        time on the batcher's clock after which the rows are not run.
        """
        if not self.accepting:
            raise BatcherStopped(f"{self.name} is not accepting rows")
        if len(self._pending) + len(items) > self.max_queue_rows:
            raise QueueFull(
                f"the queue holds {len(self._pending)} of {self.max_queue_rows} rows; "
                f"{len(items)} more do not fit"
            )
        loop = asyncio.get_running_loop()
        now = self._clock.now()
        futures: list[asyncio.Future[RowResult[R]]] = []
        for item in items:
            fut: asyncio.Future[RowResult[R]] = loop.create_future()
            self._pending.append(_Row(item, fut, now, deadline))
            futures.append(fut)
        self._wakeup.set()
        self._report_depth()
        return futures

    def may_run_inline(self) -> bool:
        """Whether a lone row would run inline now (`run_inline`)."""
        return not (self.inline_max_s <= 0 or self.single_run_s is None or self.single_run_s > self.inline_max_s
                    or self._pending or self.running_rows or self._incoming or not self.accepting)

    def run_inline(self, item: T) -> RowResult[R] | None:
        """Run one row now, on this thread, if the batcher is idle and a batch of one is cheap enough;
        None when it is not (then `submit` it). Raises BatchFailed when the model fails on it. The caller
        checks the deadline: the row runs at once."""
        if not self.may_run_inline():
            return None
        start = self._clock.now()
        try:
            outputs = self._run_batch([item])
            if len(outputs) != 1:
                raise RuntimeError(f"the model returned {len(outputs)} outputs for 1 row")
        except Exception as exc:
            logger.warning("%s: row failed: %s", self.name, exc)
            raise BatchFailed(str(exc)) from exc
        run_s = self._clock.now() - start
        self._note_single(run_s)
        if self._observer is not None:
            self._observer.on_batch(1, "inline", [0.0], run_s)
        return RowResult(outputs[0], 0.0, run_s, 1)

    @property
    def costly(self) -> bool:
        """A batch of one takes longer than the delay: batch for efficiency (module docstring)."""
        return self.max_delay_s > 0 and self.single_run_s is not None and self.single_run_s > self.max_delay_s

    def _note_single(self, run_s: float) -> None:
        prev = self.single_run_s
        self.single_run_s = run_s if prev is None else 0.8 * prev + 0.2 * run_s

    async def stop(self, timeout_s: float | None = None) -> None:
        """Stop taking rows, run the rows already queued (flush reason `drain`), then end the loop."""
        self._stopping = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
            except TimeoutError:
                logger.warning("%s: drain took longer than %.1fs; failing %d queued rows",
                               self.name, timeout_s, len(self._pending))
                self._task.cancel()
        while self._pending:
            row = self._pending.popleft()
            _settle(row.future, exc=BatcherStopped(f"{self.name} stopped before this row ran"))
        if self._own_executor:
            self._executor.shutdown(wait=False)

    async def _loop(self) -> None:
        slots = asyncio.Semaphore(self.batches_in_flight)
        running: set[asyncio.Task[None]] = set()
        try:
            while True:
                await slots.acquire()
                formed = await self._next_batch()
                if formed is None:
                    slots.release()
                    return
                live = self._live(formed[0])
                if not live:
                    slots.release()
                    continue
                self.running_rows += len(live)  # now, not when the task starts: the next batch forms first
                task = asyncio.get_running_loop().create_task(self._run_in_slot(live, formed[1], slots))
                running.add(task)
                task.add_done_callback(running.discard)
        finally:
            if running:
                await asyncio.gather(*running, return_exceptions=True)

    async def _next_batch(self) -> tuple[list[_Row[T]], str] | None:
        """Wait until a batch should close and take its rows; None once stopping with nothing queued."""
        while not self._pending:
            if self._stopping:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()
        oldest = self._pending[0].enqueued
        rest_of, self._rest_of = self._rest_of, None
        while True:
            if rest_of is not None:  # the second half of a split: it starts beside the first
                reason = rest_of
                break
            if len(self._pending) >= self.max_batch_size:
                reason = "full"
                break
            if self._stopping:
                reason = "drain"
                break
            reason, remaining = self._closing(oldest)
            if reason:
                break
            self._wakeup.clear()
            if remaining is None:
                await self._wakeup.wait()
            else:
                await self._clock.wait(self._wakeup, remaining)
        take = min(self.max_batch_size, len(self._pending))
        if (rest_of is None and self.costly and self.batches_in_flight > 1 and not self.running_rows
                and reason != "drain" and 2 <= len(self._pending) <= self.max_batch_size):
            take = (take + 1) // 2
            self._rest_of = reason
        batch = [self._pending.popleft() for _ in range(take)]
        self._report_depth()
        return batch, reason

    def _closing(self, oldest: float) -> tuple[str, float | None]:
        """Why the forming batch closes now ("" if not yet) and else how long to wait (None: until woken)."""
        costly = self.costly
        if costly and self.running_rows:
            return "", None  # the cores are busy: wait for the running batch to end
        now = self._clock.now()
        coming = self._incoming > 0
        # a costly model's delay counts from when it became free: the answers that went out bring rows back
        idle_at = self._freed_at + self.max_delay_s if costly else now
        if self.flush_when_idle and not coming and not self.running_rows and now >= idle_at:
            return "idle", 0.0
        start = max(oldest, self._freed_at) if costly else oldest
        wait = max(self.max_delay_s, self.single_run_s or 0.0) if costly and coming else self.max_delay_s
        remaining = start + wait - now
        if remaining <= 0:
            return "delay", 0.0
        if costly and self.flush_when_idle and not coming:  # wake when it turns idle
            remaining = min(remaining, idle_at - now)
        return "", remaining

    async def _run_in_slot(self, rows: list[_Row[T]], reason: str, slots: asyncio.Semaphore) -> None:
        try:
            await self._run(rows, reason)
        except asyncio.CancelledError:  # stop() gave up waiting for the drain
            for row in rows:
                _settle(row.future, exc=BatcherStopped(f"{self.name} stopped while this row ran"))
            raise
        except Exception:  # _run settles every row; this is a bug, not a model error
            logger.exception("%s: batch runner failed", self.name)
            for row in rows:
                _settle(row.future, exc=BatchFailed("internal error while running the batch"))
        finally:
            self.running_rows -= len(rows)
            if not self.running_rows:
                self._freed_at = self._clock.now()
            slots.release()
            self._wakeup.set()  # a batch waiting for its delay may now close as idle

    def _live(self, batch: list[_Row[T]]) -> list[_Row[T]]:
        now = self._clock.now()
        live, cancelled, expired = [], 0, 0
        for row in batch:
            if row.future.done():
                cancelled += 1
            elif row.deadline is not None and row.deadline <= now:
                expired += 1
                _settle(row.future, exc=DeadlineExceeded("the deadline passed while the row was queued"))
            else:
                live.append(row)
        if self._observer is not None:
            if cancelled:
                self._observer.on_drop("cancelled", cancelled)
            if expired:
                self._observer.on_drop("deadline", expired)
        return live

    async def _run(self, rows: list[_Row[T]], reason: str) -> None:
        loop = asyncio.get_running_loop()
        start = self._clock.now()
        try:
            outputs = await loop.run_in_executor(self._executor, self._run_batch, [r.item for r in rows])
            if len(outputs) != len(rows):
                raise RuntimeError(f"the model returned {len(outputs)} outputs for {len(rows)} rows")
        except Exception as exc:
            if len(rows) == 1:
                logger.warning("%s: row failed: %s", self.name, exc)
                _settle(rows[0].future, exc=BatchFailed(str(exc)), cause=exc)
                return
            logger.warning("%s: batch of %d failed (%s); retrying in halves", self.name, len(rows), exc)
            half = len(rows) // 2
            await self._run(rows[:half], reason)
            await self._run(rows[half:], reason)
            return
        run_s = self._clock.now() - start
        if len(rows) == 1:
            self._note_single(run_s)
        waits = [start - r.enqueued for r in rows]
        logger.debug("%s: ran %d rows (%s) in %.1f ms", self.name, len(rows), reason, run_s * 1e3)
        for row, out, wait in zip(rows, outputs, waits, strict=True):
            _settle(row.future, result=RowResult(out, wait, run_s, len(rows)))
        if self._observer is not None:
            self._observer.on_batch(len(rows), reason, waits, run_s)

    def _report_depth(self) -> None:
        if self._observer is not None:
            self._observer.on_depth(len(self._pending))


def _settle(fut: asyncio.Future[Any], *, result: Any = None, exc: BaseException | None = None,
            cause: BaseException | None = None) -> None:
    """Set a future's outcome unless its caller already went away."""
    if fut.done():
        return
    if exc is not None:
        if cause is not None:
            exc.__cause__ = cause
        fut.set_exception(exc)
    else:
        fut.set_result(result)
