"""Several URLs for one upstream: requests reach a reachable replica; a failing one is skipped until
its probe answers again.  Real HTTP against the Ollama and vLLM-Omni emulators."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import attrs
import pytest

import aistack_plugins.ollama
import aistack_plugins.qwen3_tts
from aistack_core import Config, runs_on_this_machine, upstream_urls
from aistack_core.app import create_app
from aistack_core.backends import Upstream
from aistack_core.context import registry_key
from aistack_core.upstreams import probes_key

from .upstreams import GatewayClient, free_port, refused_url, run_gateway
from .upstreams.ollama import OllamaEmulator
from .upstreams.vllm_omni import VllmOmniEmulator, synthesize, wav_header

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Name a river in Spain."}]


@pytest.fixture
async def gateway(base_config, plugin_set):
    async with contextlib.AsyncExitStack() as stack:

        async def factory(ollama_url: str = "", tts_url: str = "", probe_cache_s: float = 0.3) -> GatewayClient:
            if ollama_url:
                plugin_set.register(aistack_plugins.ollama, name="ollama")
            if tts_url:
                plugin_set.register(aistack_plugins.qwen3_tts, name="qwen3_tts")
            config = attrs.evolve(base_config, probe_cache_s=probe_cache_s, env={
                "AISTACK_OLLAMA_URL": ollama_url or refused_url(), "AISTACK_QWEN3_TTS_URL": tts_url or refused_url()})
            return await stack.enter_async_context(run_gateway(create_app(config, plugins=plugin_set)))

        yield factory


def upstream_of(client: GatewayClient, name: str) -> Upstream:
    return client.app[registry_key].upstreams[name].backend


async def chat(client: GatewayClient) -> tuple[int, dict]:
    response = await client.post(CHAT, json={"model": "qwen3:4b", "messages": MESSAGES})
    return response.status, await response.json()


async def wait_until(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def test_a_refused_replica_is_skipped_within_the_request(gateway):
    ollama = OllamaEmulator()
    async with ollama.running():
        dead = refused_url()
        client = await gateway(f"{dead}, {ollama.url}/")
        status, body = await chat(client)
        assert status == 200 and body["object"] == "chat.completion"
        probes, upstream = client.app[probes_key], upstream_of(client, "ollama")
        assert probes.is_down(upstream, dead)
        assert probes.candidates(upstream) == [ollama.url, dead]  # the dead one is now tried last
        ids = [m["id"] for m in (await (await client.get("/v1/models")).json())["data"]]
        assert "qwen3:4b" in ids  # the reachable replica's listing stands for the upstream


async def test_failover_and_return_when_the_first_replica_comes_back(gateway):
    first, second = OllamaEmulator(), OllamaEmulator()
    first_port = free_port()
    async with second.running():
        async with first.running(first_port):
            client = await gateway(f"{first.url},{second.url}")
            assert (await chat(client))[0] == 200
            assert len(first.received(CHAT)) == 1 and not second.received(CHAT)
        # The first daemon stopped: requests keep succeeding, on the second.
        for _ in range(3):
            assert (await chat(client))[0] == 200
        assert len(first.received(CHAT)) == 1 and len(second.received(CHAT)) == 3
        upstream, probes = upstream_of(client, "ollama"), client.app[probes_key]
        assert probes.is_down(upstream, first.url)

        revived = OllamaEmulator()
        async with revived.running(first_port):
            # Skipped until its probe answers: the background re-probe brings it back.
            assert await wait_until(lambda: not probes.is_down(upstream, revived.url), 3.0)
            assert (await chat(client))[0] == 200
            assert len(revived.received(CHAT)) == 1 and len(second.received(CHAT)) == 3


async def test_every_replica_down_is_503_naming_them(gateway):
    dead = (refused_url(), refused_url())
    client = await gateway(",".join(dead))
    status, body = await chat(client)
    assert status == 503 and body["error"]["kind"] == "network"
    assert "ollama serve" in body["error"]["message"]
    assert all(url in body["error"]["message"] for url in dead) and "every replica" in body["error"]["message"]
    assert (await (await client.get("/v1/models")).json())["data"] == []


async def test_a_hanging_replica_does_not_hide_the_others_models(gateway):
    slow, quick = OllamaEmulator(), OllamaEmulator()
    slow.tags_delay_s = 5
    async with slow.running(), quick.running():
        client = await gateway(f"{slow.url},{quick.url}")
        started = time.monotonic()
        ids = [m["id"] for m in (await (await client.get("/v1/models")).json())["data"]]
        assert time.monotonic() - started < 1.0
        assert ids.count("qwen3:4b") == 1  # listed once although two replicas serve it


async def test_qwen3_tts_replicas_speech_and_websocket(gateway):
    tts = VllmOmniEmulator()
    async with tts.running():
        client = await gateway(tts_url=f"{refused_url()},{tts.url}")
        response = await client.post("/v1/audio/speech", json={
            "model": "qwen3-tts-12hz-0.6b-customvoice", "input": "Rivers run to the sea.", "voice": "vivian",
        })
        pcm = synthesize("vivian", "Rivers run to the sea.")
        assert response.status == 200 and await response.read() == wav_header(len(pcm)) + pcm

        # A streamed body (the batch route relays the client's bytes as they come) survives the failover too.
        batch = json.dumps({"items": [{"input": "One."}, {"input": "Two."}], "voice": "vivian"}).encode()
        response = await client.post("/v1/audio/speech/batch", data=batch, headers={"Content-Type": "application/json"})
        assert response.status == 200 and (await response.json())["succeeded"] == 2
        assert tts.last("/v1/audio/speech/batch").body == batch

        ws = await client.ws_connect("/v1/audio/speech/stream")
        await ws.send_json({"type": "session.config", "voice": "serena", "response_format": "pcm"})
        await ws.send_json({"type": "input.text", "text": "Hello there."})
        await ws.send_json({"type": "input.done"})
        assert (await ws.receive_json(timeout=2))["type"] == "audio.start"
        assert await ws.receive_bytes(timeout=2) == synthesize("serena", "Hello there.")
        await ws.close()
        assert json.loads(tts.last("/v1/audio/speech").body)["input"] == "Rivers run to the sea."


# --- URLs and where they point ---------------------------------------------------------


def test_upstream_url_lists():
    assert upstream_urls(" http://a:1/ ,http://b:2,") == ("http://a:1", "http://b:2")
    assert upstream_urls(("https://c",)) == ("https://c",)
    for bad in ("", " , ", "a:11434", "ftp://x"):
        with pytest.raises(ValueError):
            upstream_urls(bad)


@pytest.mark.parametrize("url, here", [
    ("http://127.0.0.1:11434", True), ("http://127.8.9.1", True), ("http://[::1]:8000", True),
    ("http://localhost:8000", True), ("http://LOCALHOST", True), ("http://host.docker.internal:11434", True),
    (f"http://{socket.gethostname()}:8000", True),
    ("http://10.0.0.7:8000", False), ("http://gpu-box:8000", False), ("https://llm.example.org/v1", False),
])
def test_which_urls_are_this_machine(url, here):
    assert runs_on_this_machine(url) is here


def test_a_remote_ollama_or_tts_does_not_take_the_local_slot():
    remote = Config(env={"AISTACK_OLLAMA_URL": "http://gpu-box:11434", "AISTACK_QWEN3_TTS_URL": "http://10.0.0.5:17860"})
    assert not aistack_plugins.ollama.make_upstream(remote).uses_local_gpu
    assert not aistack_plugins.qwen3_tts.make_upstream(remote).uses_local_gpu
    mixed = Config(env={"AISTACK_OLLAMA_URL": "http://gpu-box:11434,http://127.0.0.1:11434"})
    assert aistack_plugins.ollama.make_upstream(mixed).uses_local_gpu  # it may end up computing here
    assert aistack_plugins.ollama.make_upstream(Config()).uses_local_gpu


def test_doctor_checks_each_replica(tmp_path):
    from aistack_core.doctor import run_checks
    from aistack_core.plugins import load_plugins

    from .nginx_runner import ROOT, stop, wait_port

    port = free_port()
    emulator = subprocess.Popen([sys.executable, "-m", "tests.upstreams.ollama", "--port", str(port)], cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        wait_port(port, emulator, "the Ollama emulator")
        dead, alive = refused_url(), f"http://127.0.0.1:{port}"
        plugins = load_plugins(load_entrypoints=False)
        plugins.register(aistack_plugins.ollama, name="ollama")
        config = Config(env={"AISTACK_OLLAMA_URL": f"{dead},{alive}"}, obs_log_dir=tmp_path / "logs", upload_dir=tmp_path,
                        tts_cache_dir=tmp_path / "cache", obs_payload_dir=tmp_path / "payloads")
        checks = {check.name: check for check in run_checks(config, plugins) if check.name.startswith("upstream")}
    finally:
        stop(emulator)
    assert checks[f"upstream ollama ({alive})"].status == "ok" and "qwen3:4b" in checks[f"upstream ollama ({alive})"].detail
    assert checks[f"upstream ollama ({dead})"].status == "warn"
