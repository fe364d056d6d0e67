"""OpenAI-compatible engines as upstreams, end to end: client → gateway → vLLM emulators (and Ollama's).

Two vLLM emulators (tests/upstreams/vllm_openai.py) stand for two engines,
one writing vLLM's current error shape and one the older flat one; the
Ollama emulator is the default LLM.  The tests check what the client got
and what each upstream was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import attrs
import pytest
from openai import APIStatusError, AsyncOpenAI

import aistack_plugins.ollama
import aistack_plugins.openai_compatible
from aistack_core.app import create_app
from aistack_plugins.openai_compatible import parse_upstreams, server_root

from .helpers import BackendPlugin, SlowAsr, tone_wav
from .upstreams import FAULT_HEADER, GatewayClient, refused_url, run_gateway
from .upstreams.ollama import OllamaEmulator
from .upstreams.vllm_openai import WORDS, VllmOpenAIEmulator, embedding_of

CHAT = "/v1/chat/completions"
QWEN = "Qwen/Qwen2.5-1.5B-Instruct"
LLAMA = "meta-llama/Llama-3.2-1B-Instruct"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
GATEWAY_KEY = "gateway-secret-key"


def openai_client(client: GatewayClient, api_key: str = "unused") -> AsyncOpenAI:
    return AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=api_key, max_retries=0, timeout=10)


def reply(count: int) -> str:
    return "".join(WORDS[i % len(WORDS)] for i in range(count))


@pytest.fixture
async def engines():
    """Two running engines: ``vllm`` serves QWEN (nested errors), ``llamacpp`` serves LLAMA (flat errors)."""
    first = VllmOpenAIEmulator((QWEN,))
    second = VllmOpenAIEmulator((LLAMA,), error_style="flat")
    async with first.running(), second.running():
        yield first, second


@pytest.fixture
async def ollama():
    emulator = OllamaEmulator()
    async with emulator.running():
        yield emulator


@pytest.fixture
async def gateway(base_config, plugin_set):
    """``await gateway(upstreams, ollama_url=None, **env)``: the gateway with the openai_compatible plugin
    (and Ollama's when ``ollama_url`` is given)."""
    async with contextlib.AsyncExitStack() as stack:

        async def factory(upstreams: str, ollama_url: str | None = None, plugins: dict | None = None,
                          api_key: str | None = None, probe_cache_s: float = 2.0, **env: str) -> GatewayClient:
            plugin_set.register(aistack_plugins.openai_compatible, name="openai_compatible")
            if ollama_url is not None:
                plugin_set.register(aistack_plugins.ollama, name="ollama")
            for name, plugin in (plugins or {}).items():
                plugin_set.register(plugin, name=name)
            base_config.upload_dir.mkdir(parents=True, exist_ok=True)
            config = attrs.evolve(
                base_config, api_key=api_key, probe_cache_s=probe_cache_s,
                env={"AISTACK_OPENAI_UPSTREAMS": upstreams, "AISTACK_OLLAMA_URL": ollama_url or refused_url(), **env},
            )
            return await stack.enter_async_context(run_gateway(create_app(config, plugins=plugin_set)))

        yield factory


# --- configuration ----------------------------------------------------------------


def test_upstream_list_parsing():
    settings = parse_upstreams(" vllm=http://gpu:8000/v1/ , http://gpu2:8000 ,llama.cpp=https://box:8080,")
    assert [(s.name, s.urls) for s in settings] == [
        ("vllm", ("http://gpu:8000", "http://gpu2:8000")),
        ("llama.cpp", ("https://box:8080",)),
    ]
    assert settings[1].variable_prefix == "AISTACK_OPENAI_UPSTREAM_LLAMA_CPP"
    assert server_root("http://h:1/v1") == server_root("http://h:1/") == "http://h:1"
    assert parse_upstreams("") == [] and parse_upstreams(None) == []


@pytest.mark.parametrize("value, fragment", [
    ("http://lonely:8000", "neither name=url"),
    ("vllm=ftp://x", "neither name=url"),
    ("vllm", "neither name=url"),
    ("a=http://x,a=http://y", "named twice"),
    ("bad name=http://x", "may hold only"),
])
def test_bad_upstream_lists_say_what_is_wrong(value, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_upstreams(value)


async def test_a_bad_list_skips_the_plugin_and_says_why(gateway):
    client = await gateway("http://lonely:8000")
    plugins = {p["name"]: p for p in (await (await client.get("/-/plugins")).json())["plugins"]}
    assert plugins["openai_compatible"]["status"] == "skipped"
    assert "neither name=url" in plugins["openai_compatible"]["error"]


# --- through the official client ------------------------------------------------------


async def test_chat_plain_and_streamed_through_the_openai_client(gateway, engines):
    vllm, _ = engines
    client = await gateway(f"vllm={vllm.url}/v1")
    sdk = openai_client(client)
    answer = await sdk.chat.completions.create(model=QWEN, messages=MESSAGES)
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.content == reply(vllm.reply_tokens)
    assert answer.usage.completion_tokens == vllm.reply_tokens

    vllm.token_interval_s = 0.03
    stream = await sdk.chat.completions.create(
        model=QWEN, messages=MESSAGES, stream=True, max_tokens=15, stream_options={"include_usage": True}
    )
    first_at, pieces, finish, usage = None, [], None, None
    async for chunk in stream:
        first_at = first_at or time.monotonic()
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    assert "".join(pieces) == reply(15) and finish == "length" and usage.completion_tokens == 15
    # Streamed as it came: the first token was here while the engine still had ~0.4 s to go.
    assert first_at < vllm.last(CHAT).finished_at - 0.2


async def test_completions_and_embeddings_pass_through(gateway, engines):
    vllm, _ = engines
    client = await gateway(f"vllm={vllm.url}")
    sdk = openai_client(client)
    completion = await sdk.completions.create(model=QWEN, prompt="The capital of France", max_tokens=3)
    assert completion.choices[0].text == reply(3)
    embedded = await sdk.embeddings.create(model=QWEN, input=["alpha", "beta"])
    assert embedded.data[1].embedding == pytest.approx(embedding_of("beta"))


async def test_request_and_answer_bytes_are_untouched(gateway, engines):
    vllm, _ = engines
    client = await gateway(f"vllm={vllm.url}")
    body = b'{"model": "%s",  "messages": [{"role":"user","content":"caf\\u00e9"}], "x_custom": 1}' % QWEN.encode()
    response = await client.post(CHAT, data=body, headers={"Content-Type": "application/json"})
    assert response.status == 200
    assert vllm.last(CHAT).body == body  # no keep_alive or anything else added for this upstream
    assert (await response.json())["object"] == "chat.completion"


# --- routing by model ------------------------------------------------------------------


async def test_models_are_routed_to_the_upstream_that_lists_them(gateway, engines, ollama):
    vllm, llamacpp = engines
    client = await gateway(f"vllm={vllm.url},llamacpp={llamacpp.url}/v1", ollama_url=ollama.url)
    listed = {m["id"]: m for m in (await (await client.get("/v1/models")).json())["data"]}
    assert {QWEN, LLAMA, "qwen3:4b"} <= set(listed)
    assert listed[QWEN]["owned_by"] == "vllm" and listed[QWEN]["capabilities"] == ["llm"]

    sdk = openai_client(client)
    for model in (QWEN, LLAMA, "qwen3:4b", QWEN):
        await sdk.chat.completions.create(model=model, messages=MESSAGES)
    assert [json.loads(r.body)["model"] for r in vllm.received(CHAT)] == [QWEN, QWEN]
    assert [json.loads(r.body)["model"] for r in llamacpp.received(CHAT)] == [LLAMA]
    assert [json.loads(r.body)["model"] for r in ollama.received(CHAT)] == ["qwen3:4b"]

    # A model nobody lists goes to the default LLM (Ollama), whose own 404 tells the client.
    with pytest.raises(APIStatusError) as caught:
        await sdk.chat.completions.create(model="mistral:7b", messages=MESSAGES)
    assert caught.value.status_code == 404 and "try pulling it first" in caught.value.message
    assert len(vllm.received(CHAT)) == 2 and len(llamacpp.received(CHAT)) == 1


async def test_engine_errors_reach_the_client_as_written(gateway, engines):
    vllm, llamacpp = engines
    client = await gateway(f"vllm={vllm.url},llamacpp={llamacpp.url}")
    await client.get("/v1/models")
    for engine, model in ((vllm, QWEN), (llamacpp, LLAMA)):
        response = await client.post(CHAT, json={"model": model, "messages": []})
        body = await response.json()
        assert response.status == 400
        fields = body["error"] if engine.error_style == "nested" else body
        assert fields["type"] == "BadRequestError" and fields["code"] == 400
        assert "kind" not in json.dumps(body)  # the engine's own body, not the gateway's envelope


async def test_one_engine_down_hides_its_models_and_answers_503_with_a_hint(gateway, ollama):
    vllm, llamacpp = VllmOpenAIEmulator((QWEN,)), VllmOpenAIEmulator((LLAMA,))
    async with vllm.running():
        async with llamacpp.running():
            client = await gateway(f"vllm={vllm.url},llamacpp={llamacpp.url}", ollama_url=ollama.url,
                                   probe_cache_s=0)
            ids = [m["id"] for m in (await (await client.get("/v1/models")).json())["data"]]
            assert QWEN in ids and LLAMA in ids
        # llamacpp has stopped.
        ids = [m["id"] for m in (await (await client.get("/v1/models")).json())["data"]]
        assert QWEN in ids and LLAMA not in ids and "qwen3:4b" in ids
        response = await client.post(CHAT, json={"model": LLAMA, "messages": MESSAGES})
        error = (await response.json())["error"]
        assert response.status == 503 and "Retry-After" not in response.headers  # down, not busy
        assert error["kind"] == "network" and error["provider"] == "llamacpp"
        assert "'llamacpp' is not reachable" in error["message"] and "AISTACK_OPENAI_UPSTREAMS" in error["message"]
        assert not ollama.received(CHAT)  # not handed to the default, whose 404 would mislead
        answer = await openai_client(client).chat.completions.create(model=QWEN, messages=MESSAGES)
        assert answer.choices[0].message.content == reply(vllm.reply_tokens)


# --- credentials ----------------------------------------------------------------------


async def test_the_gateway_key_is_never_forwarded(gateway, engines):
    vllm, llamacpp = engines
    llamacpp.api_key = "engine-key"
    client = await gateway(
        f"vllm={vllm.url},llamacpp={llamacpp.url}", api_key=GATEWAY_KEY,
        AISTACK_OPENAI_UPSTREAM_LLAMACPP_API_KEY="engine-key",
    )
    sdk = openai_client(client, api_key=GATEWAY_KEY)
    ids = [m.id async for m in sdk.models.list()]
    assert QWEN in ids and LLAMA in ids  # the keyed engine's probe carried its key
    await sdk.chat.completions.create(model=QWEN, messages=MESSAGES)
    await sdk.chat.completions.create(model=LLAMA, messages=MESSAGES)
    assert "Authorization" not in vllm.last(CHAT).headers
    assert llamacpp.last(CHAT).headers["Authorization"] == "Bearer engine-key"
    for engine in engines:
        assert all(GATEWAY_KEY not in json.dumps(dict(r.headers)) for r in engine.requests)


async def test_wrong_engine_key_is_the_engines_401(gateway, engines):
    vllm, _ = engines
    vllm.api_key = "engine-key"
    client = await gateway(f"vllm={vllm.url}", AISTACK_OPENAI_UPSTREAM_VLLM_API_KEY="stale-key")
    assert [m["id"] for m in (await (await client.get("/v1/models")).json())["data"]] == []
    response = await client.post(CHAT, json={"model": QWEN, "messages": MESSAGES})
    assert response.status == 401 and await response.json() == {"error": "Unauthorized"}


# --- the local slot ---------------------------------------------------------------------


@pytest.mark.parametrize("local", ["on", "off"])
async def test_only_a_local_engine_takes_the_gpu_slot(gateway, engines, tmp_path, local):
    vllm, _ = engines
    asr = SlowAsr(steps=30, step_s=0.05)
    client = await gateway(f"vllm={vllm.url}", plugins={"slow": BackendPlugin(asr)},
                           AISTACK_OPENAI_UPSTREAM_VLLM_LOCAL=local)
    wav = tone_wav(tmp_path / "tone.wav")
    with open(wav, "rb") as audio:
        transcription = asyncio.create_task(
            client.post("/v1/audio/transcriptions", data={"file": audio, "model": "slow-asr"})
        )
        while not asr.running.is_set():
            await asyncio.sleep(0.01)
        response = await client.post(CHAT, json={"model": QWEN, "messages": MESSAGES})
        if local == "on":
            assert response.status == 503 and response.headers["Retry-After"] == "5"
        else:
            assert response.status == 200, await response.text()
        health = await (await client.get("/health")).json()
        assert health["devices"] == {"total": 1, "busy": 1} and health["in_flight"]["asr"] == 1
        assert (await transcription).status == 200


async def test_client_leaving_mid_stream_reaches_the_engine(gateway, engines):
    vllm, _ = engines
    vllm.token_interval_s = 0.05
    client = await gateway(f"vllm={vllm.url}")
    async with client.post(CHAT, json={"model": QWEN, "messages": MESSAGES, "stream": True, "max_tokens": 200}) as r:
        assert r.status == 200
        await r.content.readline()
        r.close()  # hang up after the first event; the engine had ~10 s of tokens left
        left_at = time.monotonic()
    received = vllm.last(CHAT)
    gone_at = await vllm.wait_client_gone(received)
    assert gone_at is not None and gone_at - left_at < 1.0


async def test_a_hanging_engine_does_not_slow_requests_for_another(gateway, engines):
    quick, hanging = engines
    hanging.faults = attrs.evolve(hanging.faults, first_byte_delay_s=5.0)  # accepts, never answers in time
    client = await gateway(f"hanging={hanging.url},quick={quick.url}")
    ids = [m["id"] for m in (await (await client.get("/v1/models")).json())["data"]]
    assert ids == [QWEN]  # the hanging engine's models are left out, after at most the probe deadline
    for _ in range(3):
        started = time.monotonic()
        response = await client.post(CHAT, json={"model": QWEN, "messages": MESSAGES})
        assert response.status == 200
        assert time.monotonic() - started < 0.3  # the quick engine's fresh listing decides at once


async def test_an_engine_that_does_not_answer_in_time_is_504(gateway, engines):
    vllm, _ = engines
    client = await gateway(f"vllm={vllm.url}", AISTACK_OPENAI_READ_TIMEOUT_S="0.3")
    response = await client.post(CHAT, json={"model": QWEN, "messages": MESSAGES},
                                 headers={FAULT_HEADER: "first-byte-delay=3"})
    error = (await response.json())["error"]
    assert response.status == 504 and error["kind"] == "network" and error["provider"] == "vllm"
    assert "did not answer within 0.3 s" in error["message"]
