"""Which model versions are served: scans the store, loads and warms new versions in the background,
swaps them in atomically, and retires old ones once their in-flight requests are done."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from service import store
from service.batcher import Batcher
from service.errors import BadRequest, NotFound, NotReady
from service.metrics import Metrics
from service.settings import Settings
from service.store import ModelMeta, StoreError

logger = logging.getLogger(__name__)


class Classifier(Protocol):
    meta: ModelMeta

    def predict_rows(self, rows: list[np.ndarray]) -> np.ndarray: ...

    def warmup(self, batch_sizes: list[int], in_flight: int = 1) -> float: ...


Loader = Callable[[Path, ModelMeta], Classifier]


def default_loader(path: Path, meta: ModelMeta) -> Classifier:
    from service.model import SavedModelClassifier

    return SavedModelClassifier(path, meta)


@dataclass
class ServedVersion:
    name: str
    version: int
    meta: ModelMeta
    model: Classifier
    batcher: Batcher[np.ndarray, np.ndarray]
    path: Path
    loaded_at: float
    load_seconds: float
    state: str = "AVAILABLE"
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
        self.state = "UNLOADING"
        if self.inflight:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout_s)
        await self.batcher.stop(timeout_s)
        self.state = "END"


@dataclass
class Failure:
    signature: tuple[float, ...]
    reason: str


class Registry:
    def __init__(self, settings: Settings, metrics: Metrics, loader: Loader = default_loader) -> None:
        self.settings = settings
        self.metrics = metrics
        self.loader = loader
        self.served: dict[str, ServedVersion] = {}
        self.failures: dict[tuple[str, int], Failure] = {}
        self.unloaded: set[str] = set()
        self._poll_task: asyncio.Task[None] | None = None
        self._scan_lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()

    @property
    def ready(self) -> bool:
        return bool(self.served)

    def start_polling(self) -> None:
        self._poll_task = asyncio.get_running_loop().create_task(self._poll(), name="store-poll")

    async def _poll(self) -> None:
        while True:
            try:
                await self.scan()
            except Exception:  # a scan must never kill polling
                logger.exception("store scan failed")
            await asyncio.sleep(self.settings.poll_interval_s)

    def _candidates(self, name: str) -> list[int]:
        pin = self.settings.pins.get(name)
        versions = store.list_versions(self.settings.model_store, name)
        if pin is not None:
            return [pin] if pin in versions else []
        return sorted(versions, reverse=True)

    async def scan(self) -> None:
        """Load the best version of every model in the store that is better than the one served."""
        async with self._scan_lock:
            names = store.list_models(self.settings.model_store)
            allow = self.settings.model_allowlist
            for name in names:
                if name in self.unloaded or (allow and name not in allow):
                    continue
                await self._update(name)

    async def _update(self, name: str) -> None:
        current = self.served.get(name)
        for version in self._candidates(name):
            if current is not None and version == current.version:
                return
            if current is not None and version < current.version and name not in self.settings.pins:
                return
            path = store.version_dir(self.settings.model_store, name, version)
            try:
                signature = _signature(path)
            except StoreError as exc:
                logger.debug("skipping %s/%s: %s", name, version, exc)
                continue
            known = self.failures.get((name, version))
            if known is not None and known.signature == signature:
                continue
            if await self._load(name, version, path, signature):
                return

    async def _load(self, name: str, version: int, path: Path, signature: tuple[float, ...]) -> bool:
        s = self.settings
        logger.info("loading %s version %d from %s", name, version, path)
        t0 = time.perf_counter()
        try:
            meta = store.read_metadata(path, name=name, version=version)
            model = await asyncio.to_thread(self.loader, path, meta)
            warm = await asyncio.to_thread(model.warmup, s.warmup_sizes, s.batches_in_flight)
        except Exception as exc:
            reason = f"{exc.__class__.__name__}: {exc}"
            logger.error("refusing %s version %d: %s", name, version, reason)
            self.failures[(name, version)] = Failure(signature, reason)
            self.metrics.model_loads.labels(name, "failure").inc()
            return False
        seconds = time.perf_counter() - t0
        batcher: Batcher[np.ndarray, np.ndarray] = Batcher(
            model.predict_rows,
            max_batch_size=s.max_batch_size,
            max_delay_s=s.max_batch_delay_s,
            max_queue_rows=s.max_queue_rows,
            observer=self.metrics.observer(name, version),
            name=f"{name}:{version}",
            flush_when_idle=s.flush_when_idle,
            batches_in_flight=s.batches_in_flight,
        )
        batcher.start()
        new = ServedVersion(name, version, meta, model, batcher, path, time.time(), seconds)
        old = self.served.get(name)
        self.served[name] = new  # the swap: new requests resolve to `new` from here on
        self.failures.pop((name, version), None)
        self.metrics.model_loads.labels(name, "success").inc()
        self.metrics.model_version.labels(name).set(version)
        self.metrics.ready.set(1)
        self.metrics.model_load_seconds.labels(name, str(version)).set(seconds)
        self.metrics.queue_capacity.labels(name, str(version)).set(s.max_queue_rows)
        logger.info("serving %s version %d (%d classes, input %dx%d), loaded in %.1fs of which warm-up %.1fs "
                    "at batch sizes %s%s", name, version, meta.num_classes, meta.input.height, meta.input.width,
                    seconds, warm, s.warmup_sizes,
                    f" (the largest {s.batches_in_flight} at once)" if s.batches_in_flight > 1 else "")
        if old is not None:
            self._retire_later(old)
        # The model's many long-lived Python objects would otherwise be walked by every full
        # garbage collection, a pause of tens to hundreds of ms under load; freeze them out of it.
        gc.collect()
        gc.freeze()
        return True

    def _retire_later(self, old: ServedVersion) -> None:
        task = asyncio.get_running_loop().create_task(old.retire(self.settings.drain_timeout_s))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        for gauge in (self.metrics.queue_depth, self.metrics.queue_capacity):
            with contextlib.suppress(KeyError):
                gauge.remove(old.name, str(old.version))
        logger.info("retiring %s version %d once its %d requests are done", old.name, old.version, old.inflight)

    def resolve(self, name: str | None, version: int | None = None) -> ServedVersion:
        """The version answering a request for model `name` (default model when None)."""
        if not self.served:
            raise NotReady("no model is loaded yet; retry shortly")
        if not name:
            name = self.settings.default_model or None
            if name is None:
                if len(self.served) > 1:
                    raise BadRequest(f"several models are served ({', '.join(sorted(self.served))}): "
                                     "name one with the 'model' parameter")
                name = next(iter(self.served))
        served = self.served.get(name)
        if served is None:
            raise NotFound(f"model {name!r} is not served; served models: {', '.join(sorted(self.served))}")
        if version is not None and version != served.version:
            raise NotFound(f"version {version} of model {name!r} is not loaded; loaded version: {served.version}")
        return served

    def describe(self) -> list[dict[str, Any]]:
        out = []
        for name in store.list_models(self.settings.model_store) or sorted(self.served):
            served = self.served.get(name)
            versions = []
            for v in store.list_versions(self.settings.model_store, name):
                fail = self.failures.get((name, v))
                state = "AVAILABLE" if served and served.version == v else ("FAILED" if fail else "NOT_LOADED")
                entry: dict[str, Any] = {"version": v, "state": state}
                if fail:
                    entry["reason"] = fail.reason
                versions.append(entry)
            doc: dict[str, Any] = {"name": name, "versions": versions, "served_version": served.version if served
                                   else None}
            if served:
                doc.update(labels=served.meta.labels, input=vars(served.meta.input),
                           backbone=served.meta.backbone, metrics=served.meta.raw.get("metrics", {}),
                           created_at=served.meta.created_at, queue_depth=served.batcher.depth)
            out.append(doc)
        return out

    async def unload(self, name: str) -> None:
        served = self.served.pop(name, None)
        if served is None:
            raise NotFound(f"model {name!r} is not loaded")
        self.unloaded.add(name)
        self.metrics.model_version.remove(name)
        self._retire_later(served)

    async def load(self, name: str) -> ServedVersion:
        if not store.is_model_name(name) or name not in store.list_models(self.settings.model_store):
            raise NotFound(f"model {name!r} is not in the model store")
        self.unloaded.discard(name)
        async with self._scan_lock:
            await self._update(name)
        served = self.served.get(name)
        if served is None:
            reasons = [f.reason for (n, _), f in self.failures.items() if n == name]
            raise NotFound(f"model {name!r} has no loadable version" + (f": {reasons[-1]}" if reasons else ""))
        return served

    async def stop(self, timeout_s: float) -> None:
        if self._poll_task is not None:
            self._poll_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll_task
        for served in list(self.served.values()):
            self._retire_later(served)
        self.served.clear()
        if self._retiring:
            await asyncio.wait(list(self._retiring), timeout=timeout_s + 1)


def _signature(path: Path) -> tuple[float, ...]:
    """Changes whenever any file of the version changes, so a version refused while it was still
    being copied (or fixed in place) is tried again."""
    meta = path / store.METADATA_FILE
    if not meta.is_file():
        raise StoreError(f"{meta} is missing (incomplete or still being copied)")
    count, size, newest = 0, 0, 0.0
    for f in path.rglob("*"):
        if f.is_file():
            st = f.stat()
            count, size, newest = count + 1, size + st.st_size, max(newest, st.st_mtime)
    return (float(count), float(size), newest)
