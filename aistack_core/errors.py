"""Typed errors and the one middleware that turns them into the envelope.

Code anywhere in aistack raises one of the classes below; nothing else
builds ``{"error": {...}}`` bodies.  The five kinds and their statuses are
part of the public contract (integration guide, section 8)::

    malformed 400 · overflow 413 · cancelled 499 · network 503 · unknown 500

The proxies also need 502 and 504, which keep the ``network`` kind.

Each error also carries OpenAI's ``type``, ``code`` and ``param`` (additive:
OpenAI clients read them as ``e.code``): ``type`` follows from the class,
``code`` is a stable string per error the gateway makes, ``param`` the
request field at fault or None.
"""

from __future__ import annotations

import logging
import re
from typing import Any, ClassVar, Mapping

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from .observe.record import REQUEST_INFO

log = logging.getLogger("aistack.errors")

ENVELOPE_KINDS = ("network", "malformed", "overflow", "cancelled", "unknown")


class AistackError(Exception):
    """Base of every error that reaches a client as an envelope."""

    kind: ClassVar[str] = "unknown"
    status: ClassVar[int] = 500
    openai_type: ClassVar[str] = "server_error"
    default_code: ClassVar[str] = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        provider: str = "aistack",
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.provider = provider
        if status is not None:
            self.status = status
        self.headers = dict(headers or {})
        self.code = code or self.default_code
        self.param = param

    def envelope(self) -> dict:
        return {"error": {
            "kind": self.kind, "provider": self.provider, "message": self.message,
            "type": self.openai_type, "code": self.code, "param": self.param,
        }}

    def to_response(self) -> web.Response:
        response = web.json_response(self.envelope(), status=self.status, headers=self.headers)
        if self.headers.get("Connection", "").lower() == "close":
            response.force_close()  # the server, too, must not wait for another request on it
        return response


class Malformed(AistackError):
    """The client sent something we cannot use (400)."""

    kind = "malformed"
    status = 400
    openai_type = "invalid_request_error"
    default_code = "invalid_request"


class Unauthorized(Malformed):
    """Missing or wrong API key (401; the contract has no separate kind)."""

    status = 401
    openai_type = "authentication_error"
    default_code = "invalid_api_key"


class Overflow(AistackError):
    """The input is larger than allowed (413)."""

    kind = "overflow"
    status = 413
    openai_type = "invalid_request_error"
    default_code = "request_too_large"


class Cancelled(AistackError):
    """The client went away before we finished (499)."""

    kind = "cancelled"
    status = 499
    openai_type = "invalid_request_error"
    default_code = "client_cancelled"


class Network(AistackError):
    """A backend or upstream cannot serve now (503)."""

    kind = "network"
    status = 503
    openai_type = "server_error"
    # A backend that cannot serve now (weights missing, a download failed);
    # the proxies say upstream_unreachable when nothing listens.
    default_code = "backend_unavailable"


class Busy(Network):
    """The GPU slot is taken; the client should retry after ``Retry-After``."""

    default_code = "gpu_busy"

    def __init__(self, message: str, *, retry_after: int = 5) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class BadGateway(Network):
    """An upstream answered with something that is not usable HTTP (502)."""

    status = 502
    default_code = "bad_gateway"


class GatewayTimeout(Network):
    """An upstream did not answer in time (504)."""

    status = 504
    default_code = "upstream_timeout"


class Unknown(AistackError):
    """Anything that fits no other kind (500)."""


_HTTP_STATUS_CODES = {404: "not_found", 405: "method_not_allowed"}
_HTTP_STATUS_MESSAGES = {
    404: "No such endpoint: {method} {path}. See GET /v1/models and the README for the routes aistack serves.",
    405: "Method {method} is not allowed on {path}.",
}


def _from_http_exception(exc: web.HTTPException, request: web.Request) -> AistackError:
    template = _HTTP_STATUS_MESSAGES.get(exc.status)
    message = template.format(method=request.method, path=request.path) if template else exc.reason
    if exc.status == 413:
        return Overflow(f"Request body too large: {exc.text or exc.reason}")
    if exc.status == 401:
        return Unauthorized(message)
    code = _HTTP_STATUS_CODES.get(exc.status)
    if exc.status < 500:
        error: AistackError = Malformed(message, status=exc.status, code=code)
    else:
        error = Unknown(message, status=exc.status)
    if exc.status == 405 and "Allow" in exc.headers:
        error.headers["Allow"] = exc.headers["Allow"]
    return error


def _abort_started(request: web.Request, prepared: web.StreamResponse) -> web.StreamResponse:
    """A failure after the headers went out: close the connection so the client
    sees a truncated transfer, never a second response or a body that looks complete."""
    transport = request.transport
    if transport is not None:
        transport.close()
    return prepared


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Turn every exception into the envelope, unless the response already started.

    Once a response's headers are out its status cannot change: the
    connection is aborted instead (a streaming route that can say so
    in-band, as an SSE ``error`` event, does that before raising).
    """
    try:
        return await handler(request)
    except AistackError as exc:
        prepared = _started_response(request)
        if prepared is not None:
            if exc.kind != "cancelled":
                log.warning("%s %s failed after its answer started: %s", request.method, request.path, exc.message)
            return _abort_started(request, prepared)
        return exc.to_response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _from_http_exception(exc, request).to_response()
    except (ConnectionResetError, ConnectionAbortedError):
        # The client hung up (e.g. mid-upload): nobody will read this answer, but
        # returning it keeps a routine disconnect out of the error log.
        prepared = _started_response(request)
        if prepared is not None:
            return _abort_started(request, prepared)
        return Cancelled("The client closed the connection before the request finished.").to_response()
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        prepared = _started_response(request)
        if prepared is not None:
            return _abort_started(request, prepared)
        return Unknown(
            "Internal error in aistack; the server log has the details (search it for this request's X-Request-ID)."
        ).to_response()


def _started_response(request: web.Request) -> web.StreamResponse | None:
    info = request.get(REQUEST_INFO)
    response = info.prepared_response if info is not None else None
    return response if response is not None and response.prepared else None


# aiohttp's parser messages quote the offending bytes (a request line, a header with its
# value): they may hold a key, so neither the log nor the answer repeats them.
_QUOTED = re.compile(r"""b?(['"]).*?(?<!\\)\1""", re.S)


def parser_refusal_detail(exc: BaseException) -> str:
    """What aiohttp's parser objected to, without the bytes it quotes."""
    message = str(getattr(exc, "message", "") or "").split(":\n", 1)[0]
    message = " ".join(_QUOTED.sub("(...)", message).split())
    return message[:200] or type(exc).__name__


class ServerLog(logging.LoggerAdapter):
    """The logger aiohttp's connection handler writes to (``handler_args={"logger": ...}``).

    aiohttp logs every request its parser refuses (a URL over 8 KB, too many
    headers, Transfer-Encoding with Content-Length, an unknown
    Content-Encoding) with a full traceback at ERROR: one cheap request, a
    screenful of log.  Those are the client's mistakes and get one WARNING
    line; anything else keeps its traceback.  (The app never sees these
    requests; under ``aistack serve`` :mod:`aistack_core.runner` answers
    them in the envelope.)
    """

    def exception(self, msg: Any, *args: Any, exc_info: Any = True, **kwargs: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):
            detail = parser_refusal_detail(exc_info)
            self.warning("refused a malformed request: %s (%s %s)", detail, exc_info.code,
                         msg % args if args else msg)
            return
        self.error(msg, *args, exc_info=exc_info, **kwargs)


server_log = ServerLog(logging.getLogger("aistack.server"), {})
