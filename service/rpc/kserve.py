"""`inference.GRPCInferenceService`: the KServe v2 / Open Inference Protocol over gRPC, as Triton defines
it and `tritonclient.grpc` speaks it. The same answers as the REST side (service/api/kserve.py): BYTES
inputs hold encoded images, UINT8 inputs pixels; the `classification` output parameter gives top-k
strings; a request parameter `label` picks a labelled version, and Triton's `timeout` (microseconds)
sets the deadline when the call has none of its own."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import numpy as np

from service import __version__
from service.api.views import describe_models, runtime_view
from service.errors import BadRequest, NotFound, ServiceError
from service.loading import ServedVersion
from service.pipeline import TIMEOUT_HEADER, Images, infer, not_ready
from service.rpc import protos
from service.rpc.server import Rpc, RpcServer
from service.store import parse_version
from service.tensors import ACCEPTS, classification_k, input_images, output_tensor, pack_bytes

EXTENSIONS = ["classification", "model_repository"]
PLATFORMS = {"tensorflow": "tensorflow_savedmodel", "openvino": "openvino"}
REQUEST_PARAMETERS = {"label", "timeout", "priority"}
OUTPUT_PARAMETERS = {"classification", "binary_data"}
STREAM_WINDOW = 64  # requests of one stream worked on at once


def _m(name: str) -> Any:
    return protos.message(f"inference.{name}")


def parameters(params: Any, allowed: set[str], what: str) -> dict[str, Any]:
    """An InferParameter map as plain values; a parameter this server does not know is refused."""
    out = {}
    for key, p in params.items():
        if key not in allowed:
            hint = "; shared memory is not supported" if "shared_memory" in key else ""
            raise BadRequest(f"unknown {what} parameter {key!r}: accepted are {sorted(allowed)}{hint}")
        which = p.WhichOneof("parameter_choice")
        out[key] = getattr(p, which) if which else None
    return out


def _version(text: str) -> int | None:
    if not text:
        return None
    version = parse_version(text)
    if version is None:
        raise NotFound(f"version {text!r} is not a positive integer")
    return version


async def server_live(req: Any, rpc: Rpc) -> Any:
    return _m("ServerLiveResponse")(live=True)


async def server_ready(req: Any, rpc: Rpc) -> Any:
    return _m("ServerReadyResponse")(ready=not_ready(rpc.serving) is None)


async def model_ready(req: Any, rpc: Rpc) -> Any:
    """As Triton: `ready: false` (not an error) for a model or version that is not being served."""
    registry = getattr(rpc.serving, "registry", None)
    try:
        ready = registry is not None and registry.resolve(req.name, _version(req.version)) is not None
    except ServiceError:  # unknown, or not loaded (unloaded, failed, starting)
        ready = False
    return _m("ModelReadyResponse")(ready=ready)


async def server_metadata(req: Any, rpc: Rpc) -> Any:
    return _m("ServerMetadataResponse")(name="imgserve", version=__version__, extensions=EXTENSIONS)


def _tensor_meta(served: ServedVersion) -> tuple[list[Any], list[Any]]:
    h, w = served.meta.input.height, served.meta.input.width
    tm = _m("ModelMetadataResponse.TensorMetadata")
    return ([tm(name="images", datatype="UINT8", shape=[-1, h, w, 3])],
            [tm(name="probabilities", datatype="FP32", shape=[-1, served.meta.num_classes])])


async def model_metadata(req: Any, rpc: Rpc) -> Any:
    registry = rpc.registry()
    version = _version(req.version)
    served = registry.resolve(req.name, version)
    versions = [served.version] if version is not None else sorted(registry.models[served.name].loaded)
    inputs, outputs = _tensor_meta(served)
    return _m("ModelMetadataResponse")(name=served.name, versions=[str(v) for v in versions],
                                       platform=PLATFORMS.get(served.runtime.runtime, served.runtime.runtime),
                                       inputs=inputs, outputs=outputs)


async def model_config(req: Any, rpc: Rpc) -> Any:
    """The parts of Triton's model configuration that describe this model (what clients read)."""
    served = rpc.registry().resolve(req.name, _version(req.version))
    h, w = served.meta.input.height, served.meta.input.width
    batcher = served.batcher

    def dtype(name: str) -> int:
        return protos.enum_value("inference.DataType", name)

    config = _m("ModelConfig")(
        name=served.name, platform=PLATFORMS.get(served.runtime.runtime, served.runtime.runtime),
        max_batch_size=batcher.max_batch_size,
        input=[_m("ModelInput")(name="images", data_type=dtype("TYPE_UINT8"), dims=[h, w, 3])],
        output=[_m("ModelOutput")(name="probabilities", data_type=dtype("TYPE_FP32"), dims=[served.meta.num_classes])],
    )
    config.parameters["labels"].string_value = ",".join(served.meta.labels)
    config.parameters["accepts"].string_value = ACCEPTS
    for key, value in runtime_view(served).items():
        config.parameters[key].string_value = value
    return _m("ModelConfigResponse")(config=config)


def _images(req: Any, served: ServedVersion) -> Images:
    if len(req.inputs) != 1:
        raise BadRequest(f"the request must hold exactly one input (the images); it holds {len(req.inputs)}")
    spec = req.inputs[0]
    parameters(spec.parameters, set(), "input")
    if len(req.raw_input_contents) > 1:
        raise BadRequest(f"{len(req.raw_input_contents)} raw_input_contents for one input")
    raw = req.raw_input_contents[0] if req.raw_input_contents else None
    contents = spec.contents
    if raw is not None and contents.ByteSize():
        raise BadRequest("the input has both raw_input_contents and typed contents: send one")
    if raw is None and not contents.ByteSize():
        raise BadRequest("the input has no data: send raw_input_contents or contents")
    elements = list(contents.bytes_contents) if spec.datatype == "BYTES" and raw is None else None
    values = np.asarray(contents.uint_contents, np.int64) if spec.datatype == "UINT8" and raw is None else None
    return input_images(served, spec.datatype, list(spec.shape), raw=raw, elements=elements, values=values)


async def model_infer(req: Any, rpc: Rpc) -> Any:
    version = _version(req.model_version)
    params = parameters(req.parameters, REQUEST_PARAMETERS, "request")
    label = params.get("label")
    if label is not None and not isinstance(label, str):
        raise BadRequest("the label parameter must be a string")
    outputs = []
    for o in req.outputs or ():
        if o.name != "probabilities":
            raise BadRequest(f"unknown output {o.name!r}: this model has 'probabilities'")
        outputs.append(classification_k(parameters(o.parameters, OUTPUT_PARAMETERS, "output")))
    call = rpc.call()
    timeout_us = params.get("timeout")
    if timeout_us is not None:
        if not isinstance(timeout_us, int) or isinstance(timeout_us, bool) or timeout_us < 0:
            raise BadRequest("the timeout parameter must be a whole number of microseconds")
        if timeout_us and rpc.context.time_remaining() is None and TIMEOUT_HEADER not in rpc.metadata:
            cap = rpc.serving.settings.max_request_timeout_ms / 1000
            call.deadline = time.monotonic() + min(timeout_us / 1e6, cap)

    async def parse(served: ServedVersion) -> Images:
        return _images(req, served)

    outcome = await infer(call, req.model_name or None, version, parse, label)
    rpc.answered_by(outcome)
    resp = _m("ModelInferResponse")(model_name=outcome.served.name, model_version=str(outcome.served.version),
                                    id=req.id)
    for k in outputs or [0]:
        datatype, shape, data = output_tensor(outcome.probabilities, outcome.served.meta.labels, k)
        resp.outputs.add(name="probabilities", datatype=datatype, shape=shape)
        resp.raw_output_contents.append(data.tobytes() if isinstance(data, np.ndarray) else pack_bytes(data))
    return resp


async def model_stream_infer(requests: AsyncIterator[Any], rpc: Rpc) -> AsyncIterator[Any]:
    """Each request of the stream as ModelInfer, up to STREAM_WINDOW at once; a response per request, in the
    order they finish (each carries its request's id); a request that fails gets `error_message` and the
    stream goes on. The stream's n-th request is `<the stream's x-request-id>/<n>` (from 1) in the request
    log and for feedback."""
    out: asyncio.Queue[Any] = asyncio.Queue()
    metrics = rpc.serving.metrics
    window = asyncio.Semaphore(STREAM_WINDOW)
    tasks: set[asyncio.Task[None]] = set()

    async def one(req: Any, n: int) -> None:
        # each request of a stream is a request in progress, as a unary call is: the in-flight gauge counts
        # it, and a lone row runs inline only while nothing else is being worked on (pipeline.run_rows)
        metrics.request_began()
        try:
            if isinstance(req, BadRequest):
                raise req
            rpc.admit()
            own = replace(rpc, request_id=f"{rpc.trailers['x-request-id']}/{n}")  # the same trailers
            resp = _m("ModelStreamInferResponse")(infer_response=await model_infer(req, own))
        except ServiceError as exc:
            resp = _m("ModelStreamInferResponse")(error_message=exc.message, infer_response=_m("ModelInferResponse")(
                id=getattr(req, "id", ""), model_name=getattr(req, "model_name", "")))
        finally:
            metrics.request_ended()
            metrics.process_requests.inc()
            window.release()
        await out.put(resp)

    async def read() -> None:
        n = 0
        async for req in requests:
            await window.acquire()
            n += 1
            task = asyncio.get_running_loop().create_task(one(req, n))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        while tasks:
            await asyncio.wait(set(tasks))
        await out.put(None)

    reader = asyncio.get_running_loop().create_task(read())
    try:
        while (resp := await out.get()) is not None:
            yield resp
        await reader
    finally:
        reader.cancel()
        for task in list(tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader


async def repository_index(req: Any, rpc: Rpc) -> Any:
    index = _m("RepositoryIndexResponse.ModelIndex")
    models = []
    for m in describe_models(rpc.registry()):
        for v in m["versions"]:
            state = "READY" if v["state"] == "AVAILABLE" else "UNAVAILABLE"
            if req.ready and state != "READY":
                continue
            models.append(index(name=m["name"], version=str(v["version"]), state=state, reason=v.get("reason", "")))
    return _m("RepositoryIndexResponse")(models=models)


async def repository_load(req: Any, rpc: Rpc) -> Any:
    await rpc.registry().load(req.model_name)
    return _m("RepositoryModelLoadResponse")()


async def repository_unload(req: Any, rpc: Rpc) -> Any:
    await rpc.registry().unload(req.model_name)
    return _m("RepositoryModelUnloadResponse")()


def register(server: RpcServer) -> None:
    server.add(protos.KSERVE, {
        "ServerLive": server_live, "ServerReady": server_ready, "ModelReady": model_ready,
        "ServerMetadata": server_metadata, "ModelMetadata": model_metadata, "ModelConfig": model_config,
        "ModelInfer": model_infer, "ModelStreamInfer": model_stream_infer,
        "RepositoryIndex": repository_index, "RepositoryModelLoad": repository_load,
        "RepositoryModelUnload": repository_unload,
    }, auth={"ModelInfer": "predict", "ModelStreamInfer": "predict", "RepositoryIndex": "admin",
             "RepositoryModelLoad": "admin", "RepositoryModelUnload": "admin"})
