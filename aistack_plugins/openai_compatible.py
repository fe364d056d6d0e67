"""Any OpenAI-compatible LLM server (vLLM, llama.cpp's server, SGLang, LM Studio) as an upstream.

``AISTACK_OPENAI_UPSTREAMS`` names them, ``name=url`` pairs separated by
commas::

    AISTACK_OPENAI_UPSTREAMS=vllm=http://gpu-box:8000/v1,llamacpp=http://127.0.0.1:8080

A URL may be the server's root or end in the ``/v1`` that OpenAI clients
use; both mean the same server.  A bare URL after a pair is another replica
of the same upstream (``vllm=http://a:8000,http://b:8000``): requests go to
the first reachable one.

Each upstream serves ``/v1/chat/completions``, ``/v1/completions`` and
``/v1/embeddings`` for the models its own ``GET /v1/models`` lists; those
models appear in the gateway's ``/v1/models`` and requests for them are
routed there, while any other model id stays with the default LLM upstream
(Ollama).  Requests and answers pass through unchanged, streamed as they
come; the server's own errors reach the client as it wrote them.

Per upstream, from the environment (``<NAME>`` is the name upper-cased,
anything but letters and digits turned into ``_``):

``AISTACK_OPENAI_UPSTREAM_<NAME>_API_KEY``
    sent as ``Authorization: Bearer <key>`` (vLLM's ``--api-key``); the
    gateway's own key is never forwarded.
``AISTACK_OPENAI_UPSTREAM_<NAME>_LOCAL``
    on/off: whether the server computes on this machine's GPU, so its
    requests hold the local slot.  Unset: decided from the URL (loopback
    and this host's name are local).

And for all of them: ``AISTACK_OPENAI_CONNECT_TIMEOUT_S`` (default 5),
``AISTACK_OPENAI_READ_TIMEOUT_S`` (default 600).
"""

from __future__ import annotations

import re
from typing import Any, Callable

import aiohttp
import attrs

from aistack_core import Config, ModelCard, Upstream, hookimpl, runs_on_this_machine, upstream_urls

from .manifests import OPENAI_COMPATIBLE, OPENAI_CONNECT_TIMEOUT_S, OPENAI_READ_TIMEOUT_S, OPENAI_UPSTREAMS

# Found by the loader and by in-memory registration (tests); the entry point names it too.
AISTACK_MANIFEST = OPENAI_COMPATIBLE

UPSTREAMS_VARIABLE = OPENAI_UPSTREAMS.name
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_PAIR = re.compile(r"(?P<name>[^=/:]+)=(?P<url>https?://.*)")


@attrs.frozen
class EngineSetting:
    """One configured upstream: its name and its replicas' root URLs."""

    name: str
    urls: tuple[str, ...]

    @property
    def variable_prefix(self) -> str:
        return "AISTACK_OPENAI_UPSTREAM_" + re.sub(r"[^A-Z0-9]", "_", self.name.upper())


def server_root(url: str) -> str:
    """``http://h:8000/v1/`` and ``http://h:8000`` are the same server; the gateway adds ``/v1/...`` itself."""
    url = url.strip().rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def parse_upstreams(value: str | None) -> list[EngineSetting]:
    """``a=http://x/v1,http://y,b=http://z`` → [a: x, y; b: z].  Raises ValueError with the culprit."""
    settings: list[tuple[str, list[str]]] = []
    for token in (value or "").split(","):
        token = token.strip()
        if not token:
            continue
        pair = _PAIR.fullmatch(token)
        if pair is not None:
            name = pair["name"].strip()
            if not _NAME.fullmatch(name):
                raise ValueError(
                    f"{UPSTREAMS_VARIABLE}: upstream name {name!r} may hold only letters, digits, '_', '.' "
                    f"and '-' (at most 64)"
                )
            if any(existing == name for existing, _ in settings):
                raise ValueError(f"{UPSTREAMS_VARIABLE}: upstream {name!r} is named twice")
            settings.append((name, [server_root(pair["url"])]))
        elif token.startswith(("http://", "https://")) and settings:
            settings[-1][1].append(server_root(token))
        else:
            raise ValueError(
                f"{UPSTREAMS_VARIABLE}: {token!r} is neither name=url nor a further URL of the upstream before it "
                f"(expected e.g. vllm=http://127.0.0.1:8000/v1)"
            )
    return [EngineSetting(name, upstream_urls(urls)) for name, urls in settings]


def cards_from_listing(payload: Any, provider: str) -> list[ModelCard]:
    """Model cards from an OpenAI ``/v1/models`` answer (``{"object": "list", "data": [{"id", ...}]}``)."""
    entries = payload.get("data") if isinstance(payload, dict) else None
    cards: list[ModelCard] = []
    for entry in entries if isinstance(entries, list) else ():
        model_id = entry.get("id") if isinstance(entry, dict) else None
        if not isinstance(model_id, str) or not model_id:
            continue
        owner = entry.get("owned_by")
        cards.append(
            ModelCard(
                id=model_id,
                capabilities=("llm",),
                owned_by=owner if isinstance(owner, str) and owner else provider,
                provider=provider,
                supports_streaming=True,
            )
        )
    return cards


def make_probe(provider: str, auth_headers: tuple[tuple[str, str], ...]):
    async def probe(session: aiohttp.ClientSession, base_url: str) -> list[ModelCard]:
        # Proxy sessions do not decompress, so ask for an uncompressed answer.
        headers = {"Accept-Encoding": "identity", **dict(auth_headers)}
        async with session.get(base_url + "/v1/models", headers=headers) as response:
            if response.status != 200:
                return []  # it answers (a wrong key, say): reachable, listing nothing we may route
            return cards_from_listing(await response.json(content_type=None), provider)

    return probe


def make_upstream(setting: EngineSetting, config: Config) -> Upstream:
    api_key = config.env_str(setting.variable_prefix + "_API_KEY")
    auth_headers = (("Authorization", f"Bearer {api_key}"),) if api_key else ()
    local = config.env_bool(setting.variable_prefix + "_LOCAL", None)
    return Upstream(
        name=setting.name,
        capability="llm",
        base_url=setting.urls,
        provider=setting.name,
        routes=ROUTES,
        probe=make_probe(setting.name, auth_headers),
        unreachable_hint=(
            f"The OpenAI-compatible server {setting.name!r} is not reachable at {', '.join(setting.urls)}. "
            f"Start it (vLLM: vllm serve <model> --port 8000) or correct {UPSTREAMS_VARIABLE}"
        ),
        connect_timeout=OPENAI_CONNECT_TIMEOUT_S.read(config),
        read_timeout=OPENAI_READ_TIMEOUT_S.read(config),
        # These engines reserve their GPU memory when they start: evicting
        # the gateway's models before each request would free nothing for them.
        evict_before=(),
        timeout_status=504,
        # Only the models it lists come here; unknown ids stay with the default LLM.
        catch_all=False,
        headers=auth_headers,
        uses_local_gpu=local if local is not None else any(runs_on_this_machine(url) for url in setting.urls),
    )


@hookimpl
def register_upstreams(register: Callable[[Upstream], None], config: Config) -> None:
    for setting in parse_upstreams(OPENAI_UPSTREAMS.read(config)):
        register(make_upstream(setting, config))
