"""TensorFlow Serving REST API: predict (row and columnar), model status and metadata."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field, model_validator

from service.api.deps import (
    EXAMPLE_JPEG_B64,
    PREDICT_ERRORS,
    ORJSONResponse,
    PredictAuth,
    RegistryDep,
    http_call,
    json_body_doc,
    parse_body,
)
from service.api.views import runtime_view, version_entries
from service.errors import BadRequest, NotFound, UnsupportedMediaType, servable_not_found
from service.loading import ServedVersion
from service.pipeline import Images, b64_image, infer, pixel_rows
from service.registry import Registry
from service.store import parse_version

router = APIRouter(tags=["tensorflow-serving"])


class PredictRequest(BaseModel):
    """A TF Serving predict body: `instances` (row format) or `inputs` (columnar), not both."""

    signature_name: str | None = Field("serving_default", description="only 'serving_default'")
    instances: list[Any] | None = Field(None, description="one entry per image: {'b64': ...} or [H][W][3] pixels")
    inputs: list[Any] | dict[str, list[Any]] | None = Field(None, description="columnar: a list, or {'images': [...]}")

    @model_validator(mode="after")
    def _one_format(self) -> PredictRequest:
        if (self.instances is None) == (self.inputs is None):
            raise ValueError("the body must hold exactly one of 'instances' (row format) or 'inputs' (columnar)")
        if self.signature_name not in ("serving_default", "", None):
            raise ValueError(f"unknown signature {self.signature_name!r}: this model has 'serving_default'")
        if isinstance(self.inputs, dict) and set(self.inputs) != {"images"}:
            raise ValueError(f"unknown inputs {sorted(self.inputs)}: this model takes 'images'")
        return self

    def items(self) -> list[Any]:
        if self.instances is not None:
            return self.instances
        return self.inputs["images"] if isinstance(self.inputs, dict) else list(self.inputs or [])


class PredictResponse(BaseModel):
    predictions: list[list[float]] | None = Field(None, description="row format: probabilities per image")
    outputs: list[list[float]] | None = Field(None, description="columnar format: probabilities per image")


class VersionStatus(BaseModel):
    version: str
    state: str
    status: dict[str, str]


class StatusResponse(BaseModel):
    model_version_status: list[VersionStatus]


PREDICT_DOC = json_body_doc(PredictRequest, {"instances": [{"b64": EXAMPLE_JPEG_B64}]})
HINTS = {"instances": "a list of images", "inputs": "a list of images, or {'images': [...]}"}
ERRORS = PREDICT_ERRORS


def _version(text: str) -> int:
    version = parse_version(text)
    if version is None:
        raise NotFound(f"version {text!r} is not a positive integer")
    return version


def _split_action(target: str) -> str:
    base, sep, action = target.rpartition(":")
    if not sep or action != "predict":
        raise NotFound(f"unknown method {target!r}: use ':predict'")
    return base


def _resolve(registry: Registry, name: str, version: int | None, label: str | None = None) -> ServedVersion:
    with servable_not_found():
        if label is not None:
            return registry.route(name, version, label)[0]
        return registry.resolve(name, version)


def _instance_payload(item: Any) -> Any:
    """An instance is {"b64": ...}, a pixel array, or {"images": one of those}."""
    if isinstance(item, dict):
        if "b64" in item:
            return item
        if "images" in item and len(item) == 1:
            return item["images"]
        raise BadRequest(f"an instance must be {{'b64': ...}}, a pixel array or {{'images': ...}}; got keys "
                         f"{sorted(item)}")
    return item


def _images(items: list[Any], served: ServedVersion) -> Images:
    if not items:
        raise BadRequest("no instances to predict")
    payloads = [_instance_payload(i) for i in items]
    if all(isinstance(p, dict) for p in payloads):
        return Images(blobs=[b64_image(p["b64"], f"instance {i}: 'b64'") for i, p in enumerate(payloads)])
    if any(isinstance(p, dict) for p in payloads):
        raise BadRequest("mixing b64 and pixel-array instances in one request is not supported")
    return Images(pixels=pixel_rows(payloads, served.meta.input.height, served.meta.input.width))


async def _predict(request: Request, name: str, version: int | None, label: str | None = None) -> Response:
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if ctype not in ("application/json", "", "text/plain"):
        raise UnsupportedMediaType(f"content type {ctype} is not accepted: send application/json")
    columnar = False

    async def parse(served: ServedVersion) -> Images:
        nonlocal columnar
        body = parse_body(PredictRequest, await request.body(), HINTS)
        columnar = body.inputs is not None
        return _images(body.items(), served)

    with servable_not_found():
        outcome = await infer(http_call(request), name, version, parse, label)
    key = "outputs" if columnar else "predictions"
    return ORJSONResponse({key: outcome.probabilities}, headers=outcome.headers())


@router.post("/v1/models/{target}", summary="TF Serving predict: POST /v1/models/{model}:predict",
             openapi_extra=PREDICT_DOC, responses={200: {"model": PredictResponse}, **ERRORS},
             dependencies=[PredictAuth])
async def predict(target: str, request: Request) -> Response:
    return await _predict(request, _split_action(target), None)


@router.post("/v1/models/{model}/versions/{target}",
             summary="TF Serving predict on a version: POST /v1/models/{model}/versions/{v}:predict",
             openapi_extra=PREDICT_DOC, responses={200: {"model": PredictResponse}, **ERRORS},
             dependencies=[PredictAuth])
async def predict_version(model: str, target: str, request: Request) -> Response:
    return await _predict(request, model, _version(_split_action(target)))


def _status(registry: Registry, name: str, version: int | None) -> StatusResponse:
    """TF Serving lists every loaded version (AVAILABLE) and those that failed (END, with the error)."""
    served = _resolve(registry, name, version)
    if version is not None:
        entries = [e for e in version_entries(registry, name) if e["version"] == served.version]
    else:
        entries = [e for e in version_entries(registry, name) if e["state"] in ("AVAILABLE", "FAILED")]
    return StatusResponse(model_version_status=[
        VersionStatus(version=str(e["version"]), state="AVAILABLE" if e["state"] == "AVAILABLE" else "END",
                      status={"error_code": "OK", "error_message": ""} if e["state"] == "AVAILABLE" else
                      {"error_code": "UNKNOWN", "error_message": e.get("reason", "")})
        for e in entries])


@router.get("/v1/models/{model}", summary="TF Serving model status", responses=ERRORS)
async def status(model: str, registry: RegistryDep) -> StatusResponse:
    return _status(registry, model, None)


@router.get("/v1/models/{model}/versions/{version}", summary="TF Serving model version status", responses=ERRORS)
async def status_version(model: str, version: str, registry: RegistryDep) -> StatusResponse:
    return _status(registry, model, _version(version))


def _dim(n: int | None) -> dict[str, str]:
    return {"size": str(-1 if n is None else n), "name": ""}


def _metadata(registry: Registry, name: str, version: int | None) -> dict[str, Any]:
    served = _resolve(registry, name, version)
    h, w = served.meta.input.height, served.meta.input.width
    sig = {
        "inputs": {"images": {"dtype": "DT_UINT8", "name": "images",
                              "tensor_shape": {"dim": [_dim(None), _dim(h), _dim(w), _dim(3)],
                                               "unknown_rank": False}}},
        "outputs": {"probabilities": {"dtype": "DT_FLOAT", "name": "probabilities",
                                      "tensor_shape": {"dim": [_dim(None), _dim(served.meta.num_classes)],
                                                       "unknown_rank": False}}},
        "method_name": "tensorflow/serving/predict",
    }
    return {"model_spec": {"name": served.name, "signature_name": "", "version": str(served.version)},
            "metadata": {"signature_def": {"signature_def": {"serving_default": sig}}},
            "labels": served.meta.labels, **runtime_view(served)}


@router.post("/v1/models/{model}/labels/{target}",
             summary="TF Serving predict on a labelled version: POST /v1/models/{model}/labels/{label}:predict",
             openapi_extra=PREDICT_DOC, responses={200: {"model": PredictResponse}, **ERRORS},
             dependencies=[PredictAuth])
async def predict_label(model: str, target: str, request: Request) -> Response:
    return await _predict(request, model, None, _split_action(target))


@router.get("/v1/models/{model}/labels/{label}", summary="TF Serving model status by label", responses=ERRORS)
async def status_label(model: str, label: str, registry: RegistryDep) -> StatusResponse:
    return _status(registry, model, _resolve(registry, model, None, label).version)


@router.get("/v1/models/{model}/metadata", summary="TF Serving model metadata (signature)", responses=ERRORS)
async def metadata(model: str, registry: RegistryDep) -> dict[str, Any]:
    return _metadata(registry, model, None)


@router.get("/v1/models/{model}/versions/{version}/metadata", summary="TF Serving version metadata",
            responses=ERRORS)
async def metadata_version(model: str, version: str, registry: RegistryDep) -> dict[str, Any]:
    return _metadata(registry, model, _version(version))
