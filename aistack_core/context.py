"""Typed application keys shared by the app factory and the capability files."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from .config import Config
from .model_cache import ModelCache
from .plugins import PluginSet
from .registry import Registry
from .slot import GpuSlot

config_key = web.AppKey("config", Config)
plugins_key = web.AppKey("plugins", PluginSet)
registry_key = web.AppKey("registry", Registry)
slot_key = web.AppKey("slot", GpuSlot)
model_cache_key = web.AppKey("model_cache", ModelCache)
# The devices each upstream's work occupies, by Upstream.name (its declaration resolved).
upstream_devices_key = web.AppKey("upstream_devices", dict[str, tuple[str, ...]])
# One ClientSession per upstream, by Upstream.name, opened in cleanup_ctx.
upstream_sessions_key = web.AppKey("upstream_sessions", dict[str, aiohttp.ClientSession])
