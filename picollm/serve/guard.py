"""Who may talk to the server: an ASGI middleware in front of every route.

- Host: an IP address, `localhost`, or a name given with --allowed-host. A web page on another site
  that makes its own name resolve to 127.0.0.1 (DNS rebinding) sends its own name: refused.
- Origin: a browser names the page that sent a request; it must be this server itself, so another
  site's page cannot drive the server through the user's browser (`Sec-Fetch-Site: cross-site` is
  refused too). There is no CORS: other origins get no permission to read anything.
- With --api-key, /v1/ and /api/ need `Authorization: Bearer KEY` (compared in constant time).
- Bodies over the limit are refused before they are read (413).
- Every response says nosniff, no framing, no referrer, and a content security policy that allows
  only this server's own scripts and styles.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]

PAGE_POLICY = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
PROTECTED_PREFIXES = ("/v1/", "/api/")


def split_host(value: str) -> str:
    """The host of a Host header or an origin's authority, without the port, lower case."""
    value = value.strip().lower()
    if value.startswith("["):  # [::1]:8000
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def host_allowed(host: str, allowed: set[str]) -> bool:
    name = split_host(host)
    if name in allowed or name == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class Guard:
    def __init__(self, app: ASGIApp, api_key: str | None, allowed_hosts: set[str], max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key
        self.allowed_hosts = {h.lower() for h in allowed_hosts}
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refusal = self.refusal(scope, headers)
        if refusal is not None:
            status, message, extra = refusal
            await _send_error(send, status, message, extra)
            return

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                added = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                         (b"referrer-policy", b"no-referrer"), (b"content-security-policy", PAGE_POLICY.encode())]
                message["headers"] = [*message.get("headers", []), *[(k, v) for k, v in added if k not in names]]
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def refusal(self, scope: Scope, headers: dict[str, str]) -> tuple[int, str, list[tuple[bytes, bytes]]] | None:
        host = headers.get("host", "")
        if not host_allowed(host, self.allowed_hosts):
            return 403, (f"Host '{host[:100]}' is not allowed: this server answers to its IP addresses and localhost "
                         "(add a name with --allowed-host)"), []
        origin = headers.get("origin")
        if origin is not None:
            authority = origin.split("://", 1)[1] if "://" in origin else None
            if authority is None or authority.lower() != host.lower():
                return 403, (f"cross-origin request from '{origin[:100]}' refused: only this server's own page "
                             "may call it"), []
        if headers.get("sec-fetch-site") == "cross-site":
            return 403, "cross-site request refused: only this server's own page may call it", []
        path = scope.get("path", "")
        if self.api_key is not None and path.startswith(PROTECTED_PREFIXES):
            given = headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return 401, "missing or wrong API key: send 'Authorization: Bearer KEY' (the server's --api-key)", [
                    (b"www-authenticate", b"Bearer")]
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return 413, f"the request body is over {self.max_body_bytes:,} bytes", []
        return None


async def _send_error(send: Callable[[Any], Awaitable[None]], status: int, message: str,
                      extra: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps(error_body(message, "invalid_request_error" if status != 401 else "authentication_error")
                      ).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"x-content-type-options", b"nosniff"), *extra]})
    await send({"type": "http.response.body", "body": body})


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
