"""What each device is doing: its slot and its resident models, for /health, /metrics and the admin API."""

from __future__ import annotations

import time

from aiohttp import web

from .context import model_cache_key, slot_key


def device_report(app: web.Application) -> list[dict]:
    """One entry per device, in ``AISTACK_DEVICES`` order; cheap (nothing is asked of a GPU library)."""
    now = time.monotonic()
    cache = app[model_cache_key]
    resident: dict[str, list[dict]] = {}
    for entry in cache.loaded_entries():
        resident.setdefault(entry.device, []).append({
            "capability": entry.key[0] if isinstance(entry.key, tuple) else None,
            "model": entry.key[1] if isinstance(entry.key, tuple) else str(entry.key),
            "in_use": entry.in_use,
            "idle_s": round(now - entry.last_used, 1),
            "pinned": entry.pinned,
        })
    return [{**slot, "models": resident.get(slot["device"], [])} for slot in app[slot_key].device_status()]
