"""The observe middleware: request identity, and the recording of every request.

Every request gets an ``X-Request-ID`` (the caller's when it is 1–128
characters of ``[A-Za-z0-9-_:.]``, else 16 fresh hex characters), echoed on
every response, streamed ones and errors included, and carried by every log
line written while the request runs.  When it is over, its
:class:`~aistack_core.observe.record.RequestInfo` becomes one
:class:`~aistack_core.observe.record.RequestOutcome` for the sinks that are
on: metrics, the access log and payload capture.  None of them does I/O on
the event loop, and none can make a request wait or fail.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator

from aiohttp import web

from ..config import Config
from ..context import model_cache_key, slot_key
from ..device_report import device_report
from . import capture as payload_capture
from .access_log import AccessLog
from .capture import PayloadStore, RequestCapture
from .metrics import LiveState, Metrics, prometheus_registry
from .realtime import RealtimeCollector, RealtimeStats
from .record import (
    REQUEST_INFO, RequestInfo, RequestOutcome, classify, current_request_id, measured_values, pick_request_id,
)

log = logging.getLogger("aistack.observe")


def capability_for_path(path: str) -> str:
    """Which capability a path belongs to, for requests that fail before the route says so."""
    if path.startswith("/v1/audio/"):
        if path.startswith(("/v1/audio/transcriptions", "/v1/audio/translations")):
            return "asr"
        return "tts"
    if path.startswith(("/v1/chat/", "/v1/completions", "/v1/embeddings")):
        return "llm"
    if path.startswith("/v1/realtime"):
        return "asr"
    return "gateway"  # health, models, metrics, admin, 404s


def outcome_row(request: web.Request, info: RequestInfo, response: web.StreamResponse | None) -> tuple:
    """A finished request's RequestOutcome as a row: its fields in order (see RequestOutcome.to_row)."""
    latency = time.monotonic() - info.started
    disconnected = info.client_disconnected
    if response is not None:
        status = response.status
        # Body bytes when the length is declared; for streamed answers, the bytes written.
        bytes_out = response.content_length
        if bytes_out is None:
            bytes_out = response.body_length
    else:
        status = 499 if disconnected else 500
        bytes_out = 0
    if info.bytes_out is not None:  # what a proxy relayed wins over the headers' figure
        bytes_out = info.bytes_out
    headers_sent_at = info.headers_sent_at
    return (
        time.time() - latency,
        info.request_id,
        request.method,
        request.path,
        status,
        "2xx" if status < 300 and not disconnected else classify(
            status, busy=info.slot_busy and status == 503, disconnected=disconnected),
        info.capability or capability_for_path(request.path),
        info.model,
        info.provider,
        latency,
        info.slot_wait_s,
        request.remote,
        info.bytes_in if info.bytes_in is not None else (request.content_length or 0),
        bytes_out,
        None if headers_sent_at is None else headers_sent_at - info.started,
        measured_values(info),
    )


# The metrics and the access log take finished requests a moment later, a
# batch at a time: handed over one by one between two requests, their code
# ran cold (every cache miss paid again) and cost three times what the same
# work costs in a batch.  Meanwhile a request waits as a row of plain values
# (which the garbage collector stops tracking), not as live objects.
# Readers of the metrics record what is waiting first, so they never see a
# request late; the access log's thread waits longer than this anyway.
RECORD_AFTER_S = 0.02
RECORD_AT_MOST = 256


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
        self._unrecorded: list[tuple] = []  # rows of finished requests not yet handed to the metrics and the access log
        self.realtime = RealtimeStats()  # live-transcription sessions (kept even with metrics off: it is tiny)

    @property
    def records(self) -> bool:
        """Whether any sink wants finished requests (else the middleware only sets the request id)."""
        return self.metrics is not None or self.access_log is not None or self.payloads is not None

    def finish(
        self,
        request: web.Request,
        info: RequestInfo,
        response: web.StreamResponse | None,
        capture: RequestCapture | None,
    ) -> None:
        """Note a finished request: the capture takes its outcome now, the
        metrics and the access log within RECORD_AFTER_S."""
        row = outcome_row(request, info, response)
        if capture is not None:
            capture.finish(request, RequestOutcome.from_row(row))
        unrecorded = self._unrecorded
        unrecorded.append(row)
        if len(unrecorded) == 1:
            asyncio.get_running_loop().call_later(RECORD_AFTER_S, self.record_finished)
        elif len(unrecorded) >= RECORD_AT_MOST:
            self.record_finished()

    def record_finished(self) -> None:
        """Hand the waiting outcomes to the metrics and the access log (on the
        event loop; whoever reads the metrics calls it first)."""
        rows, self._unrecorded = self._unrecorded, []
        metrics, access_log = self.metrics, self.access_log
        for row in rows:
            outcome = RequestOutcome.from_row(row)
            try:
                if metrics is not None:
                    metrics.record(outcome, row)
                if access_log is not None:
                    access_log.submit(outcome)
            except Exception:  # noqa: BLE001 - one request's record must not cost the others theirs
                log.exception("could not record request %s (%s %s)", outcome.request_id, outcome.method, outcome.path)

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
            devices=device_report(app),
            counters=counters,
        )

    def prometheus_registry(self, app: web.Application) -> Any:
        if self._prometheus is None:
            assert self.metrics is not None
            self._prometheus = prometheus_registry(self.metrics, lambda: self.live_state(app))
            self._prometheus.register(RealtimeCollector(self.realtime))
        return self._prometheus

    # --- background threads -------------------------------------------------------

    async def run_writers(self, app: web.Application) -> AsyncIterator[None]:
        """cleanup_ctx: the access-log and capture threads live as long as the app."""
        sinks = [sink for sink in (self.access_log, self.payloads) if sink is not None]
        for sink in sinks:
            sink.start()
        yield
        self.record_finished()  # the last requests' lines, before the threads end
        # Joining may take a moment (last batch, a slow disk): not on the loop.
        await asyncio.gather(*(asyncio.to_thread(sink.stop) for sink in sinks))


observability_key = web.AppKey("observability", Observability)


async def echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: runs for every response just before its headers go out."""
    info = request.get(REQUEST_INFO)
    if info is not None:
        response.headers["X-Request-ID"] = info.request_id
        info.headers_sent_at = time.monotonic()
        info.prepared_response = response


# Liveness probes arrive every few seconds from Docker, systemd or a load
# balancer: recording each would drown real traffic in the access log and
# metrics, and /health must stay as cheap as a probe expects.  They still
# get their X-Request-ID.  The admin page's own polling reads (status, the
# model list, the page files) are left out for the same reason; what it
# changes (loads, unloads) and the API calls it makes are recorded like any
# other request, and so are metrics reads (scrapers want to see themselves).
UNOBSERVED_PATHS = frozenset({
    "/health", "/health/ready", "/admin", "/admin/", "/admin/static/admin.js", "/admin/static/admin.css",
    "/admin/api/status", "/admin/api/models",
})
# Non-streamed bodies at least this large are sent inside the observe
# middleware (see there); smaller ones go out in one socket write anyway.
SEND_HERE_ABOVE_BYTES = 64 * 1024


@web.middleware
async def observe_middleware(request: web.Request, handler) -> web.StreamResponse:
    """The request id and the recording of the request.

    One layer, because every request passes through it.  Sits outside the error middleware, so it sees the envelope responses
    that middleware makes.  A large response the handler returned unsent is
    sent here (aiohttp then finds it already finished), so latency covers
    the body and a client that vanished meanwhile is noticed; a small one
    fits the socket buffer at once and is left to aiohttp, which is cheaper.
    """
    info = RequestInfo(pick_request_id(request.headers.get("X-Request-ID")))
    request[REQUEST_INFO] = info
    token = current_request_id.set(info.request_id)
    observability = request.app[observability_key]
    if request.path in UNOBSERVED_PATHS or not observability.records:
        try:
            return await handler(request)
        finally:
            current_request_id.reset(token)
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


def setup(app: web.Application, config: Config) -> None:
    """Signals and background writers of the observability layer (the app factory calls it)."""
    observability = Observability(config)
    app[observability_key] = observability
    app.on_response_prepare.append(echo_request_id)
    if observability.access_log is not None or observability.payloads is not None:
        app.cleanup_ctx.append(observability.run_writers)


def capture_signal(app: web.Application) -> None:
    """Last on_response_prepare handler: the capture sees the final headers (request id, CORS)."""
    if app[observability_key].payloads is not None:
        app.on_response_prepare.append(payload_capture.on_response_prepare)
