"""KServe v2 / Open Inference Protocol, with the classification, binary tensor data and model
repository extensions: what `tritonclient.http` speaks."""

from __future__ import annotations

import base64
import binascii
import struct
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from service import __version__
from service.api.deps import (
    EXAMPLE_JPEG_B64,
    PREDICT_ERRORS,
    AdminAuth,
    AppState,
    ORJSONResponse,
    PredictAuth,
    RegistryDep,
)
from service.errors import BadRequest, NotFound, NotReady, PayloadTooLarge
from service.inference import deadline_for, decode_all, run_rows, top_k
from service.registry import Registry, ServedVersion

router = APIRouter(tags=["kserve-v2"])
HEADER_LENGTH = "inference-header-content-length"
EXTENSIONS = ["classification", "binary_tensor_data", "model_repository"]
ERRORS = PREDICT_ERRORS
INFER_EXAMPLE = {
    "id": "42",
    "inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [EXAMPLE_JPEG_B64]}],
    "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}],
}
INFER_DOC = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"type": "object"}, "example": INFER_EXAMPLE},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def _version(text: str | None) -> int | None:
    if text is None:
        return None
    if not text.isdigit() or int(text) < 1 or (len(text) > 1 and text[0] == "0"):
        raise NotFound(f"version {text!r} is not a positive integer")
    return int(text)


@router.get("/v2", summary="Server metadata")
async def server_metadata() -> dict[str, Any]:
    return {"name": "imgserve", "version": __version__, "extensions": EXTENSIONS}


@router.get("/v2/health/live", summary="Server liveness")
async def server_live() -> dict[str, bool]:
    return {"live": True}


@router.get("/v2/health/ready", summary="Server readiness", responses={503: {"description": "not ready"}})
async def server_ready(request: Request) -> dict[str, bool]:
    registry = getattr(request.app.state, "registry", None)
    if request.app.state.draining or registry is None or not registry.ready:
        raise NotReady("not ready")
    return {"ready": True}


def _model_metadata(served: ServedVersion) -> dict[str, Any]:
    h, w = served.meta.input.height, served.meta.input.width
    return {
        "name": served.name,
        "versions": [str(served.version)],
        "platform": "tensorflow_savedmodel",
        "inputs": [{"name": "images", "datatype": "UINT8", "shape": [-1, h, w, 3]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, served.meta.num_classes]}],
        "parameters": {"labels": served.meta.labels,
                       "accepts": "UINT8 [N, H, W, 3] pixels, or BYTES [N] encoded images (JPEG, PNG, WebP, BMP)"},
    }


@router.get("/v2/models/{model}", summary="Model metadata", responses=ERRORS)
async def model_metadata(model: str, registry: RegistryDep) -> dict[str, Any]:
    return _model_metadata(registry.resolve(model))


@router.get("/v2/models/{model}/versions/{version}", summary="Model version metadata", responses=ERRORS)
async def model_version_metadata(model: str, version: str, registry: RegistryDep) -> dict[str, Any]:
    return _model_metadata(registry.resolve(model, _version(version)))


@router.get("/v2/models/{model}/ready", summary="Model readiness", responses=ERRORS)
async def model_ready(model: str, registry: RegistryDep) -> dict[str, Any]:
    served = registry.resolve(model)
    return {"name": served.name, "ready": True}


@router.get("/v2/models/{model}/versions/{version}/ready", summary="Model version readiness", responses=ERRORS)
async def model_version_ready(model: str, version: str, registry: RegistryDep) -> dict[str, Any]:
    served = registry.resolve(model, _version(version))
    return {"name": served.name, "ready": True}


def _split_body(raw: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError as exc:
            raise BadRequest(f"Inference-Header-Content-Length {header_length!r} is not a number") from exc
        if not 0 < n <= len(raw):
            raise BadRequest(f"Inference-Header-Content-Length {n} does not fit the {len(raw)}-byte body")
        head, binary = raw[:n], raw[n:]
    else:
        head, binary = raw, b""
    try:
        doc = orjson.loads(head)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the inference request is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise BadRequest("the inference request must be a JSON object")
    return doc, binary


def _bytes_elements(buf: bytes) -> list[bytes]:
    """BYTES tensor in binary form: each element is a 4-byte little-endian length, then the bytes."""
    out, i = [], 0
    while i < len(buf):
        if i + 4 > len(buf):
            raise BadRequest("BYTES binary data ends inside an element length")
        (n,) = struct.unpack_from("<I", buf, i)
        i += 4
        if i + n > len(buf):
            raise BadRequest("BYTES binary data ends inside an element")
        out.append(buf[i : i + n])
        i += n
    return out


def _json_bytes(data: Any) -> list[bytes]:
    if not isinstance(data, list):
        raise BadRequest("BYTES input 'data' must be a list of base64 strings")
    out = []
    for i, item in enumerate(data):
        if isinstance(item, dict) and "b64" in item:
            item = item["b64"]
        if not isinstance(item, str):
            raise BadRequest(f"BYTES element {i} must be a base64 string")
        try:
            out.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise BadRequest(f"BYTES element {i} is not valid base64 ({exc})") from exc
    return out


def _shape(spec: dict[str, Any]) -> list[int]:
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise BadRequest("input 'shape' must be a list of non-negative integers")
    return shape


async def _input_rows(request: Request, state: AppState, served: ServedVersion, doc: dict[str, Any],
                      binary: bytes) -> list[np.ndarray]:
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadRequest("'inputs' must be a list holding exactly one input (the images)")
    spec = inputs[0]
    shape, dtype = _shape(spec), spec.get("datatype")
    params = spec.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest("input 'parameters' must be an object")
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or size > len(binary):
            raise BadRequest(f"binary_data_size {size!r} does not fit the {len(binary)} bytes of binary data")
        raw = binary[:size]
    elif "data" not in spec:
        raise BadRequest("the input has neither 'data' nor binary data")
    s = state.settings
    h, w = served.meta.input.height, served.meta.input.width
    n = shape[0] if shape else 0
    if n > s.max_images_per_request:
        raise PayloadTooLarge(f"{n} images in one request; the limit is {s.max_images_per_request}")
    if dtype == "BYTES":
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise BadRequest(f"a BYTES input must have shape [N] or [N, 1], got {shape}")
        blobs = _bytes_elements(raw) if size is not None else _json_bytes(spec["data"])
        if len(blobs) != n:
            raise BadRequest(f"the shape says {n} elements but {len(blobs)} were sent")
        return await decode_all(blobs, h, w, s, request.app.state.decode_pool, state.metrics)
    if dtype == "UINT8":
        if shape[1:] != [h, w, 3] or len(shape) != 4:
            raise BadRequest(f"a UINT8 input must have shape [N, {h}, {w}, 3], got {shape}")
        if n == 0:
            raise BadRequest("the request holds no image")
        if size is not None:
            if len(raw) != n * h * w * 3:
                raise BadRequest(f"binary_data_size {len(raw)} does not match shape {shape}")
            arr = np.frombuffer(raw, np.uint8).reshape(shape)
        else:
            flat = spec["data"]
            try:
                arr = np.asarray(flat, dtype=np.int64).reshape(shape)
            except (ValueError, TypeError) as exc:
                raise BadRequest(f"'data' does not hold {np.prod(shape)} integers: {exc}") from exc
            if arr.min() < 0 or arr.max() > 255:
                raise BadRequest("UINT8 values must be between 0 and 255")
            arr = arr.astype(np.uint8)
        return list(arr)
    raise BadRequest(f"datatype {dtype!r} is not accepted: send BYTES (encoded images) or UINT8 (pixels)")


async def _infer(request: Request, state: AppState, registry: Registry, model: str, version: int | None) -> Response:
    deadline = deadline_for(request, state.settings)
    served = registry.resolve(model, version)
    with served.acquire():
        with served.batcher.incoming():  # rows on their way: the batcher may wait for them
            doc, binary = _split_body(await request.body(), request.headers.get(HEADER_LENGTH))
            req_id = doc.get("id")
            outputs_req = doc.get("outputs") or [{"name": "probabilities"}]
            if not isinstance(outputs_req, list) or not all(isinstance(o, dict) for o in outputs_req):
                raise BadRequest("'outputs' must be a list of objects")
            for o in outputs_req:
                if o.get("name") != "probabilities":
                    raise BadRequest(f"unknown output {o.get('name')!r}: this model has 'probabilities'")
            request_params = doc.get("parameters") or {}
            if not isinstance(request_params, dict):
                raise BadRequest("'parameters' must be an object")
            rows = await _input_rows(request, state, served, doc, binary)
        outcome = await run_rows(request, served, rows, deadline, state.metrics)
    probs = outcome.probabilities.astype(np.float32)
    out_docs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for o in outputs_req:
        params = o.get("parameters") or {}
        k = params.get("classification", 0)
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise BadRequest("the classification parameter must be a non-negative integer")
        as_binary = bool(params.get("binary_data", request_params.get("binary_data_output", False)))
        if k:
            k = min(k, probs.shape[1])
            strings = [f"{t['score']:.6f}:{t['index']}:{t['label']}".encode()
                       for row in top_k(probs, served.meta.labels, k) for t in row]
            entry: dict[str, Any] = {"name": "probabilities", "datatype": "BYTES", "shape": [len(rows), k]}
            if as_binary:
                blob = b"".join(struct.pack("<I", len(s)) + s for s in strings)
                entry["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                entry["data"] = [s.decode() for s in strings]
        else:
            entry = {"name": "probabilities", "datatype": "FP32", "shape": list(probs.shape)}
            if as_binary:
                blob = probs.tobytes()
                entry["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                entry["data"] = probs.ravel()
        out_docs.append(entry)
    body: dict[str, Any] = {"model_name": served.name, "model_version": str(served.version), "outputs": out_docs}
    if req_id is not None:
        body["id"] = req_id
    headers = outcome.headers()
    head = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    if blobs:
        headers["Inference-Header-Content-Length"] = str(len(head))
        return Response(head + b"".join(blobs), media_type="application/octet-stream", headers=headers)
    return Response(head, media_type="application/json", headers=headers)


@router.post("/v2/models/{model}/infer", summary="Inference", openapi_extra=INFER_DOC, responses=ERRORS,
             dependencies=[PredictAuth])
async def infer(model: str, request: Request, state: AppState, registry: RegistryDep) -> Response:
    return await _infer(request, state, registry, model, None)


@router.post("/v2/models/{model}/versions/{version}/infer", summary="Inference on a version",
             openapi_extra=INFER_DOC, responses=ERRORS, dependencies=[PredictAuth])
async def infer_version(model: str, version: str, request: Request, state: AppState,
                        registry: RegistryDep) -> Response:
    return await _infer(request, state, registry, model, _version(version))


@router.post("/v2/repository/index", summary="Model repository index", dependencies=[AdminAuth])
async def repository_index(registry: RegistryDep) -> Response:
    out = []
    for m in registry.describe():
        for v in m["versions"]:
            entry = {"name": m["name"], "version": str(v["version"]),
                     "state": "READY" if v["state"] == "AVAILABLE" else "UNAVAILABLE"}
            if "reason" in v:
                entry["reason"] = v["reason"]
            out.append(entry)
    return ORJSONResponse(out)


@router.post("/v2/repository/models/{model}/load", summary="Load a model (latest version)",
             dependencies=[AdminAuth], responses=ERRORS)
async def repository_load(model: str, registry: RegistryDep) -> dict[str, Any]:
    served = await registry.load(model)
    return {"name": served.name, "version": str(served.version), "state": "READY"}


@router.post("/v2/repository/models/{model}/unload", summary="Unload a model", dependencies=[AdminAuth],
             responses=ERRORS)
async def repository_unload(model: str, registry: RegistryDep) -> dict[str, Any]:
    await registry.unload(model)
    return {"name": model, "state": "UNAVAILABLE"}
