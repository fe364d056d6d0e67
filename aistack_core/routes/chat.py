"""``POST /v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings``: the LLM proxy.

The body is checked just enough to give a useful 400 for what is plainly
not a chat (or completion, or embeddings) request; everything else is the
upstream's to judge, and its own errors reach the client untouched.  With
several LLM upstreams the request's ``model`` picks one (upstreams.py);
the slot is held only for an upstream on this machine.  The gateway adds
three things: the GPU slot is held for the whole call (streamed answers
included), the upstream's ``evict_before`` model-cache categories are
dropped first (only when the upstream answers: a request that cannot reach
it must not cost the speech models their place), and its ``rewrite_json``
(Ollama: a default keep_alive) is applied.  A body the rewrite leaves alone
is forwarded byte for byte.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from aiohttp import web

from .. import proxy
from ..context import model_cache_key
from ..errors import Malformed, Network
from ..forms import Field, defer_continue, read_form
from ..observe.record import request_info
from ..registry import Registered
from ..upstreams import probes_key

NO_BACKEND = (
    "No chat backend is installed: install aistack with its default plugins "
    "(pip install aistack) or enable an LLM upstream plugin (AISTACK_LOAD_PLUGINS)."
)

CHAT_FIELDS = (Field("model", "str"), Field("messages", "json"), Field("stream", "bool", default=False))
COMPLETION_FIELDS = (Field("model", "str"), Field("prompt", "json"), Field("stream", "bool", default=False))
EMBEDDING_FIELDS = (Field("model", "str"), Field("input", "json"))


def _check_chat(form) -> None:
    if not isinstance(form["messages"], list):
        raise Malformed("A chat request needs 'messages': a list of {role, content} objects.", param="messages")


def _check_completion(form) -> None:
    if form["prompt"] is None:
        raise Malformed("A completion request needs 'prompt': a string or a list of strings.", param="prompt")


def _check_embeddings(form) -> None:
    if form["input"] is None:
        raise Malformed("An embeddings request needs 'input': a string or a list of strings.", param="input")


async def _chat_upstream(request: web.Request, model: str) -> Registered:
    entry = await request.app[probes_key].pick(request.app, "llm", model)
    if entry is None:
        raise Network(NO_BACKEND, code="no_backend")
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


def _listed_model(request: web.Request, upstream_name: str, model: str) -> str | None:
    """The model id as the upstream last listed it (a metric label), or None when it did not."""
    result = request.app[probes_key].last(upstream_name)
    lowered = model.lower()
    return next((card.id for card in (result.cards if result else ()) if card.id.lower() == lowered), None)


async def _proxy_json(request: web.Request, fields, check: Callable) -> web.StreamResponse:
    info = request_info(request)
    info.capability = "llm"
    form = await read_form(request, fields, keep_raw=True)
    model = form["model"]
    if not model:
        raise Malformed("The request needs a 'model' (a model id from GET /v1/models).", param="model")
    check(form)
    info.requested_model = model
    info.stream = form.get("stream")

    entry = await _chat_upstream(request, model)
    upstream = entry.backend
    body = _outgoing_body(form.raw, form.raw_values, upstream.rewrite_json)

    async def free_gpu_memory(device) -> None:
        # Once the slot is ours, and only for an upstream that answers its probe:
        # the speech models on the device whose slot the chat holds make way.
        reachable = await request.app[probes_key].reachable(request.app, upstream.name)
        info.model = _listed_model(request, upstream.name, model)  # a label only if the upstream lists it
        if reachable and device is not None:  # no slot here (an engine elsewhere): nothing to free
            cache = request.app[model_cache_key]
            for category in upstream.evict_before:
                cache.evict(category, device=device.name)

    return await proxy.relay(
        request, "llm", entry, body=body, model_id=None, on_slot=free_gpu_memory, served_model=model,
    )


async def post_chat_completions(request: web.Request) -> web.StreamResponse:
    return await _proxy_json(request, CHAT_FIELDS, _check_chat)


async def post_completions(request: web.Request) -> web.StreamResponse:
    return await _proxy_json(request, COMPLETION_FIELDS, _check_completion)


async def post_embeddings(request: web.Request) -> web.StreamResponse:
    return await _proxy_json(request, EMBEDDING_FIELDS, _check_embeddings)


def setup(app: web.Application) -> None:
    app.router.add_route("POST", "/v1/chat/completions", post_chat_completions, expect_handler=defer_continue)
    app.router.add_route("POST", "/v1/completions", post_completions, expect_handler=defer_continue)
    app.router.add_route("POST", "/v1/embeddings", post_embeddings, expect_handler=defer_continue)
