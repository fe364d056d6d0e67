"""The TTS pass-through, end to end: client → gateway → vLLM-Omni emulator.

Requests for the Qwen3-TTS model (and everything under /v1/audio/ that no
in-process voice serves) go to the container untouched; these tests check
the bytes on both sides, streaming, the WebSocket relay, the GPU slot, the
error mapping and path safety.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import time

import aiohttp
import attrs
import pytest
from openai import AsyncOpenAI, InternalServerError

import aistack_plugins.ollama
import aistack_plugins.qwen3_tts
from aistack_core.app import create_app
from aistack_core.context import slot_key

from .upstreams import FAULT_HEADER, GatewayClient, refused_url, run_gateway
from .upstreams.ollama import OllamaEmulator
from .upstreams.vllm_omni import VllmOmniEmulator, synthesize, wav_header

MODEL = "qwen3-tts-12hz-0.6b-customvoice"
SPEECH = "/v1/audio/speech"
COMPOSE_HINT = "docker compose -f docker/tts_qwen3/docker-compose.yml up -d"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def expected_wav(text: str, voice: str = "vivian") -> bytes:
    pcm = synthesize(voice, text)
    return wav_header(len(pcm)) + pcm


@pytest.fixture
async def tts():
    emulator = VllmOmniEmulator()
    async with emulator.running():
        yield emulator


@pytest.fixture
async def ollama():
    emulator = OllamaEmulator()
    async with emulator.running():
        yield emulator


@pytest.fixture
async def gateway(base_config, plugin_set, tts, ollama):
    """``await gateway(**env)``: the app with the qwen3_tts and ollama plugins on the emulators."""
    async with contextlib.AsyncExitStack() as stack:

        async def factory(url: str | None = None, **env: str) -> GatewayClient:
            plugin_set.register(aistack_plugins.qwen3_tts, name="qwen3_tts")
            plugin_set.register(aistack_plugins.ollama, name="ollama")
            config = attrs.evolve(
                base_config, env={"AISTACK_QWEN3_TTS_URL": url or tts.url, "AISTACK_OLLAMA_URL": ollama.url, **env}
            )
            return await stack.enter_async_context(run_gateway(create_app(config, plugins=plugin_set)))

        yield factory


def openai_client(client) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="x", max_retries=0, timeout=10)


async def wait_until(condition, timeout_s: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def direct(method: str, url: str, **kwargs) -> tuple[int, dict, bytes]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async with session.request(method, url, **kwargs) as answer:
            return answer.status, dict(answer.headers), await answer.read()


def multipart_body(boundary: str, fields: dict[str, str], file: tuple[str, str, str, bytes]) -> bytes:
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    field, filename, content_type, data = file
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n"
    )
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


# --- bytes in, bytes out ----------------------------------------------------------


async def test_speech_through_openai_sdk_is_byte_identical(gateway, tts):
    client = await gateway()
    text = "Hello from the proxy, one chunk at a time."
    async with openai_client(client).audio.speech.with_streaming_response.create(
        model=MODEL, voice="vivian", input=text, response_format="wav"
    ) as response:
        assert response.headers["content-type"] == "audio/wav"
        assert "x-request-id" in response.headers
        assert response.headers["x-vllm-omni-total-tokens"]
        audio = b"".join([chunk async for chunk in response.iter_bytes()])
    assert sha256(audio) == sha256(expected_wav(text))
    sent = json.loads(tts.last(SPEECH).body)
    assert sent == {"model": MODEL, "voice": "vivian", "input": text, "response_format": "wav"}
    assert client.app[slot_key].is_free


async def test_first_audio_chunk_arrives_before_the_upstream_finishes(gateway, tts):
    client = await gateway()
    text = "Streaming audio should start playing long before synthesis ends."
    started = time.monotonic()
    async with openai_client(client).audio.speech.with_streaming_response.create(
        model=MODEL, voice="ryan", input=text, response_format="pcm", stream_format="audio",
        extra_headers={FAULT_HEADER: "trickle=0.05"},
    ) as response:
        chunks = response.iter_bytes()
        first = await chunks.__anext__()
        first_at = time.monotonic()
        rest = b"".join([chunk async for chunk in chunks])
    received = tts.last(SPEECH)
    assert first and first_at < received.finished_at - 0.2
    assert first + rest == synthesize("ryan", text)
    assert first_at - started < 0.5


async def test_sse_stream_passes_through_verbatim(gateway, tts):
    client = await gateway()
    body = json.dumps({"model": MODEL, "input": "Events, please.", "stream": True, "response_format": "pcm"})
    response = await client.post(SPEECH, data=body, headers={"Content-Type": "application/json"})
    via_gateway = await response.read()
    status, headers, expected = await direct("POST", tts.url + SPEECH, data=body)
    assert response.status == status == 200
    assert response.headers["Content-Type"] == headers["Content-Type"] == "text/event-stream"
    assert via_gateway == expected
    events = [json.loads(line[6:]) for line in via_gateway.decode().splitlines() if line.startswith("data: ")]
    assert events[-1]["type"] == "speech.audio.done"
    audio = b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta")
    assert audio == synthesize("vivian", "Events, please.")


async def test_multipart_voice_upload_and_voice_list(gateway, tts):
    client = await gateway()
    sample = os.urandom(300_000)
    boundary = "aistack-test-boundary"
    body = multipart_body(boundary, {"name": "narrator", "consent": "consent-42", "ref_text": "The exact words I read."},
                          ("audio_sample", "me.wav", "audio/wav", sample))
    response = await client.post(
        "/v1/audio/voices", data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    assert response.status == 200, await response.text()
    assert tts.last("/v1/audio/voices").body_sha256 == sha256(body)
    voice = (await response.json())["voice"]
    assert voice["name"] == "narrator" and voice["file_size"] == len(sample)

    listing = await client.get("/v1/audio/voices")
    assert "narrator" in (await listing.json())["voices"]
    deleted = await client.delete("/v1/audio/voices/narrator")
    assert deleted.status == 200 and (await deleted.json())["success"] is True


async def test_binary_request_body_streams_through_unchanged(gateway, tts):
    client = await gateway()
    blob = os.urandom(3 * 1024 * 1024)
    response = await client.post(
        "/v1/audio/speech/batch", data=blob, headers={"Content-Type": "application/octet-stream"}
    )
    received = tts.last("/v1/audio/speech/batch")
    assert received.body_sha256 == sha256(blob)
    assert received.headers["Content-Length"] == str(len(blob))
    # vLLM-Omni rejects it; its own error comes back as it wrote it.
    assert response.status == 400
    assert "error" in await response.json()


async def test_batch_synthesis(gateway, tts):
    client = await gateway()
    response = await client.post(
        "/v1/audio/speech/batch",
        json={"items": [{"input": "One."}, {"input": "Two.", "voice": "aiden"}, {"input": ""}], "voice": "ryan"},
    )
    result = await response.json()
    assert response.status == 200 and result["succeeded"] == 2 and result["failed"] == 1
    assert base64.b64decode(result["results"][1]["audio_data"]) == expected_wav("Two.", "aiden")
    too_many = await client.post("/v1/audio/speech/batch", json={"items": [{"input": "x"}] * 33})
    assert too_many.status == 400
    assert set((await too_many.json())["error"]) == {"message", "type", "param", "code"}


async def test_hop_by_hop_headers_are_dropped_both_ways(gateway, tts):
    client = await gateway()
    response = await client.get(
        "/v1/audio/voices",
        headers={
            "Connection": "keep-alive, X-Client-Hop",
            "X-Client-Hop": "gateway only",
            "Keep-Alive": "timeout=5",
            "Proxy-Authorization": "Basic c2VjcmV0",
            "TE": "trailers",
            "Upgrade": "h2c",
            "X-End-To-End": "kept",
            FAULT_HEADER: "hop-headers",
        },
    )
    assert response.status == 200
    sent = tts.last("/v1/audio/voices").headers
    for dropped in ("X-Client-Hop", "Keep-Alive", "Proxy-Authorization", "TE", "Upgrade"):
        assert dropped not in sent, dropped
    assert sent["X-End-To-End"] == "kept"
    for dropped in ("X-Upstream-Hop", "Keep-Alive", "Proxy-Authenticate"):
        assert dropped not in response.headers, dropped
    assert response.headers["X-Upstream-End"] == "end to end"


# --- slot and disconnects -------------------------------------------------------------


async def test_chat_during_speech_gets_busy(gateway, tts, ollama):
    client = await gateway()
    response = await client.post(
        SPEECH,
        json={"model": MODEL, "input": "A long reading.", "stream_format": "audio", "response_format": "pcm"},
        headers={FAULT_HEADER: "trickle=0.05"},
    )
    assert response.status == 200
    await response.content.readany()
    busy = await client.post(
        "/v1/chat/completions", json={"model": "qwen3:4b", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert busy.status == 503
    assert busy.headers["Retry-After"] == "5"
    assert "tts request" in (await busy.json())["error"]["message"]
    assert ollama.requests == []
    await response.read()
    assert await wait_until(lambda: client.app[slot_key].is_free, 1.0)


async def test_speech_during_chat_gets_busy(gateway, tts, ollama):
    ollama.token_interval_s = 0.05
    client = await gateway()
    chat = await client.post(
        "/v1/chat/completions",
        json={"model": "qwen3:4b", "messages": [{"role": "user", "content": "hi"}], "stream": True},
    )
    assert chat.status == 200
    await chat.content.readany()
    with pytest.raises(InternalServerError) as busy:
        await openai_client(client).audio.speech.create(model=MODEL, voice="vivian", input="Not now.")
    assert busy.value.status_code == 503
    assert busy.value.response.headers["retry-after"] == "5"
    assert "llm request" in busy.value.message
    assert tts.received(SPEECH) == []
    await chat.read()
    assert await wait_until(lambda: client.app[slot_key].is_free, 1.0)


async def test_client_disconnect_closes_the_upstream(gateway, tts):
    client = await gateway()
    response = await client.post(
        SPEECH,
        json={"model": MODEL, "input": "This will be cut short.", "stream_format": "audio", "response_format": "pcm"},
        headers={FAULT_HEADER: "trickle=0.3"},
    )
    assert response.status == 200
    await response.content.readany()
    received = tts.last(SPEECH)
    response.close()
    left_at = time.monotonic()
    gone_at = await tts.wait_client_gone(received)
    assert gone_at is not None and gone_at - left_at < 1.0
    assert await wait_until(lambda: client.app[slot_key].is_free, 1.0)


async def test_client_disconnect_during_cold_start(gateway, tts):
    client = await gateway()
    with pytest.raises(asyncio.TimeoutError):
        await client.post(
            SPEECH, json={"model": MODEL, "input": "Warming up."},
            headers={FAULT_HEADER: "first-byte-delay=5"}, timeout=aiohttp.ClientTimeout(total=0.3),
        )
    left_at = time.monotonic()
    gone_at = await tts.wait_client_gone(tts.last(SPEECH))
    assert gone_at is not None and gone_at - left_at < 1.0
    assert await wait_until(lambda: client.app[slot_key].is_free, 1.0)


# --- errors ------------------------------------------------------------------------------


async def test_container_down_is_503_with_the_compose_command(gateway):
    url = refused_url()
    client = await gateway(url=url)
    response = await client.post(SPEECH, json={"model": MODEL, "input": "Anyone there?"})
    assert response.status == 503
    error = (await response.json())["error"]
    assert error["kind"] == "network" and error["provider"] == "aistack"
    assert COMPOSE_HINT in error["message"] and url in error["message"]
    assert client.app[slot_key].is_free


@pytest.mark.parametrize(
    "fault, fragment",
    [
        ("drop", "ServerDisconnectedError"),
        ("not-http", "not valid HTTP"),
        ("first-byte-delay=3", "did not answer within 0.3 s"),
    ],
)
async def test_transport_failures_are_502(gateway, tts, fault, fragment):
    client = await gateway(AISTACK_QWEN3_TTS_READ_TIMEOUT_S="0.3")
    response = await client.post(SPEECH, json={"model": MODEL, "input": "Hello."}, headers={FAULT_HEADER: fault})
    assert response.status == 502
    error = (await response.json())["error"]
    assert error["kind"] == "network" and error["provider"] == "Qwen3-TTS"
    assert fragment in error["message"]
    assert client.app[slot_key].is_free


@pytest.mark.parametrize(
    "method, path, body, status",
    [
        ("POST", SPEECH, {"model": MODEL, "input": "Hi", "voice": "nobody"}, 400),
        ("POST", SPEECH, {"model": "qwen3-tts-other", "input": "Hi"}, 404),
        ("POST", SPEECH, {"model": MODEL, "input": "Hi", "stream": True, "response_format": "mp3"}, 400),
        ("DELETE", "/v1/audio/voices/nobody", None, 404),
    ],
)
async def test_upstream_errors_pass_through_untouched(gateway, tts, method, path, body, status):
    client = await gateway()
    data = None if body is None else json.dumps(body).encode()
    response = await client.request(method, path, data=data, headers={"Content-Type": "application/json"})
    expected_status, expected_headers, expected = await direct(method, tts.url + path, data=data)
    assert response.status == expected_status == status
    assert await response.read() == expected
    assert response.headers["Content-Type"] == expected_headers["Content-Type"]


async def test_reset_mid_body_truncates_the_client_body(gateway, tts):
    client = await gateway()
    response = await client.post(
        SPEECH, json={"model": MODEL, "input": "A sentence long enough to be cut in the middle."},
        headers={FAULT_HEADER: "chunk-bytes=8192;reset-after=40000"},
    )
    assert response.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    assert await wait_until(lambda: client.app[slot_key].is_free, 1.0)


async def raw_status(client, target: str, method: str = "GET") -> int:
    """Send ``target`` exactly as written (no client-side normalisation)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(f"{method} {target} HTTP/1.1\r\nHost: gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    return int(status_line.split()[1])


@pytest.mark.parametrize(
    "target",
    [
        "/v1/audio/../../health",
        "/v1/audio/voices/../../../metrics",
        "/v1/audio/%2e%2e/%2e%2e/health",
        "/v1/audio/%2E%2E/health",
        "/v1/audio/voices/..%2f..%2fhealth",
        "/v1/audio/voices/%2fetc",
        "/v1/audio/voices/%5c..%5cx",
        "/v1/audio/voices\\..\\x",
        "/v1/audio//voices",
        "/v1/audio/./voices",
        "/v1/audio/voices/%252e%252e",
        "/v1/audio/voices/a%00b",
    ],
)
async def test_path_tricks_are_refused(gateway, tts, target):
    client = await gateway()
    assert await raw_status(client, target) == 400
    assert tts.requests == []


# --- WebSocket ----------------------------------------------------------------------------


async def test_websocket_relay_both_ways(gateway, tts):
    client = await gateway()
    ws = await client.ws_connect("/v1/audio/speech/stream")
    await ws.send_json({"type": "session.config", "voice": "serena", "response_format": "wav"})
    await ws.send_json({"type": "input.text", "text": "Hello over "})
    await ws.send_json({"type": "input.text", "text": "a socket."})
    await ws.send_json({"type": "input.done"})
    start = await ws.receive_json(timeout=2)
    assert start["type"] == "audio.start" and start["sentence_text"] == "Hello over a socket."
    audio = await ws.receive_bytes(timeout=2)
    assert audio == expected_wav("Hello over a socket.", "serena")
    done = await ws.receive_json(timeout=2)
    assert done == {"type": "audio.done", "utterance_index": 0, "sentence_index": 0,
                    "total_bytes": len(audio), "error": False}
    assert (await ws.receive_json(timeout=2))["type"] == "session.done"
    assert client.app[slot_key].holder is not None  # the session holds the GPU slot
    await ws.send_json({"type": "session.close"})
    closing = await ws.receive(timeout=2)
    assert closing.type is aiohttp.WSMsgType.CLOSE and ws.close_code == 1000
    assert await wait_until(lambda: client.app[slot_key].is_free, 1.0)


async def test_websocket_close_codes_are_relayed(gateway, tts):
    client = await gateway()
    ws = await client.ws_connect("/v1/audio/speech/stream", headers={FAULT_HEADER: "ws-close-code=4001"})
    await ws.send_json({"type": "session.config", "stream_audio": True, "response_format": "pcm"})
    await ws.send_json({"type": "input.text", "text": "Bye."})
    await ws.send_json({"type": "input.done"})
    frames = []
    while True:
        message = await ws.receive(timeout=2)
        if message.type is not aiohttp.WSMsgType.BINARY and message.type is not aiohttp.WSMsgType.TEXT:
            break
        frames.append(message)
    assert ws.close_code == 4001
    pcm = b"".join(m.data for m in frames if m.type is aiohttp.WSMsgType.BINARY)
    assert pcm == synthesize("vivian", "Bye.")

    ws = await client.ws_connect("/v1/audio/speech/stream")
    await ws.send_json({"type": "session.config"})
    await ws.close(code=4002, message=b"client done")
    session = tts.websocket_sessions[-1]
    assert await wait_until(lambda: session.ws_close_code is not None)
    assert session.ws_close_code == 4002
    assert await wait_until(lambda: client.app[slot_key].is_free, 1.0)


async def test_websocket_client_vanishing_closes_the_upstream(gateway, tts):
    client = await gateway()
    async with aiohttp.ClientSession() as other:
        ws = await other.ws_connect(client.url + "/v1/audio/speech/stream")
        await ws.send_json({"type": "session.config"})
        session = tts.websocket_sessions[-1]
    # The client's session is closed without a close frame: its connection just drops.
    assert await wait_until(lambda: session.ws_close_code is not None, 1.0)
    assert session.ws_close_code == 1001  # "going away", on the client's behalf
    assert await wait_until(lambda: client.app[slot_key].is_free, 1.0)


async def test_websocket_to_a_stopped_container_is_503_before_upgrade(gateway):
    client = await gateway(url=refused_url())
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/v1/audio/speech/stream")
    assert refused.value.status == 503


# --- /v1/models -------------------------------------------------------------------------


async def model_ids(client) -> set[str]:
    response = await client.get("/v1/models")
    assert response.status == 200
    return {m["id"] for m in (await response.json())["data"]}


async def test_models_show_tts_only_while_health_answers(gateway, tts):
    client = await gateway(url=None)
    entry = next(m for m in (await (await client.get("/v1/models")).json())["data"] if m["id"] == MODEL)
    assert entry["capabilities"] == ["tts"] and entry["supports_streaming"] is True and entry["owned_by"] == "qwen"
    assert "qwen3:4b" in await model_ids(client)


async def test_models_hide_tts_while_unhealthy(gateway, tts):
    tts.healthy = False
    client = await gateway()
    ids = await model_ids(client)
    assert MODEL not in ids and "qwen3:4b" in ids


async def test_models_stay_fast_when_the_container_hangs(gateway, tts):
    tts.health_delay_s = 5
    client = await gateway()
    started = time.monotonic()
    ids = await model_ids(client)
    assert time.monotonic() - started < 0.6
    assert MODEL not in ids and "qwen3:4b" in ids
