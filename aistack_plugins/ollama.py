"""Ollama, reached over its OpenAI-compatible HTTP API.

Chat and embeddings requests are forwarded to the local Ollama daemon; its
installed models (``GET /api/tags``) are what ``/v1/models`` lists.  Two
gateway behaviours live here as data the core applies: resident ASR models
are evicted first (so Ollama can load into the freed GPU memory), and
``keep_alive`` defaults to 30 s so an idle Ollama gives the memory back.
And the other way round: before an in-process model loads onto a device
whose memory is short, the core calls ``release_memory``, which asks Ollama
(``GET /api/ps``) what it holds and unloads each of those models
(``POST /api/generate`` with ``keep_alive: 0``; Ollama unloads once any
request still using a model is done).

``AISTACK_OLLAMA_URL`` may name several daemons, comma-separated; requests
go to the first one that is reachable.  Its settings (``AISTACK_OLLAMA_URL``,
``..._CONNECT_TIMEOUT_S``, ``..._READ_TIMEOUT_S``, ``..._DEVICES``: the gateway
devices Ollama's work runs on, ``cuda:0,cuda:1``, ``all`` or ``none``; default
all when the URL is on this machine, none otherwise) are declared in
``manifests.OLLAMA``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

import aiohttp

from aistack_core import Config, ModelCard, Upstream, hookimpl, parse_device_names, runs_on_this_machine, upstream_urls

log = logging.getLogger("aistack.plugins.ollama")

from .manifests import OLLAMA, OLLAMA_CONNECT_TIMEOUT_S, OLLAMA_DEVICES, OLLAMA_READ_TIMEOUT_S, OLLAMA_URL

# Found by the loader and by in-memory registration (tests); the entry point names it too.
AISTACK_MANIFEST = OLLAMA

PROVIDER = "Ollama"
DEFAULT_KEEP_ALIVE = "30s"


def is_embedding_model(tag: dict[str, Any]) -> bool:
    """Ollama has no capability flag in /api/tags; the family and name tell.

    Embedding models report BERT-style families (``bert``, ``nomic-bert``)
    or carry "embed" in their family or name (``mxbai-embed-large``).
    """
    details = tag.get("details") or {}
    families = [details.get("family") or "", *(details.get("families") or [])]
    if any("bert" in family.lower() or "embed" in family.lower() for family in families if isinstance(family, str)):
        return True
    return "embed" in str(tag.get("name") or tag.get("model") or "").lower()


def cards_from_tags(payload: dict[str, Any]) -> list[ModelCard]:
    cards: list[ModelCard] = []
    for tag in payload.get("models") or []:
        name = tag.get("name") or tag.get("model")
        if not isinstance(name, str) or not name:
            continue
        capabilities = ("embeddings",) if is_embedding_model(tag) else ("llm",)
        cards.append(
            ModelCard(
                id=name,
                capabilities=capabilities,
                owned_by="ollama",
                provider=PROVIDER,
                supports_streaming=True,
            )
        )
    return cards


async def probe(session: aiohttp.ClientSession, base_url: str) -> list[ModelCard]:
    # Proxy sessions do not decompress, so ask for an uncompressed answer.
    async with session.get(base_url + "/api/tags", headers={"Accept-Encoding": "identity"}) as response:
        if response.status != 200:
            return []
        return cards_from_tags(await response.json(content_type=None))


def default_keep_alive(body: dict[str, Any]) -> dict[str, Any]:
    """Add ``keep_alive: "30s"`` when the client sent none.

    Any value the client did send (``"0"``, ``0``, ``-1``, ``null``…) is
    theirs to choose and stays exactly as sent.
    """
    if "keep_alive" in body:
        return body
    return {**body, "keep_alive": DEFAULT_KEEP_ALIVE}


async def _release_at(session: aiohttp.ClientSession, base_url: str, device: str, headers: dict) -> list[str]:
    async with session.get(base_url + "/api/ps", headers=headers) as response:
        if response.status != 200:
            return []
        running = (await response.json(content_type=None)).get("models") or []
    on_gpu = not (device == "cpu" or device.startswith("cpu:"))
    unloaded = []
    for model in running:
        if not isinstance(model, dict):
            continue
        name = model.get("name") or model.get("model")
        size, in_vram = model.get("size") or 0, model.get("size_vram") or 0
        if not isinstance(name, str) or not name:
            continue
        if (in_vram <= 0) if on_gpu else (in_vram >= size):
            continue  # none of it where memory is wanted
        body = {"model": name, "keep_alive": 0}
        async with session.post(base_url + "/api/generate", json=body, headers=headers) as answer:
            if answer.status == 200:
                unloaded.append(name)
    return unloaded


def make_release_memory(urls: tuple[str, ...]) -> Callable[[aiohttp.ClientSession, str], Awaitable[list[str]]]:
    # The daemons on this machine hold its memory; with none listed as local, the operator
    # declared the devices (AISTACK_OLLAMA_DEVICES), so every listed daemon is asked.
    local = tuple(url for url in urls if runs_on_this_machine(url)) or urls
    identity = {"Accept-Encoding": "identity"}  # proxy sessions do not decompress

    async def release_memory(session: aiohttp.ClientSession, device: str) -> list[str]:
        """Unload what Ollama holds on this kind of device; returns the models it unloaded.

        Ollama cannot say which GPU a model sits on, only how much of it is
        in GPU memory (``size_vram``): for a GPU, the models with some;
        for a CPU device, the models with some in system memory.
        """
        unloaded = []
        for base_url in local:
            try:
                unloaded += await _release_at(session, base_url, device, identity)
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, AttributeError, TypeError) as exc:
                # A daemon that is down or answers oddly keeps what it has; the others are still asked.
                log.warning("Ollama at %s could not unload its models: %s: %s", base_url, type(exc).__name__, exc)
        return unloaded

    return release_memory


def make_upstream(config: Config) -> Upstream:
    # AISTACK_OLLAMA_URL may list several daemons (comma-separated): the core
    # sends each request to the first reachable one.
    urls = upstream_urls(OLLAMA_URL.read(config))
    return Upstream(
        name="ollama",
        capability="llm",
        base_url=urls,
        provider=PROVIDER,
        routes=("/v1/chat/completions", "/v1/embeddings"),
        probe=probe,
        unreachable_hint=(
            f"Ollama is not reachable at {', '.join(urls)}. Start it with: ollama serve "
            f"(or point AISTACK_OLLAMA_URL at where it runs)"
        ),
        connect_timeout=OLLAMA_CONNECT_TIMEOUT_S.read(config),
        read_timeout=OLLAMA_READ_TIMEOUT_S.read(config),
        rewrite_json=default_keep_alive,
        evict_before=("asr",),
        timeout_status=504,
        # An Ollama on another machine computes there: no local slot, nothing to evict here.
        uses_local_gpu=any(runs_on_this_machine(url) for url in urls),
        devices=parse_device_names(OLLAMA_DEVICES.read(config)),
        release_memory=make_release_memory(urls),
    )


@hookimpl
def register_upstreams(register: Callable[[Upstream], None], config: Config) -> None:
    register(make_upstream(config))
