"""Request identity and per-request facts that logs and metrics read.

Every request gets an ``X-Request-ID`` (the caller's when it is 1–128
characters of ``[A-Za-z0-9-_:.]``, else 16 fresh hex characters), echoed on
every response, streamed ones and errors included.
"""

from __future__ import annotations

import contextvars
import logging
import re
import secrets
import time
from typing import Any

import attrs
from aiohttp import web

_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9\-_:.]{1,128}")
REQUEST_INFO = "aistack.request"  # key on web.Request

current_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("aistack_request_id", default="-")


@attrs.define
class RequestInfo:
    """Facts about one request, filled in by the capability that serves it."""

    request_id: str
    started: float = attrs.field(factory=time.monotonic)
    capability: str | None = None
    model: str | None = None
    provider: str | None = None
    slot_wait_s: float | None = None
    client_disconnected: bool = False
    extras: dict[str, Any] = attrs.field(factory=dict)


def request_info(request: web.Request) -> RequestInfo:
    info = request.get(REQUEST_INFO)
    if info is None:  # a request that bypassed the middleware (should not happen)
        info = RequestInfo(secrets.token_hex(8))
        request[REQUEST_INFO] = info
    return info


def pick_request_id(supplied: str | None) -> str:
    if supplied and _VALID_REQUEST_ID.fullmatch(supplied):
        return supplied
    return secrets.token_hex(8)


@web.middleware
async def request_id_middleware(request: web.Request, handler) -> web.StreamResponse:
    info = RequestInfo(pick_request_id(request.headers.get("X-Request-ID")))
    request[REQUEST_INFO] = info
    token = current_request_id.set(info.request_id)
    try:
        return await handler(request)
    finally:
        current_request_id.reset(token)


async def echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: runs for every response just before its headers go out."""
    info = request.get(REQUEST_INFO)
    if info is not None:
        response.headers["X-Request-ID"] = info.request_id


class RequestIdLogFilter(logging.Filter):
    """Adds ``request_id`` to every log record so formatters can show it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id.get()
        return True


def configure_logging(log_format: str = "text", level: int = logging.INFO) -> None:
    """Root logging for ``aistack serve``: text or one JSON object per line."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdLogFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def middlewares(config) -> list:
    """The observability middlewares, outermost first (request id always)."""
    return [request_id_middleware]


def setup(app: web.Application) -> None:
    """Routes and signals of the observability layer."""
    app.on_response_prepare.append(echo_request_id)


def inner_middlewares(config) -> list:
    """Middlewares that run inside the error middleware (their errors become envelopes)."""
    return []


def warn_if_exposed(config) -> None:
    """Log a warning when binding beyond loopback without an API key."""
    if config.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        logging.getLogger("aistack").warning(
            "listening on %s without AISTACK_API_KEY: anyone who can reach this address can use the GPU",
            config.host,
        )
