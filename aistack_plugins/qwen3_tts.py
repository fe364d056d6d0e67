"""Qwen3-TTS served by vLLM-Omni in its Docker container, reached over HTTP.

The gateway passes ``/v1/audio/*`` through to the container unchanged (the
core's ``tts.py`` decides which requests go there); this plugin only says
where the container lives (``AISTACK_QWEN3_TTS_URL``: one URL, or several
comma-separated replicas), how long to wait for it, and how to tell whether
it is up.  Its settings (``AISTACK_QWEN3_TTS_URL``, ``..._CONNECT_TIMEOUT_S``,
``..._READ_TIMEOUT_S``: the first request after the container starts compiles
for one to two and a half minutes, ``..._DEVICES``: the gateway devices its
work runs on, ``cuda:0``, ``all`` or ``none``; default all when the URL is on
this machine, none otherwise) are declared in ``manifests.QWEN3_TTS``.

vLLM-Omni reserves a fixed share of its GPU's memory when it starts
(``gpu_memory_utilization`` in the compose file) and keeps it: there is no
``release_memory`` here, so size the in-process models to fit beside it.
"""

from __future__ import annotations

from typing import Callable

import aiohttp

from aistack_core import Config, ModelCard, Upstream, hookimpl, parse_device_names, runs_on_this_machine, upstream_urls

from .manifests import (
    QWEN3_TTS, QWEN3_TTS_CONNECT_TIMEOUT_S, QWEN3_TTS_DEVICES, QWEN3_TTS_READ_TIMEOUT_S, QWEN3_TTS_URL,
)

# Found by the loader and by in-memory registration (tests); the entry point names it too.
AISTACK_MANIFEST = QWEN3_TTS

MODEL_ID = "qwen3-tts-12hz-0.6b-customvoice"
PROVIDER = "Qwen3-TTS"
COMPOSE_FILE = "docker/tts_qwen3/docker-compose.yml"

CARD = ModelCard(
    id=MODEL_ID,
    capabilities=("tts",),
    owned_by="qwen",
    provider=PROVIDER,
    supports_streaming=True,
)


async def probe(session: aiohttp.ClientSession, base_url: str) -> list[ModelCard]:
    # vLLM answers 200 on /health once the engine is up (before that the
    # port is closed or the engine reports an error status).
    async with session.get(base_url + "/health") as response:
        return [CARD] if response.status == 200 else []


def make_upstream(config: Config) -> Upstream:
    # AISTACK_QWEN3_TTS_URL may list several containers (comma-separated):
    # the core sends each request to the first reachable one.
    urls = upstream_urls(QWEN3_TTS_URL.read(config))
    return Upstream(
        name="qwen3-tts",
        capability="tts",
        base_url=urls,
        provider=PROVIDER,
        routes=("/v1/audio/*",),
        probe=probe,
        unreachable_hint=(
            f"Qwen3-TTS container is not reachable at {', '.join(urls)}. "
            f"Start it with: docker compose -f {COMPOSE_FILE} up -d"
        ),
        connect_timeout=QWEN3_TTS_CONNECT_TIMEOUT_S.read(config),
        read_timeout=QWEN3_TTS_READ_TIMEOUT_S.read(config),
        # The TTS contract: anything but "nothing listens" is a bad gateway.
        timeout_status=502,
        uses_local_gpu=any(runs_on_this_machine(url) for url in urls),
        devices=parse_device_names(QWEN3_TTS_DEVICES.read(config)),
    )


@hookimpl
def register_upstreams(register: Callable[[Upstream], None], config: Config) -> None:
    register(make_upstream(config))
