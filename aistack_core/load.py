"""How loaded this gateway is now: what ``/health`` tells load balancers and routers.

Two figures, both read live and never kept in sync by hand: the devices
(from the slot's own status; today one slot stands for the one device) and
the requests in flight per capability (counted by a middleware around
every request to a capability's path, WebSocket sessions included).
"""

from __future__ import annotations

from typing import Any, Mapping

import attrs
from aiohttp import web

from .observe.middleware import capability_for_path

# Always reported, so a router sees a stable schema (zeros rather than missing keys).
REPORTED_CAPABILITIES = ("asr", "tts", "llm")


@attrs.define
class InFlight:
    """Requests being served now, by capability."""

    counts: dict[str, int] = attrs.field(factory=lambda: dict.fromkeys(REPORTED_CAPABILITIES, 0))

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)


in_flight_key = web.AppKey("in_flight", InFlight)


@web.middleware
async def count_in_flight(request: web.Request, handler) -> web.StreamResponse:
    capability = capability_for_path(request.path)
    if capability not in REPORTED_CAPABILITIES:
        return await handler(request)
    counts = request.app[in_flight_key].counts
    counts[capability] += 1
    try:
        return await handler(request)
    finally:
        counts[capability] -= 1


@attrs.frozen
class DeviceLoad:
    total: int
    busy: int

    @property
    def load_score(self) -> float:
        """Busy share of the devices, 0 (idle) to 1 (every device busy)."""
        return round(self.busy / self.total, 3) if self.total else 1.0


def device_load(slot_status: Mapping[str, Any]) -> DeviceLoad:
    """Devices total and busy from ``GpuSlot.status()``.

    A status with a ``devices`` list (one entry per device slot, each with
    its ``busy`` flag) counts those; the single-slot status (``{"busy": ...}``)
    is one device.
    """
    devices = slot_status.get("devices")
    if isinstance(devices, list):
        return DeviceLoad(total=len(devices), busy=sum(1 for device in devices if device.get("busy")))
    return DeviceLoad(total=1, busy=1 if slot_status.get("busy") else 0)
