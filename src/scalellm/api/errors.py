"""OpenAI error bodies and the HTTP status of each error kind."""

from __future__ import annotations

import msgspec

from scalellm.protocol.errors import ContextLengthError, InvalidParameterError


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> bytes:
        return msgspec.json.encode(
            {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        )


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def model_not_found(model: str, available: list[str]) -> APIError:
    return APIError(404, f"The model `{model}` does not exist. Available: {', '.join(available)}",
                    "invalid_request_error", "model", "model_not_found")


def unavailable(message: str, retry_after: int = 1) -> APIError:
    return APIError(503, message, "service_unavailable", None, "service_unavailable",
                    {"retry-after": str(retry_after)})


def from_exception(e: BaseException) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, ContextLengthError):
        return bad_request(e.message if e.message else str(e), e.param, "context_length_exceeded")
    if isinstance(e, InvalidParameterError):
        return bad_request(str(e), e.param)
    if isinstance(e, TimeoutError):
        return APIError(504, f"request deadline exceeded; the request was aborted ({e})".replace(" ()", ""),
                        "timeout_error", None, "deadline_exceeded")
    name = type(e).__name__
    if name == "QueueFullError":
        return APIError(503, str(e), "service_unavailable", None, "queue_full", {"retry-after": "1"})
    if name == "RequestAbortedError":
        return APIError(499, str(e), "invalid_request_error", None, "request_aborted")
    if name == "EngineDeadError":
        return unavailable(f"the engine is not running: {e}", 5)
    return APIError(500, f"internal error: {name}: {e}", "internal_error")
