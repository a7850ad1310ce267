"""Domain errors carrying their HTTP status; one handler in the app turns them into JSON."""

from __future__ import annotations


class ServiceError(Exception):
    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(ServiceError):
    status_code = 400
    code = "bad_request"


class Unauthorized(ServiceError):
    status_code = 401
    code = "unauthorized"


class NotFound(ServiceError):
    status_code = 404
    code = "not_found"


class RequestTimeout(ServiceError):
    status_code = 408
    code = "request_timeout"


class PayloadTooLarge(ServiceError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status_code = 415
    code = "unsupported_media_type"


class Unprocessable(ServiceError):
    status_code = 422
    code = "invalid_request"


class Overloaded(ServiceError):
    status_code = 429
    code = "queue_full"


class ModelFailed(ServiceError):
    status_code = 500
    code = "model_error"


class NotReady(ServiceError):
    status_code = 503
    code = "not_ready"


class DeadlineExpired(ServiceError):
    status_code = 504
    code = "deadline_exceeded"
