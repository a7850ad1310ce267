"""Shared route dependencies and the JSON response class."""

from __future__ import annotations

import base64
from typing import Annotated, Any, TypeVar

import cv2
import numpy as np
import orjson
from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from service.auth import key_matches
from service.errors import BadRequest, NotReady, ServiceError, Unauthorized
from service.metrics import Metrics
from service.pipeline import ROUTE_KEY_HEADER, TIMEOUT_HEADER, Call, deadline_for, not_ready
from service.registry import Registry
from service.settings import Settings


def _example_jpeg() -> str:
    """A real 32x32 JPEG (a red disc on grey), base64: the protocol examples in /docs work when tried."""
    img = np.full((32, 32, 3), 128, np.uint8)
    cv2.circle(img, (16, 16), 10, (40, 40, 220), -1)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 80])
    return base64.b64encode(buf.tobytes()).decode() if ok else ""


EXAMPLE_JPEG_B64 = _example_jpeg()

ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "Bad input: not decodable, malformed body or parameter (`{\"error\": ...}`)",
    401: "Missing or wrong API key",
    404: "Unknown model or version",
    408: "The request body did not arrive in time",
    413: "Body, image pixels or image count over the limit",
    415: "Not a JPEG, PNG, WebP or BMP image, or a content type not accepted",
    422: "Invalid query parameter",
    429: "Queue full; retry after the Retry-After header",
    503: "No model loaded yet, or shutting down",
    504: "The deadline passed before the images were run",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the given error statuses, all JSON `{"error", "code"}`."""
    return {c: {"description": ERROR_DESCRIPTIONS[c]} for c in codes}


PREDICT_ERRORS = error_responses(400, 401, 404, 408, 413, 415, 422, 429, 503, 504)


M = TypeVar("M", bound=BaseModel)
BODY_MODELS: dict[str, type[BaseModel]] = {}  # request bodies the OpenAPI document describes (see app.py)


def json_body_doc(model: type[BaseModel], example: dict[str, Any], **more: Any) -> dict[str, Any]:
    """`openapi_extra` for a route that parses `model` from its JSON body itself (its schema comes from the model)."""
    BODY_MODELS[model.__name__] = model
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": ref, "example": example}, **more}}}


def parse_body(model: type[M], raw: bytes, hints: dict[str, str] | None = None) -> M:
    """Validate a JSON body against `model`; a 400 naming the first problem (and the field's hint)."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        loc = [str(p) for p in first["loc"]]
        if first["type"] == "json_invalid":
            raise BadRequest(f"the body is not valid JSON: {first['msg']}") from exc
        if first["type"] == "model_type" and not loc:
            raise BadRequest("the body must be a JSON object") from exc
        message = f"{'.'.join(loc)}: {first['msg']}" if loc else first["msg"].removeprefix("Value error, ")
        hint = (hints or {}).get(loc[0]) if loc else None
        raise BadRequest(message + (f" ({hint})" if hint else "")) from exc


class ORJSONResponse(JSONResponse):
    """JSON with orjson: several times faster than the standard library for large probability arrays."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def error_response(exc: ServiceError) -> ORJSONResponse:
    """The answer to a ServiceError: `{"error", "code"}` with its status and headers (every route)."""
    return ORJSONResponse({"error": exc.message, "code": exc.code}, status_code=exc.status_code, headers=exc.headers)


class State:
    """What the lifespan puts on `app.state`, typed."""

    settings: Settings
    metrics: Metrics
    registry: Registry
    draining: bool


# The dependencies below are coroutines: FastAPI runs plain functions in its thread pool, a thread hop
# per request.
async def get_state(request: Request) -> State:
    return request.app.state  # type: ignore[no-any-return]


def http_call(request: Request) -> Call:
    """The pipeline's view of an HTTP request: its deadline, routing key, and whether the client left."""
    state = request.app.state

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return Call(state, deadline_for(request.headers.get(TIMEOUT_HEADER), state.settings), "http",
                request.headers.get(ROUTE_KEY_HEADER), gone, request.scope.get("state", {}).get("request_id"))


def not_ready_reason(request: Request) -> str | None:
    """Why the service cannot answer predictions now, or None when it can (every readiness endpoint)."""
    return not_ready(request.app.state)


async def get_registry(request: Request) -> Registry:
    registry: Registry | None = getattr(request.app.state, "registry", None)
    if registry is None:
        raise NotReady("the service is starting")
    return registry


def _check_key(request: Request, expected: str, what: str) -> None:
    if not key_matches(request.headers, expected):
        raise Unauthorized(f"this endpoint needs the {what} key: send 'Authorization: Bearer <key>' or "
                           "'X-API-Key: <key>'", headers={"WWW-Authenticate": "Bearer"})


async def require_predict_key(request: Request) -> None:
    settings: Settings = request.app.state.settings
    if settings.api_key is not None:
        _check_key(request, settings.api_key.get_secret_value(), "API")


async def require_admin_key(request: Request) -> None:
    settings: Settings = request.app.state.settings
    if settings.admin_api_key is not None:
        _check_key(request, settings.admin_api_key.get_secret_value(), "admin API")


AppState = Annotated[State, Depends(get_state)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
PredictAuth = Depends(require_predict_key)
AdminAuth = Depends(require_admin_key)
