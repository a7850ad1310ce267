"""Prometheus metrics of the service, on a registry of their own (base units: seconds, rows)."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        mv = ["model", "version"]
        self.decode_seconds = Histogram("imgserve_decode_seconds", "Time to decode and resize one image",
                                        buckets=FAST_BUCKETS, registry=r)
        self.queue_wait_seconds = Histogram("imgserve_queue_wait_seconds", "Time a row waited in the queue",
                                            mv, buckets=FAST_BUCKETS, registry=r)
        self.inference_seconds = Histogram("imgserve_inference_seconds", "Model call time per batch", mv,
                                           buckets=FAST_BUCKETS, registry=r)
        self.batch_size = Histogram("imgserve_batch_size", "Rows per batch run by the model", mv,
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batches = Counter("imgserve_batches_total", "Batches run, by why they were flushed",
                               [*mv, "reason"], registry=r)
        self.rows = Counter("imgserve_rows_total", "Rows (images) run by the model", mv, registry=r)
        self.queue_depth = Gauge("imgserve_queue_depth", "Rows waiting in the queue", mv, registry=r)
        self.queue_capacity = Gauge("imgserve_queue_capacity_rows", "Rows the queue holds before 429", mv,
                                    registry=r)
        self.inflight_rows = Gauge("imgserve_inflight_rows", "Rows queued or running", mv, registry=r)
        self.dropped_rows = Counter("imgserve_dropped_rows_total", "Rows dropped before inference",
                                    [*mv, "reason"], registry=r)
        self.rejections = Counter("imgserve_rejections_total", "Requests refused, by reason", ["reason"],
                                  registry=r)
        self.model_loads = Counter("imgserve_model_loads_total", "Model version loads, by outcome",
                                   ["model", "outcome"], registry=r)
        self.model_version = Gauge("imgserve_model_version_served", "Version being served (latest loaded)",
                                   ["model"], registry=r)
        self.model_load_seconds = Gauge("imgserve_model_load_seconds", "Load plus warm-up time of a version",
                                        mv, registry=r)
        self.runtime_info = Gauge("imgserve_model_runtime_info", "1 for the runtime and precision serving a version",
                                  [*mv, "runtime", "precision"], registry=r)
        self.ready = Gauge("imgserve_ready", "1 when the service is ready to answer", registry=r)

    def observer(self, model: str, version: int) -> BatchMetrics:
        return BatchMetrics(self, model, str(version))


class BatchMetrics:
    """The batcher's observer for one model version."""

    def __init__(self, m: Metrics, model: str, version: str) -> None:
        self._m = m
        self._labels = (model, version)
        self._queue_wait = m.queue_wait_seconds.labels(*self._labels)
        self._inference = m.inference_seconds.labels(*self._labels)
        self._batch_size = m.batch_size.labels(*self._labels)
        self._rows = m.rows.labels(*self._labels)
        self._depth = m.queue_depth.labels(*self._labels)

    def on_batch(self, size: int, reason: str, queue_waits_s: Sequence[float], run_s: float) -> None:
        self._batch_size.observe(size)
        self._inference.observe(run_s)
        self._rows.inc(size)
        self._m.batches.labels(*self._labels, reason).inc()
        for w in queue_waits_s:
            self._queue_wait.observe(w)

    def on_drop(self, reason: str, count: int) -> None:
        self._m.dropped_rows.labels(*self._labels, reason).inc(count)

    def on_depth(self, depth: int) -> None:
        self._depth.set(depth)
