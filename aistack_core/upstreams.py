"""What the upstreams can serve now: bounded, cached availability probes.

Shared by ``/v1/models`` (which lists the upstreams' models), the LLM proxy
(which frees GPU memory only for an upstream that answers) and the admin
views.  One probe runs at a time per upstream; a listing waits for it at
most ``timeout_s``, and an answer that arrives after that is still kept for
the next caller, so a slow upstream is listed as soon as it has answered once.
"""

from __future__ import annotations

import asyncio
import logging
import time

import attrs
from aiohttp import web

from .backends import ModelCard
from .context import registry_key, upstream_sessions_key

log = logging.getLogger("aistack.upstreams")


@attrs.define
class _ProbeResult:
    cards: list[ModelCard]
    reachable: bool
    expires: float


@attrs.define
class UpstreamProbes:
    """Bounded, cached availability probes, one in flight per upstream."""

    timeout_s: float
    cache_s: float
    _results: dict[str, _ProbeResult] = attrs.field(factory=dict)
    _inflight: dict[str, asyncio.Task] = attrs.field(factory=dict)

    async def cards(self, app: web.Application) -> list[ModelCard]:
        """Every model the reachable upstreams list now."""
        registry = app[registry_key]
        sessions = app.get(upstream_sessions_key, {})
        names = [name for name in registry.upstreams if name in sessions]
        results = await asyncio.gather(*(self.probe(app, name) for name in names))
        return [card for result in results for card in result.cards]

    def last(self, name: str) -> _ProbeResult | None:
        """The last answer, however old, without probing (None before the first)."""
        return self._results.get(name)

    async def reachable(self, app: web.Application, name: str) -> bool:
        return (await self.probe(app, name)).reachable

    async def probe(self, app: web.Application, name: str) -> _ProbeResult:
        cached = self._results.get(name)
        if cached is not None and cached.expires > time.monotonic():
            return cached
        task = self._inflight.get(name)
        if task is None or task.done():
            task = asyncio.create_task(self._run_probe(app, name))
            self._inflight[name] = task
        try:
            # shield: a slow probe keeps running (and caches its answer when it
            # comes), but this caller stops waiting for it at the deadline.
            return await asyncio.wait_for(asyncio.shield(task), timeout=self.timeout_s)
        except asyncio.TimeoutError:
            log.info("upstream %s did not answer its probe within %.2f s", name, self.timeout_s)
            if cached is not None:
                return cached  # the last answer, stale, beats none
            return _ProbeResult([], False, 0.0)

    async def _run_probe(self, app: web.Application, name: str) -> _ProbeResult:
        upstream = app[registry_key].upstreams[name].backend
        try:
            cards = list(await upstream.probe(app[upstream_sessions_key][name]))
            result = _ProbeResult(cards, True, time.monotonic() + self.cache_s)
        except Exception as exc:  # noqa: BLE001 - a broken probe hides the upstream, nothing more
            log.info("upstream %s probe failed: %s: %s", name, type(exc).__name__, exc)
            result = _ProbeResult([], False, time.monotonic() + self.cache_s)
        self._results[name] = result
        return result


probes_key = web.AppKey("upstream_probes", UpstreamProbes)
