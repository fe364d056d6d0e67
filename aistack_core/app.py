"""The application factory: every route, middleware and cleanup context in one place."""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

import aiohttp
from aiohttp import web

from . import security
from .config import Config
from .context import (
    config_key,
    model_cache_key,
    plugins_key,
    registry_key,
    slot_key,
    upstream_devices_key,
    upstream_sessions_key,
)
from .devices import configured_devices, free_memory_reader, upstream_devices
from .errors import error_middleware, server_log
from .load import InFlight, count_in_flight, in_flight_key
from .model_cache import ModelCache
from .observe import middleware as observe
from .plugins import PluginSet, load_plugins
from .registry import Registry
from .routes import (
    admin, audio_proxy, chat, diarization, fallback, health, metrics, models, openapi, realtime, speech,
    transcriptions,
)
from .slot import GpuSlot
from .upstreams import UpstreamProbes, probes_key, recheck_down_replicas

log = logging.getLogger("aistack.app")

# How long an engine may take to free memory before a load goes ahead anyway.
RELEASE_TIMEOUT_S = 10.0

# Route families in the order their routes are matched: the catch-all
# /v1/audio/{tail} proxy comes after the /v1/audio routes served here, and
# the fallback (404/405 for every other path) after everything.
ROUTE_FAMILIES = (
    health, models, metrics, transcriptions, diarization, realtime, speech, chat, admin, openapi, audio_proxy,
    fallback,
)


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


async def _release_upstream_memory(app: web.Application, device: str) -> None:
    """Ask each upstream engine working on ``device`` to free the memory it holds idle."""
    for entry in app[registry_key].upstreams.values():
        upstream = entry.backend
        if upstream.release_memory is None or device not in app[upstream_devices_key].get(upstream.name, ()):
            continue
        session = app[upstream_sessions_key][upstream.name]
        try:
            released = await asyncio.wait_for(upstream.release_memory(session, device), RELEASE_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - an engine that cannot answer keeps its memory; the load goes on
            log.warning("%s could not release memory on %s: %s: %s", upstream.name, device, type(exc).__name__, exc)
            continue
        if released:
            log.info("%s released %s to make room on %s", upstream.name, ", ".join(released), device)


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

    cors = security.CorsPolicy(config.cors_allow_origins) if config.cors_allow_origins else None
    # Outside in: request id and recording, the envelope, then (inside the
    # envelope, so their refusals are envelopes too) CORS preflights and the key.
    app = web.Application(
        middlewares=[
            observe.observe_middleware, count_in_flight, error_middleware, *security.middlewares(config, cors)
        ],
        # Bodies are read by forms.py, which sets each route's own limit.
        client_max_size=1 << 40,
        # aiohttp's own parser refusals: one log line each, not a traceback at ERROR.
        handler_args={"logger": server_log},
    )
    app[config_key] = config
    app[plugins_key] = plugins
    app[registry_key] = registry
    devices = configured_devices(config, plugins.manager)
    app[slot_key] = GpuSlot(wait_s=config.slot_wait_s, devices=devices)
    app[upstream_devices_key] = {
        entry.backend.name: upstream_devices(
            entry.backend.name, entry.backend.devices, entry.backend.uses_local_gpu, devices
        )
        for entry in registry.upstreams.values()
    }
    cache = ModelCache(
        keep_alive_s=config.model_keep_alive_s, min_free_mb=config.min_free_ram_mb,
        default_device=devices[0].name, device_free_memory=free_memory_reader(plugins.manager),
        min_free_device_mb=config.min_free_vram_mb,
    )
    cache.release_elsewhere = lambda device: _release_upstream_memory(app, device)
    app[in_flight_key] = InFlight()
    app[model_cache_key] = cache
    log.info("devices: %s", ", ".join(device.name for device in devices))
    app[probes_key] = UpstreamProbes(timeout_s=config.probe_timeout_s, cache_s=config.probe_cache_s)
    app.cleanup_ctx.append(_upstream_sessions)
    app.cleanup_ctx.append(recheck_down_replicas)  # needs the sessions above
    app.cleanup_ctx.append(_model_cache_sweeper)

    observe.setup(app, config)
    if cors is not None:
        app.on_response_prepare.append(cors.add_headers)
    observe.capture_signal(app)  # last: the capture sees the final headers
    for family in ROUTE_FAMILIES:
        family.setup(app)
    return app
