"""POST /v1/feedback: the right label for a photo, stored where `python -m train --extra-data` reads it
(service/feedback.py). The photo comes as a multipart upload (`file`, `label`, optional `model` and `who`),
or, when the operator keeps recent images (IMGSERVE_RECENT_IMAGES_MB), as the request id of a prediction
(JSON `{"request_id", "label"}`)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from service.api.deps import ORJSONResponse, error_responses, json_body_doc, parse_body
from service.api.multipart import MultipartError, read_parts
from service.auth import key_matches
from service.errors import BadRequest, NotFound, Unauthorized, UnsupportedMediaType
from service.feedback import LABEL_RE, Conflict, FeedbackStore, StorageUnavailable
from service.imaging import sniff
from service.pipeline import decode_all

router = APIRouter(tags=["feedback"])
MAX_FIELD = 200


class FeedbackByRequest(BaseModel):
    """Feedback on a recent prediction, by the X-Request-ID its answer carried."""

    model_config = {"extra": "forbid"}

    request_id: str = Field(min_length=1, max_length=128)
    label: str = Field(min_length=1, max_length=64)
    index: int = Field(0, ge=0, description="which image of that request (0: the first)")
    who: str | None = Field(None, max_length=MAX_FIELD, description="who says so")


FORM_BODY = {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "label"],
    "properties": {"file": {"type": "string", "format": "binary", "description": "the photo (JPEG, PNG, WebP, BMP)"},
                   "label": {"type": "string", "description": "its right class"},
                   "model": {"type": "string", "description": "the model (default: the only or default model)"},
                   "who": {"type": "string", "description": "who says so"}}}}}


def _check_key(request: Request) -> None:
    """The API key, the admin key or the feedback key (which may do nothing else); open when none is set."""
    s = request.app.state.settings
    keys = [k.get_secret_value() for k in (s.api_key, s.admin_api_key, s.feedback_api_key) if k is not None]
    if keys and not any(key_matches(request.headers, k) for k in keys):
        raise Unauthorized("feedback needs the API key or the feedback key: send 'Authorization: Bearer <key>' or "
                           "'X-API-Key: <key>'", headers={"WWW-Authenticate": "Bearer"})


async def _form(request: Request) -> tuple[bytes, dict[str, str]]:
    try:
        parts = await read_parts(request.stream(), request.headers["content-type"], 8)
    except MultipartError as exc:
        raise BadRequest(str(exc)) from exc
    files = [p for p in parts if p.name == "file"]
    if len(files) != 1 or files[0].filename is None:
        raise BadRequest("send exactly one photo as a multipart file part named 'file'")
    fields = {}
    for p in parts:
        if p.name in ("label", "model", "who") and p.filename is None:
            fields[p.name] = p.data.decode("utf-8", "replace")[:MAX_FIELD]
        elif p.name != "file":
            raise BadRequest(f"unknown field {p.name!r}: the fields are file, label, model and who")
    return files[0].data, fields


@router.post(
    "/v1/feedback", summary="The right label for a photo: stored as training data for the next version",
    description="A multipart upload (`file`, `label`, optional `model`, `who`), or JSON naming a recent "
    "prediction's `request_id` when the server keeps recent images. The photo is stored once (named by its "
    "content) in the feedback folder, a folder per class, which `python -m train --extra-data` reads.",
    status_code=201,
    responses={201: {"description": "stored"}, 200: {"description": "the same photo had this label already"},
               409: {"description": "the same photo has another label"},
               **error_responses(400, 401, 404, 413, 415, 503)},
    openapi_extra=json_body_doc(FeedbackByRequest, {"request_id": "3f2a...", "label": "shoes"}, **FORM_BODY),
)
async def feedback(request: Request) -> Response:
    _check_key(request)
    state = request.app.state
    settings = state.settings
    if settings.feedback_dir is None:
        raise NotFound("feedback is off on this server: set IMGSERVE_FEEDBACK_DIR")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    predicted, version = None, None
    if ctype == "multipart/form-data":
        data, fields = await _form(request)
        label, model, who = fields.get("label", ""), fields.get("model") or None, fields.get("who")
    elif ctype == "application/json":
        body = parse_body(FeedbackByRequest, await request.body())
        recent = getattr(state, "recent", None)
        if recent is None:
            raise NotFound("this server keeps no recent images (IMGSERVE_RECENT_IMAGES_MB is 0): send the photo")
        kept = await asyncio.to_thread(recent.get, body.request_id)
        if body.index >= len(kept.images):
            raise BadRequest(f"request {body.request_id!r} had {len(kept.images)} image(s); index {body.index} "
                             "is not one of them")
        data, label, model, who = kept.images[body.index], body.label, kept.model, body.who
        predicted, version = kept.predicted[body.index], kept.version
    else:
        raise UnsupportedMediaType(f"content type {ctype or '(none)'} is not accepted: send multipart/form-data "
                                   "with 'file' and 'label', or JSON with 'request_id' and 'label'")
    served, _ = state.registry.route(model, None, None, None)
    labels = served.meta.labels
    label = label.strip()
    if not label:
        raise BadRequest("'label' is missing: the photo's right class")
    metrics = state.metrics.feedback
    if label not in labels:
        if not settings.feedback_new_classes:
            metrics.labels(served.name, "refused").inc()
            raise BadRequest(f"{label!r} is not a class of {served.name} ({', '.join(labels)}); "
                             "IMGSERVE_FEEDBACK_NEW_CLASSES=true accepts new ones")
        if not LABEL_RE.fullmatch(label):
            raise BadRequest(f"{label!r} cannot be a class name: letters, digits, space, '_', '.', '+' and '-', "
                             "starting with a letter or digit, 64 at most")
    # decoded as a prediction decodes it: a photo the model could not read is refused, not stored
    h, w = served.meta.input.height, served.meta.input.width
    await decode_all([data], h, w, settings, state.decode_pool, state.metrics)
    image_format = sniff(data)
    if image_format is None:  # decoded by Pillow's header yet not sniffed: refuse rather than guess
        raise UnsupportedMediaType("the photo's format could not be told from its bytes")
    record: dict[str, Any] = {"who": who, "model_version": version or served.version,
                              "request_id": request.scope.get("state", {}).get("request_id")}
    if predicted is not None:
        record["predicted"] = predicted
    store = FeedbackStore(settings.feedback_dir)
    try:
        saved = await asyncio.to_thread(store.save, served.name, label, data, image_format, record)
    except Conflict:
        metrics.labels(served.name, "conflict").inc()
        raise
    except StorageUnavailable:
        metrics.labels(served.name, "storage_error").inc()
        raise
    metrics.labels(served.name, "stored" if saved.created else "duplicate").inc()
    return ORJSONResponse({"model": served.name, "label": label, "stored": str(saved.path.relative_to(
        settings.feedback_dir)), "sha256": saved.sha256, "created": saved.created},
        status_code=201 if saved.created else 200)


@router.get("/v1/feedback", summary="Whether feedback is on, and the photos stored so far per model and class")
async def feedback_status(request: Request) -> dict[str, Any]:
    settings = request.app.state.settings
    if settings.feedback_dir is None:
        return {"enabled": False}
    store = FeedbackStore(settings.feedback_dir)
    root = settings.feedback_dir
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []
    counts = await asyncio.to_thread(lambda: {n: store.counts(n) for n in names})
    return {"enabled": True, "new_classes": settings.feedback_new_classes,
            "by_request_id": getattr(request.app.state, "recent", None) is not None, "stored": counts}
