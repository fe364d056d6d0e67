"""The application factory: every route, middleware and cleanup context in one place."""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

import aiohttp
from aiohttp import web

from . import asr, health, llm, models, tts
from .config import Config
from .context import (
    config_key,
    model_cache_key,
    plugins_key,
    registry_key,
    slot_key,
    upstream_sessions_key,
)
from .errors import error_middleware
from .model_cache import ModelCache
from . import observe
from .plugins import PluginSet, load_plugins
from .registry import Registry
from .slot import GpuSlot

log = logging.getLogger("aistack.app")

# JSON bodies (TTS, chat) are read whole; uploads are streamed and capped separately.
MAX_JSON_BODY = 64 * 1024 * 1024


async def _upstream_sessions(app: web.Application) -> AsyncIterator[None]:
    """One ClientSession per upstream, with that upstream's timeouts.

    ``auto_decompress=False`` keeps the proxy transparent: compressed bodies
    pass through byte for byte with their Content-Encoding.
    """
    sessions: dict[str, aiohttp.ClientSession] = {}
    for entry in app[registry_key].upstreams.values():
        upstream = entry.backend
        sessions[upstream.name] = aiohttp.ClientSession(
            base_url=None,
            timeout=aiohttp.ClientTimeout(
                total=None, connect=upstream.connect_timeout, sock_read=upstream.read_timeout
            ),
            auto_decompress=False,
            read_bufsize=1 << 20,  # bigger reads, fewer writes on the relay hot path
            connector=aiohttp.TCPConnector(limit=0, force_close=False),
        )
    app[upstream_sessions_key] = sessions
    yield
    await asyncio.gather(*(session.close() for session in sessions.values()))


async def _model_cache_sweeper(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(app[model_cache_key].run_sweeper())
    yield
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    app[model_cache_key].evict()


def create_app(config: Config | None = None, *, plugins: PluginSet | None = None) -> web.Application:
    """Build the gateway.

    :param config: settings; read from the environment when omitted.
    :param plugins: an already loaded :class:`PluginSet` (tests pass one built
        with ``load_plugins(load_entrypoints=False)``); entry points are loaded
        when omitted, honouring ``AISTACK_LOAD_PLUGINS``.
    """
    config = config or Config.from_env()
    if plugins is None:
        plugins = load_plugins(load_entrypoints=True, allow=config.load_plugins)
    registry = Registry.from_plugins(plugins, config)

    app = web.Application(
        middlewares=[*observe.middlewares(config), error_middleware, *observe.inner_middlewares(config)],
        client_max_size=MAX_JSON_BODY,
    )
    app[config_key] = config
    app[plugins_key] = plugins
    app[registry_key] = registry
    app[slot_key] = GpuSlot(wait_s=config.slot_wait_s)
    app[model_cache_key] = ModelCache(keep_alive_s=config.model_keep_alive_s, min_free_mb=config.min_free_ram_mb)
    app.cleanup_ctx.append(_upstream_sessions)
    app.cleanup_ctx.append(_model_cache_sweeper)

    observe.setup(app)
    for capability in (health, models, asr, tts, llm):
        capability.setup(app)
    return app
