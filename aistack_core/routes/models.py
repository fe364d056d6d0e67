"""``GET /v1/models``: what can serve right now.

In-process backends are listed because their plugin imported.  Upstreams
are probed concurrently, each under a short deadline and cached briefly,
so one hanging upstream never slows the listing.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from ..context import model_cache_key, registry_key
from ..errors import Malformed
from ..registry import OPENAI_ASR_IDS, OPENAI_TTS_IDS, Registered, Registry, is_auto
from ..upstreams import probes_key

log = logging.getLogger("aistack.models")


def _alias_entry(alias: str, capability: str, target: Registered) -> dict:
    """An OpenAI model id that works here, and the model it stands for right now."""
    return {
        "id": alias,
        "object": "model",
        "created": 0,
        "owned_by": "aistack",
        "capabilities": [capability],
        "supports_streaming": target.card.supports_streaming,
        "is_routing_alias": True,
        "resolves_to": target.card.id,
    }


def _openai_aliases(registry: Registry, asr: list[Registered], tts: list[Registered]) -> list[dict]:
    """OpenAI's ids that resolve to a backend that can serve now (blocking: call from a thread)."""
    entries: list[dict] = []
    serving = {id(entry) for entry in (*asr, *tts)}
    for alias in OPENAI_ASR_IDS:
        if registry.find("asr", alias) is not None:
            target = registry.find("asr", alias)
        elif is_auto(alias) and asr:
            target = registry.pick_auto(None)
        else:
            continue
        if id(target) in serving and target.card.id != alias:
            entries.append(_alias_entry(alias, "asr", target))
    for alias in OPENAI_TTS_IDS:
        target = registry.resolve_tts(alias)
        if target is not None and id(target) in serving and target.card.id != alias:
            entries.append(_alias_entry(alias, "tts", target))
    return entries


def _in_process_entries(app: web.Application, resident: dict) -> list[dict]:
    registry = app[registry_key]
    asr = registry.serving("asr")
    tts = registry.serving("tts")
    entries: list[dict] = []
    auto = registry.auto_card(asr)
    if auto is not None:
        entries.append(auto)
    diarizers = registry.serving("diarization")
    diarize_alias = registry.diarize_alias_card(asr, diarizers)
    if diarize_alias is not None:
        entries.append(diarize_alias)
    for capability, pool in (("asr", asr), ("tts", tts), ("diarization", diarizers)):
        for entry in sorted(pool, key=lambda e: e.card.id):
            # Which devices hold it now: a request for it goes there first.
            entries.append({**entry.card.to_openai(),
                            "resident_devices": resident.get((capability, entry.card.id), [])})
    entries.extend(_openai_aliases(registry, asr, tts))
    return entries


async def list_entries(app: web.Application) -> list[dict]:
    # Read on the loop, where the cache changes; the listing itself runs in a thread.
    resident: dict = {}
    for cached in app[model_cache_key].loaded_entries():
        resident.setdefault(cached.key, []).append(cached.device)
    local, remote = await asyncio.gather(
        asyncio.to_thread(_in_process_entries, app, resident), app[probes_key].cards(app)
    )
    return local + [card.to_openai() for card in remote]


async def get_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": await list_entries(request.app)})


async def get_model(request: web.Request) -> web.Response:
    wanted = request.match_info["model"]
    registry = request.app[registry_key]
    # Aliases (whisper-1, tts-1, parakeet, ...) retrieve the model they stand for.
    for capability in ("asr", "tts", "diarization"):
        found = registry.resolve_tts(wanted) if capability == "tts" else registry.find(capability, wanted)
        if found is not None:
            wanted = found.card.id
            break
    entries = await list_entries(request.app)
    # A real model first (whisper-1 retrieves the model it stands for), then an alias entry.
    for entry in sorted(entries, key=lambda e: "resolves_to" in e):
        if entry["id"] == wanted:
            return web.json_response(entry)
    raise Malformed(
        f"No model {wanted!r} is available now; GET /v1/models lists those that are.",
        status=404, code="model_not_found", param="model",
    )


def setup(app: web.Application) -> None:
    app.router.add_get("/v1/models", get_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
