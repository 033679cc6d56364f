"""A replica's gRPC status becomes the right HTTP status and OpenAI error body at the gateway."""

from __future__ import annotations

import grpc
import msgspec
import pytest

from scalellm.api.errors import from_exception
from scalellm.gateway.errors import from_grpc, no_replica

S = grpc.StatusCode


@pytest.mark.parametrize("code, status, type_, err_code, retry_after", [
    (S.INVALID_ARGUMENT, 400, "invalid_request_error", None, None),
    (S.OUT_OF_RANGE, 400, "invalid_request_error", None, None),
    (S.FAILED_PRECONDITION, 400, "invalid_request_error", None, None),
    (S.NOT_FOUND, 404, "invalid_request_error", "model_not_found", None),
    (S.CANCELLED, 499, "invalid_request_error", "request_aborted", None),
    (S.ABORTED, 499, "invalid_request_error", "request_aborted", None),
    (S.UNIMPLEMENTED, 501, "not_implemented_error", "not_implemented", None),
    (S.UNAUTHENTICATED, 502, "bad_gateway", "replica_refused", None),
    (S.PERMISSION_DENIED, 502, "bad_gateway", "replica_refused", None),
    (S.INTERNAL, 502, "bad_gateway", "replica_error", None),
    (S.UNKNOWN, 502, "bad_gateway", "replica_error", None),
    (S.DATA_LOSS, 502, "bad_gateway", "replica_error", None),
    (S.RESOURCE_EXHAUSTED, 503, "service_unavailable", "queue_full", "1"),
    (S.UNAVAILABLE, 503, "service_unavailable", "service_unavailable", "1"),
    (S.DEADLINE_EXCEEDED, 504, "timeout_error", "deadline_exceeded", None),
])
def test_every_status_maps(code, status, type_, err_code, retry_after):
    details = "model 'x' not found" if code == S.NOT_FOUND else "top_p: must be in (0, 1], got 3"
    err = from_exception(from_grpc(code, details))
    assert (err.status, err.type, err.code, err.headers.get("retry-after")) == (status, type_, err_code, retry_after)
    body = msgspec.json.decode(err.body())["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]


def test_every_grpc_status_is_covered():
    """No status falls through to a 500 (an internal error of the gateway itself)."""
    for code in S:
        if code != S.OK:
            assert from_exception(from_grpc(code, "x")).status != 500, code


def test_client_errors_keep_the_field():
    err = from_exception(from_grpc(S.INVALID_ARGUMENT, "top_p: must be in (0, 1], got 3"))
    assert err.param == "top_p" and err.message.startswith("top_p")
    err = from_exception(from_grpc(S.INVALID_ARGUMENT, "max_tokens: prompt (3) + max_tokens (1000) exceeds "
                                                       "the context length 256"))
    assert err.param == "max_tokens" and err.code == "context_length_exceeded"
    err = from_exception(from_grpc(S.INVALID_ARGUMENT, "no field named here"))
    assert err.param == "body" and err.message.endswith("no field named here")


def test_no_replica_is_503_with_retry_after():
    err = from_exception(no_replica("no healthy replica"))
    assert err.status == 503 and err.code == "no_replica_available" and err.headers["retry-after"] == "1"
