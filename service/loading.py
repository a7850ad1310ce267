"""Loading one version: read model.json, load its runtime, warm it up, and give it a batcher."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np

from service import store
from service.batcher import Batcher
from service.metadata import ModelMeta
from service.metrics import Metrics
from service.quality import Quality
from service.runtimes import Runtime, warmup
from service.settings import BatchingConfig

logger = logging.getLogger(__name__)

Loader = Callable[[Path, ModelMeta], Runtime]


@dataclass
class ServedVersion:
    """A loaded, warm version with its own batcher; held by requests while they use it."""

    name: str
    version: int
    meta: ModelMeta
    runtime: Runtime
    batcher: Batcher[np.ndarray, np.ndarray]
    batching: BatchingConfig
    quality: Quality | None = None  # answer statistics and drift (service/quality.py), set by the registry
    inflight: int = 0
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    @contextlib.contextmanager
    def acquire(self) -> Iterator[ServedVersion]:
        """Hold the version for one request: it is not retired until every holder is done."""
        self.inflight += 1
        self._idle.clear()
        try:
            yield self
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self._idle.set()

    async def retire(self, timeout_s: float) -> None:
        if self.inflight:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout_s)
        await self.batcher.stop(timeout_s)


def time_single(runtime: Runtime, runs: int = 5) -> float:
    """The median time of a batch of one, after warm-up: whether a lone row may run inline, and whether
    the model is costly beside the batch delay (`Batcher.costly`)."""
    h, w = runtime.meta.input.height, runtime.meta.input.width
    image = np.zeros((1, h, w, 3), np.uint8)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        runtime.predict(image)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


async def load_version(name: str, version: int, path: Path, loader: Loader, defaults: BatchingConfig,
                       warmup_given: list[int], metrics: Metrics) -> ServedVersion:
    """Everything that may fail happens here, before the version is swapped in; raises on failure."""
    t0 = time.perf_counter()
    meta = store.read_metadata(path, name=name, version=version)
    cfg = defaults.with_overrides(meta.batching, warmup_given)
    runtime = await asyncio.to_thread(loader, path, meta)
    warm = await asyncio.to_thread(warmup, runtime, cfg.warmup_sizes, cfg.batches_in_flight)
    single = await asyncio.to_thread(time_single, runtime)  # inline runs, and batching a costly model
    seconds = time.perf_counter() - t0

    def run(rows: list[np.ndarray]) -> Sequence[np.ndarray]:
        return cast(Sequence[np.ndarray], runtime.predict(np.stack(rows)))  # an [N, C] array: N rows

    batcher: Batcher[np.ndarray, np.ndarray] = Batcher(
        run,
        max_batch_size=cfg.max_batch_size,
        max_delay_s=cfg.max_delay_s,
        max_queue_rows=cfg.max_queue_rows,
        observer=metrics.observer(name, version),
        name=f"{name}:{version}",
        flush_when_idle=cfg.flush_when_idle,
        batches_in_flight=cfg.batches_in_flight,
        inline_max_s=cfg.inline_run_max_ms / 1000.0,
        single_run_s=single,
    )
    metrics.model_load_seconds.labels(name, str(version)).set(seconds)
    metrics.queue_capacity.labels(name, str(version)).set(cfg.max_queue_rows)
    logger.info("loaded %s version %d (%d classes, input %dx%d, runtime %s %s) in %.1fs of which warm-up %.1fs "
                "at batch sizes %s%s; batching %s; a batch of one takes %.1f ms%s", name, version, meta.num_classes,
                meta.input.height, meta.input.width, runtime.runtime, runtime.precision, seconds, warm,
                list(cfg.warmup_sizes),
                f" (the largest {cfg.batches_in_flight} at once)" if cfg.batches_in_flight > 1 else "",
                "from model.json" if meta.batching else "defaults", single * 1e3,
                f", more than the {cfg.max_batch_delay_ms:g}-ms delay: batched for efficiency"
                if batcher.costly else "")
    return ServedVersion(name, version, meta, runtime, batcher, cfg)
