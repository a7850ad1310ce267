"""TensorFlow Serving REST API: predict (row and columnar), model status and metadata."""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.api.deps import EXAMPLE_JPEG_B64, PREDICT_ERRORS, AppState, ORJSONResponse, PredictAuth, RegistryDep
from service.errors import BadRequest, NotFound, PayloadTooLarge, UnsupportedMediaType
from service.inference import deadline_for, decode_all, run_rows
from service.registry import Registry, ServedVersion

router = APIRouter(tags=["tensorflow-serving"])

PREDICT_EXAMPLE = {"instances": [{"b64": EXAMPLE_JPEG_B64}]}
PREDICT_DOC = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"type": "object"}, "example": PREDICT_EXAMPLE}},
    }
}
ERRORS = PREDICT_ERRORS


def _version(text: str) -> int:
    if not text.isdigit() or int(text) < 1 or (len(text) > 1 and text[0] == "0"):
        raise NotFound(f"version {text!r} is not a positive integer")
    return int(text)


def _split_action(target: str) -> tuple[str, str]:
    base, sep, action = target.rpartition(":")
    if not sep or action != "predict":
        raise NotFound(f"unknown method {target!r}: use ':predict'")
    return base, action


def _resolve(registry: Registry, name: str, version: int | None) -> ServedVersion:
    try:
        return registry.resolve(name, version)
    except NotFound as exc:
        raise NotFound(f"Servable not found for request: {exc.message}") from exc


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


async def _rows(request: Request, state: AppState, served: ServedVersion, items: list[Any]) -> list[np.ndarray]:
    settings = state.settings
    if not items:
        raise BadRequest("no instances to predict")
    if len(items) > settings.max_images_per_request:
        raise PayloadTooLarge(f"{len(items)} instances; the limit is {settings.max_images_per_request}")
    h, w = served.meta.input.height, served.meta.input.width
    payloads = [_instance_payload(i) for i in items]
    if all(isinstance(p, dict) for p in payloads):
        blobs = []
        for i, p in enumerate(payloads):
            if not isinstance(p["b64"], str):
                raise BadRequest(f"instance {i}: 'b64' must be a string")
            try:
                blobs.append(base64.b64decode(p["b64"], validate=True))
            except (binascii.Error, ValueError) as exc:
                raise BadRequest(f"instance {i}: invalid base64 ({exc})") from exc
        return await decode_all(blobs, h, w, settings, request.app.state.decode_pool, state.metrics)
    if any(isinstance(p, dict) for p in payloads):
        raise BadRequest("mixing b64 and pixel-array instances in one request is not supported")
    try:
        arr = np.asarray(payloads)
    except ValueError as exc:
        raise BadRequest(f"the pixel arrays are ragged: {exc}") from exc
    if arr.shape[1:] != (h, w, 3):
        raise BadRequest(f"pixel arrays must have shape [{h}, {w}, 3] per instance; got {list(arr.shape[1:])}")
    if arr.dtype.kind not in "iuf" or (arr.dtype.kind == "f" and not np.all(np.mod(arr, 1) == 0)):
        raise BadRequest("pixel values must be integers from 0 to 255 (uint8 input)")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise BadRequest("pixel values must be between 0 and 255 (uint8 input)")
    return list(arr.astype(np.uint8))


async def _predict(request: Request, state: AppState, registry: Registry, name: str, version: int | None) -> Response:
    deadline = deadline_for(request, state.settings)
    served = _resolve(registry, name, version)
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if ctype not in ("application/json", "", "text/plain"):
        raise UnsupportedMediaType(f"content type {ctype} is not accepted: send application/json")
    with served.acquire():
        with served.batcher.incoming():  # rows on their way: the batcher may wait for them
            try:
                body = orjson.loads(await request.body())
            except orjson.JSONDecodeError as exc:
                raise BadRequest(f"the body is not valid JSON: {exc}") from exc
            if not isinstance(body, dict):
                raise BadRequest("the body must be a JSON object with 'instances' or 'inputs'")
            sig = body.get("signature_name", "serving_default")
            if sig not in ("serving_default", "", None):
                raise BadRequest(f"unknown signature {sig!r}: this model has 'serving_default'")
            if ("instances" in body) == ("inputs" in body):
                raise BadRequest("the body must hold exactly one of 'instances' (row format) or 'inputs' (columnar)")
            columnar = "inputs" in body
            items = body["inputs"] if columnar else body["instances"]
            if columnar and isinstance(items, dict):
                if set(items) != {"images"}:
                    raise BadRequest(f"unknown inputs {sorted(items)}: this model takes 'images'")
                items = items["images"]
            if not isinstance(items, list):
                raise BadRequest("'instances' / 'inputs' must be a list")
            rows = await _rows(request, state, served, items)
        outcome = await run_rows(request, served, rows, deadline, state.metrics)
    key = "outputs" if columnar else "predictions"
    return ORJSONResponse({key: outcome.probabilities}, headers=outcome.headers())


@router.post("/v1/models/{target}", summary="TF Serving predict: POST /v1/models/{model}:predict",
             openapi_extra=PREDICT_DOC, responses=ERRORS, dependencies=[PredictAuth])
async def predict(target: str, request: Request, state: AppState, registry: RegistryDep) -> Response:
    name, _ = _split_action(target)
    return await _predict(request, state, registry, name, None)


@router.post("/v1/models/{model}/versions/{target}",
             summary="TF Serving predict on a version: POST /v1/models/{model}/versions/{v}:predict",
             openapi_extra=PREDICT_DOC, responses=ERRORS, dependencies=[PredictAuth])
async def predict_version(model: str, target: str, request: Request, state: AppState,
                          registry: RegistryDep) -> Response:
    text, _ = _split_action(target)
    return await _predict(request, state, registry, model, _version(text))


def _status(registry: Registry, name: str, version: int | None) -> dict[str, Any]:
    served = _resolve(registry, name, version)
    return {"model_version_status": [{"version": str(served.version), "state": "AVAILABLE",
                                      "status": {"error_code": "OK", "error_message": ""}}]}


@router.get("/v1/models/{model}", summary="TF Serving model status", responses=ERRORS)
async def status(model: str, registry: RegistryDep) -> dict[str, Any]:
    return _status(registry, model, None)


@router.get("/v1/models/{model}/versions/{version}", summary="TF Serving model version status", responses=ERRORS)
async def status_version(model: str, version: str, registry: RegistryDep) -> dict[str, Any]:
    return _status(registry, model, _version(version))


def _dim(n: int | None) -> dict[str, str]:
    return {"size": str(-1 if n is None else n), "name": ""}


def _metadata(registry: Registry, name: str, version: int | None) -> dict[str, Any]:
    served = _resolve(registry, name, version)
    h, w = served.meta.input.height, served.meta.input.width
    sig = {
        "inputs": {"images": {"dtype": "DT_UINT8", "name": "serving_default_images:0",
                              "tensor_shape": {"dim": [_dim(None), _dim(h), _dim(w), _dim(3)],
                                               "unknown_rank": False}}},
        "outputs": {"probabilities": {"dtype": "DT_FLOAT", "name": "StatefulPartitionedCall:0",
                                      "tensor_shape": {"dim": [_dim(None), _dim(served.meta.num_classes)],
                                                       "unknown_rank": False}}},
        "method_name": "tensorflow/serving/predict",
    }
    return {"model_spec": {"name": served.name, "signature_name": "", "version": str(served.version)},
            "metadata": {"signature_def": {"signature_def": {"serving_default": sig}}},
            "labels": served.meta.labels}


@router.get("/v1/models/{model}/metadata", summary="TF Serving model metadata (signature)", responses=ERRORS)
async def metadata(model: str, registry: RegistryDep) -> dict[str, Any]:
    return _metadata(registry, model, None)


@router.get("/v1/models/{model}/versions/{version}/metadata", summary="TF Serving version metadata",
            responses=ERRORS)
async def metadata_version(model: str, version: str, registry: RegistryDep) -> dict[str, Any]:
    return _metadata(registry, model, _version(version))
