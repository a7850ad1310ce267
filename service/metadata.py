"""`model.json`, the one document shared by train, service, bench and tests, as pydantic models.

Train builds it with `ModelMeta.create(...)`, the store validates it on publish and on read, and
the service reads only these typed fields. Unknown keys are kept (extra="allow"), so a newer
trainer's additions survive a round trip.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

METADATA_FORMAT: Literal[1] = 1


class InputSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    height: int = Field(ge=1)
    width: int = Field(ge=1)
    channels: Literal[3] = 3
    dtype: Literal["uint8"] = "uint8"
    color: Literal["RGB"] = "RGB"


class BatchingOverride(BaseModel):
    """Per-model batching settings; each one given replaces the service-wide setting for this model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_batch_size: int | None = Field(None, ge=1, le=1024)
    max_batch_delay_ms: float | None = Field(None, ge=0, le=10_000)
    batches_in_flight: int | None = Field(None, ge=1, le=8)
    max_queue_rows: int | None = Field(None, ge=1)
    flush_when_idle: bool | None = None


class VariantEval(BaseModel):
    """How a variant did on the version's test split, against the SavedModel (float32)."""

    model_config = ConfigDict(extra="allow")

    accuracy: float
    macro_f1: float | None = None
    accuracy_drop: float = Field(description="SavedModel accuracy minus this variant's, in [0, 1] units")
    top1_agreement: float | None = None
    max_probability_change: float | None = None
    images_per_s: float | None = None
    test_images: int | None = None


class Variant(BaseModel):
    """An optimized form of the version's SavedModel, stored inside the version folder."""

    model_config = ConfigDict(extra="allow")

    runtime: str
    precision: str
    path: str = Field(description="relative to the version folder")
    source_sha256: str | None = Field(None, description="store.savedmodel_digest of the SavedModel it was made from")
    evaluation: VariantEval | None = None

    @field_validator("path")
    @classmethod
    def _relative(cls, v: str) -> str:
        if v.startswith("/") or ".." in v.split("/"):
            raise ValueError(f"variant path {v!r} must stay inside the version folder")
        return v

    @property
    def key(self) -> str:
        return f"{self.runtime}-{self.precision}"


# upper edges of the bins of the top probability (the answer's confidence) that drift is scored on
CONFIDENCE_EDGES: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


class Reference(BaseModel):
    """The version's answers on its own test split, written by `train`: the baseline its drift scores
    compare the live answers with (service/quality.py)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    images: int = Field(ge=1, description="test images the shares were measured on")
    class_mix: list[float] = Field(description="share of the test images predicted as each class, in label order")
    confidence_edges: list[float] = Field(default_factory=lambda: list(CONFIDENCE_EDGES))
    confidence: list[float] = Field(description="share of the test images whose top probability is in each bin")
    low_confidence: dict[str, float] = Field(default_factory=dict,
                                             description="share below each threshold, e.g. {'0.5': 0.08}")

    @model_validator(mode="after")
    def _bins(self) -> Reference:
        if len(self.confidence) != len(self.confidence_edges):
            raise ValueError("confidence needs one share per bin of confidence_edges")
        return self


class ModelMeta(BaseModel):
    """The parsed and validated content of `model.json`."""

    model_config = ConfigDict(frozen=True, extra="allow")

    format: Literal[1] = METADATA_FORMAT
    name: str
    version: int = Field(ge=1)
    created_at: str
    labels: list[str] = Field(min_length=2)
    input: InputSpec
    backbone: str
    weights: str = ""
    metrics: dict[str, Any] = Field(default_factory=dict)
    dataset: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    signature: dict[str, str] = Field(default_factory=lambda: {"name": "serving_default", "input": "images",
                                                                "output": "probabilities"})
    batching: BatchingOverride | None = None
    variants: list[Variant] = Field(default_factory=list)
    reference: Reference | None = None

    @model_validator(mode="after")
    def _reference_fits(self) -> ModelMeta:
        if self.reference is not None and len(self.reference.class_mix) != len(self.labels):
            raise ValueError(f"reference.class_mix has {len(self.reference.class_mix)} shares for "
                             f"{len(self.labels)} labels")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @classmethod
    def create(cls, *, labels: list[str], size: tuple[int, int], backbone: str, weights: str = "none",
               name: str = "unnamed", version: int = 1, **extra: Any) -> ModelMeta:
        """A new version's metadata; `name` and `version` are set again by `store.publish`."""
        created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        return cls(name=name, version=version, created_at=created, labels=labels,
                   input=InputSpec(height=size[0], width=size[1]), backbone=backbone, weights=weights, **extra)

    def document(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


def describe_error(exc: ValidationError) -> str:
    """The first problem of a validation error, as `field.path: message`."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{where}: {first['msg']}" if where else str(first["msg"])
