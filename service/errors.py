"""Domain errors carrying their HTTP status; one handler in the app turns them into JSON."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class ServiceError(Exception):
    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


# One class per status: raise NotFound("...") where a request names something that is not served.
class BadRequest(ServiceError):
    status_code, code = 400, "bad_request"


class Unauthorized(ServiceError):
    status_code, code = 401, "unauthorized"


class NotFound(ServiceError):
    status_code, code = 404, "not_found"


class RequestTimeout(ServiceError):
    status_code, code = 408, "request_timeout"


class PayloadTooLarge(ServiceError):
    status_code, code = 413, "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status_code, code = 415, "unsupported_media_type"


class Overloaded(ServiceError):
    status_code, code = 429, "queue_full"


class ModelFailed(ServiceError):
    status_code, code = 500, "model_error"


class NotReady(ServiceError):
    status_code, code = 503, "not_ready"


class DeadlineExpired(ServiceError):
    status_code, code = 504, "deadline_exceeded"


@contextlib.contextmanager
def servable_not_found() -> Iterator[None]:
    """TF Serving's wording for an unknown model or version (REST and gRPC alike)."""
    try:
        yield
    except NotFound as exc:
        raise NotFound(f"Servable not found for request: {exc.message}") from exc
