"""Observability: request identity, metrics, the access log and payload capture.

Every request gets an ``X-Request-ID`` (the caller's when it is 1–128
characters of ``[A-Za-z0-9-_:.]``, else 16 fresh hex characters), echoed on
every response, streamed ones and errors included, and carried by every log
line written while the request runs.

Capability code describes its request on :class:`RequestInfo`
(``request_info(request)``): capability, model, provider, slot wait, and
extras such as ``audio_sec``, ``rtf``, ``stream``, ``response_format``.
When the request is over, :func:`observe_middleware` turns that into one
:class:`~aistack_core.metrics.RequestOutcome` and hands it to the sinks
that are on: metrics (``AISTACK_OBS_METRICS``), the access log
(``AISTACK_OBS_ACCESS_LOG``) and payload capture (``AISTACK_OBS_PAYLOAD``).
None of them does I/O on the event loop, and none can make a request wait.

Routes: ``GET /metrics`` (Prometheus text) and ``GET /admin/api/metrics``
(JSON with rolling-window percentiles, the GPU slot, loaded models and the
last requests).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import re
import secrets
import time
from typing import Any, AsyncIterator

import attrs
from aiohttp import web

from . import capture as payload_capture
from . import security
from .access_log import AccessLog
from .capture import PayloadStore, RequestCapture
from .config import Config
from .context import config_key, model_cache_key, slot_key
from .errors import Malformed, Network
from .security import warn_if_exposed  # noqa: F401 - `aistack serve` calls it from here
from .metrics import (
    RECENT_REQUESTS,
    LiveState,
    Metrics,
    PrometheusUnavailable,
    RequestOutcome,
    classify,
    iso_utc,
    prometheus_registry,
    prometheus_text,
)

log = logging.getLogger("aistack.observe")

_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9\-_:.]{1,128}")

current_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("aistack_request_id", default="-")


@attrs.define
class RequestInfo:
    """Facts about one request, filled in by the capability that serves it.

    ``extras`` go to the access log as they are; ``audio_sec`` and ``rtf``
    also feed the metrics.  Set ``client_disconnected`` when the caller
    went away, so the request counts as ``client-disconnect``.
    """

    request_id: str
    started: float = attrs.field(factory=time.monotonic)
    capability: str | None = None
    model: str | None = None
    provider: str | None = None
    slot_wait_s: float | None = None
    client_disconnected: bool = False
    extras: dict[str, Any] = attrs.field(factory=dict)
    # Set by the on_response_prepare signal: when headers went out, and the
    # response, so a disconnect after that point can still be answered cleanly.
    headers_sent_at: float | None = None
    prepared_response: web.StreamResponse | None = attrs.field(default=None, repr=False)


REQUEST_INFO = web.RequestKey("aistack.request", RequestInfo)


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
        info.headers_sent_at = time.monotonic()
        info.prepared_response = response


# --- logging --------------------------------------------------------------------


class RequestIdLogFilter(logging.Filter):
    """Adds ``request_id`` to every log record so formatters can show it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id.get()
        return True


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, request_id, message (and exc)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": iso_utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


LOG_FORMATS = ("text", "json")


def configure_logging(log_format: str = "text", level: int = logging.INFO) -> None:
    """Root logging for ``aistack serve``: text or one JSON object per line."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdLogFilter())
    if log_format == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


# --- the sinks ------------------------------------------------------------------


def capability_for_path(path: str) -> str:
    """Which capability a path belongs to, for requests that fail before the capability says so."""
    if path.startswith("/v1/audio/"):
        if path.startswith(("/v1/audio/transcriptions", "/v1/audio/translations")):
            return "asr"
        return "tts"
    if path.startswith(("/v1/chat/", "/v1/completions")):
        return "llm"
    return "gateway"  # health, models, metrics, 404s


class Observability:
    """The sinks of one app, chosen by its config."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics(window_s=config.obs_metrics_window_min * 60) if config.obs_metrics else None
        self.access_log = AccessLog(config.obs_log_dir) if config.obs_access_log else None
        self.payloads = (
            PayloadStore(
                config.obs_payload_dir,
                max_bytes=config.obs_payload_max_mb * 1024 * 1024,
                max_age_s=config.obs_payload_max_age_h * 3600,
                request_cap_bytes=config.obs_payload_request_cap_kb * 1024,
            )
            if config.obs_payload
            else None
        )
        self._prometheus: Any = None

    def finish(
        self,
        request: web.Request,
        info: RequestInfo,
        response: web.StreamResponse | None,
        capture: RequestCapture | None,
    ) -> None:
        """Turn a finished request into a RequestOutcome and hand it to the sinks."""
        latency = time.monotonic() - info.started
        disconnected = info.client_disconnected
        if response is not None:
            status = response.status
            busy = status == 503 and "Retry-After" in response.headers
            # Body bytes when the length is declared; for streamed answers,
            # the bytes written to the connection.
            bytes_out = response.content_length
            if bytes_out is None:
                bytes_out = response.body_length
        else:
            status = 499 if disconnected else 500
            busy = False
            bytes_out = 0
        extras = info.extras
        bytes_in = request.content_length or 0
        if extras and ("bytes_in" in extras or "bytes_out" in extras):
            # The proxies count what they relayed; those figures win over the headers'.
            extras = dict(extras)
            bytes_in = extras.pop("bytes_in", bytes_in)
            bytes_out = extras.pop("bytes_out", bytes_out)
        started = info.started
        headers_sent_at = info.headers_sent_at
        # Positional, in field order: this runs for every request.
        outcome = RequestOutcome(
            time.time() - latency,
            info.request_id,
            request.method,
            request.path,
            status,
            "2xx" if status < 300 and not disconnected else classify(status, busy=busy, disconnected=disconnected),
            info.capability or capability_for_path(request.path),
            info.model or "",
            info.provider,
            latency,
            info.slot_wait_s,
            request.remote,
            bytes_in,
            bytes_out,
            None if headers_sent_at is None else headers_sent_at - started,
            extras,
        )
        if self.metrics is not None:
            self.metrics.record(outcome)
        if self.access_log is not None:
            self.access_log.submit(outcome)
        if capture is not None:
            capture.finish(request, outcome)

    # --- reading ----------------------------------------------------------------

    def live_state(self, app: web.Application) -> LiveState:
        slot = app[slot_key]
        counters: dict[str, tuple[str, float]] = {}
        for sink in (self.access_log, self.payloads):
            if sink is not None:
                counters.update(sink.counters())
        return LiveState(
            slot=slot.status(),
            busy_rejections=slot.busy_rejections,
            loaded_models=app[model_cache_key].loaded(),
            counters=counters,
        )

    def prometheus_registry(self, app: web.Application) -> Any:
        if self._prometheus is None:
            assert self.metrics is not None
            self._prometheus = prometheus_registry(self.metrics, lambda: self.live_state(app))
        return self._prometheus

    # --- background threads -------------------------------------------------------

    async def run_writers(self, app: web.Application) -> AsyncIterator[None]:
        """cleanup_ctx: the access-log and capture threads live as long as the app."""
        sinks = [sink for sink in (self.access_log, self.payloads) if sink is not None]
        for sink in sinks:
            sink.start()
        yield
        # Joining may take a moment (last batch, a slow disk): not on the loop.
        await asyncio.gather(*(asyncio.to_thread(sink.stop) for sink in sinks))


observability_key = web.AppKey("observability", Observability)

# Liveness probes arrive every few seconds from Docker, systemd or a load
# balancer: recording each would drown real traffic in the access log and
# metrics, and /health must stay as cheap as a probe expects.  They still
# get their X-Request-ID.
UNOBSERVED_PATHS = frozenset({"/health"})
# Non-streamed bodies at least this large are sent inside the observe
# middleware (see there); smaller ones go out in one socket write anyway.
SEND_HERE_ABOVE_BYTES = 64 * 1024


@web.middleware
async def observe_middleware(request: web.Request, handler) -> web.StreamResponse:
    """The request id (as :func:`request_id_middleware`) and the recording of the request.

    One layer instead of two, because every request passes through it.
    Sits outside the error middleware, so it sees the envelope responses
    that middleware makes.  A large response the handler returned unsent is
    sent here (aiohttp then finds it already finished), so latency covers
    the body and a client that vanished meanwhile is noticed; a small one
    fits the socket buffer at once and is left to aiohttp, which is cheaper.
    """
    info = RequestInfo(pick_request_id(request.headers.get("X-Request-ID")))
    request[REQUEST_INFO] = info
    token = current_request_id.set(info.request_id)
    if request.path in UNOBSERVED_PATHS:
        try:
            return await handler(request)
        finally:
            current_request_id.reset(token)
    observability = request.app[observability_key]
    capture = None
    if observability.payloads is not None:
        capture = payload_capture.begin(observability.payloads, request, info, time.time())
    response: web.StreamResponse | None = None
    try:
        response = await handler(request)
        if capture is not None:
            await payload_capture.capture_read_body(request, capture)
        if not response.prepared and (
            capture is not None or (response.content_length or SEND_HERE_ABOVE_BYTES) >= SEND_HERE_ABOVE_BYTES
        ):
            await response.prepare(request)
            await response.write_eof()
        return response
    except ConnectionError:
        # The client reset the connection (aiohttp's write errors are
        # ConnectionResetError subclasses).  Hand back the response already
        # under way so aiohttp finishes quietly instead of logging a 500
        # that nobody would receive.
        info.client_disconnected = True
        if response is None:
            response = info.prepared_response
        if response is not None:
            return response
        raise
    except asyncio.CancelledError:
        info.client_disconnected = True
        raise
    except web.HTTPException as exc:  # below 400: the error middleware lets these through
        response = exc
        raise
    finally:
        try:
            observability.finish(request, info, response, capture)
        except Exception:  # noqa: BLE001 - recording must never fail the request it records
            log.exception("could not record %s %s", request.method, request.path)
        finally:
            current_request_id.reset(token)


def middlewares(config: Config) -> list:
    """The outer middlewares: the request id alone, or with the recording when any sink is on."""
    if config.obs_metrics or config.obs_access_log or config.obs_payload:
        return [observe_middleware]
    return [request_id_middleware]


def inner_middlewares(config: Config) -> list:
    """Middlewares that run inside the error middleware (their errors become envelopes)."""
    return security.inner_middlewares(config)


# --- routes ---------------------------------------------------------------------


async def get_prometheus_metrics(request: web.Request) -> web.Response:
    observability = request.app[observability_key]
    if observability.metrics is None:
        raise Network("Metrics are turned off on this server (AISTACK_OBS_METRICS=off).")
    try:
        registry = observability.prometheus_registry(request.app)
    except PrometheusUnavailable:
        raise Network(
            "The Prometheus text needs prometheus-client: pip install 'aistack[observe]'. "
            "The same metrics are served as JSON at /admin/api/metrics."
        ) from None
    body, content_type = prometheus_text(registry)
    return web.Response(body=body, headers={"Content-Type": content_type})


async def get_admin_metrics(request: web.Request) -> web.Response:
    observability = request.app[observability_key]
    try:
        recent = int(request.query.get("recent", "20"))
    except ValueError:
        raise Malformed(f"recent must be a whole number (at most {RECENT_REQUESTS}).") from None
    state = observability.live_state(request.app)
    body: dict[str, Any] = {
        "metrics": observability.metrics.snapshot(recent=recent) if observability.metrics is not None else None,
        "slot": {**state.slot, "busy_rejections": state.busy_rejections},
        "loaded_models": state.loaded_models,
        "access_log": observability.access_log.status() if observability.access_log is not None else None,
        "payload_capture": observability.payloads.status() if observability.payloads is not None else None,
    }
    return web.json_response(body)


def setup(app: web.Application) -> None:
    """Routes, signals and background writers of the observability layer."""
    config = app[config_key]
    observability = Observability(config)
    app[observability_key] = observability
    app.on_response_prepare.append(echo_request_id)
    security.setup(app, config)
    if observability.payloads is not None:
        # Last, so the capture sees the final headers (request id, CORS).
        app.on_response_prepare.append(payload_capture.on_response_prepare)
    app.router.add_get("/metrics", get_prometheus_metrics)
    app.router.add_get("/admin/api/metrics", get_admin_metrics)
    if observability.access_log is not None or observability.payloads is not None:
        app.cleanup_ctx.append(observability.run_writers)
