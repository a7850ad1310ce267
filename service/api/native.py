"""The native API: /predict, /v1/models, health, the upload page and training reports."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, Response
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from service import store
from service.api.deps import (
    PREDICT_ERRORS,
    AppState,
    ORJSONResponse,
    PredictAuth,
    RegistryDep,
    error_response,
    http_call,
    not_ready_reason,
)
from service.api.multipart import MultipartError, read_parts
from service.api.views import describe_models, runtime_view
from service.auth import key_matches
from service.errors import BadRequest, NotFound, NotReady, ServiceError, UnsupportedMediaType
from service.loading import ServedVersion
from service.pipeline import ClientGone, Images, infer, top_k
from service.workers import WorkerState, describe

router = APIRouter()
STATIC = Path(__file__).resolve().parent.parent / "static"
REPORT_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,100}\.(png|json|md)$")
STATIC_FILE_RE = re.compile(r"^[a-z0-9-]{1,64}\.(js|css|png|svg)$")

ERRORS = PREDICT_ERRORS
MODEL_NAME_MAX = 64
TOP_K_MAX = 1000
PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"},
                                            "description": "one or more images (JPEG, PNG, WebP, BMP)"}},
                }
            },
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
PREDICT_EXAMPLE = {
    "model": "demo-shapes",
    "version": 1,
    "predictions": [{"filename": "circle.jpg", "top": [{"label": "circle", "index": 0, "score": 0.97},
                                                       {"label": "square", "index": 2, "score": 0.02}]}],
}


async def read_images(request: Request, max_files: int, max_fields: int) -> Images:
    """The images of a request: multipart parts named `file`, or the whole body when it is an image."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        try:
            parts = await read_parts(request.stream(), request.headers["content-type"], max_files + 1 + max_fields)
        except MultipartError as exc:
            raise BadRequest(str(exc)) from exc
        files = [p for p in parts if p.name == "file"]
        if not files:
            names = ", ".join(dict.fromkeys(p.name for p in parts))
            raise BadRequest(f"the multipart body has no part named 'file' (it has: {names or 'no parts'})")
        if len(parts) - len(files) > max_fields:
            raise BadRequest(f"the multipart body has more than {max_fields} fields besides 'file' "
                             "(IMGSERVE_MAX_FORM_FIELDS)")
        images = Images()
        for i, part in enumerate(files):
            if part.filename is None:
                raise BadRequest(f"part {i + 1} named 'file' is a text field, not a file upload")
            images.blobs.append(part.data)
            images.names.append(part.filename or f"image-{i + 1}")
        return images
    if ctype.startswith("image/") or ctype == "application/octet-stream":
        return Images(blobs=[await request.body()], names=["body"])
    raise UnsupportedMediaType(
        f"content type {ctype or '(none)'} is not accepted: send multipart/form-data with 'file' parts, "
        "or one image as the body with an image/* content type"
    )


@router.post(
    "/predict",
    tags=["predict"],
    summary="Classify one or more images",
    description="Send images as multipart parts named `file` (several allowed) or one image as the raw body "
    "(`Content-Type: image/jpeg` ...). Answers the `top_k` classes of each image, best first, and the model "
    "version that answered. Optional header `X-Request-Timeout-Ms` sets the deadline.",
    openapi_extra=PREDICT_BODY,
    responses={200: {"content": {"application/json": {"example": PREDICT_EXAMPLE}}}, **ERRORS},
    dependencies=[PredictAuth],
    response_class=ORJSONResponse,
)
async def predict(
    request: Request,
    model: Annotated[str | None, Query(description="model name (default: the only or default model)",
                                       max_length=MODEL_NAME_MAX)] = None,
    version: Annotated[int | None, Query(ge=1, description="version (default: stable, or the canary for its "
                                        "share of the traffic)")] = None,
    top_k_: Annotated[int, Query(alias="top_k", ge=1, le=TOP_K_MAX, description="classes per image")] = 5,
    label: Annotated[str | None, Query(description="a version label: stable, canary, shadow or one an operator set",
                                       max_length=32)] = None,
) -> Response:
    return await answer(request, model, version, top_k_, label)


async def answer(request: Request, model: str | None, version: int | None, k: int,
                 label: str | None = None) -> Response:
    """/predict once its query is valid and its key checked (the route above, or `FastPath`)."""
    settings = request.app.state.settings

    async def parse(served: ServedVersion) -> Images:
        return await read_images(request, settings.max_images_per_request, settings.max_form_fields)

    outcome = await infer(http_call(request), model, version, parse, label)
    tops = top_k(outcome.probabilities, outcome.served.meta.labels, k)
    body = {
        "model": outcome.served.name,
        "version": outcome.served.version,
        "predictions": [{"filename": n, "top": t} for n, t in zip(outcome.names, tops, strict=True)],
    }
    return ORJSONResponse(body, headers=outcome.headers())


class FastPath:
    """ASGI: `POST /predict` with a raw image body or a multipart upload, its key right and its query
    plainly valid, goes straight to `answer`, past Starlette's routing and FastAPI's dependency solving
    and query validation (about a tenth of the server's CPU time per request on a small model, a fifth
    with multipart: `python -m bench.inprocess [--multipart]`). Anything else, including every request
    whose query or key would be refused, goes on to the FastAPI route; a bad body gets the same
    `error_response` on either path (tests/service/test_fastpath.py sends each both ways)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        query = self._query(scope) if scope["type"] == "http" and scope["path"] == "/predict" else None
        if query is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            response = await answer(request, *query)
        except ServiceError as exc:
            response = error_response(exc)
        except (ClientGone, ClientDisconnect):
            request.app.state.metrics.rejections.labels("client_gone").inc()
            response = Response(status_code=499)
        await response(scope, receive, send)

    @staticmethod
    def _query(scope: Scope) -> tuple[str | None, int | None, int, str | None] | None:
        """(model, version, top_k, label) when this request can take the fast path, else None."""
        if scope["method"] != "POST":
            return None
        ctype = key = b""
        for name, value in scope["headers"]:
            if name == b"content-type":
                ctype = value
            elif name in (b"authorization", b"x-api-key"):
                key = value
        ctype = ctype.split(b";", 1)[0].strip().lower()
        if not (ctype.startswith(b"image/") or ctype in (b"application/octet-stream", b"multipart/form-data")):
            return None
        expected = scope["app"].state.settings.api_key
        if expected is not None and not (key and key_matches(Headers(scope=scope), expected.get_secret_value())):
            return None
        model, version, k, label = None, None, 5, None
        raw = scope["query_string"]
        if raw:
            seen = set()
            for name, value in parse_qsl(raw.decode("latin-1"), keep_blank_values=True):
                if name in seen:
                    return None
                seen.add(name)
                if name == "model" and 0 < len(value) <= MODEL_NAME_MAX:
                    model = value
                elif name == "version" and value.isascii() and value.isdigit() and int(value) >= 1:
                    version = int(value)
                elif name == "top_k" and value.isascii() and value.isdigit() and 1 <= int(value) <= TOP_K_MAX:
                    k = int(value)
                elif name == "label" and 0 < len(value) <= 32:
                    label = value
                else:
                    return None
        return model, version, k, label


@router.get("/v1/models", tags=["models"], summary="Models, versions, states, runtimes and labels",
            response_class=ORJSONResponse)
async def list_models(registry: RegistryDep) -> Response:
    doc: dict[str, Any] = {"models": describe_models(registry)}
    if registry.mirror is not None:
        doc["store"] = registry.mirror.status()
    return ORJSONResponse(doc)


@router.get("/health/live", tags=["health"], summary="The process answers",
            responses={200: {"content": {"application/json": {"example": {"status": "live"}}}}})
async def live() -> dict[str, str]:
    return {"status": "live"}


@router.get("/health/ready", tags=["health"], summary="A model is loaded and warm, and not draining",
            responses={503: {"description": "starting, no model loaded, or draining for shutdown"}})
async def ready(request: Request) -> dict[str, Any]:
    reason = not_ready_reason(request)
    if reason is not None:
        raise NotReady(reason)
    registry = request.app.state.registry
    board = request.app.state.board
    alone = [WorkerState(0, os.getpid(), True, False, "", registry.versions())]
    return {"status": "ready", "models": registry.versions(),
            "runtimes": {n: runtime_view(s) for n, s in registry.served.items()},
            "device": getattr(request.app.state, "device", "unknown"),
            "processes": describe(board.states() if board is not None else alone)}


@router.get("/", include_in_schema=False)
async def upload_page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/static/{name}", include_in_schema=False)
async def static_file(name: str) -> FileResponse:
    if not STATIC_FILE_RE.fullmatch(name):
        raise NotFound("no such file")
    path = STATIC / name
    if not path.is_file():
        raise NotFound("no such file")
    return FileResponse(path)


@router.get(
    "/v1/models/{model}/versions/{version}/report/{file}",
    tags=["models"],
    summary="A file of the version's training report (metrics.json, report.md, plots)",
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}, "application/json": {}, "text/markdown": {}}},
               404: {"description": "unknown model, version or file", "content": {"application/json": {}}}},
)
async def report_file(model: str, version: int, file: str, state: AppState) -> FileResponse:
    if not store.is_model_name(model) or version < 1 or not REPORT_FILE_RE.fullmatch(file):
        raise NotFound("no such report file")
    folder = store.version_dir(state.settings.model_store, model, version) / "report"
    path = (folder / file).resolve()
    if path.parent != folder.resolve() or not path.is_file():
        raise NotFound(f"model {model!r} version {version} has no report file {file!r}")
    media = {"png": "image/png", "json": "application/json", "md": "text/markdown"}[file.rsplit(".", 1)[1]]
    return FileResponse(path, media_type=media)
