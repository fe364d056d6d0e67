"""Access control for a gateway that leaves loopback: CORS and an optional API key.

Both are off by default; the contract's clients run on the same machine.

- ``AISTACK_CORS_ALLOW_ORIGINS`` (comma list, or ``*``) lets browser pages
  on those origins call the gateway.  Preflights are answered before any
  route or key check, so they work for every path and method (including
  the catch-all ``/v1/audio/{tail}`` proxy route), and every answer to an
  allowed origin carries the CORS headers, errors included.
- ``AISTACK_API_KEY`` makes every route except :data:`OPEN_PATHS` require
  ``Authorization: Bearer <key>`` (what OpenAI clients send as
  ``api_key``); a missing or wrong key gets the 401 envelope.

A small middleware plus a response signal does this; aiohttp-cors wants a
per-route registration, which does not fit a catch-all route that accepts
any method.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging

from aiohttp import hdrs, web

from .config import Config
from .errors import Malformed, Unauthorized

log = logging.getLogger("aistack.security")

# Paths that answer without a key: liveness and readiness probes must work
# unauthenticated, and a browser must reach the admin page's shell (markup,
# script, style: no data) to be asked for the key.
OPEN_PATHS = frozenset({
    "/health", "/health/ready", "/", "/admin", "/admin/", "/admin/static/admin.js", "/admin/static/admin.css",
})
# Response headers a browser page may read (besides the CORS-safelisted ones).
EXPOSED_HEADERS = "X-Request-ID, Retry-After, X-Cache, Content-Disposition, X-Aistack-Model, X-Aistack-Language"
DEFAULT_ALLOWED_HEADERS = "Authorization, Content-Type, X-Request-ID"
ALLOWED_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
PREFLIGHT_MAX_AGE_S = "600"


class CorsPolicy:
    """Which origins may call, and the headers that tell the browser so."""

    def __init__(self, allow_origins: tuple[str, ...]) -> None:
        self.any_origin = "*" in allow_origins
        self.origins = frozenset(origin.rstrip("/") for origin in allow_origins if origin != "*")

    def allows(self, origin: str) -> bool:
        return self.any_origin or origin in self.origins

    def allow_origin_value(self, origin: str) -> str:
        # "*" needs no Vary and is valid because aistack never uses cookies.
        return "*" if self.any_origin else origin

    @web.middleware
    async def preflight_middleware(self, request: web.Request, handler) -> web.StreamResponse:
        if (
            request.method == hdrs.METH_OPTIONS
            and hdrs.ORIGIN in request.headers
            and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers
        ):
            origin = request.headers[hdrs.ORIGIN]
            if not self.allows(origin):
                raise Malformed(
                    f"Origin {origin!r} is not allowed; add it to AISTACK_CORS_ALLOW_ORIGINS.", status=403,
                    code="origin_not_allowed",
                )
            return web.Response(
                status=204,
                headers={
                    hdrs.ACCESS_CONTROL_ALLOW_METHODS: ALLOWED_METHODS,
                    hdrs.ACCESS_CONTROL_ALLOW_HEADERS: request.headers.get(
                        hdrs.ACCESS_CONTROL_REQUEST_HEADERS, DEFAULT_ALLOWED_HEADERS
                    ),
                    hdrs.ACCESS_CONTROL_MAX_AGE: PREFLIGHT_MAX_AGE_S,
                },
            )
        return await handler(request)

    async def add_headers(self, request: web.BaseRequest, response: web.StreamResponse) -> None:
        """on_response_prepare: CORS headers on every answer to an allowed origin."""
        # Whether CORS headers appear depends on Origin, so caches must key on it,
        # on every answer (also those to a refused or absent origin).
        if hdrs.ORIGIN not in response.headers.getall(hdrs.VARY, ()):
            response.headers.add(hdrs.VARY, hdrs.ORIGIN)
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None or not self.allows(origin):
            return
        # Replace, not add: a proxied upstream may send its own, and two
        # Allow-Origin values make the browser reject the response.
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = self.allow_origin_value(origin)
        response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = EXPOSED_HEADERS


# Browsers cannot set headers on a WebSocket, so OpenAI's realtime clients in a
# page send the key as a subprotocol: ``Sec-WebSocket-Protocol: realtime,
# openai-insecure-api-key.<key>``.  Accepted on the realtime path only.
KEY_SUBPROTOCOL_PREFIX = "openai-insecure-api-key."
KEY_SUBPROTOCOL_PATHS = frozenset({"/v1/realtime"})


def bearer_token(request: web.BaseRequest) -> str | None:
    scheme, _, token = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if request.path in KEY_SUBPROTOCOL_PATHS:
        for protocol in request.headers.get(hdrs.SEC_WEBSOCKET_PROTOCOL, "").split(","):
            protocol = protocol.strip()
            if protocol.startswith(KEY_SUBPROTOCOL_PREFIX) and len(protocol) > len(KEY_SUBPROTOCOL_PREFIX):
                return protocol[len(KEY_SUBPROTOCOL_PREFIX):]
    return None


def api_key_middleware(api_key: str):
    """Require ``Authorization: Bearer <api_key>`` on every path but :data:`OPEN_PATHS`."""
    expected = api_key.encode("utf-8")

    @web.middleware
    async def require_api_key(request: web.Request, handler) -> web.StreamResponse:
        if request.path not in OPEN_PATHS:
            supplied = bearer_token(request)
            # compare_digest: the time taken must not reveal how much of a guess matched.
            # surrogateescape: header bytes that are not UTF-8 compare (unequal) instead of failing.
            if supplied is None or not hmac.compare_digest(supplied.encode("utf-8", "surrogateescape"), expected):
                # The message never echoes what was sent.
                raise Unauthorized(
                    "Missing or wrong API key: send 'Authorization: Bearer <key>' "
                    "(the api_key of OpenAI clients) with the key set in AISTACK_API_KEY."
                    if supplied is None else "Wrong API key.",
                    headers={hdrs.WWW_AUTHENTICATE: 'Bearer realm="aistack"'},
                )
        return await handler(request)

    return require_api_key


def middlewares(config: Config, cors: CorsPolicy | None) -> list:
    """Run inside the error middleware: preflight first (it needs no key), then the key."""
    result = []
    if cors is not None:
        result.append(cors.preflight_middleware)
    if config.api_key:
        result.append(api_key_middleware(config.api_key))
    return result


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def warn_if_exposed(config: Config) -> bool:
    """Log a warning when the gateway listens beyond loopback without an API key.

    Returns True when it warned.  ``aistack serve`` calls it before binding.
    """
    if config.api_key or is_loopback(config.host):
        return False
    log.warning(
        "aistack is listening on %s without an API key: anyone who can reach this address can use the GPU. "
        "Set AISTACK_API_KEY, bind to 127.0.0.1, or put an authenticating reverse proxy in front.",
        config.host,
    )
    return True
