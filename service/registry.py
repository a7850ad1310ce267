"""The versions being served. Each scan reads every model's rollout state (service/rollout.py) and its
complete versions, decides which version is stable and which are canary and shadow (and which are held,
and why), loads what that needs plus what the version policy asks for (within a cap per model), swaps
the new set in atomically, and retires versions no role needs once their in-flight requests are done.
A rollout file that cannot be used leaves the last good state in force, with the reason in the log, a
metric and the status."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import random
from collections import defaultdict
from dataclasses import dataclass, field

from service import rollout, store
from service.errors import BadRequest, NotFound, NotReady
from service.loading import Loader, ServedVersion, load_version
from service.metrics import Metrics
from service.quality import Quality
from service.remote import Mirror, RemoteError
from service.rollout import Candidate, Plan, RolloutError, RolloutState
from service.settings import Settings
from service.versions import VersionPolicy, signature

logger = logging.getLogger(__name__)


@dataclass
class ModelVersions:
    """The loaded versions of one model and the role of each; replaced whole on every change."""

    name: str
    loaded: dict[int, ServedVersion]
    plan: Plan
    state_error: str | None = None
    refused: dict[int, str] = field(default_factory=dict)  # versions wanted but over the cap

    @property
    def stable(self) -> ServedVersion | None:
        return self.loaded.get(self.plan.stable) if self.plan.stable is not None else None

    def role(self, version: int) -> str:
        return self.plan.roles().get(version, "available")

    def by_label(self, label: str) -> int | None:
        if label in ("stable", "canary", "shadow"):
            return getattr(self.plan, label)  # type: ignore[no-any-return]
        return self.plan.labels.get(label)


class Registry:
    def __init__(self, settings: Settings, metrics: Metrics, loader: Loader) -> None:
        self.settings = settings
        self.metrics = metrics
        self.loader = loader
        self.policy = VersionPolicy(settings.model_store, set(settings.models), dict(settings.pinned_versions))
        self.models: dict[str, ModelVersions] = {}
        self.scanned = False  # a whole pass over the store's models has ended: each one loaded or refused
        self._states: dict[str, RolloutState | None] = {}  # the last good rollout state of each model
        self._poll_task: asyncio.Task[None] | None = None
        self._scan_lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()
        self._logged_held: dict[str, set[int]] = {}
        # per (model, shadow version, answering version): this process's copies and what they showed
        self.shadow_stats: dict[tuple[str, int, int], defaultdict[str, float]] = {}
        self.mirror: Mirror | None = None  # the object store mirrored into settings.model_store, if any
        self.fetch_errors: dict[tuple[str, int], str] = {}
        if settings.store_url:
            secret = settings.s3_secret_access_key
            self.mirror = Mirror.open(settings.store_url, settings.model_store,
                                      int(settings.store_cache_max_gb * (1 << 30)), settings.s3_endpoint_url,
                                      settings.s3_access_key_id.get_secret_value() if settings.s3_access_key_id
                                      else None, secret.get_secret_value() if secret else None)

    def waiting_for(self) -> str:
        """Why no model is served yet, for readiness."""
        if self.mirror is not None and self.mirror.error:
            return f"no model is loaded yet: the model store {self.mirror.url} could not be read: {self.mirror.error}"
        if self.fetch_errors:
            return f"no model is loaded yet: {next(iter(self.fetch_errors.values()))}"
        if self.mirror is not None and self.mirror.last_sync is None:
            return f"no model is loaded yet: listing the model store {self.mirror.url}"
        if self.served:
            return f"loading the models in the store: {', '.join(sorted(self.served))} loaded so far"
        return "no model is loaded yet"

    # -- what is served ------------------------------------------------------------------------------------

    @property
    def served(self) -> dict[str, ServedVersion]:
        """Model name -> its stable version (what a request naming no version gets)."""
        return {n: m.stable for n, m in self.models.items() if m.stable is not None}

    @property
    def ready(self) -> bool:
        """Something is served, and the first pass over the store has ended: a process with several models
        is not ready while some of them are still loading (a client would be told they do not exist)."""
        return self.scanned and bool(self.served)

    def versions(self) -> dict[str, int]:
        """Model name -> the stable version."""
        return {n: s.version for n, s in self.served.items()}

    # -- polling -------------------------------------------------------------------------------------------

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
        """Bring every model's loaded versions and roles in line with its rollout state and the store (first
        its local copy, when the store is object storage)."""
        async with self._scan_lock:
            if self.mirror is not None:
                synced = await asyncio.to_thread(self.mirror.sync)
                self.metrics.store_syncs.labels("ok" if synced else "error").inc()
            for name in self.policy.models():
                await self._update(name)
            self.scanned = True

    def _state(self, name: str, versions: set[int]) -> tuple[RolloutState | None, str | None]:
        """The model's rollout state, or its last good one (and why) when the file cannot be used: missing
        parts, not JSON, not valid, or naming for a role a version that is not complete in the store."""
        try:
            state = rollout.read(self.settings.model_store, name)
            if state is not None:
                named = {state.stable, state.canary, state.shadow, *state.labels.values()} - {None}
                missing = sorted(v for v in named if v not in versions)  # type: ignore[type-var]
                if missing:
                    raise RolloutError(f"{rollout.path_of(self.settings.model_store, name)} names versions that "
                                       f"are not complete in the store: {', '.join(map(str, missing))}")
        except RolloutError as exc:
            reason = str(exc)
            current = self.models.get(name)
            if current is None or current.state_error != reason:
                logger.error("%s: keeping the last good rollout state: %s", name, reason)
                self.metrics.rollout_state_errors.labels(name).inc()
            return self._states.get(name), reason
        self._states[name] = state
        return state, None

    def _candidates(self, name: str) -> list[Candidate]:
        """Complete versions that may be served: not refused before with the same files, and readable."""
        root = self.settings.model_store
        out = []
        pin = self.policy.pins.get(name)
        for v in store.list_versions(root, name):
            if pin is not None and v != pin:
                continue
            path = store.version_dir(root, name, v)
            try:
                sig = signature(path)
            except store.StoreError:
                continue  # model.json not there yet: still being published
            known = self.policy.failures.get((name, v))
            if known is not None and known.signature == sig:
                continue
            try:
                meta = store.read_metadata(path, name=name, version=v)
            except store.StoreError as exc:
                self._refuse(name, v, sig, f"{exc.__class__.__name__}: {exc}")
                continue
            out.append(Candidate(v, meta.metrics.get("accuracy"), (meta.model_extra or {}).get("comparison")))
        return out

    async def _fetched(self, name: str, version: int, loaded: dict[int, ServedVersion]) -> bool:
        """The version's files copied from object storage into the cache; False (and why, kept for the status
        and readiness) while they cannot be: tried again at a later scan, with backoff."""
        assert self.mirror is not None
        keep = {(n, v) for n, m in self.models.items() for v in m.loaded} | {(name, v) for v in loaded}
        try:
            await asyncio.to_thread(self.mirror.fetch, name, version, keep)
        except RemoteError as exc:
            if self.fetch_errors.get((name, version)) != str(exc):
                logger.error("%s", exc)
            self.fetch_errors[(name, version)] = str(exc)
            self.metrics.store_fetches.labels(name, "error").inc()
            return False
        self.fetch_errors.pop((name, version), None)
        self.metrics.store_fetches.labels(name, "ok").inc()
        return True

    def _refuse(self, name: str, version: int, sig: tuple[float, ...], reason: str) -> None:
        logger.error("refusing %s version %d: %s", name, version, reason)
        self.policy.failed(name, version, sig, reason)
        self.metrics.model_loads.labels(name, "failure").inc()

    def _wanted(self, name: str, plan: Plan, candidates: list[Candidate]) -> tuple[list[int], dict[int, str]]:
        """The versions to have loaded, most needed first, within the cap; and those left out over it."""
        wanted = plan.needed()
        extra = sorted((c.version for c in candidates if c.version not in plan.held), reverse=True)
        policy = self.settings.version_policy
        if policy.kind == "latest":
            extra = extra[: policy.count]
        elif policy.kind == "specific":
            extra = [v for v in extra if v in policy.versions]
        elif policy.kind == "none":
            extra = []
        wanted += [v for v in extra if v not in wanted]
        cap = self.settings.max_versions_per_model
        over = {v: f"not loaded: {len(wanted)} versions wanted, at most {cap} per model "
                   f"(IMGSERVE_MAX_VERSIONS_PER_MODEL)" for v in wanted[cap:]}
        return wanted[:cap], over

    async def _update(self, name: str) -> None:
        candidates = self._candidates(name)
        state, state_error = self._state(name, {c.version for c in candidates})
        if name in self.policy.pins:
            state = RolloutState(mode="immediate")  # a pinned version is served whatever the rollout says
        s = self.settings
        plan = rollout.plan(state, candidates, s.max_accuracy_drop, s.rollout_mode)
        current = self.models.get(name)
        loaded = dict(current.loaded) if current else {}
        wanted, over = self._wanted(name, plan, candidates)
        fresh: list[ServedVersion] = []
        for v in wanted:
            if v in loaded:
                continue
            path = store.version_dir(s.model_store, name, v)
            if self.mirror is not None and not await self._fetched(name, v, loaded):
                continue
            logger.info("loading %s version %d from %s (%s)", name, v, path, plan.roles().get(v, "available"))
            try:
                sig = signature(path)
            except store.StoreError:
                continue  # removed since the listing
            try:
                new = await load_version(name, v, path, self.loader, s.batching, s.warmup_batch_sizes, self.metrics)
                new.quality = Quality(self.metrics, name, v, new.meta.labels, new.meta.reference, s.drift_window,
                                      s.low_confidence)
            except Exception as exc:
                self._refuse(name, v, sig, f"{exc.__class__.__name__}: {exc}")
                continue
            new.batcher.start()
            loaded[v] = new
            fresh.append(new)
        plan = self._fallback(plan, loaded, current)
        keep = {v for v in wanted if v in loaded} | ({plan.stable} if plan.stable in loaded else set())
        same = current is not None and current.plan == plan and set(current.loaded) == keep
        if same and current is not None and current.state_error == state_error and not fresh:
            return
        before = current.plan.roles() if current else {}
        self.models[name] = ModelVersions(name, {v: loaded[v] for v in keep}, plan, state_error, over)
        for new in fresh:
            self.policy.succeeded(name, new.version)
            self.metrics.model_loads.labels(name, "success").inc()
            self.metrics.runtime_info.labels(name, str(new.version), new.runtime.runtime,
                                             new.runtime.precision).set(1)
        self._publish_roles(name, before, plan)
        for v, old in loaded.items():
            if v not in keep:
                self._retire_later(old)
        if fresh:
            # The model's many long-lived Python objects would otherwise be walked by every full
            # garbage collection, a pause of tens to hundreds of ms under load; freeze them out of it.
            gc.collect()
            gc.freeze()

    @staticmethod
    def _fallback(plan: Plan, loaded: dict[int, ServedVersion], current: ModelVersions | None) -> Plan:
        """A role whose version did not load: stable keeps the version that served before; a canary or
        shadow stage ends (the status says why: the version is FAILED)."""
        if plan.stable is not None and plan.stable not in loaded:
            previous = current.plan.stable if current else None
            plan.stable = previous if previous in loaded else None
        if plan.canary is not None and plan.canary not in loaded:
            plan.canary, plan.canary_percent = None, 0.0
        if plan.shadow is not None and plan.shadow not in loaded:
            plan.shadow, plan.shadow_percent = None, 0.0
        return plan

    def _publish_roles(self, name: str, before: dict[int, str], plan: Plan) -> None:
        m = self.metrics
        after = plan.roles()
        for v, role in before.items():
            if after.get(v) != role:
                m.forget(m.rollout_role, name, str(v), role)
        for v, role in after.items():
            m.rollout_role.labels(name, str(v), role).set(1)
            if before.get(v) != role:
                logger.info("%s version %d is now %s%s", name, v, role,
                            f" ({plan.notes[v]})" if v in plan.notes else "")
        for v, why in plan.held.items():
            if v not in self._logged_held.setdefault(name, set()):
                logger.warning("%s version %d is held: %s", name, v, why)
                self._logged_held[name].add(v)
        if plan.stable is not None:
            m.model_version.labels(name).set(plan.stable)
            m.ready.set(1)

    def _retire_later(self, old: ServedVersion) -> None:
        task = asyncio.get_running_loop().create_task(old.retire(self.settings.drain_timeout_s))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        m = self.metrics
        for gauge in (m.queue_depth, m.queue_capacity):
            m.forget(gauge, old.name, str(old.version))
        m.forget(m.runtime_info, old.name, str(old.version), old.runtime.runtime, old.runtime.precision)
        for signal in ("class_mix", "confidence"):
            m.forget(m.drift_score, old.name, str(old.version), signal)
        logger.info("retiring %s version %d once its %d requests are done", old.name, old.version, old.inflight)

    # -- routing -------------------------------------------------------------------------------------------

    def model(self, name: str | None) -> ModelVersions:
        """The versions of model `name` (the default model when None)."""
        if not self.served:
            raise NotReady("no model is loaded yet; retry shortly")
        if not name:
            name = self.settings.default_model or None
            if name is None:
                if len(self.served) > 1:
                    raise BadRequest(f"several models are served ({', '.join(sorted(self.served))}): "
                                     "name one with the 'model' parameter")
                name = next(iter(self.served))
        found = self.models.get(name)
        if found is None or found.stable is None:
            raise NotFound(f"model {name!r} is not served; served models: {', '.join(sorted(self.served))}")
        return found

    def route(self, name: str | None, version: int | None = None, label: str | None = None,
              key: str | None = None) -> tuple[ServedVersion, str]:
        """The version that answers a request, and its role: the version or label it names, else stable or
        canary by the canary's percent (always the same for one routing key)."""
        m = self.model(name)
        if version is not None and label is not None:
            raise BadRequest("name a version or a label, not both")
        if label is not None:
            if not rollout.LABEL_RE.fullmatch(label):
                raise BadRequest(f"invalid label {label!r}: lower-case letters, digits, '_' and '-'")
            version = m.by_label(label)
            if version is None:
                labels = sorted(k for k in ("stable", "canary", "shadow") if m.by_label(k) is not None)
                raise NotFound(f"model {m.name!r} has no version labelled {label!r}; labels: "
                               f"{', '.join(labels + sorted(m.plan.labels))}")
        if version is not None:
            served = m.loaded.get(version)
            if served is None:
                raise NotFound(f"version {version} of model {m.name!r} is not loaded; loaded versions: "
                               f"{', '.join(map(str, sorted(m.loaded)))}")
            return served, m.role(version)
        stable = m.stable
        assert stable is not None
        p = m.plan
        if p.canary is not None and p.canary_percent > 0 and _share(key, m.name) < p.canary_percent / 100:
            return m.loaded[p.canary], "canary"
        return stable, "stable"

    def resolve(self, name: str | None, version: int | None = None) -> ServedVersion:
        """The version named, else the stable one (no canary split: for metadata and status)."""
        if version is None:
            stable = self.model(name).stable
            assert stable is not None
            return stable
        return self.route(name, version)[0]

    def shadow(self, name: str) -> tuple[ServedVersion, float] | None:
        m = self.models.get(name)
        if m is None or m.plan.shadow is None or m.plan.shadow_percent <= 0:
            return None
        served = m.loaded.get(m.plan.shadow)
        return (served, m.plan.shadow_percent) if served is not None else None

    # -- the KServe repository calls -----------------------------------------------------------------------

    async def unload(self, name: str) -> None:
        m = self.models.pop(name, None)
        if m is None:
            raise NotFound(f"model {name!r} is not loaded")
        self.policy.unloaded.add(name)
        self.metrics.forget(self.metrics.model_version, name)
        for v, role in m.plan.roles().items():
            self.metrics.forget(self.metrics.rollout_role, name, str(v), role)
        for served in m.loaded.values():
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
        for m in self.models.values():
            for served in m.loaded.values():
                self._retire_later(served)
        self.models.clear()
        if self._retiring:
            await asyncio.wait(list(self._retiring), timeout=timeout_s + 1)


def _share(key: str | None, model: str) -> float:
    """Where a request falls in [0, 1): random without a routing key, always the same with one."""
    if not key:
        return random.random()
    digest = hashlib.blake2b(f"{model}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64
