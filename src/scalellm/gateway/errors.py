"""A replica's gRPC status → the HTTP error the gateway's client gets (OpenAI error body).

    gRPC status from the replica      HTTP  type / code                       why
    INVALID_ARGUMENT, OUT_OF_RANGE    400   invalid_request_error             the request names a bad field
    FAILED_PRECONDITION               400   invalid_request_error
    NOT_FOUND                         404   invalid_request_error / model_not_found
    CANCELLED, ABORTED                499   invalid_request_error / request_aborted
    UNIMPLEMENTED                     501   not_implemented_error / not_implemented
    UNAUTHENTICATED, PERMISSION_DENIED 502  bad_gateway / replica_refused     the replica refused the gateway,
                                                                              not the client's key
    INTERNAL, UNKNOWN, DATA_LOSS      502   bad_gateway / replica_error       the replica failed
    RESOURCE_EXHAUSTED                503   service_unavailable / queue_full  + Retry-After (replica's queue full)
    UNAVAILABLE                       503   service_unavailable               + Retry-After
    DEADLINE_EXCEEDED                 504   timeout_error / deadline_exceeded

The HTTP layer sees only these errors, never grpc. Which codes are retried on another
replica is the backend's business (scalellm.gateway.backend); a call whose retries are
all used up, or that finds no healthy replica, is `no_replica` (503 + Retry-After).
"""

from __future__ import annotations

import grpc

from scalellm.api.errors import APIError
from scalellm.protocol.errors import ContextLengthError, InvalidParameterError

_S = grpc.StatusCode

# status -> (HTTP status, type, code, Retry-After seconds or None)
_BY_STATUS: dict[grpc.StatusCode, tuple[int, str, str | None, int | None]] = {
    _S.NOT_FOUND: (404, "invalid_request_error", "model_not_found", None),
    _S.CANCELLED: (499, "invalid_request_error", "request_aborted", None),
    _S.ABORTED: (499, "invalid_request_error", "request_aborted", None),
    _S.UNIMPLEMENTED: (501, "not_implemented_error", "not_implemented", None),
    _S.UNAUTHENTICATED: (502, "bad_gateway", "replica_refused", None),
    _S.PERMISSION_DENIED: (502, "bad_gateway", "replica_refused", None),
    _S.INTERNAL: (502, "bad_gateway", "replica_error", None),
    _S.UNKNOWN: (502, "bad_gateway", "replica_error", None),
    _S.DATA_LOSS: (502, "bad_gateway", "replica_error", None),
    _S.RESOURCE_EXHAUSTED: (503, "service_unavailable", "queue_full", 1),
    _S.UNAVAILABLE: (503, "service_unavailable", "service_unavailable", 1),
}
_CLIENT_ERRORS = {_S.INVALID_ARGUMENT, _S.OUT_OF_RANGE, _S.FAILED_PRECONDITION}


def from_grpc(code: grpc.StatusCode, details: str) -> Exception:
    """The error to raise for a failed replica call. Client errors keep the field the
    replica named (its details read `field: message`); DEADLINE_EXCEEDED becomes the
    TimeoutError the HTTP layer answers with 504."""
    if code in _CLIENT_ERRORS:
        param, sep, message = details.partition(": ")
        if not sep:
            param, message = "body", details
        cls = ContextLengthError if "context length" in details else InvalidParameterError
        return cls(param, message)
    if code == _S.DEADLINE_EXCEEDED:
        return TimeoutError(details)
    status, type_, err_code, retry_after = _BY_STATUS.get(code, (502, "bad_gateway", "replica_error", None))
    if code == _S.NOT_FOUND and "model" not in details:
        err_code = "not_found"
    headers = {"retry-after": str(retry_after)} if retry_after else None
    param = "model" if err_code == "model_not_found" else None
    return APIError(status, f"replica error {code.name}: {details}", type_, param, err_code, headers)


def no_replica(message: str) -> APIError:
    """No healthy replica could take the call (none left, or every try failed)."""
    return APIError(503, message, "service_unavailable", None, "no_replica_available", {"retry-after": "1"})
