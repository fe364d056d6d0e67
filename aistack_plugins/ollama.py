"""Ollama, reached over its OpenAI-compatible HTTP API.

Chat and embeddings requests are forwarded to the local Ollama daemon; its
installed models (``GET /api/tags``) are what ``/v1/models`` lists.  Two
gateway behaviours live here as data the core applies: resident ASR models
are evicted first (so Ollama can load into the freed GPU memory), and
``keep_alive`` defaults to 30 s so an idle Ollama gives the memory back.

``AISTACK_OLLAMA_URL`` may name several daemons, comma-separated; requests
go to the first one that is reachable.  Settings beyond the URL, read from
``config.env``:
``AISTACK_OLLAMA_CONNECT_TIMEOUT_S`` (default 5),
``AISTACK_OLLAMA_READ_TIMEOUT_S`` (default 600).
"""

from __future__ import annotations

from typing import Any, Callable

import aiohttp

from aistack_core import Config, ModelCard, Upstream, hookimpl, runs_on_this_machine, upstream_urls

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


def make_upstream(config: Config) -> Upstream:
    # AISTACK_OLLAMA_URL may list several daemons (comma-separated): the core
    # sends each request to the first reachable one.
    urls = upstream_urls(config.ollama_url)
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
        connect_timeout=config.env_float("AISTACK_OLLAMA_CONNECT_TIMEOUT_S", 5.0),
        read_timeout=config.env_float("AISTACK_OLLAMA_READ_TIMEOUT_S", 600.0),
        rewrite_json=default_keep_alive,
        evict_before=("asr",),
        timeout_status=504,
        # An Ollama on another machine computes there: no local slot, nothing to evict here.
        uses_local_gpu=any(runs_on_this_machine(url) for url in urls),
    )


@hookimpl
def register_upstreams(register: Callable[[Upstream], None], config: Config) -> None:
    register(make_upstream(config))
