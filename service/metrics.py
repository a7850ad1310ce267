"""Prometheus metrics of the service, on a registry of their own (base units: seconds, rows).

With several server processes (PROMETHEUS_MULTIPROC_DIR set by the supervisor) every process writes
its values to shared files and a scrape of any process sums them: counters and histograms add up,
and each gauge says how its processes' values combine (`multiprocess_mode`, ignored in one process).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

MULTIPROCESS = "PROMETHEUS_MULTIPROC_DIR" in os.environ
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 2.5, 3, 4, 5,
                7.5, 10, 30, 60)
CONFIDENCE_BUCKETS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        mv = ["model", "version"]
        self.http_requests = Counter("imgserve_http_requests_total", "HTTP answers, by route, method and status",
                                     ["handler", "method", "status"], registry=r)
        self.http_latency = Histogram("imgserve_http_request_duration_highr_seconds",
                                      "Time from the request's arrival to its answer (every route)",
                                      buckets=HTTP_BUCKETS, registry=r)
        self.http_latency_by_route = Histogram("imgserve_http_request_duration_seconds",
                                               "Time to answer, by route and method", ["handler", "method"],
                                               buckets=(0.1, 0.5, 1), registry=r)
        self.grpc_requests = Counter("imgserve_grpc_requests_total", "gRPC answers, by service, method and status code",
                                     ["service", "method", "code"], registry=r)
        self.grpc_latency = Histogram("imgserve_grpc_request_duration_seconds",
                                      "Time from a gRPC call's arrival to its answer, by method", ["method"],
                                      buckets=HTTP_BUCKETS, registry=r)
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
        self.queue_depth = Gauge("imgserve_queue_depth", "Rows waiting in the queue", mv, registry=r,
                                 multiprocess_mode="livesum")
        self.queue_capacity = Gauge("imgserve_queue_capacity_rows", "Rows the queue holds before 429", mv,
                                    registry=r, multiprocess_mode="livesum")
        self.inflight_rows = Gauge("imgserve_inflight_rows", "Rows queued or running", mv, registry=r,
                                   multiprocess_mode="livesum")
        self.inflight_requests = Gauge("imgserve_inflight_requests", "Requests being worked on (HTTP POSTs; "
                                       "gRPC inference and repository calls)", registry=r, multiprocess_mode="livesum")
        self.requests_in_progress = 0  # the gauge's value in this process, for the pipeline (`request_began`)
        self.dropped_rows = Counter("imgserve_dropped_rows_total", "Rows dropped before inference",
                                    [*mv, "reason"], registry=r)
        self.rejections = Counter("imgserve_rejections_total", "Requests refused, by reason", ["reason"],
                                  registry=r)
        self.store_syncs = Counter("imgserve_store_syncs_total", "Listings of the object store mirrored into the "
                                   "local cache, by outcome (error: kept serving what was cached)", ["outcome"],
                                   registry=r)
        self.store_fetches = Counter("imgserve_store_fetches_total", "Versions copied from the object store "
                                     "before loading, by outcome", ["model", "outcome"], registry=r)
        self.store_scans = Counter("imgserve_store_scans_total", "Scans of the model store completed, by outcome",
                                   ["outcome"], registry=r)
        self.rollout_role = Gauge("imgserve_rollout_role",
                                  "1 for the role (stable, canary, shadow) of a loaded version",
                                  [*mv, "role"], registry=r, multiprocess_mode="livemax")
        self.version_requests = Counter("imgserve_version_requests_total",
                                        "Prediction requests by the version and role that answered them, and outcome "
                                        "(ok, client_error: 4xx, server_error: 5xx)", [*mv, "role", "outcome"],
                                        registry=r)
        self.version_latency = Histogram("imgserve_version_request_seconds",
                                         "Time from routing to answer, by the version and role that answered",
                                         [*mv, "role"], registry=r,
                                         buckets=(.0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.rollout_state_errors = Counter("imgserve_rollout_state_errors_total",
                                            "Rollout files that could not be used (the last good state stays)",
                                            ["model"], registry=r)
        self.shadow_requests = Counter("imgserve_shadow_requests_total",
                                       "Requests copied to a shadow version, by outcome (compared, dropped for "
                                       "want of idle capacity, failed)", [*mv, "against", "outcome"], registry=r)
        self.shadow_agreement = Counter("imgserve_shadow_top1_agreements_total",
                                        "Shadowed rows whose top-1 class equals the answering version's",
                                        [*mv, "against"], registry=r)
        self.shadow_rows = Counter("imgserve_shadow_rows_total", "Rows compared on a shadow version",
                                   [*mv, "against"], registry=r)
        self.shadow_top_prob_change = Counter("imgserve_shadow_top_probability_change",
                                              "Sum over compared rows of the shadow's top probability minus the "
                                              "answering version's", [*mv, "against"], registry=r)
        self.shadow_seconds = Histogram("imgserve_shadow_seconds", "Time a shadow copy of a request took",
                                        [*mv, "against"],
                                        registry=r)
        self.model_loads = Counter("imgserve_model_loads_total", "Model version loads, by outcome",
                                   ["model", "outcome"], registry=r)
        self.model_version = Gauge("imgserve_model_version_served",
                                   "Version being served (the oldest one any server process still serves)",
                                   ["model"], registry=r, multiprocess_mode="livemin")
        self.model_load_seconds = Gauge("imgserve_model_load_seconds", "Load plus warm-up time of a version",
                                        mv, registry=r, multiprocess_mode="livemax")
        self.runtime_info = Gauge("imgserve_model_runtime_info", "1 for the runtime and precision serving a version",
                                  [*mv, "runtime", "precision"], registry=r, multiprocess_mode="livemax")
        # answer quality and drift (service/quality.py)
        self.predicted_class = Counter("imgserve_predicted_class_total", "Answered images, by predicted class",
                                       [*mv, "label"], registry=r)
        self.top_probability = Histogram("imgserve_top_probability", "The top probability of each answered image",
                                         mv, buckets=CONFIDENCE_BUCKETS, registry=r)
        self.low_confidence = Counter("imgserve_low_confidence_total",
                                      "Answered images whose top probability is below IMGSERVE_LOW_CONFIDENCE", mv,
                                      registry=r)
        self.drift_score = Gauge("imgserve_drift_score",
                                 "PSI of the last IMGSERVE_DRIFT_WINDOW answers against the version's test split, "
                                 "by signal (class_mix, confidence); the highest of the server processes",
                                 [*mv, "signal"], registry=r, multiprocess_mode="livemax")
        self.feedback = Counter("imgserve_feedback_total", "Feedback received, by outcome", ["model", "outcome"],
                                registry=r)
        self.ready = Gauge("imgserve_ready", "1 when the service is ready to answer (every server process)",
                           registry=r, multiprocess_mode="livemin")
        self.processes = Gauge("imgserve_server_processes", "Server processes answering on the port", registry=r,
                               multiprocess_mode="livesum")
        self.process_requests = Gauge("imgserve_server_process_requests",
                                      "HTTP requests and gRPC calls answered by each server process since it started "
                                      "(label pid with several: how evenly the kernel spreads connections)", registry=r,
                                      multiprocess_mode="liveall")
        self.process_rss = Gauge("imgserve_server_process_resident_memory_bytes",
                                 "Resident memory of each server process (label pid with several)", registry=r,
                                 multiprocess_mode="liveall")

    def request_began(self) -> None:
        """A request of any protocol is being worked on (HTTP POST, gRPC inference or repository call; not reads
        such as metadata): `request_ended` when answered."""
        self.requests_in_progress += 1
        self.inflight_requests.inc()

    def request_ended(self) -> None:
        self.requests_in_progress -= 1
        self.inflight_requests.dec()

    def observe_http(self, handler: str, method: str, status: int, seconds: float) -> None:
        self.http_requests.labels(handler, method, str(status)).inc()
        self.process_requests.inc()
        self.http_latency.observe(seconds)
        self.http_latency_by_route.labels(handler, method).observe(seconds)

    def exposition(self) -> bytes:
        """The Prometheus text of every server process (with several) or of this one."""
        registry = self.registry
        if MULTIPROCESS:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)

    def forget(self, gauge: Gauge, *labels: str) -> None:
        """Drop a gauge's series (e.g. a retired version's). Zeroed first: with several processes the
        value lives on in the shared file, where 0 adds nothing to a sum and means 'not serving'."""
        with contextlib.suppress(KeyError):
            gauge.labels(*labels).set(0)
            if not MULTIPROCESS:
                gauge.remove(*labels)

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
