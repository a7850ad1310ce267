"""Domain errors carrying their HTTP status; one handler in the app turns them into JSON."""

from __future__ import annotations


class ServiceError(Exception):
    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


def _kind(name: str, status: int, code: str) -> type[ServiceError]:
    return type(name, (ServiceError,), {"status_code": status, "code": code, "__module__": __name__})


# One class per status: raise NotFound("...") where a request names something that is not served.
BadRequest = _kind("BadRequest", 400, "bad_request")
Unauthorized = _kind("Unauthorized", 401, "unauthorized")
NotFound = _kind("NotFound", 404, "not_found")
RequestTimeout = _kind("RequestTimeout", 408, "request_timeout")
PayloadTooLarge = _kind("PayloadTooLarge", 413, "payload_too_large")
UnsupportedMediaType = _kind("UnsupportedMediaType", 415, "unsupported_media_type")
Overloaded = _kind("Overloaded", 429, "queue_full")
ModelFailed = _kind("ModelFailed", 500, "model_error")
NotReady = _kind("NotReady", 503, "not_ready")
DeadlineExpired = _kind("DeadlineExpired", 504, "deadline_exceeded")
