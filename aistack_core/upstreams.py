"""What the upstreams can serve now, which of their replicas are reachable, and where a model goes.

Shared by ``/v1/models`` (which lists the upstreams' models), the LLM proxy
(which routes by model and frees GPU memory only for an upstream that
answers), the proxy (which picks a reachable replica) and the admin views.

Probes run per replica (one URL of an upstream), one at a time per replica;
a caller waits for one at most ``timeout_s``, and an answer that arrives
after that is still kept for the next caller, so a slow upstream is listed
as soon as it has answered once.  An upstream's answer is the union of its
replicas' answers.

A replica whose probe fails, or that refuses a proxied connection, is
*down*: requests skip it (unless every replica is down) until its probe
answers again, and a background task re-probes down replicas every
``cache_s`` seconds.  That is all the gateway does about replicas; for load
spreading or anything smarter, put a load balancer in front (docker/cluster/).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

import attrs
from aiohttp import web

from .backends import ModelCard, Upstream
from .context import registry_key, upstream_sessions_key
from .errors import Network
from .registry import Registered

log = logging.getLogger("aistack.upstreams")

# A probe still running after this long counts as failed (callers stopped
# waiting for it long before, at ``timeout_s``).
PROBE_GIVE_UP_S = 10.0
RECHECK_MIN_INTERVAL_S = 0.5


@attrs.define
class _ProbeResult:
    cards: list[ModelCard]
    reachable: bool
    expires: float


def _merged(results: list[_ProbeResult]) -> _ProbeResult:
    """One upstream's answer from its replicas': what the reachable ones list, once each."""
    cards: dict[str, ModelCard] = {}
    for result in results:
        if result.reachable:
            for card in result.cards:
                cards.setdefault(card.id, card)
    return _ProbeResult(
        list(cards.values()),
        any(result.reachable for result in results),
        min((result.expires for result in results), default=0.0),
    )


@attrs.define
class UpstreamProbes:
    """Bounded, cached availability probes per replica, and the replicas known to be down."""

    timeout_s: float
    cache_s: float
    _results: dict[tuple[str, str], _ProbeResult] = attrs.field(factory=dict)  # (name, url)
    _inflight: dict[tuple[str, str], asyncio.Task] = attrs.field(factory=dict)
    _down: dict[tuple[str, str], str] = attrs.field(factory=dict)  # (name, url) -> why
    # Model ids each upstream has listed since start: a request for one whose
    # upstream cannot be reached now gets that upstream's 503, not another's 404.
    _seen: dict[str, set[str]] = attrs.field(factory=dict)

    # --- what the upstreams serve --------------------------------------------------

    async def cards(self, app: web.Application) -> list[ModelCard]:
        """Every model the reachable upstreams list now."""
        registry = app[registry_key]
        sessions = app.get(upstream_sessions_key, {})
        names = [name for name in registry.upstreams if name in sessions]
        results = await asyncio.gather(*(self.probe(app, name) for name in names))
        return [card for result in results for card in result.cards]

    def last(self, name: str) -> _ProbeResult | None:
        """The last answer, however old, without probing (None before the first)."""
        results = [result for key, result in self._results.items() if key[0] == name]
        return _merged(results) if results else None

    async def reachable(self, app: web.Application, name: str) -> bool:
        return (await self.probe(app, name)).reachable

    async def probe(self, app: web.Application, name: str) -> _ProbeResult:
        upstream: Upstream = app[registry_key].upstreams[name].backend
        return _merged(list(await asyncio.gather(*(self._probe_replica(app, name, url) for url in upstream.urls))))

    async def _probe_replica(self, app: web.Application, name: str, url: str) -> _ProbeResult:
        key = (name, url)
        cached = self._results.get(key)
        if cached is not None and cached.expires > time.monotonic():
            return cached
        task = self._inflight.get(key)
        if task is None or task.done():
            task = asyncio.create_task(self._run_probe(app, name, url))
            self._inflight[key] = task
        try:
            # shield: a slow probe keeps running (and caches its answer when it
            # comes), but this caller stops waiting for it at the deadline.
            return await asyncio.wait_for(asyncio.shield(task), timeout=self.timeout_s)
        except asyncio.TimeoutError:
            log.info("upstream %s at %s did not answer its probe within %.2f s", name, url, self.timeout_s)
            if cached is not None:
                return cached  # the last answer, stale, beats none
            return _ProbeResult([], False, 0.0)

    async def _run_probe(self, app: web.Application, name: str, url: str) -> _ProbeResult:
        upstream: Upstream = app[registry_key].upstreams[name].backend
        try:
            cards = list(
                await asyncio.wait_for(upstream.probe(app[upstream_sessions_key][name], url), PROBE_GIVE_UP_S)
            )
        except Exception as exc:  # noqa: BLE001 - a broken probe hides the replica, nothing more
            reason = f"{type(exc).__name__}: {exc}".rstrip(": ")
            # Said once as it goes down (mark_down warns), not at every re-probe.
            level = logging.DEBUG if self.is_down(upstream, url) else logging.INFO
            log.log(level, "upstream %s probe at %s failed: %s", name, url, reason)
            self.mark_down(upstream, url, f"its probe failed ({reason})")
            result = _ProbeResult([], False, time.monotonic() + self.cache_s)
        else:
            self.mark_up(upstream, url)
            self._seen.setdefault(name, set()).update(card.id for card in cards)
            result = _ProbeResult(cards, True, time.monotonic() + self.cache_s)
        self._results[(name, url)] = result
        return result

    # --- replicas ----------------------------------------------------------------------

    def candidates(self, upstream: Upstream) -> list[str]:
        """The replicas to try, in order: those not known to be down, then (as a last resort) the rest."""
        up = [url for url in upstream.urls if (upstream.name, url) not in self._down]
        return up + [url for url in upstream.urls if (upstream.name, url) in self._down]

    def is_down(self, upstream: Upstream, url: str) -> bool:
        return (upstream.name, url) in self._down

    def mark_down(self, upstream: Upstream, url: str, reason: str) -> None:
        key = (upstream.name, url)
        if key not in self._down:
            log.warning("upstream %s at %s is down: %s", upstream.name, url, reason)
        self._down[key] = reason
        cached = self._results.get(key)
        if cached is not None and cached.reachable:
            # Its listing no longer stands; the next caller asks again.
            self._results[key] = _ProbeResult([], False, 0.0)

    def mark_up(self, upstream: Upstream, url: str) -> None:
        if self._down.pop((upstream.name, url), None) is not None:
            log.info("upstream %s at %s answers again", upstream.name, url)

    async def recheck_down(self, app: web.Application) -> None:
        """Probe every replica that is down, so one that came back rejoins.

        Only upstreams with several replicas: a lone URL is always tried
        anyway, so knowing it is down changes nothing.
        """
        upstreams = app[registry_key].upstreams
        keys = [key for key in list(self._down) if key[0] in upstreams and len(upstreams[key[0]].backend.urls) > 1]
        await asyncio.gather(*(self._probe_replica(app, name, url) for name, url in keys))

    # --- routing by model ----------------------------------------------------------------

    async def pick(self, app: web.Application, capability: str, model: str) -> Registered | None:
        """The upstream of ``capability`` that serves ``model``.

        With one upstream there is nothing to choose (and nothing is probed on
        the request path).  With several: the first whose reachable replicas
        list ``model``; else, when an upstream listed it before but cannot be
        reached now, that upstream's 503; else the first ``catch_all`` one.
        """
        entries = app[registry_key].upstreams_for(capability)
        if len(entries) <= 1:
            return entries[0] if entries else None
        now = time.monotonic()
        for entry in entries:
            # A fresh listing that has the model answers at once: no waiting on
            # the other upstreams' probes (one of them may hang).
            known = self.last(entry.backend.name)
            if known is not None and known.expires > now and any(card.id == model for card in known.cards):
                return entry
        results = await asyncio.gather(*(self.probe(app, entry.backend.name) for entry in entries))
        for entry, result in zip(entries, results):
            if any(card.id == model for card in result.cards):
                return entry
        for entry, result in zip(entries, results):
            upstream = entry.backend
            if not result.reachable and model in self._seen.get(upstream.name, ()):
                raise Network(
                    f"Model {model!r} is served by {upstream.provider}, which cannot be reached now: "
                    f"{upstream.unreachable_hint}",
                    provider=upstream.provider, code="upstream_unreachable",
                )
        return next((entry for entry in entries if entry.backend.catch_all), entries[0])


probes_key = web.AppKey("upstream_probes", UpstreamProbes)


async def recheck_down_replicas(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: re-probe down replicas in the background while the app runs."""
    probes = app[probes_key]
    interval_s = max(RECHECK_MIN_INTERVAL_S, probes.cache_s)

    async def loop() -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await probes.recheck_down(app)
            except Exception:  # noqa: BLE001 - the next round tries again
                log.exception("re-probing down upstream replicas failed")

    task = asyncio.create_task(loop())
    yield
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
