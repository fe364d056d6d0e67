"""The runner ``aistack serve`` uses: aiohttp's own refusals answered in the envelope too.

aiohttp's connection handler refuses some requests before the app (and so
the error middleware) ever sees them: a URL or header line over 8 KB, too
many headers, ``Transfer-Encoding`` together with ``Content-Length``, an
unknown ``Content-Encoding``.  It answers those itself with a plain-text
400.  Clients of the gateway parse every error as ``{"error": {...}}``, so
this runner makes aiohttp's per-connection handler answer them in the
envelope as well (the refusal is still logged as one line, by
:class:`~aistack_core.errors.ServerLog`).

aiohttp has no public switch for this; the hook is its documented-by-code
``RequestHandler.handle_error``.  Should a later aiohttp change that
method, :class:`GatewayRunner` falls back to aiohttp's plain answer (the
test of the envelope then fails and says so), never to a broken server.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from .errors import Malformed, Overflow, Unknown, parser_refusal_detail

log = logging.getLogger("aistack.runner")


def refusal_envelope(status: int, exc: BaseException | None) -> web.Response:
    """The envelope for a request aiohttp itself refused with ``status``."""
    detail = parser_refusal_detail(exc) if isinstance(exc, HttpProcessingError) else ""
    if status >= 500:
        error = Unknown("The gateway failed while handling this request; the server log has the details.")
    elif status == 413:
        error = Overflow(f"The request is too large: {detail or 'over a limit of the HTTP parser'}.",
                         code="request_too_large")
    else:
        error = Malformed(
            f"The request is not valid HTTP for this server: {detail or 'it could not be parsed'}. "
            "A URL and each header line may be at most 8 KB, at most 128 headers, and a body has "
            "Content-Length or Transfer-Encoding (not both), encoded with gzip or deflate if at all.",
            code="bad_http_request",
        )
    response = error.to_response()
    response.force_close()  # aiohttp's parser state for this connection is not to be trusted
    return response


class _EnvelopeRequestHandler(RequestHandler):
    __slots__ = ()

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        plain = super().handle_error(request, status, exc, message)  # logs it; raises if output began
        try:
            return refusal_envelope(status, exc)
        except Exception:  # noqa: BLE001 - the plain answer is still an answer
            log.exception("could not build the envelope for a refused request")
            return plain


class _EnvelopeServer(web.Server):
    def __call__(self) -> RequestHandler:
        handler = super().__call__()
        if type(handler) is RequestHandler:
            handler.__class__ = _EnvelopeRequestHandler  # same slots: only the method lookup changes
        return handler


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` whose connections answer aiohttp's own refusals in the envelope."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        if type(server) is web.Server:
            server.__class__ = _EnvelopeServer
        else:  # pragma: no cover - a future aiohttp with another server class: keep its answers
            log.warning("aiohttp's server class is %s; its own refusals stay plain text", type(server).__name__)
        return server
