"""The admin page, the model-management API behind it, start-up preloads and readiness.

- ``GET /admin`` serves the page shipped in ``aistack_core/static/admin/``
  (plain HTML, script and style: nothing is fetched from elsewhere, nothing
  is built).  The page holds no data; everything it shows comes from the
  JSON routes below and the public API, with the key when one is set.
- ``GET /admin/api/status``: version, uptime, the slot's holder, readiness.
- ``GET /admin/api/models``: every in-process model, resident or not, with
  last use, load seconds and memory for the resident ones.
- ``POST /admin/api/models/{id}/load`` loads a model now and keeps it past
  the keep-alive; ``DELETE /admin/api/models/{id}`` drops it now (409 while a
  request uses it).  Both go through the model cache, never around it.
- ``AISTACK_PRELOAD`` loads models in the background at start-up;
  ``GET /health/ready`` answers 200 once they are all loaded, 503 before
  (and 503 naming the failure if one could not be loaded).
- ``GET /`` sends browsers to the page and tells API clients where to look.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from pathlib import Path
from typing import AsyncIterator

import attrs
from aiohttp import hdrs, web

from .. import __version__
from ..backends import backend_unavailable, load_on
from ..context import config_key, model_cache_key, plugins_key, registry_key, slot_key
from ..device_report import device_report
from ..errors import AistackError, Busy, Malformed, Network
from ..inference import candidate_devices
from ..model_cache import ModelInUse, ModelKey
from ..observe.record import iso_utc, request_info
from ..registry import Registered

log = logging.getLogger("aistack.admin")

STATIC_DIR = Path(__file__).parent.parent / "static" / "admin"
# The only files served: a fixed list, so no path a client sends reaches the file system.
STATIC_FILES = {
    "admin.js": "text/javascript",
    "admin.css": "text/css",
}
# The page runs only its own script and style; recorded and synthesized audio
# is played from blob: URLs.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; media-src 'self' blob:; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}
# While a preload finds the slot taken (a request got in first), it tries again this often.
PRELOAD_RETRY_S = 0.5
IN_PROCESS_CAPABILITIES = ("asr", "tts")


@attrs.define
class Readiness:
    """Where the start-up preloads stand; ``/health/ready`` reports it."""

    wanted: tuple[str, ...] = ()
    loaded: list[str] = attrs.field(factory=list)
    failed: dict[str, str] = attrs.field(factory=dict)
    finished: bool = False

    @property
    def ready(self) -> bool:
        return self.finished and not self.failed

    def to_json(self) -> dict:
        pending = [model for model in self.wanted if model not in self.loaded and model not in self.failed]
        return {"ready": self.ready, "preload": list(self.wanted), "loaded": list(self.loaded),
                "pending": pending, "failed": dict(self.failed)}


@attrs.define
class AdminState:
    """When the server started (reset when the app starts, not when it was built)."""

    started_monotonic: float = attrs.field(factory=time.monotonic)
    started_wall: float = attrs.field(factory=time.time)


readiness_key = web.AppKey("readiness", Readiness)
admin_state_key = web.AppKey("admin_state", AdminState)
static_files_key = web.AppKey("admin_static_files", dict[str, bytes])


# --- finding a model ----------------------------------------------------------


@attrs.frozen
class InProcessModel:
    capability: str
    entry: Registered

    @property
    def cache_key(self) -> ModelKey:
        # The key the inference context uses with the model cache.
        return (self.capability, self.entry.card.id)


def find_in_process(app: web.Application, model: str) -> InProcessModel | None:
    """The in-process model ``model`` names (an id or an alias), if any."""
    registry = app[registry_key]
    name = model.strip()
    if not name:
        return None
    for capability in IN_PROCESS_CAPABILITIES:
        entry = registry.resolve_tts(name) if capability == "tts" else registry.find("asr", name)
        if entry is not None:
            return InProcessModel(capability, entry)
    return None


def _require_in_process(app: web.Application, model: str) -> InProcessModel:
    found = find_in_process(app, model)
    if found is None:
        shown = model if len(model) <= 120 else model[:120] + "…"  # a client's string, echoed bounded
        raise Malformed(
            f"No in-process model {shown!r}. GET /admin/api/models lists the models aistack loads itself; "
            "models served by an upstream are loaded by that upstream.",
            status=404, code="model_not_found", param="model",
        )
    return found


async def load_model(app: web.Application, model: InProcessModel, request_id: str) -> tuple[dict, bool]:
    """Load (and pin) ``model`` while holding the slot, so a load never competes with an inference."""
    card = model.entry.card
    slots, cache = app[slot_key], app[model_cache_key]
    candidates = candidate_devices(slots, model.entry.backend)
    prefer = cache.placement(model.cache_key, candidates)
    async with slots.acquire_or_busy(
        f"{model.capability} load", card.id, request_id, devices=candidates, prefer=prefer
    ) as lease:
        loader = functools.partial(load_on, model.entry.backend, lease.device)
        _, loaded_now = await cache.load(model.cache_key, model.capability, loader, device=lease.device.name)
    return _describe(app, model), loaded_now


def _resident_view(cached) -> dict:
    now = time.monotonic()
    wall = time.time()
    return {
        "in_use": cached.in_use,
        "loaded_at": iso_utc(wall - (now - cached.loaded_at)),
        "last_used_at": iso_utc(wall - (now - cached.last_used)),
        "idle_s": round(now - cached.last_used, 1),
        "load_s": round(cached.load_seconds, 3),
        "memory_mb": None if cached.memory_mb is None else round(cached.memory_mb, 1),
        "pinned": cached.pinned,
    }


def _describe(app: web.Application, model: InProcessModel, unavailable: str | None = None) -> dict:
    card = model.entry.card
    cached = app[model_cache_key].entry(model.cache_key)
    view: dict = {
        "id": card.id,
        "capability": model.capability,
        "provider": card.provider,
        "plugin": model.entry.plugin,
        "aliases": list(card.aliases),
        "in_process": True,
        "available": unavailable is None,
        "unavailable": unavailable,
        "resident": cached is not None,
    }
    if cached is not None:
        view.update(_resident_view(cached))
        view["devices"] = app[model_cache_key].resident_devices(model.cache_key)
    return view


def _all_in_process(app: web.Application) -> list[dict]:
    """Every registered in-process model (blocking file checks: call from a thread)."""
    registry = app[registry_key]
    views = []
    for capability in IN_PROCESS_CAPABILITIES:
        table = registry.asr if capability == "asr" else registry.tts
        for entry in sorted(table.values(), key=lambda e: e.card.id):
            views.append(_describe(app, InProcessModel(capability, entry), backend_unavailable(entry.backend)))
    return views


# --- routes: the API ------------------------------------------------------------


async def get_status(request: web.Request) -> web.Response:
    app = request.app
    state = app[admin_state_key]
    slot = app[slot_key]
    counts: dict[str, int] = {"loaded": 0, "skipped": 0, "disabled": 0}
    for record in app[plugins_key].records.values():
        counts[record.status] = counts.get(record.status, 0) + 1
    return web.json_response({
        "service": "aistack",
        "version": __version__,
        "pid": os.getpid(),
        "started_at": iso_utc(state.started_wall),
        "uptime_s": round(time.monotonic() - state.started_monotonic, 1),
        "slot": {**slot.status(), "busy_rejections": slot.busy_rejections},
        "device_slots": device_report(app),
        "readiness": app[readiness_key].to_json(),
        "plugins": counts,
        "resident_models": len(app[model_cache_key].loaded()),
        "keep_alive_s": app[model_cache_key].keep_alive_s,
        "api_key_required": app[config_key].api_key is not None,
    })


async def get_models(request: web.Request) -> web.Response:
    models = await asyncio.to_thread(_all_in_process, request.app)
    return web.json_response({"object": "list", "data": models})


def _refuse_cross_site(request: web.Request) -> None:
    """Changes come from the admin page or an API client, not from another site's page.

    Without a key, any web page the operator visits could otherwise make the
    browser post a load to 127.0.0.1 (a form post needs no CORS preflight).
    Browsers mark such requests ``Sec-Fetch-Site: cross-site``; origins the
    operator allowed with ``AISTACK_CORS_ALLOW_ORIGINS`` stay allowed.
    """
    if request.headers.get("Sec-Fetch-Site", "") != "cross-site":
        return
    allowed = request.app[config_key].cors_allow_origins
    origin = request.headers.get(hdrs.ORIGIN, "")
    if "*" in allowed or origin.rstrip("/") in allowed:
        return
    raise Malformed(
        "Model loads and unloads are accepted from the admin page or an API client, not from another site's page; "
        "allow that origin with AISTACK_CORS_ALLOW_ORIGINS if it should manage models.",
        status=403, code="cross_site_request",
    )


async def post_load(request: web.Request) -> web.Response:
    _refuse_cross_site(request)
    model = _require_in_process(request.app, request.match_info["model"])
    info = request_info(request)
    info.model, info.provider = model.entry.card.id, model.entry.card.provider
    view, loaded_now = await load_model(request.app, model, info.request_id)
    return web.json_response({**view, "loaded_now": loaded_now})


async def delete_model(request: web.Request) -> web.Response:
    _refuse_cross_site(request)
    model = _require_in_process(request.app, request.match_info["model"])
    try:
        unloaded = await request.app[model_cache_key].unload(model.cache_key)
    except ModelInUse:
        raise Malformed(
            f"Model {model.entry.card.id!r} is serving a request right now; unload it when that is done.",
            status=409, code="model_in_use",
        ) from None
    unavailable = await asyncio.to_thread(backend_unavailable, model.entry.backend)  # file checks: off the loop
    return web.json_response({**_describe(request.app, model, unavailable), "unloaded": unloaded})


async def get_ready(request: web.Request) -> web.Response:
    readiness = request.app[readiness_key]
    if readiness.ready:
        return web.json_response(readiness.to_json())
    if readiness.failed:
        failures = "; ".join(f"{model}: {reason}" for model, reason in readiness.failed.items())
        raise Network(f"Not ready: AISTACK_PRELOAD could not load {failures}", code="preload_failed")
    pending = ", ".join(readiness.to_json()["pending"])
    raise Network(f"Not ready yet: loading {pending} (AISTACK_PRELOAD).", code="not_ready")


# --- routes: the page and the root ------------------------------------------------


async def _static_body(app: web.Application, name: str) -> bytes:
    # Read once, off the event loop; a FileResponse would fight the observe
    # middleware, which sends large or unsized answers itself.
    files = app[static_files_key]
    body = files.get(name)
    if body is None:
        body = files[name] = await asyncio.to_thread((STATIC_DIR / name).read_bytes)
    return body


async def get_page(request: web.Request) -> web.Response:
    body = await _static_body(request.app, "index.html")
    return web.Response(body=body, content_type="text/html", charset="utf-8", headers=PAGE_HEADERS)


async def get_static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    content_type = STATIC_FILES.get(name)
    if content_type is None:
        raise Malformed(f"No admin file {name!r}.", status=404, code="not_found")
    body = await _static_body(request.app, name)
    return web.Response(body=body, content_type=content_type, charset="utf-8", headers=PAGE_HEADERS)


async def get_root(request: web.Request) -> web.StreamResponse:
    # A browser asks for HTML first; an API client asks for JSON or anything.
    if "text/html" in request.headers.get(hdrs.ACCEPT, ""):
        raise web.HTTPFound("/admin")
    return web.json_response({
        "service": "aistack",
        "version": __version__,
        "description": "Local OpenAI-compatible gateway: speech-to-text, text-to-speech and chat.",
        "openai_base_url": "/v1",
        "models": "/v1/models",
        "admin": "/admin",
        "health": "/health",
        "docs": "README.md of the aistack distribution; the admin page lists what is installed.",
    })


# --- start-up preloads ------------------------------------------------------------


async def _preload_one(app: web.Application, name: str, readiness: Readiness) -> None:
    model = find_in_process(app, name)
    if model is None:
        readiness.failed[name] = "no in-process model has this id or alias"
        log.error("AISTACK_PRELOAD: no in-process model %r (GET /admin/api/models lists them)", name)
        return
    while True:
        try:
            await load_model(app, model, "preload")
        except Busy:
            await asyncio.sleep(PRELOAD_RETRY_S)  # a request got the slot first; it will not hold it long
            continue
        except AistackError as exc:
            readiness.failed[name] = exc.message
            log.error("AISTACK_PRELOAD: %s could not be loaded: %s", name, exc.message)
            return
        except Exception as exc:  # noqa: BLE001 - a plugin's load may raise anything; the gateway serves on
            readiness.failed[name] = f"{type(exc).__name__}: {exc}"
            log.exception("AISTACK_PRELOAD: %s could not be loaded", name)
            return
        readiness.loaded.append(name)
        return


async def _run_preloads(app: web.Application) -> None:
    readiness = app[readiness_key]
    started = time.monotonic()
    for name in readiness.wanted:
        await _preload_one(app, name, readiness)
    readiness.finished = True
    log.info("preloads done in %.1f s: %d loaded, %d failed",
             time.monotonic() - started, len(readiness.loaded), len(readiness.failed))


async def _preloads(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: preloads run beside the server, so /health answers while they load."""
    state = app[admin_state_key]
    state.started_monotonic, state.started_wall = time.monotonic(), time.time()
    readiness = app[readiness_key]
    task = asyncio.create_task(_run_preloads(app)) if readiness.wanted else None
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def setup(app: web.Application) -> None:
    config = app[config_key]
    wanted = tuple(dict.fromkeys(config.preload))  # in order, each once
    app[readiness_key] = Readiness(wanted=wanted, finished=not wanted)
    app[admin_state_key] = AdminState()
    app[static_files_key] = {}
    app.cleanup_ctx.append(_preloads)
    app.router.add_get("/", get_root)
    app.router.add_get("/health/ready", get_ready)
    app.router.add_get("/admin", get_page)
    app.router.add_get("/admin/", get_page)
    app.router.add_get("/admin/static/{name}", get_static)
    app.router.add_get("/admin/api/status", get_status)
    app.router.add_get("/admin/api/models", get_models)
    app.router.add_post("/admin/api/models/{model:.+}/load", post_load)
    app.router.add_delete("/admin/api/models/{model:.+}", delete_model)
