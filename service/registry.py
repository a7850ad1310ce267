"""The versions being served: polls the store through the version policy, swaps newly loaded versions
in atomically, and retires old ones once their in-flight requests are done."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging

from service import store
from service.errors import BadRequest, NotFound, NotReady
from service.loading import Loader, ServedVersion, load_version
from service.metrics import Metrics
from service.settings import Settings
from service.versions import VersionPolicy

logger = logging.getLogger(__name__)


class Registry:
    def __init__(self, settings: Settings, metrics: Metrics, loader: Loader) -> None:
        self.settings = settings
        self.metrics = metrics
        self.loader = loader
        self.policy = VersionPolicy(settings.model_store, set(settings.models), dict(settings.pinned_versions))
        self.served: dict[str, ServedVersion] = {}
        self._poll_task: asyncio.Task[None] | None = None
        self._scan_lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()

    @property
    def ready(self) -> bool:
        return bool(self.served)

    def versions(self) -> dict[str, int]:
        """Model name -> the version served."""
        return {n: s.version for n, s in self.served.items()}

    def start_polling(self) -> None:
        self._poll_task = asyncio.get_running_loop().create_task(self._poll(), name="store-poll")

    async def _poll(self) -> None:
        while True:
            try:
                await self.scan()
                self.metrics.store_scans.labels("ok").inc()
            except Exception:  # a scan must never kill polling
                logger.exception("store scan failed")
                self.metrics.store_scans.labels("error").inc()
            await asyncio.sleep(self.settings.poll_interval_s)

    async def scan(self) -> None:
        """Load the best version of every model in the store that is better than the one served."""
        async with self._scan_lock:
            for name in self.policy.models():
                await self._update(name)

    async def _update(self, name: str) -> None:
        current = self.served.get(name)
        for version, path, sig in self.policy.candidates(name, current.version if current else None):
            logger.info("loading %s version %d from %s", name, version, path)
            s = self.settings
            try:
                new = await load_version(name, version, path, self.loader, s.batching, s.warmup_batch_sizes,
                                         self.metrics)
            except Exception as exc:
                reason = f"{exc.__class__.__name__}: {exc}"
                logger.error("refusing %s version %d: %s", name, version, reason)
                self.policy.failed(name, version, sig, reason)
                self.metrics.model_loads.labels(name, "failure").inc()
                continue
            self._swap(new)
            return

    def _swap(self, new: ServedVersion) -> None:
        new.batcher.start()
        old = self.served.get(new.name)
        self.served[new.name] = new  # the swap: new requests resolve to `new` from here on
        self.policy.succeeded(new.name, new.version)
        self.metrics.model_loads.labels(new.name, "success").inc()
        self.metrics.model_version.labels(new.name).set(new.version)
        self.metrics.runtime_info.labels(new.name, str(new.version), new.runtime.runtime, new.runtime.precision).set(1)
        self.metrics.ready.set(1)
        logger.info("serving %s version %d", new.name, new.version)
        if old is not None:
            self._retire_later(old)
        # The model's many long-lived Python objects would otherwise be walked by every full
        # garbage collection, a pause of tens to hundreds of ms under load; freeze them out of it.
        gc.collect()
        gc.freeze()

    def _retire_later(self, old: ServedVersion) -> None:
        task = asyncio.get_running_loop().create_task(old.retire(self.settings.drain_timeout_s))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        m = self.metrics
        for gauge in (m.queue_depth, m.queue_capacity):
            m.forget(gauge, old.name, str(old.version))
        m.forget(m.runtime_info, old.name, str(old.version), old.runtime.runtime, old.runtime.precision)
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

    async def unload(self, name: str) -> None:
        served = self.served.pop(name, None)
        if served is None:
            raise NotFound(f"model {name!r} is not loaded")
        self.policy.unloaded.add(name)
        self.metrics.forget(self.metrics.model_version, name)
        self._retire_later(served)

    async def load(self, name: str) -> ServedVersion:
        if not store.is_model_name(name) or name not in store.list_models(self.settings.model_store):
            raise NotFound(f"model {name!r} is not in the model store")
        self.policy.unloaded.discard(name)
        async with self._scan_lock:
            await self._update(name)
        served = self.served.get(name)
        if served is None:
            reasons = self.policy.reasons(name)
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
