"""All service settings: one class, every field an environment variable prefixed `IMGSERVE_`."""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, PositiveInt, SecretStr, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.metadata import BatchingOverride


def _comma_list(value: Any) -> Any:
    """'a, b,,c' -> ['a', 'b', 'c']; lists pass through (environment variables arrive as text)."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _pins(value: Any) -> Any:
    """'clothing=3,demo=1' -> {'clothing': 3, 'demo': 1}."""
    if not isinstance(value, str):
        return value
    out: dict[str, str] = {}
    for part in _comma_list(value):
        name, sep, ver = part.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"pinned_versions entry {part!r} must look like 'model=3'")
        out[name.strip()] = ver.strip()
    return out


@dataclass(frozen=True)
class VersionPolicySetting:
    """Which versions are loaded besides those the rollout names, as TF Serving's version policy has it:
    `latest:N` (the N newest complete versions that are not held), `all`, `specific:3,5`, or `none`."""

    kind: str = "latest"
    count: int = 1
    versions: tuple[int, ...] = ()

    def __str__(self) -> str:
        if self.kind == "latest":
            return f"latest:{self.count}"
        return f"specific:{','.join(map(str, self.versions))}" if self.kind == "specific" else self.kind


def _version_policy(value: Any) -> Any:
    if isinstance(value, VersionPolicySetting):
        return value
    text = str(value).strip().lower()
    kind, _, rest = text.partition(":")
    try:
        if kind == "latest":
            count = int(rest) if rest else 1
            if count < 1:
                raise ValueError
            return VersionPolicySetting("latest", count)
        if kind in ("all", "none") and not rest:
            return VersionPolicySetting(kind)
        if kind == "specific":
            versions = tuple(int(v) for v in _comma_list(rest))
            if versions and all(v >= 1 for v in versions):
                return VersionPolicySetting("specific", 0, versions)
    except ValueError:
        pass
    raise ValueError(f"version_policy {value!r}: use latest, latest:N, all, none or specific:V1,V2")


CommaList = Annotated[list[str], NoDecode, BeforeValidator(_comma_list)]
CommaInts = Annotated[list[PositiveInt], NoDecode, BeforeValidator(_comma_list)]
Pins = Annotated[dict[str, PositiveInt], NoDecode, BeforeValidator(_pins)]


@dataclass(frozen=True)
class BatchingConfig:
    """How one model version is batched: the service-wide settings, with the model's own overrides."""

    max_batch_size: int
    max_batch_delay_ms: float
    batches_in_flight: int
    max_queue_rows: int
    flush_when_idle: bool
    warmup_sizes: tuple[int, ...] = ()
    inline_run_max_ms: float = 0.0

    def with_overrides(self, override: BatchingOverride | None, warmup_given: list[int]) -> BatchingConfig:
        given = override.model_dump(exclude_none=True) if override is not None else {}
        merged = replace(self, **given)
        sizes = warmup_given or [1, merged.max_batch_size]
        return replace(merged, warmup_sizes=tuple(sorted({s for s in sizes if s <= merged.max_batch_size})))

    @property
    def max_delay_s(self) -> float:
        return self.max_batch_delay_ms / 1000.0


class Settings(BaseSettings):
    """Defaults suit one CPU container; see the README for what each one does."""

    model_config = SettingsConfigDict(env_prefix="IMGSERVE_", extra="ignore", secrets_dir=None)

    workers: Literal["auto"] | PositiveInt = Field(
        1, description="server processes behind the one port (auto: one per usable CPU core); see Processes"
    )
    max_inflight_requests: int = Field(
        0, ge=0, description="requests a process works on at once, HTTP and gRPC together, before 429 or "
        "RESOURCE_EXHAUSTED (0: twice max_queue_rows); refused before the body is read"
    )
    host: str = Field("127.0.0.1", description="address uvicorn listens on (0.0.0.0 in containers)")
    port: int = Field(8000, ge=1, le=65535, description="TCP port")
    grpc_port: int = Field(8001, ge=0, le=65535, description="gRPC port (KServe v2 / Triton, TF Serving and health "
                           "services; 8001 as in Triton); 0 turns gRPC off")
    model_store: Path = Field(Path("model_store"), description="model store: a folder (read only), or object storage "
                              "(s3://bucket/prefix, or another fsspec URL) mirrored into store_cache_dir")
    store_url: str = Field("", description="the object store being mirrored (set from a model_store URL)")
    store_cache_dir: Path = Field(Path(tempfile.gettempdir()) / "imgserve-store-cache",
                                  description="local copy of the versions served from object storage")
    store_cache_max_gb: float = Field(20.0, gt=0, description="bound on the local copy: versions not being served are "
                                      "dropped from it, oldest first")
    s3_endpoint_url: str = Field("", description="S3-compatible endpoint (MinIO, ...); empty: AWS")
    s3_access_key_id: SecretStr | None = Field(None, description="S3 key (else AWS_ACCESS_KEY_ID, ~/.aws, roles)")
    s3_secret_access_key: SecretStr | None = Field(None, description="S3 secret (else AWS_SECRET_ACCESS_KEY, ...)")
    models: CommaList = Field(
        default_factory=list, description="serve only these models, comma-separated (empty: every model in the store)"
    )
    pinned_versions: Pins = Field(
        default_factory=dict, description="serve these versions instead of the latest, e.g. 'clothing=3,demo-shapes=1'"
    )
    default_model: str = Field("", description="model used when a request names none (default: the only one)")
    rollout_mode: Literal["immediate", "gated", "progressive"] = Field(
        "gated", description="for a model with no rollout.json: immediate (the newest version takes the traffic), "
        "gated (only if its accuracy is within max_accuracy_drop of the version train compared it with) or "
        "progressive (gated, then shadow and canary by the controller); see docs/rollout.md")
    version_policy: Annotated[VersionPolicySetting, NoDecode, BeforeValidator(_version_policy)] = Field(
        VersionPolicySetting(), description="versions loaded besides stable, canary, shadow and labelled ones "
        "(addressable by version): latest:N, all, none, specific:V1,V2")
    max_versions_per_model: int = Field(3, ge=1, le=64, description="versions of one model loaded at once at most")
    poll_interval_s: float = Field(5.0, gt=0, description="how often the store is scanned for new versions")
    max_batch_size: int = Field(32, ge=1, le=1024, description="rows per batch at most")
    max_batch_delay_ms: float = Field(5.0, ge=0, le=10_000, description="longest wait of a batch's oldest row")
    flush_when_idle: bool = Field(
        True, description="close a batch at once when no other request is decoding (nothing more is coming)"
    )
    batches_in_flight: int = Field(
        1, ge=1, le=8, description="batches the model runs at once (2 for GPUs and compute-bound models, see Batching)"
    )
    max_queue_rows: int = Field(256, ge=1, description="queued rows per model version before 429")
    request_timeout_ms: int = Field(30_000, ge=1, description="default deadline of a request")
    max_request_timeout_ms: int = Field(120_000, ge=1, description="cap on the X-Request-Timeout-Ms header")
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="request body size limit")
    body_timeout_s: float = Field(30.0, gt=0, description="time limit for receiving a request body (slow clients)")
    max_image_pixels: int = Field(40_000_000, ge=1, description="width x height limit, checked before decoding")
    max_images_per_request: int = Field(64, ge=1, description="images in one request at most")
    max_form_fields: int = Field(256, ge=1, description="multipart fields in one request at most")
    inline_decode_max_pixels: int = Field(
        300_000, ge=0, description="a lone image of at most this many pixels is decoded on the event loop, not in "
        "the thread pool (0: never)"
    )
    opentelemetry: bool = Field(
        False, description="FastAPI's native OpenTelemetry spans, metrics and logs (with an OpenTelemetry SDK "
        "configured in the process); off, FastAPI skips its per-request checks"
    )
    inline_run_max_ms: float = Field(
        2.0, ge=0, le=1000, description="a lone row that finds its model idle (nothing queued, running or "
        "decoding, no other request in progress) runs on the event loop, not the model thread, when a batch of one "
        "takes at most this long (0: never)"
    )
    decode_threads: int = Field(
        0, ge=0, description="decoding thread pool size (0: the process's share of the CPU cores)"
    )
    warmup_batch_sizes: CommaInts = Field(
        default_factory=list, description="comma-separated batch sizes run at load (default: 1 and max_batch_size)"
    )
    intra_op_threads: int = Field(0, ge=0, description="threads of one model call, TensorFlow intra-op or OpenVINO (0: "
                                  "the runtime decides; with several processes, each one's share of the cores)")
    inter_op_threads: int = Field(0, ge=0, description="TensorFlow inter-op threads (0: TensorFlow decides)")
    onednn: bool = Field(True, description="set TF_ENABLE_ONEDNN_OPTS=1 (faster on x86 CPUs)")
    mixed_precision: bool = Field(
        False, description="run float32 graphs in 16 bits where safe: float16 on GPUs, bfloat16 on AVX512_BF16/AMX CPUs"
    )
    runtime: Literal["auto", "tensorflow", "openvino"] = Field(
        "auto", description="auto: the fastest variant within the accuracy budget (OpenVINO on CPUs), else TensorFlow"
    )
    precision: Literal["auto", "fp32", "bf16", "int8"] = Field(
        "auto", description="serve only variants of this precision (auto: the fastest within the budget)"
    )
    max_accuracy_drop: float = Field(
        1.0, ge=0, le=100, description="accuracy points a variant may lose on the test split (0: float32 only)"
    )
    convert_savedmodel: bool = Field(
        True, description="on a CPU, a version with no variant that can serve has its SavedModel converted by "
        "OpenVINO at load and served in float32, when its answers match TensorFlow's (false: TensorFlow serves it)"
    )
    drain_timeout_s: float = Field(20.0, ge=0, description="grace period for queued and running rows on SIGTERM")
    keep_alive_timeout_s: float = Field(
        65.0, gt=0, description="idle keep-alive connections close after this (keep above load balancers' idle timeout)"
    )
    shutdown_delay_s: float = Field(0.0, ge=0, description="pause between readiness 503 and closing the listener")
    api_key: SecretStr | None = Field(None, description="if set, predict endpoints need this key")
    admin_api_key: SecretStr | None = Field(None, description="if set, load/unload need this key")
    cors_origins: CommaList = Field(
        default_factory=list, description="comma-separated origins allowed by CORS (off when empty)"
    )
    # answer quality, drift, feedback and the request log (docs/feedback.md)
    low_confidence: float = Field(0.5, ge=0, le=1, description="answers whose top probability is below this count "
                                  "as low-confidence (imgserve_low_confidence_total)")
    drift_window: int = Field(500, ge=0, description="answers per process the drift score is computed over (0: off)")
    feedback_dir: Path | None = Field(None, description="where POST /v1/feedback stores labelled photos, a folder "
                                      "per model and class that `python -m train --extra-data` reads (off when unset)")
    feedback_new_classes: bool = Field(False, description="feedback may name a label the model does not know")
    feedback_api_key: SecretStr | None = Field(None, description="if set, this key may send feedback (besides the "
                                               "API and admin keys) but not predict or load models")
    recent_images_mb: float = Field(0.0, ge=0, description="keep the images of recent predictions, up to this many "
                                    "MB per process, so feedback can name a request id instead of sending the image "
                                    "again (0: keep none)")
    request_log: str = Field("", description="one JSON line per answer: '-' for standard output, or a file, rotated "
                             "(off when empty)")
    request_log_max_mb: float = Field(100.0, gt=0, description="the request log's size bound: its file and four "
                                      "rotated ones share it")
    request_log_images: bool = Field(False, description="the request log carries each image (base64)")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")
    log_json: bool = Field(False, description="log one JSON object per line")

    @classmethod
    def load(cls) -> Settings:
        """From the environment, and from files in $IMGSERVE_SECRETS_DIR (e.g. a mounted secret holding
        `imgserve_api_key` and `imgserve_admin_api_key`)."""
        secrets = os.environ.get("IMGSERVE_SECRETS_DIR")
        return cls(_secrets_dir=secrets) if secrets else cls()

    @model_validator(mode="before")
    @classmethod
    def _store_url(cls, data: Any) -> Any:
        """A model_store URL is mirrored: the service reads its local copy, a folder per URL in the cache."""
        if isinstance(data, dict) and "://" in str(data.get("model_store", "")):
            url = str(data["model_store"]).rstrip("/")
            cache = Path(data.get("store_cache_dir") or Path(tempfile.gettempdir()) / "imgserve-store-cache")
            data = {**data, "store_url": url,
                    "model_store": cache / hashlib.sha256(url.encode()).hexdigest()[:16]}
        return data

    @model_validator(mode="after")
    def _check_timeouts(self) -> Settings:
        if self.request_timeout_ms > self.max_request_timeout_ms:
            raise ValueError("request_timeout_ms must not exceed max_request_timeout_ms")
        return self

    @property
    def batching(self) -> BatchingConfig:
        """The service-wide batching settings (a model's `batching` block in model.json overrides them)."""
        return BatchingConfig(self.max_batch_size, self.max_batch_delay_ms, self.batches_in_flight,
                              self.max_queue_rows, self.flush_when_idle,
                              inline_run_max_ms=self.inline_run_max_ms).with_overrides(None,
                                                                                         self.warmup_batch_sizes)

    @property
    def process_count(self) -> int:
        """How many server processes `workers` asks for on this machine."""
        return usable_cores() if self.workers == "auto" else int(self.workers)

    @property
    def cores_per_process(self) -> int:
        """This machine's usable cores shared out among the server processes (at least one each)."""
        return max(1, usable_cores() // self.process_count)

    @property
    def decode_workers(self) -> int:
        return self.decode_threads or self.cores_per_process

    @property
    def model_threads(self) -> int:
        """Threads a runtime may use for one model call: the setting, else this process's share of the
        cores when there are several processes, else 0 (the runtime decides)."""
        if self.intra_op_threads or self.process_count == 1:
            return self.intra_op_threads
        return self.cores_per_process

    @property
    def inflight_limit(self) -> int:
        """A request holds its slot while its body is read and decoded and while its answer is written,
        not only while its rows are queued: with the limit at the queue rows, bursts were refused while
        the queue had room and the model idled between them (150% overload on a 2-core Zen 4, 90 s
        each: accepted 407/s at 1x, 546/s at 2x, 511/s at 4x, where the queue refuses everything)."""
        return self.max_inflight_requests or 2 * self.max_queue_rows


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
