"""The gateway's admin API, protected by its own key (never an API key):

    GET    /admin/replicas                       -> every replica with health, breaker, load
    POST   /admin/replicas  {"address", "pool"}  -> add one at run time (201)
    DELETE /admin/replicas?address=HOST:PORT     -> stop routing to it, wait for its
                                                    in-flight requests (up to the drain
                                                    timeout), then drop it

Without an admin key configured the API answers 403.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from urllib.parse import parse_qs

import msgspec

from scalellm.api.app import OpenAIApp, Receive, Scope, Send, _header, _send_json, read_body
from scalellm.api.errors import APIError, bad_request
from scalellm.gateway.backend import GatewayBackend
from scalellm.gateway.config import ReplicaSpec

logger = logging.getLogger("scalellm.gateway.admin")


class AddReplica(msgspec.Struct, forbid_unknown_fields=True):
    address: str
    pool: str = "default"


class AdminAPI:
    def __init__(self, backend: GatewayBackend, admin_key: str | None, drain_timeout: float) -> None:
        self.backend = backend
        self._digest = hashlib.sha256(admin_key.encode()).digest() if admin_key else None
        self.drain_timeout = drain_timeout

    def install(self, app: OpenAIApp) -> None:
        app.add_route("GET", "/admin/replicas", self._list)
        app.add_route("POST", "/admin/replicas", self._add)
        app.add_route("DELETE", "/admin/replicas", self._remove)

    def _check(self, scope: Scope) -> None:
        if self._digest is None:
            raise APIError(403, "the admin API is disabled: start the gateway with --admin-key or SCALELLM_ADMIN_KEY",
                           "permission_error", None, "admin_disabled")
        auth = _header(scope, b"authorization") or ""
        presented = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(hashlib.sha256(presented.encode()).digest(), self._digest):
            logger.warning("admin request rejected (request_id=%s)", scope.get("scalellm.trace"))
            raise APIError(401, "invalid or missing admin key", "invalid_request_error", None, "invalid_admin_key")

    async def _list(self, scope: Scope, receive: Receive, send: Send) -> int:
        self._check(scope)
        body = {"policy": self.backend.policy.name, "replicas": [r.describe() for r in self.backend.replicas]}
        await _send_json(send, 200, msgspec.json.encode(body))
        return 200

    async def _add(self, scope: Scope, receive: Receive, send: Send) -> int:
        self._check(scope)
        try:
            req = msgspec.json.decode(await read_body(scope, receive, 1 << 16), type=AddReplica)
            spec = ReplicaSpec(req.address, req.pool)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
            raise bad_request(f"body must be {{\"address\": \"HOST:PORT\", \"pool\": \"...\"}}: {e}", "address") from None
        if any(r.address == spec.address for r in self.backend.replicas):
            raise APIError(409, f"replica {spec.address} is already registered", "invalid_request_error", "address",
                           "replica_exists")
        client = await self.backend.add_replica(spec.address, spec.pool)
        logger.warning("admin: added replica %s (pool %s)", spec.address, spec.pool)
        await _send_json(send, 201, msgspec.json.encode(client.describe()))
        return 201

    async def _remove(self, scope: Scope, receive: Receive, send: Send) -> int:
        self._check(scope)
        address = parse_qs(scope.get("query_string", b"").decode()).get("address", [None])[0]
        if not address:
            raise bad_request("give ?address=HOST:PORT", "address")
        if not any(r.address == address for r in self.backend.replicas):
            raise APIError(404, f"no replica {address}", "invalid_request_error", "address", "replica_not_found")
        drained = await self.backend.remove_replica(address, self.drain_timeout)
        logger.warning("admin: removed replica %s (drained: %s)", address, drained)
        await _send_json(send, 200, msgspec.json.encode({"removed": address, "drained": drained}))
        return 200
