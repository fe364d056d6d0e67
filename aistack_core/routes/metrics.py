"""``GET /metrics`` (Prometheus text) and ``GET /admin/api/metrics`` (JSON with percentiles)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..errors import Malformed, Network
from ..observe.middleware import observability_key
from ..observe.metrics import RECENT_REQUESTS, PrometheusUnavailable, prometheus_text


async def get_prometheus_metrics(request: web.Request) -> web.Response:
    observability = request.app[observability_key]
    if observability.metrics is None:
        raise Network("Metrics are turned off on this server (AISTACK_OBS_METRICS=off).", code="metrics_disabled")
    try:
        registry = observability.prometheus_registry(request.app)
    except PrometheusUnavailable:
        raise Network(
            "The Prometheus text needs prometheus-client: pip install 'aistack[observe]'. "
            "The same metrics are served as JSON at /admin/api/metrics.",
            code="no_backend",
        ) from None
    observability.record_finished()
    body, content_type = prometheus_text(registry)
    return web.Response(body=body, headers={"Content-Type": content_type})


async def get_admin_metrics(request: web.Request) -> web.Response:
    observability = request.app[observability_key]
    try:
        recent = int(request.query.get("recent", "20"))
    except ValueError:
        raise Malformed(f"recent must be a whole number (at most {RECENT_REQUESTS}).", param="recent") from None
    observability.record_finished()
    state = observability.live_state(request.app)
    body: dict[str, Any] = {
        "metrics": observability.metrics.snapshot(recent=recent) if observability.metrics is not None else None,
        "slot": {**state.slot, "busy_rejections": state.busy_rejections},
        "loaded_models": state.loaded_models,
        "device_slots": state.devices,
        "access_log": observability.access_log.status() if observability.access_log is not None else None,
        "payload_capture": observability.payloads.status() if observability.payloads is not None else None,
        "realtime": observability.realtime.snapshot(recent=recent),
    }
    return web.json_response(body)


def setup(app: web.Application) -> None:
    app.router.add_get("/metrics", get_prometheus_metrics)
    app.router.add_get("/admin/api/metrics", get_admin_metrics)
