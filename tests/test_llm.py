"""The LLM proxy, end to end over real HTTP: client → gateway → Ollama emulator.

The emulator (tests/upstreams/ollama.py) answers like Ollama's OpenAI
layer and records what reached it, so these tests check both what the
client got and what the upstream was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import time

import aiohttp
import attrs
import pytest
from openai import APIStatusError, AsyncOpenAI

import aistack_plugins.ollama
from aistack_core.app import create_app
from aistack_core.context import model_cache_key, slot_key

from .upstreams import FAULT_HEADER, GatewayClient, refused_url, run_gateway
from .upstreams.ollama import WORDS, OllamaEmulator, embedding_of

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Say something about foxes."}]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def openai_client(client) -> AsyncOpenAI:
    # No retries: a 503 must reach the test, not be retried away.
    return AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="x", max_retries=0, timeout=10)


@pytest.fixture
async def ollama():
    emulator = OllamaEmulator()
    async with emulator.running():
        yield emulator


@pytest.fixture
async def gateway(base_config, plugin_set, ollama):
    """``await gateway(**env)``: the app with the ollama plugin, pointed at the emulator."""
    async with contextlib.AsyncExitStack() as stack:

        async def factory(url: str | None = None, *, plugins=True, **env: str) -> GatewayClient:
            if plugins:
                plugin_set.register(aistack_plugins.ollama, name="ollama")
            config = attrs.evolve(base_config, env={"AISTACK_OLLAMA_URL": url or ollama.url, **env})
            return await stack.enter_async_context(run_gateway(create_app(config, plugins=plugin_set)))

        yield factory


async def wait_until(condition, timeout_s: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


# --- happy paths through the official client ----------------------------------


async def test_chat_through_openai_sdk(gateway, ollama):
    client = await gateway()
    reply = await openai_client(client).chat.completions.create(model="qwen3:4b", messages=MESSAGES)
    assert reply.object == "chat.completion"
    assert reply.system_fingerprint == "fp_ollama"
    assert reply.choices[0].message.content == "".join(WORDS[i % len(WORDS)] for i in range(ollama.reply_tokens))
    assert reply.choices[0].finish_reason == "stop"
    sent = json.loads(ollama.last(CHAT).body)
    assert sent["messages"] == MESSAGES
    assert sent["keep_alive"] == "30s"


async def test_streamed_chat_arrives_chunk_by_chunk(gateway, ollama):
    ollama.token_interval_s = 0.03
    client = await gateway()
    stream = await openai_client(client).chat.completions.create(
        model="qwen3:4b", messages=MESSAGES, stream=True, max_tokens=20
    )
    first_chunk_at = None
    pieces, finish = [], None
    async for chunk in stream:
        if first_chunk_at is None:
            first_chunk_at = time.monotonic()
        pieces.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    received = ollama.last(CHAT)
    assert "".join(pieces) == "".join(WORDS[i % len(WORDS)] for i in range(20))
    assert finish == "length"
    # The first token was with the client while the upstream still had ~0.6 s to go.
    assert first_chunk_at < received.finished_at - 0.3
    assert client.app[slot_key].is_free


async def test_embeddings_through_openai_sdk(gateway, ollama):
    client = await gateway()
    result = await openai_client(client).embeddings.create(model="nomic-embed-text", input=["alpha", "beta"])
    assert [round(x, 6) for x in result.data[1].embedding] == pytest.approx(embedding_of("beta"), abs=1e-6)
    assert json.loads(ollama.last("/v1/embeddings").body)["keep_alive"] == "30s"


# --- transparency ---------------------------------------------------------------


async def test_json_bytes_pass_untouched_both_ways(gateway, ollama):
    """A body that already has keep_alive is forwarded byte for byte, and the answer comes back byte for byte."""
    client = await gateway()
    body = b'{ "input" : ["caf\\u00e9", "x"],\n  "model":"nomic-embed-text", "keep_alive": 0, "dimensions": 16 }'
    via_gateway = await client.post("/v1/embeddings?trace=1", data=body, headers={"Content-Type": "application/json"})
    gateway_bytes = await via_gateway.read()
    received = ollama.last("/v1/embeddings")
    assert received.body_sha256 == sha256(body)
    assert received.query == "trace=1"
    async with aiohttp.ClientSession() as direct:
        async with direct.post(ollama.url + "/v1/embeddings", data=body) as answer:
            direct_bytes = await answer.read()
            direct_type = answer.headers["Content-Type"]
    assert via_gateway.status == 200
    assert sha256(gateway_bytes) == sha256(direct_bytes)
    assert via_gateway.headers["Content-Type"] == direct_type


@pytest.mark.parametrize("explicit", ["0", 0, -1, "5m", None])
async def test_explicit_keep_alive_is_left_exactly_as_sent(gateway, ollama, explicit):
    client = await gateway()
    body = json.dumps({"model": "qwen3:4b", "messages": MESSAGES, "keep_alive": explicit}).encode()
    response = await client.post(CHAT, data=body, headers={"Content-Type": "application/json"})
    assert response.status == 200
    received = ollama.last(CHAT)
    assert received.body == body
    assert json.loads(received.body)["keep_alive"] == explicit


async def test_keep_alive_injected_when_absent(gateway, ollama):
    client = await gateway()
    response = await client.post(CHAT, json={"model": "qwen3:4b", "messages": MESSAGES, "temperature": 0.7})
    assert response.status == 200
    sent = json.loads(ollama.last(CHAT).body)
    assert sent == {"model": "qwen3:4b", "messages": MESSAGES, "temperature": 0.7, "keep_alive": "30s"}


async def test_compressed_request_body_is_forwarded_decoded(gateway, ollama):
    """aiohttp decodes a gzip request body on arrival; what goes on must say so."""
    client = await gateway()
    document = {"model": "nomic-embed-text", "input": "squeezed", "keep_alive": "1m"}
    response = await client.post(
        "/v1/embeddings",
        data=gzip.compress(json.dumps(document).encode()),
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert response.status == 200
    received = ollama.last("/v1/embeddings")
    assert json.loads(received.body) == document
    assert "Content-Encoding" not in received.headers


async def test_hop_by_hop_headers_are_dropped_both_ways(gateway, ollama):
    client = await gateway()
    response = await client.post(
        CHAT,
        json={"model": "qwen3:4b", "messages": MESSAGES},
        headers={
            "Connection": "keep-alive, X-Client-Hop",
            "X-Client-Hop": "for the gateway only",
            "Keep-Alive": "timeout=5",
            "Proxy-Authorization": "Basic c2VjcmV0",
            "TE": "trailers",
            "X-End-To-End": "kept",
            "Authorization": "Bearer for-the-gateway",
            FAULT_HEADER: "hop-headers",
        },
    )
    assert response.status == 200
    sent = ollama.last(CHAT).headers
    for dropped in ("X-Client-Hop", "Keep-Alive", "Proxy-Authorization", "TE"):
        assert dropped not in sent, dropped
    assert sent["X-End-To-End"] == "kept"
    # Credentials for the gateway stay at the gateway; an upstream key comes from the plugin.
    assert "Authorization" not in sent
    assert sent["Host"] == ollama.url.removeprefix("http://")
    for dropped in ("X-Upstream-Hop", "Keep-Alive", "Proxy-Authenticate"):
        assert dropped not in response.headers, dropped
    assert response.headers["X-Upstream-End"] == "end to end"
    assert "X-Request-ID" in response.headers


# --- gateway behaviour ------------------------------------------------------------


async def test_asr_models_are_evicted_before_forwarding(gateway, ollama):
    client = await gateway()
    cache = client.app[model_cache_key]
    async with cache.use("tiny-asr", "asr", lambda: object()):
        pass
    async with cache.use("some-voice", "tts", lambda: object()):
        pass
    assert "tiny-asr" in cache
    reply = await openai_client(client).chat.completions.create(model="qwen3:4b", messages=MESSAGES)
    assert reply.choices[0].message.content
    assert "tiny-asr" not in cache
    assert "some-voice" in cache


async def test_busy_slot_during_a_streamed_chat(gateway, ollama):
    ollama.token_interval_s = 0.05
    client = await gateway()
    sdk = openai_client(client)
    stream = await sdk.chat.completions.create(model="qwen3:4b", messages=MESSAGES, stream=True, max_tokens=12)
    iterator = stream.__aiter__()
    await iterator.__anext__()  # the stream is running and holds the slot
    with pytest.raises(APIStatusError) as busy:
        await sdk.chat.completions.create(model="llama3.2:1b", messages=MESSAGES)
    assert busy.value.status_code == 503
    assert busy.value.response.headers["Retry-After"] == "5"
    assert busy.value.body["kind"] == "network"  # the SDK hands over the envelope's "error" object
    async for _ in iterator:
        pass
    assert client.app[slot_key].is_free
    assert len(ollama.received(CHAT)) == 1  # the busy request never reached Ollama


async def test_client_disconnect_mid_stream_reaches_the_upstream(gateway, ollama):
    client = await gateway()
    response = await client.post(
        CHAT,
        json={"model": "qwen3:4b", "messages": MESSAGES, "stream": True, "max_tokens": 50},
        headers={FAULT_HEADER: "trickle=0.3"},
    )
    assert response.status == 200
    assert (await response.content.readany()).startswith(b"data: ")
    received = ollama.last(CHAT)
    assert client.app[slot_key].holder is not None
    response.close()  # the client goes away mid-stream
    left_at = time.monotonic()
    gone_at = await ollama.wait_client_gone(received)
    assert gone_at is not None and gone_at - left_at < 1.0
    assert await wait_until(lambda: client.app[slot_key].is_free, 1.0)


async def test_client_disconnect_before_the_answer_frees_the_slot(gateway, ollama):
    client = await gateway()
    with pytest.raises(asyncio.TimeoutError):
        await client.post(
            CHAT,
            json={"model": "qwen3:4b", "messages": MESSAGES},
            headers={FAULT_HEADER: "first-byte-delay=5"},
            timeout=aiohttp.ClientTimeout(total=0.3),
        )
    left_at = time.monotonic()
    gone_at = await ollama.wait_client_gone(ollama.last(CHAT))
    assert gone_at is not None and gone_at - left_at < 1.0
    assert await wait_until(lambda: client.app[slot_key].is_free, 1.0)


# --- errors -----------------------------------------------------------------------


async def test_unreachable_ollama_is_503_with_the_hint(gateway):
    url = refused_url()
    client = await gateway(url=url)
    response = await client.post(CHAT, json={"model": "qwen3:4b", "messages": MESSAGES})
    assert response.status == 503
    error = (await response.json())["error"]
    assert error["kind"] == "network" and error["provider"] == "aistack"
    assert "ollama serve" in error["message"] and url in error["message"]
    assert client.app[slot_key].is_free


async def test_ollama_errors_pass_through_untouched(gateway, ollama):
    client = await gateway()
    body = json.dumps({"model": "no-such-model", "messages": MESSAGES}).encode()
    via_gateway = await client.post(CHAT, data=body, headers={"Content-Type": "application/json"})
    async with aiohttp.ClientSession() as direct:
        async with direct.post(ollama.url + CHAT, data=body) as answer:
            expected = await answer.read()
    assert via_gateway.status == 404
    assert await via_gateway.read() == expected
    assert json.loads(expected)["error"] == {
        "message": 'model "no-such-model" not found, try pulling it first',
        "type": "not_found_error", "param": None, "code": None,
    }


async def test_read_timeout_is_504(gateway, ollama):
    client = await gateway(AISTACK_OLLAMA_READ_TIMEOUT_S="0.3")
    response = await client.post(
        CHAT, json={"model": "qwen3:4b", "messages": MESSAGES}, headers={FAULT_HEADER: "first-byte-delay=3"}
    )
    assert response.status == 504
    error = (await response.json())["error"]
    assert error["kind"] == "network" and "0.3 s" in error["message"]
    assert client.app[slot_key].is_free


@pytest.mark.parametrize("fault, fragment", [("drop", "ServerDisconnectedError"), ("not-http", "not valid HTTP")])
async def test_broken_upstream_before_headers_is_502(gateway, ollama, fault, fragment):
    client = await gateway()
    response = await client.post(
        CHAT, json={"model": "qwen3:4b", "messages": MESSAGES}, headers={FAULT_HEADER: fault}
    )
    assert response.status == 502
    error = (await response.json())["error"]
    assert error["kind"] == "network" and fragment in error["message"]


async def test_reset_mid_stream_truncates_the_client_body(gateway, ollama):
    client = await gateway()
    response = await client.post(
        CHAT,
        json={"model": "qwen3:4b", "messages": MESSAGES, "stream": True, "max_tokens": 30},
        headers={FAULT_HEADER: "reset-after=700"},
    )
    assert response.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    assert await wait_until(lambda: client.app[slot_key].is_free, 1.0)


@pytest.mark.parametrize(
    "path, body, fragment",
    [
        (CHAT, b"{not json", "not valid JSON"),
        (CHAT, b"[1, 2]", "JSON object"),
        (CHAT, b'{"messages": []}', "'model'"),
        (CHAT, b'{"model": "qwen3:4b", "messages": "hi"}', "'messages'"),
        ("/v1/embeddings", b'{"model": "nomic-embed-text"}', "'input'"),
    ],
)
async def test_malformed_requests_never_reach_ollama(gateway, ollama, path, body, fragment):
    client = await gateway()
    response = await client.post(path, data=body, headers={"Content-Type": "application/json"})
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["kind"] == "malformed" and fragment in error["message"]
    assert ollama.requests == []


async def test_no_chat_backend_installed(gateway):
    client = await gateway(plugins=False)
    response = await client.post(CHAT, json={"model": "qwen3:4b", "messages": MESSAGES})
    assert response.status == 503
    assert "LLM upstream plugin" in (await response.json())["error"]["message"]


# --- /v1/models -----------------------------------------------------------------------


async def test_models_list_ollama_tags_while_it_is_up(gateway, ollama):
    client = await gateway()
    entries = {m["id"]: m for m in (await (await client.get("/v1/models")).json())["data"]}
    assert entries["qwen3:4b"]["capabilities"] == ["llm"]
    assert entries["qwen3:4b"]["owned_by"] == "ollama"
    assert entries["qwen3:4b"]["supports_streaming"] is True
    assert entries["nomic-embed-text:latest"]["capabilities"] == ["embeddings"]


async def test_models_drop_ollama_when_it_is_down(gateway):
    client = await gateway(url=refused_url())
    response = await client.get("/v1/models")
    assert response.status == 200
    assert not [m for m in (await response.json())["data"] if m["owned_by"] == "ollama"]


async def test_models_stay_fast_when_ollama_hangs(gateway, ollama):
    ollama.tags_delay_s = 5
    client = await gateway()
    started = time.monotonic()
    response = await client.get("/v1/models")
    assert time.monotonic() - started < 0.6
    assert response.status == 200
    assert not [m for m in (await response.json())["data"] if m["owned_by"] == "ollama"]




async def test_odd_but_valid_text_survives_the_keep_alive_rewrite(gateway, ollama):
    client = await gateway()
    raw = '{"model": "qwen3:4b", "messages": [{"role": "user", "content": "caf\\u00e9 \\ud800 \\u4f60\\u597d"}]}'
    response = await client.post(CHAT, data=raw, headers={"Content-Type": "application/json"})
    assert response.status == 200, await response.text()
    sent = json.loads(ollama.last(CHAT).body)
    assert sent["messages"][0]["content"] == "caf\u00e9 \ud800 \u4f60\u597d" and sent["keep_alive"] == "30s"


@pytest.mark.parametrize("raw", [b'{"model": "m", "messages": [], "temperature": ' + b"9" * 5000 + b"}", b"[" * 100000])
async def test_absurd_json_is_malformed(gateway, raw):
    client = await gateway()
    response = await client.post(CHAT, data=raw, headers={"Content-Type": "application/json"})
    assert response.status == 400
    assert (await response.json())["error"]["kind"] == "malformed"
