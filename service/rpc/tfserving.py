"""TF Serving's gRPC API: `tensorflow.serving.PredictionService` (Predict, Classify, GetModelMetadata) and
`ModelService.GetModelStatus`, answering as the REST TF Serving endpoints do (service/api/tfserving.py).

Predict takes the input `images`: DT_STRING [N] encoded images, or DT_UINT8 [N, H, W, 3] pixels, and
answers `probabilities` (DT_FLOAT [N, C]). Classify takes tf.Examples whose `image/encoded` (or `images`)
feature holds an encoded image, and answers every class with its score, best first. A ModelSpec's
`version` or `version_label` picks the version. The messages come from the compiled definitions
(service/rpc/protos.py): TensorFlow is not imported."""

from __future__ import annotations

from typing import Any

import numpy as np

from service.api.views import version_entries
from service.errors import BadRequest, NotFound, servable_not_found
from service.loading import ServedVersion
from service.pipeline import Images, infer
from service.rpc import protos
from service.rpc.server import Rpc, RpcServer
from service.tensors import input_images

DT_FLOAT, DT_UINT8, DT_STRING = 1, 4, 7
SIGNATURES = ("", "serving_default")
FEATURES = ("image/encoded", "images")
PREDICT_METHOD = "tensorflow/serving/predict"


def _m(name: str) -> Any:
    return protos.message(name)


def _spec(spec: Any) -> tuple[str, int | None, str | None]:
    if not spec.name:
        raise BadRequest("model_spec.name is required")
    if spec.signature_name not in SIGNATURES:
        raise BadRequest(f"unknown signature {spec.signature_name!r}: this model has 'serving_default'")
    version = spec.version.value if spec.HasField("version") else None
    if version is not None and version < 1:
        raise NotFound(f"version {version} is not a positive integer")
    return spec.name, version, spec.version_label or None


def _resolve(rpc: Rpc, spec: Any) -> ServedVersion:
    name, version, label = _spec(spec)
    registry = rpc.registry()
    with servable_not_found():
        return registry.route(name, version, label)[0] if label else registry.resolve(name, version)


def _answer_spec(served: ServedVersion) -> Any:
    return _m("tensorflow.serving.ModelSpec")(name=served.name, signature_name="serving_default",
                                              version=_m("google.protobuf.Int64Value")(value=served.version))


def _shape(tensor: Any) -> list[int]:
    return [d.size for d in tensor.tensor_shape.dim]


def tensor_images(tensor: Any, served: ServedVersion) -> Images:
    """The `images` TensorProto: DT_STRING of encoded images, or DT_UINT8 pixels."""
    shape = _shape(tensor)
    if tensor.dtype == DT_STRING:
        return input_images(served, "BYTES", shape, elements=list(tensor.string_val))
    if tensor.dtype == DT_UINT8:
        raw = tensor.tensor_content or None
        values = None if raw is not None else np.asarray(tensor.int_val, np.int64)
        return input_images(served, "UINT8", shape, raw=raw, values=values)
    raise BadRequest(f"input 'images' has dtype {tensor.dtype}: send DT_STRING (encoded images) or DT_UINT8 "
                     "(pixels [N, H, W, 3])")


def _float_tensor(values: np.ndarray) -> Any:
    t = _m("tensorflow.TensorProto")(dtype=DT_FLOAT, tensor_content=values.astype("<f4").tobytes())
    t.tensor_shape.dim.extend(_m("tensorflow.TensorShapeProto.Dim")(size=n) for n in values.shape)
    return t


async def predict(req: Any, rpc: Rpc) -> Any:
    name, version, label = _spec(req.model_spec)
    if set(req.inputs) != {"images"}:
        raise BadRequest(f"inputs {sorted(req.inputs)}: this model takes one input, 'images'")
    if set(req.output_filter) - {"probabilities"}:
        raise BadRequest(f"output_filter {list(req.output_filter)}: this model has 'probabilities'")

    async def parse(served: ServedVersion) -> Images:
        return tensor_images(req.inputs["images"], served)

    with servable_not_found():
        outcome = await infer(rpc.call(), name, version, parse, label)
    rpc.answered_by(outcome)
    resp = _m("tensorflow.serving.PredictResponse")(model_spec=_answer_spec(outcome.served))
    resp.outputs["probabilities"].CopyFrom(_float_tensor(outcome.probabilities))
    return resp


def _example_images(req: Any) -> list[bytes]:
    which = req.input.WhichOneof("kind")
    if which != "example_list":
        raise BadRequest("send input.example_list: tf.Examples with the encoded image in the 'image/encoded' "
                         "bytes feature" + (" (example_list_with_context is not supported)" if which else ""))
    blobs = []
    for i, example in enumerate(req.input.example_list.examples):
        feature = next((example.features.feature[k] for k in FEATURES if k in example.features.feature), None)
        if feature is None or len(feature.bytes_list.value) != 1:
            raise BadRequest(f"example {i}: needs one encoded image in its 'image/encoded' bytes feature")
        blobs.append(feature.bytes_list.value[0])
    return blobs


async def classify(req: Any, rpc: Rpc) -> Any:
    name, version, label = _spec(req.model_spec)
    blobs = _example_images(req)

    async def parse(served: ServedVersion) -> Images:
        return Images(blobs=blobs)

    with servable_not_found():
        outcome = await infer(rpc.call(), name, version, parse, label)
    rpc.answered_by(outcome)
    labels, cls = outcome.served.meta.labels, _m("tensorflow.serving.Class")
    result = _m("tensorflow.serving.ClassificationResult")()
    for row in outcome.probabilities:
        order = np.argsort(-row, kind="stable")
        result.classifications.add(classes=[cls(label=labels[i], score=float(row[i])) for i in order])
    return _m("tensorflow.serving.ClassificationResponse")(model_spec=_answer_spec(outcome.served), result=result)


def _tensor_info(name: str, dtype: int, dims: list[int]) -> Any:
    info = _m("tensorflow.TensorInfo")(name=name, dtype=dtype)
    info.tensor_shape.dim.extend(_m("tensorflow.TensorShapeProto.Dim")(size=n) for n in dims)
    return info


async def get_model_metadata(req: Any, rpc: Rpc) -> Any:
    fields = list(req.metadata_field)
    if fields != ["signature_def"]:
        raise BadRequest(f"metadata_field {fields}: only 'signature_def' is available")
    served = _resolve(rpc, req.model_spec)
    h, w = served.meta.input.height, served.meta.input.width
    sig = _m("tensorflow.SignatureDef")(method_name=PREDICT_METHOD)
    sig.inputs["images"].CopyFrom(_tensor_info("images", DT_UINT8, [-1, h, w, 3]))
    sig.outputs["probabilities"].CopyFrom(_tensor_info("probabilities", DT_FLOAT, [-1, served.meta.num_classes]))
    sigs = _m("tensorflow.serving.SignatureDefMap")()
    sigs.signature_def["serving_default"].CopyFrom(sig)
    resp = _m("tensorflow.serving.GetModelMetadataResponse")(model_spec=_answer_spec(served))
    resp.metadata["signature_def"].Pack(sigs)
    return resp


async def get_model_status(req: Any, rpc: Rpc) -> Any:
    """Every loaded version (AVAILABLE) and those that failed (END, with the error), as TF Serving lists them."""
    registry = rpc.registry()
    name, version, label = _spec(req.model_spec)
    served = _resolve(rpc, req.model_spec)
    entries = version_entries(registry, served.name)
    if version is not None or label:
        entries = [e for e in entries if e["version"] == served.version]
    else:
        entries = [e for e in entries if e["state"] in ("AVAILABLE", "FAILED")]
    status_cls, proto = _m("tensorflow.serving.ModelVersionStatus"), _m("tensorflow.serving.StatusProto")
    states = status_cls.DESCRIPTOR.enum_types_by_name["State"]
    out = _m("tensorflow.serving.GetModelStatusResponse")()
    for e in entries:
        ok = e["state"] == "AVAILABLE"
        out.model_version_status.add(
            version=e["version"], state=states.values_by_name["AVAILABLE" if ok else "END"].number,
            status=proto(error_code=0 if ok else 2, error_message="" if ok else e.get("reason", "")))
    return out


def register(server: RpcServer) -> None:
    server.add(protos.PREDICTION, {"Predict": predict, "Classify": classify, "GetModelMetadata": get_model_metadata},
               auth={"Predict": "predict", "Classify": "predict"})
    server.add(protos.MODEL_SERVICE, {"GetModelStatus": get_model_status}, auth={})
