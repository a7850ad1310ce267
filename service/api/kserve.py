"""KServe v2 / Open Inference Protocol, with the classification, binary tensor data and model
repository extensions: what `tritonclient.http` speaks."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field, NonNegativeInt

from service import __version__
from service.api.deps import (
    EXAMPLE_JPEG_B64,
    PREDICT_ERRORS,
    AdminAuth,
    ORJSONResponse,
    PredictAuth,
    RegistryDep,
    http_call,
    json_body_doc,
    not_ready_reason,
    parse_body,
)
from service.api.views import describe_models, runtime_view
from service.errors import BadRequest, NotFound, NotReady
from service.loading import ServedVersion
from service.pipeline import Images, Outcome, b64_image, infer
from service.store import parse_version
from service.tensors import ACCEPTS, classification_k, input_images, output_tensor, pack_bytes

router = APIRouter(tags=["kserve-v2"])
HEADER_LENGTH = "inference-header-content-length"
EXTENSIONS = ["classification", "binary_tensor_data", "model_repository"]
ERRORS = PREDICT_ERRORS
PLATFORMS = {"tensorflow": "tensorflow_savedmodel", "openvino": "openvino"}  # Triton's platform names


class RequestInput(BaseModel):
    name: str
    shape: list[NonNegativeInt]
    datatype: str = Field(description="BYTES (encoded images) or UINT8 (pixels, [N, H, W, 3])")
    parameters: dict[str, Any] | None = None
    data: Any = None


class RequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput] = Field(min_length=1, max_length=1)
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[ResponseOutput]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any]


INFER_EXAMPLE = {
    "id": "42",
    "inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [EXAMPLE_JPEG_B64]}],
    "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}],
}
INFER_DOC = json_body_doc(InferenceRequest, INFER_EXAMPLE,
                          **{"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}})
HINTS = {"inputs": "'inputs' must be a list holding exactly one input (the images)"}


def _version(text: str | None) -> int | None:
    if text is None:
        return None
    version = parse_version(text)
    if version is None:
        raise NotFound(f"version {text!r} is not a positive integer")
    return version


@router.get("/v2", summary="Server metadata")
async def server_metadata() -> dict[str, Any]:
    return {"name": "imgserve", "version": __version__, "extensions": EXTENSIONS}


@router.get("/v2/health/live", summary="Server liveness")
async def server_live() -> dict[str, bool]:
    return {"live": True}


@router.get("/v2/health/ready", summary="Server readiness", responses={503: {"description": "not ready"}})
async def server_ready(request: Request) -> dict[str, bool]:
    reason = not_ready_reason(request)
    if reason is not None:
        raise NotReady(f"not ready: {reason}")
    return {"ready": True}


def _model_metadata(served: ServedVersion, loaded: list[int] | None = None) -> ModelMetadata:
    """A version's metadata; for the model (no version named), `loaded` lists every version loaded."""
    h, w = served.meta.input.height, served.meta.input.width
    rt = runtime_view(served)
    return ModelMetadata(
        name=served.name,
        versions=[str(v) for v in sorted(loaded)] if loaded else [str(served.version)],
        platform=PLATFORMS.get(rt["runtime"], rt["runtime"]),
        inputs=[TensorMetadata(name="images", datatype="UINT8", shape=[-1, h, w, 3])],
        outputs=[TensorMetadata(name="probabilities", datatype="FP32", shape=[-1, served.meta.num_classes])],
        parameters={"labels": served.meta.labels, **rt,
                    "accepts": ACCEPTS},
    )


@router.get("/v2/models/{model}", summary="Model metadata", responses=ERRORS)
async def model_metadata(model: str, registry: RegistryDep) -> ModelMetadata:
    served = registry.resolve(model)
    return _model_metadata(served, sorted(registry.models[served.name].loaded))


@router.get("/v2/models/{model}/versions/{version}", summary="Model version metadata", responses=ERRORS)
async def model_version_metadata(model: str, version: str, registry: RegistryDep) -> ModelMetadata:
    return _model_metadata(registry.resolve(model, _version(version)))


@router.get("/v2/models/{model}/ready", summary="Model readiness", responses=ERRORS)
async def model_ready(model: str, registry: RegistryDep) -> dict[str, Any]:
    served = registry.resolve(model)
    return {"name": served.name, "ready": True}


@router.get("/v2/models/{model}/versions/{version}/ready", summary="Model version readiness", responses=ERRORS)
async def model_version_ready(model: str, version: str, registry: RegistryDep) -> dict[str, Any]:
    served = registry.resolve(model, _version(version))
    return {"name": served.name, "ready": True}


def _split_body(raw: bytes, header_length: str | None) -> tuple[InferenceRequest, bytes]:
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
    return parse_body(InferenceRequest, head, HINTS), binary


def _json_bytes(data: Any) -> list[bytes]:
    if not isinstance(data, list):
        raise BadRequest("BYTES input 'data' must be a list of base64 strings")
    return [b64_image(item["b64"] if isinstance(item, dict) and "b64" in item else item, f"BYTES element {i}")
            for i, item in enumerate(data)]


def _binary_part(spec: RequestInput, binary: bytes) -> bytes | None:
    size = (spec.parameters or {}).get("binary_data_size")
    if size is None:
        if spec.data is None:
            raise BadRequest("the input has neither 'data' nor binary data")
        return None
    if not isinstance(size, int) or size < 0 or size > len(binary):
        raise BadRequest(f"binary_data_size {size!r} does not fit the {len(binary)} bytes of binary data")
    return binary[:size]


def _input_images(served: ServedVersion, spec: RequestInput, binary: bytes) -> Images:
    raw = _binary_part(spec, binary)
    elements = _json_bytes(spec.data) if spec.datatype == "BYTES" and raw is None else None
    return input_images(served, spec.datatype, spec.shape, raw=raw, elements=elements, values=spec.data)


def _check_outputs(doc: InferenceRequest) -> list[RequestOutput]:
    outputs = doc.outputs or [RequestOutput(name="probabilities")]
    for o in outputs:
        if o.name != "probabilities":
            raise BadRequest(f"unknown output {o.name!r}: this model has 'probabilities'")
        classification_k(o.parameters or {})
    return outputs


def _output(o: RequestOutput, outcome: Outcome, binary_default: bool) -> tuple[dict[str, Any], bytes | None]:
    """One output's JSON entry, and its bytes when it goes out as binary tensor data."""
    params = o.parameters or {}
    as_binary = bool(params.get("binary_data", binary_default))
    datatype, shape, data = output_tensor(outcome.probabilities, outcome.served.meta.labels,
                                          classification_k(params))
    entry: dict[str, Any] = {"name": "probabilities", "datatype": datatype, "shape": shape}
    values: Any
    if isinstance(data, np.ndarray):
        blob, values = data.tobytes(), data.ravel()
    else:
        blob, values = pack_bytes(data), [s.decode() for s in data]
    if as_binary:
        entry["parameters"] = {"binary_data_size": len(blob)}
        return entry, blob
    entry["data"] = values
    return entry, None


async def _infer(request: Request, model: str, version: int | None) -> Response:
    doc: InferenceRequest | None = None
    outputs: list[RequestOutput] = []

    async def parse(served: ServedVersion) -> Images:
        nonlocal doc, outputs
        doc, binary = _split_body(await request.body(), request.headers.get(HEADER_LENGTH))
        outputs = _check_outputs(doc)
        return _input_images(served, doc.inputs[0], binary)

    outcome = await infer(http_call(request), model, version, parse)
    assert doc is not None
    binary_default = bool((doc.parameters or {}).get("binary_data_output", False))
    rendered = [_output(o, outcome, binary_default) for o in outputs]
    body: dict[str, Any] = {"model_name": outcome.served.name, "model_version": str(outcome.served.version),
                            "outputs": [entry for entry, _ in rendered]}
    if doc.id is not None:
        body["id"] = doc.id
    headers = outcome.headers()
    head = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    blobs = [blob for _, blob in rendered if blob is not None]
    if blobs:
        headers["Inference-Header-Content-Length"] = str(len(head))
        return Response(head + b"".join(blobs), media_type="application/octet-stream", headers=headers)
    return Response(head, media_type="application/json", headers=headers)


@router.post("/v2/models/{model}/infer", summary="Inference", openapi_extra=INFER_DOC,
             responses={200: {"model": InferenceResponse}, **ERRORS}, dependencies=[PredictAuth])
async def infer_latest(model: str, request: Request) -> Response:
    return await _infer(request, model, None)


@router.post("/v2/models/{model}/versions/{version}/infer", summary="Inference on a version",
             openapi_extra=INFER_DOC, responses={200: {"model": InferenceResponse}, **ERRORS},
             dependencies=[PredictAuth])
async def infer_version(model: str, version: str, request: Request) -> Response:
    return await _infer(request, model, _version(version))


@router.post("/v2/repository/index", summary="Model repository index", dependencies=[AdminAuth])
async def repository_index(registry: RegistryDep) -> Response:
    out = []
    for m in describe_models(registry):
        for v in m["versions"]:
            entry = {"name": m["name"], "version": str(v["version"]),
                     "state": "READY" if v["state"] == "AVAILABLE" else "UNAVAILABLE"}
            for key in ("role", "reason"):
                if key in v:
                    entry[key] = v[key]
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
