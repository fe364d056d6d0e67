"""``POST /v1/chat/completions`` and ``POST /v1/embeddings``: the LLM proxy.

The body is checked just enough to give a useful 400 for what is plainly
not a chat (or embeddings) request; everything else is the upstream's to
judge, and its own errors reach the client untouched.  The gateway adds
three things: the GPU slot is held for the whole call (streamed answers
included), the upstream's ``evict_before`` model-cache categories are
dropped first, and its ``rewrite_json`` (Ollama: a default keep_alive) is
applied.  A body the rewrite leaves alone is forwarded byte for byte.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from aiohttp import web

from . import proxy
from .context import model_cache_key, registry_key, slot_key, upstream_sessions_key
from .errors import Malformed, Network
from .observe import request_info
from .registry import Registered

NO_BACKEND = (
    "No chat backend is installed: install aistack with its default plugins "
    "(pip install aistack) or enable the ollama plugin (AISTACK_LOAD_PLUGINS)."
)


def _parse_object(raw: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, absurd numbers, deep nesting
        raise Malformed(f"The request body is not valid JSON: {exc}.") from None
    if not isinstance(payload, dict):
        raise Malformed(f"The request body must be a JSON object, got {type(payload).__name__}.")
    model = payload.get("model")
    if not isinstance(model, str) or not model.strip():
        raise Malformed("The request needs a 'model' (a model id from GET /v1/models).")
    return payload


def _check_chat(payload: dict[str, Any]) -> None:
    if not isinstance(payload.get("messages"), list):
        raise Malformed("A chat request needs 'messages': a list of {role, content} objects.")


def _check_embeddings(payload: dict[str, Any]) -> None:
    if payload.get("input") is None:
        raise Malformed("An embeddings request needs 'input': a string or a list of strings.")


def _chat_upstream(request: web.Request) -> Registered:
    entry = request.app[registry_key].upstream_for("llm")
    if entry is None:
        raise Network(NO_BACKEND)
    return entry


def _outgoing_body(raw: bytes, payload: dict[str, Any], rewrite: Callable[[dict], dict] | None) -> bytes:
    """The client's own bytes unless the rewrite changed the document."""
    if rewrite is None:
        return raw
    rewritten = rewrite(dict(payload))
    if rewritten == payload:
        return raw
    # ASCII escapes keep any odd text the client sent (even lone surrogates) intact as JSON.
    return json.dumps(rewritten, ensure_ascii=True, separators=(",", ":")).encode("ascii")


async def _proxy_json(request: web.Request, check: Callable[[dict[str, Any]], None]) -> web.StreamResponse:
    info = request_info(request)
    info.capability = "llm"
    raw = await request.read()
    payload = _parse_object(raw)
    check(payload)
    model = payload["model"]
    info.model = model
    info.extras["stream"] = bool(payload.get("stream"))

    entry = _chat_upstream(request)
    upstream = entry.backend
    info.provider = upstream.provider
    body = _outgoing_body(raw, payload, upstream.rewrite_json)
    session = request.app[upstream_sessions_key][upstream.name]

    async with request.app[slot_key].acquire_or_busy("llm", model, info.request_id) as waited:
        info.slot_wait_s = waited
        # Evict only once the slot is ours: a request turned away as busy
        # must not throw out the ASR model the slot holder may need next.
        cache = request.app[model_cache_key]
        for category in upstream.evict_before:
            cache.evict(category)
        return await proxy.forward(request, upstream, session, body=body)


async def post_chat_completions(request: web.Request) -> web.StreamResponse:
    return await _proxy_json(request, _check_chat)


async def post_embeddings(request: web.Request) -> web.StreamResponse:
    return await _proxy_json(request, _check_embeddings)


def setup(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", post_chat_completions)
    app.router.add_post("/v1/embeddings", post_embeddings)
