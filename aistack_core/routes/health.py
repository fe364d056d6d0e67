"""Liveness, load for balancers and routers, and the plugin listing."""

from __future__ import annotations

from aiohttp import web

from .. import __version__
from ..context import config_key, plugins_key, slot_key
from ..device_report import device_report
from ..load import device_load, in_flight_key


async def get_health(request: web.Request) -> web.Response:
    """The contract's ``status`` and ``version``, plus what a load balancer or router needs.

    ``routing`` has the shape other OpenAI-style speech servers report
    (``accepts_requests``, ``load_score``): ``accepts_requests`` is false
    while a GPU request would get 503 + Retry-After right now.  ``devices``
    and ``in_flight`` give the detail, ``device_slots`` each device's slot
    and resident models.  It stays a liveness answer: busy is not
    unhealthy, so ``status`` is "ok" whenever the process answers.
    """
    app = request.app
    devices = device_load(app[slot_key].status())
    free = devices.total - devices.busy
    queues = app[config_key].slot_wait_s > 0  # a busy slot then makes requests wait instead of refusing
    return web.json_response({
        "status": "ok",
        "version": __version__,
        "routing": {"accepts_requests": free > 0 or queues, "load_score": devices.load_score},
        "devices": {"total": devices.total, "busy": devices.busy},
        "in_flight": app[in_flight_key].snapshot(),
        "device_slots": device_report(app),
    })


async def get_plugins(request: web.Request) -> web.Response:
    return web.json_response({"plugins": request.app[plugins_key].listing()})


def setup(app: web.Application) -> None:
    # add_get also answers HEAD with the same headers and no body.
    app.router.add_get("/health", get_health)
    app.router.add_get("/-/plugins", get_plugins)
