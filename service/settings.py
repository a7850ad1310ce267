"""All service settings: one class, every field an environment variable prefixed `IMGSERVE_`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Defaults suit one CPU container; see the README for what each one does."""

    model_config = SettingsConfigDict(env_prefix="IMGSERVE_", extra="ignore", secrets_dir=None)

    host: str = Field("127.0.0.1", description="address uvicorn listens on (0.0.0.0 in containers)")
    port: int = Field(8000, ge=1, le=65535, description="TCP port")
    model_store: Path = Field(Path("model_store"), description="model store folder (read only)")
    models: str = Field("", description="serve only these models, comma-separated (empty: every model in the store)")
    pinned_versions: str = Field(
        "", description="serve these versions instead of the latest, e.g. 'clothing=3,demo-shapes=1'"
    )
    default_model: str = Field("", description="model used when a request names none (default: the only one)")
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
    decode_threads: int = Field(0, ge=0, description="decoding thread pool size (0: number of CPUs)")
    warmup_batch_sizes: str = Field(
        "", description="comma-separated batch sizes run at load (default: 1 and max_batch_size)"
    )
    intra_op_threads: int = Field(0, ge=0, description="TensorFlow intra-op threads (0: TensorFlow decides)")
    inter_op_threads: int = Field(0, ge=0, description="TensorFlow inter-op threads (0: TensorFlow decides)")
    onednn: bool = Field(True, description="set TF_ENABLE_ONEDNN_OPTS=1 (faster on x86 CPUs)")
    mixed_precision: bool = Field(
        False, description="run float32 graphs in 16 bits where safe: float16 on GPUs, bfloat16 on AVX512_BF16/AMX CPUs"
    )
    drain_timeout_s: float = Field(20.0, ge=0, description="grace period for queued and running rows on SIGTERM")
    keep_alive_timeout_s: float = Field(
        65.0, gt=0, description="idle keep-alive connections close after this (keep above load balancers' idle timeout)"
    )
    shutdown_delay_s: float = Field(0.0, ge=0, description="pause between readiness 503 and closing the listener")
    api_key: SecretStr | None = Field(None, description="if set, predict endpoints need this key")
    admin_api_key: SecretStr | None = Field(None, description="if set, load/unload need this key")
    cors_origins: str = Field("", description="comma-separated origins allowed by CORS (off when empty)")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")
    log_json: bool = Field(False, description="log one JSON object per line")

    @classmethod
    def load(cls) -> Settings:
        """From the environment, and from files in $IMGSERVE_SECRETS_DIR (e.g. a mounted secret holding
        `imgserve_api_key` and `imgserve_admin_api_key`)."""
        secrets = os.environ.get("IMGSERVE_SECRETS_DIR")
        return cls(_secrets_dir=secrets) if secrets else cls()

    @field_validator("pinned_versions")
    @classmethod
    def _check_pins(cls, v: str) -> str:
        for part in filter(None, (p.strip() for p in v.split(","))):
            name, sep, ver = part.partition("=")
            if not sep or not ver.strip().isdigit() or int(ver) < 1 or not name.strip():
                raise ValueError(f"pinned_versions entry {part!r} must look like 'model=3'")
        return v

    @field_validator("warmup_batch_sizes")
    @classmethod
    def _check_warmup(cls, v: str) -> str:
        for part in filter(None, (p.strip() for p in v.split(","))):
            if not part.isdigit() or int(part) < 1:
                raise ValueError(f"warmup_batch_sizes entry {part!r} is not a positive integer")
        return v

    @model_validator(mode="after")
    def _check_timeouts(self) -> Settings:
        if self.request_timeout_ms > self.max_request_timeout_ms:
            raise ValueError("request_timeout_ms must not exceed max_request_timeout_ms")
        return self

    @property
    def pins(self) -> dict[str, int]:
        out = {}
        for part in filter(None, (p.strip() for p in self.pinned_versions.split(","))):
            name, _, ver = part.partition("=")
            out[name.strip()] = int(ver)
        return out

    @property
    def model_allowlist(self) -> set[str]:
        return {m.strip() for m in self.models.split(",") if m.strip()}

    @property
    def warmup_sizes(self) -> list[int]:
        given = [int(p) for p in self.warmup_batch_sizes.split(",") if p.strip()]
        sizes = given or [1, self.max_batch_size]
        return sorted({s for s in sizes if s <= self.max_batch_size})

    @property
    def decode_workers(self) -> int:
        return self.decode_threads or (os.cpu_count() or 2)

    @property
    def max_batch_delay_s(self) -> float:
        return self.max_batch_delay_ms / 1000.0
