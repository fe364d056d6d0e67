"""Every other method and path under ``/v1/audio/``: the TTS upstream, untouched.

Qwen3-TTS in vLLM-Omni serves more than speech: batches, voice uploads,
the streaming WebSocket.  The gateway forwards each of these byte for byte
(holding the slot for the exchange) and adds only its own error envelope
for trips that fail.
"""

from __future__ import annotations

from aiohttp import web

from .. import proxy
from ..context import registry_key
from ..errors import Malformed, Network
from ..forms import defer_continue
from ..observe.record import request_info

# Paths the gateway answers itself; another method on them is a 405 here,
# not a trip to the upstream.
_OWN_PATHS = ("transcriptions", "translations")


async def audio_route(request: web.Request) -> web.StreamResponse:
    tail = request.match_info["tail"].rstrip("/")
    if tail in _OWN_PATHS:
        raise Malformed(
            f"Method {request.method} is not allowed on /v1/audio/{tail}; use POST.",
            status=405, headers={"Allow": "POST"}, code="method_not_allowed",
        )
    info = request_info(request)
    info.capability = "tts"
    entry = request.app[registry_key].upstream_for("tts")
    if entry is None:
        raise Network(
            f"/v1/audio/{tail} is served by a text-to-speech upstream, and none is installed "
            "(enable the qwen3_tts plugin; in-process speech answers POST /v1/audio/speech).",
            code="no_backend",
        )
    return await proxy.relay(request, "tts", entry)


def setup(app: web.Application) -> None:
    # Registered last by the app factory: the specific /v1/audio routes win.
    app.router.add_route("*", "/v1/audio/{tail:.*}", audio_route, expect_handler=defer_continue)
