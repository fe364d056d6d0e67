"""Liveness and plugin listing."""

from __future__ import annotations

from aiohttp import web

from .. import __version__
from ..context import plugins_key


async def get_health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


async def get_plugins(request: web.Request) -> web.Response:
    return web.json_response({"plugins": request.app[plugins_key].listing()})


def setup(app: web.Application) -> None:
    # add_get also answers HEAD with the same headers and no body.
    app.router.add_get("/health", get_health)
    app.router.add_get("/-/plugins", get_plugins)
