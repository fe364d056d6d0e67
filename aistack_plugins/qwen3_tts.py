"""Qwen3-TTS served by vLLM-Omni in its Docker container, reached over HTTP.

The gateway passes ``/v1/audio/*`` through to the container unchanged (the
core's ``tts.py`` decides which requests go there); this plugin only says
where the container lives, how long to wait for it, and how to tell whether
it is up.  Settings beyond the URL are read from ``config.env``:

``AISTACK_QWEN3_TTS_CONNECT_TIMEOUT_S`` (default 5)
``AISTACK_QWEN3_TTS_READ_TIMEOUT_S`` (default 600: the first request after
the container starts compiles for one to two and a half minutes).
"""

from __future__ import annotations

from typing import Awaitable, Callable

import aiohttp

from aistack_core import Config, ModelCard, Upstream, hookimpl

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


def make_probe(base_url: str) -> Callable[[aiohttp.ClientSession], Awaitable[list[ModelCard]]]:
    health_url = base_url.rstrip("/") + "/health"

    async def probe(session: aiohttp.ClientSession) -> list[ModelCard]:
        # vLLM answers 200 on /health once the engine is up (before that the
        # port is closed or the engine reports an error status).
        async with session.get(health_url) as response:
            return [CARD] if response.status == 200 else []

    return probe


def make_upstream(config: Config) -> Upstream:
    base_url = config.qwen3_tts_url.rstrip("/")
    return Upstream(
        name="qwen3-tts",
        capability="tts",
        base_url=base_url,
        provider=PROVIDER,
        routes=("/v1/audio/*",),
        probe=make_probe(base_url),
        unreachable_hint=(
            f"Qwen3-TTS container is not reachable at {base_url}. "
            f"Start it with: docker compose -f {COMPOSE_FILE} up -d"
        ),
        connect_timeout=config.env_float("AISTACK_QWEN3_TTS_CONNECT_TIMEOUT_S", 5.0),
        read_timeout=config.env_float("AISTACK_QWEN3_TTS_READ_TIMEOUT_S", 600.0),
        # The TTS contract: anything but "nothing listens" is a bad gateway.
        timeout_status=502,
    )


@hookimpl
def register_upstreams(register: Callable[[Upstream], None], config: Config) -> None:
    register(make_upstream(config))
