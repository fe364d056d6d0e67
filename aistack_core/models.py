"""``GET /v1/models``: what can serve right now.

In-process backends are listed because their plugin imported.  Upstreams
are probed concurrently, each under a short deadline and cached briefly,
so one hanging upstream never slows the listing.
"""

from __future__ import annotations

import asyncio
import logging
import time

import attrs
from aiohttp import web

from .backends import ModelCard
from .config import Config
from .context import config_key, registry_key, upstream_sessions_key
from .errors import Malformed

log = logging.getLogger("aistack.models")


@attrs.define
class _ProbeResult:
    cards: list[ModelCard]
    expires: float


@attrs.define
class UpstreamProbes:
    """Bounded, cached availability probes, one in flight per upstream."""

    timeout_s: float
    cache_s: float
    _results: dict[str, _ProbeResult] = attrs.field(factory=dict)
    _inflight: dict[str, asyncio.Task] = attrs.field(factory=dict)

    async def cards(self, app: web.Application) -> list[ModelCard]:
        registry = app[registry_key]
        sessions = app.get(upstream_sessions_key, {})
        names = [name for name in registry.upstreams if name in sessions]
        results = await asyncio.gather(*(self._probe(app, name) for name in names))
        return [card for cards in results for card in cards]

    async def _probe(self, app: web.Application, name: str) -> list[ModelCard]:
        cached = self._results.get(name)
        now = time.monotonic()
        if cached is not None and cached.expires > now:
            return cached.cards
        task = self._inflight.get(name)
        if task is None or task.done():
            task = asyncio.create_task(self._run_probe(app, name))
            self._inflight[name] = task
        try:
            # shield: a slow probe keeps running for the next caller, but
            # this listing stops waiting for it at the deadline.
            cards = await asyncio.wait_for(asyncio.shield(task), timeout=self.timeout_s)
        except asyncio.TimeoutError:
            log.info("upstream %s did not answer its probe within %.2f s", name, self.timeout_s)
            cards = []
        except Exception as exc:  # noqa: BLE001 - a broken probe hides the upstream, nothing more
            log.info("upstream %s probe failed: %s: %s", name, type(exc).__name__, exc)
            cards = []
        self._results[name] = _ProbeResult(cards, time.monotonic() + self.cache_s)
        return cards

    async def _run_probe(self, app: web.Application, name: str) -> list[ModelCard]:
        upstream = app[registry_key].upstreams[name].backend
        return list(await upstream.probe(app[upstream_sessions_key][name]))


probes_key = web.AppKey("upstream_probes", UpstreamProbes)


def _in_process_entries(app: web.Application) -> list[dict]:
    registry = app[registry_key]
    asr = registry.serving("asr")
    entries: list[dict] = []
    auto = registry.auto_card(asr)
    if auto is not None:
        entries.append(auto)
    for pool in (asr, registry.serving("tts")):
        entries.extend(entry.card.to_openai() for entry in sorted(pool, key=lambda e: e.card.id))
    return entries


async def list_entries(app: web.Application) -> list[dict]:
    local, remote = await asyncio.gather(
        asyncio.to_thread(_in_process_entries, app), app[probes_key].cards(app)
    )
    return local + [card.to_openai() for card in remote]


async def get_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": await list_entries(request.app)})


async def get_model(request: web.Request) -> web.Response:
    wanted = request.match_info["model"]
    registry = request.app[registry_key]
    # Aliases (whisper-1, tts-1, parakeet, ...) retrieve the model they stand for.
    for capability in ("asr", "tts"):
        found = registry.resolve_tts(wanted) if capability == "tts" else registry.find("asr", wanted)
        if found is not None:
            wanted = found.card.id
            break
    for entry in await list_entries(request.app):
        if entry["id"] == wanted:
            return web.json_response(entry)
    raise Malformed(f"No model {wanted!r} is available now; GET /v1/models lists those that are.", status=404)


def setup(app: web.Application) -> None:
    config: Config = app[config_key]
    app[probes_key] = UpstreamProbes(timeout_s=config.probe_timeout_s, cache_s=config.probe_cache_s)
    app.router.add_get("/v1/models", get_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
