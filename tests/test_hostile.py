"""A hostile client against the gateway (issue 12), over real HTTP and raw sockets.

Each test is one attack: a small body or file made for it, sent the way a
careless or malicious client would, and the answer checked against what
the gateway promises — a 4xx envelope instead of a 500, a secret that
stays home, a slot that is freed, a connection that is closed, a stream
that never looks complete when it broke.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
import wave
import zlib
from pathlib import Path

import aiohttp
import attrs
import numpy as np
import pytest
from aiohttp import web

import aistack_plugins.ollama
import aistack_plugins.qwen3_tts
from aistack_core import ModelCard, Unknown
from aistack_core.app import create_app
from aistack_core.context import model_cache_key, slot_key
from aistack_core.observe.middleware import observability_key

from .helpers import BackendPlugin, SlowAsr, tone_wav
from .test_core import assert_envelope
from .test_observe import SineTts, TtsPlugin, capture_folder, flush, prometheus_samples, utc_today
from .upstreams import FAULT_HEADER, Faults, free_port, refused_url, run_gateway
from .upstreams.ollama import OllamaEmulator
from .upstreams.vllm_omni import VllmOmniEmulator

KEY = "sk-gateway-3e1d7c"
QWEN = "qwen3-tts-12hz-0.6b-customvoice"
ROOT = Path(__file__).resolve().parent.parent


# --- shared set-up --------------------------------------------------------------


class BrowserMindedOllama(OllamaEmulator):
    """Ollama started with OLLAMA_ORIGINS=* answers with its own CORS headers; some
    reverse proxies in front of it add cookies.  Neither may reach the gateway's client."""

    def make_app(self) -> web.Application:
        app = super().make_app()

        async def add_browser_headers(request: web.Request, response: web.StreamResponse) -> None:
            response.headers["Access-Control-Allow-Origin"] = "*"
            response.headers["Access-Control-Allow-Credentials"] = "true"
            response.headers["Access-Control-Expose-Headers"] = "X-Upstream-Secret"
            response.headers.add("Set-Cookie", "session=upstream-cookie; Path=/")

        app.on_response_prepare.append(add_browser_headers)
        return app


class QueueFullOllama(OllamaEmulator):
    """Ollama with OLLAMA_MAX_QUEUE reached: 503 and a Retry-After of its own."""

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": "server busy, please try again.  maximum pending requests exceeded"},
                                 status=503, headers={"Retry-After": "2"})


@pytest.fixture
async def upstreams():
    """A vLLM-Omni and an Ollama emulator (the Ollama one switchable by class)."""

    @contextlib.asynccontextmanager
    async def start(ollama_class=OllamaEmulator):
        tts, ollama = VllmOmniEmulator(), ollama_class()
        async with tts.running(), ollama.running():
            yield tts, ollama

    return start


@pytest.fixture
async def gateway(base_config, plugin_set):
    """``await gateway(tts_url, ollama_url, plugins={...}, **config)``: served the way `aistack serve` serves."""
    async with contextlib.AsyncExitStack() as stack:

        async def factory(tts_url: str | None = None, ollama_url: str | None = None, *, plugins=None, **overrides):
            if tts_url is not None:
                plugin_set.register(aistack_plugins.qwen3_tts, name="qwen3_tts")
            if ollama_url is not None:
                plugin_set.register(aistack_plugins.ollama, name="ollama")
            for name, plugin in (plugins or {}).items():
                plugin_set.register(plugin, name=name)
            base_config.upload_dir.mkdir(parents=True, exist_ok=True)
            env = {"AISTACK_QWEN3_TTS_URL": tts_url or refused_url(), "AISTACK_OLLAMA_URL": ollama_url or refused_url(),
                   **overrides.pop("env", {})}
            config = attrs.evolve(base_config, **overrides, env=env)
            return await stack.enter_async_context(run_gateway(create_app(config, plugins=plugin_set)))

        yield factory


def peak_rss_mb() -> float:
    """This process's peak resident memory (the in-process server's), from /proc."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def reset_peak_rss() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def multipart(parts: list[tuple[bytes, bytes]], boundary: bytes = b"hostile-boundary") -> tuple[bytes, str]:
    """A multipart body from (raw header block, payload) pairs, byte for byte as given."""
    body = b""
    for headers, payload in parts:
        body += b"--" + boundary + b"\r\n" + headers + b"\r\n\r\n" + payload + b"\r\n"
    body += b"--" + boundary + b"--\r\n"
    return body, f"multipart/form-data; boundary={boundary.decode()}"


def file_part(data: bytes, filename: bytes = b"a.wav", name: bytes = b"file") -> tuple[bytes, bytes]:
    return (b'Content-Disposition: form-data; name="' + name + b'"; filename="' + filename + b'"\r\n'
            b"Content-Type: audio/wav", data)


def text_part(name: str, value: str) -> tuple[bytes, bytes]:
    return (f'Content-Disposition: form-data; name="{name}"'.encode(), value.encode())


def wav_bytes(seconds: float = 0.5, rate: int = 16000) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        t = np.arange(int(seconds * rate)) / rate
        out.writeframes((3000 * np.sin(2 * np.pi * 330 * t)).astype(np.int16).tobytes())
    return buffer.getvalue()


def raw_exchange(port: int, request: bytes, *, read_timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as sock:
        sock.sendall(request)
        chunks = []
        with contextlib.suppress(socket.timeout, ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and _complete(b"".join(chunks)):
                    break
        return b"".join(chunks)


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    if head.startswith(b"HTTP/1.1 100"):
        return _complete(body) if body else False
    match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    return match is not None and len(body) >= int(match.group(1))


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def envelope_of(response: bytes) -> dict:
    head, _, body = response.partition(b"\r\n\r\n")
    if head.startswith(b"HTTP/1.1 100"):
        return envelope_of(body)
    return json.loads(body)


# --- client mistakes: 400/401 with the envelope, never a 500 ----------------------------


ASR_URL = "/v1/audio/transcriptions"


async def test_multipart_with_a_broken_header_line_is_a_400(make_client, base_config):
    client = await make_client(plugins={"asr": BackendPlugin(SlowAsr(steps=1, step_s=0.01))})
    for broken in (b"Content-Disposition form-data no colon here", b"\x00\xff: \xfe",
                   b"Content-Disposition: form-data; name=\"file\r\n broken continuation"):
        body, content_type = multipart([(broken, wav_bytes()), text_part("model", "slow-asr")])
        response = await client.post(ASR_URL, data=body, headers={"Content-Type": content_type})
        assert response.status == 400, (broken, await response.text())
        assert_envelope(await response.json(), "malformed")
    assert leftovers(base_config.upload_dir) == []


async def test_nul_in_a_filename_is_not_a_500(make_client, base_config):
    client = await make_client(plugins={"asr": BackendPlugin(SlowAsr(steps=1, step_s=0.01))})
    body, content_type = multipart([file_part(wav_bytes(), filename=b"evil\x00.wav/../../etc/passwd"),
                                    text_part("model", "slow-asr")])
    response = await client.post(ASR_URL, data=body, headers={"Content-Type": content_type})
    # The name is only a label: either refused as a 400 or served with the NUL gone.
    assert response.status in (200, 400), await response.text()
    if response.status == 400:
        assert_envelope(await response.json(), "malformed")
    assert leftovers(base_config.upload_dir) == []


async def test_nested_multipart_in_a_transcription_is_a_400(make_client, base_config):
    client = await make_client(plugins={"asr": BackendPlugin(SlowAsr(steps=1, step_s=0.01))})
    inner, inner_type = multipart([file_part(wav_bytes())], boundary=b"inner-boundary")
    body, content_type = multipart([
        (f'Content-Disposition: form-data; name="file"\r\nContent-Type: {inner_type}'.encode(), inner),
        text_part("model", "slow-asr"),
    ])
    response = await client.post(ASR_URL, data=body, headers={"Content-Type": content_type})
    assert response.status == 400, await response.text()
    assert_envelope(await response.json(), "malformed")
    assert leftovers(base_config.upload_dir) == []


def not_deflate() -> bytes:
    return b"this is plain text pretending to be deflate \x00\x01\x02" * 4


async def every_body_route(gateway, tts, ollama):
    """A gateway with in-process ASR and speech and both proxies; the routes that read a body, as
    ``{what: (path, content type, a valid body)}``."""
    client = await gateway(tts.url, ollama.url, plugins={
        "asr": BackendPlugin(SlowAsr(steps=1, step_s=0.01)), "tts": TtsPlugin(SineTts()),
    })
    body, content_type = multipart([file_part(wav_bytes()), text_part("model", "slow-asr")])
    return client, {
        "asr": (ASR_URL, content_type, body),
        "speech": ("/v1/audio/speech", "application/json", b'{"model": "sine", "input": "hi"}'),
        "chat": ("/v1/chat/completions", "application/json", b'{"model": "m", "messages": []}'),
        "voices upload (catch-all proxy)": ("/v1/audio/voices", content_type, body),
    }


async def test_bad_deflate_is_a_400_everywhere(gateway, upstreams, base_config):
    async with upstreams() as (tts, ollama):
        client, routes = await every_body_route(gateway, tts, ollama)
        for what, (path, ctype, _) in routes.items():
            for encoding in ("deflate", "gzip"):
                response = await client.post(path, data=not_deflate(), headers={
                    "Content-Type": ctype, "Content-Encoding": encoding})
                text = await response.text()
                assert response.status == 400, (what, encoding, response.status, text)
                error = assert_envelope(json.loads(text), "malformed")
                assert error["provider"] == "aistack", (what, error)
        assert not tts.received("/v1/audio/voices"), "a body that does not inflate must not be forwarded"
        assert leftovers(base_config.upload_dir) == []


async def test_a_coding_the_server_cannot_decode_is_a_415_everywhere(gateway, upstreams, base_config):
    # aiohttp decodes gzip and deflate; any other coding would reach the routes as raw bytes.
    async with upstreams() as (tts, ollama):
        client, routes = await every_body_route(gateway, tts, ollama)
        for what, (path, ctype, data) in routes.items():
            for encoding in ("compress", "zstdx", "gzip, zstdx"):
                response = await client.post(path, data=data, headers={
                    "Content-Type": ctype, "Content-Encoding": encoding})
                text = await response.text()
                assert response.status == 415, (what, encoding, response.status, text)
                error = assert_envelope(json.loads(text), "malformed")
                assert error["code"] == "unsupported_content_encoding" and "gzip" in error["message"], error
        assert not tts.received("/v1/audio/voices") and not ollama.received("/api/chat")
        assert leftovers(base_config.upload_dir) == []
        # An expectation other than 100-continue: 417, in the envelope too.
        response = await client.post("/v1/chat/completions", data=b"{}", headers={
            "Content-Type": "application/json", "Expect": "200-ok"})
        assert response.status == 417
        assert assert_envelope(await response.json(), "malformed")["code"] == "unsupported_expectation"


async def test_gzip_bomb_upload_is_refused_before_it_fills_the_disk(make_client, base_config):
    """917 KB of gzip that inflates to 900 MB: refused as 413, and the spool never grows past the limit."""
    client = await make_client(plugins={"asr": BackendPlugin(SlowAsr(steps=1, step_s=0.01))})
    boundary = b"bomb-boundary"
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip container
    head = (b"--" + boundary + b"\r\n" + file_part(b"")[0] + b"\r\n\r\nRIFF")
    body = compressor.compress(head)
    block = bytes(1 << 20)
    for _ in range(900):
        body += compressor.compress(block)
    body += compressor.compress(b"\r\n--" + boundary + b"--\r\n") + compressor.flush()
    assert len(body) < 1_000_000
    observed_peak = 0

    async def watch_spool():
        nonlocal observed_peak
        while True:
            for path in base_config.upload_dir.glob("*"):
                with contextlib.suppress(FileNotFoundError):
                    observed_peak = max(observed_peak, path.stat().st_size)
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch_spool())
    reset_peak_rss()
    rss_before = peak_rss_mb()
    try:
        response = await client.post(ASR_URL, data=body, headers={
            "Content-Type": f"multipart/form-data; boundary={boundary.decode()}", "Content-Encoding": "gzip"})
        assert response.status == 413, await response.text()
        error = assert_envelope(await response.json(), "overflow")
        assert "decompress" in error["message"]
    finally:
        watcher.cancel()
    assert observed_peak < 64 * 1024 * 1024, observed_peak
    assert peak_rss_mb() - rss_before < 200, "inflating the bomb cost the server memory"
    assert leftovers(base_config.upload_dir) == []


async def test_modest_gzip_upload_is_still_served(make_client, base_config, tmp_path):
    client = await make_client(plugins={"asr": BackendPlugin(SlowAsr(steps=1, step_s=0.01))})
    body, content_type = multipart([file_part(wav_bytes(2.0)), text_part("model", "slow-asr")])
    response = await client.post(ASR_URL, data=gzip.compress(body), headers={
        "Content-Type": content_type, "Content-Encoding": "gzip"})
    assert response.status == 200, await response.text()
    assert leftovers(base_config.upload_dir) == []


async def test_unwritable_upload_dir_is_a_503_naming_the_setting(make_client, tmp_path):
    not_a_folder = tmp_path / "uploads-is-a-file"
    not_a_folder.write_text("occupied")
    client = await make_client(plugins={"asr": BackendPlugin(SlowAsr(steps=1, step_s=0.01))},
                               upload_dir=not_a_folder / "inside")
    body, content_type = multipart([file_part(wav_bytes()), text_part("model", "slow-asr")])
    response = await client.post(ASR_URL, data=body, headers={"Content-Type": content_type})
    assert response.status == 503, await response.text()
    error = assert_envelope(await response.json(), "network")
    assert "AISTACK_UPLOAD_DIR" in error["message"] and error["code"] == "upload_dir_unwritable"


async def test_speech_content_type_with_odd_characters_is_a_400(gateway, upstreams):
    async with upstreams() as (tts, ollama):
        client = await gateway(tts.url, plugins={"tts": TtsPlugin(SineTts())})
        body = json.dumps({"model": "sine-tts", "input": "Hello there."}).encode()
        for content_type in (b"application/json; charset=\xe2\x98\x83", b"multipart/form-data; boundary=\xe2\x98\x83",
                             b"multipart/form-data; boundary=\xff\xfe", b"\xc3\xa9/\xc3\xa9"):
            request = (b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: " + content_type +
                       b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
            answer = await asyncio.to_thread(raw_exchange, client.port, request)
            status = status_of(answer)
            # JSON with an odd charset parameter is still JSON; a multipart boundary nobody can use is a 400.
            assert status in (200, 400), (content_type, answer[:300])
            if status == 400:
                assert_envelope(envelope_of(answer), "malformed")


async def test_non_utf8_authorization_is_a_401(gateway):
    client = await gateway(api_key=KEY)
    for value in (b"Bearer \xff\xfe\xfd", b"Bearer " + KEY.encode() + b"\xc3", b"\xff\xff \xff", b"Basic \x80"):
        request = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: " + value + b"\r\nConnection: close\r\n\r\n"
        answer = await asyncio.to_thread(raw_exchange, client.port, request)
        assert status_of(answer) == 401, (value, answer[:300])
        assert_envelope(envelope_of(answer), "malformed")
    ok = await client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status == 200


# --- secrets and isolation ---------------------------------------------------------------


async def test_gateway_key_never_reaches_an_upstream(gateway, upstreams):
    async with upstreams() as (tts, ollama):
        client = await gateway(tts.url, ollama.url, api_key=KEY)
        auth = {"Authorization": f"Bearer {KEY}", "Cookie": "aistack=session", "X-Api-Key": KEY}
        chat = await client.post(f"/v1/chat/completions?api_key={KEY}&keep=1", headers=auth, json={
            "model": "llama3.2:1b", "messages": [{"role": "user", "content": "Say hi."}]})
        assert chat.status == 200, await chat.text()
        speech = await client.post(f"/v1/audio/speech?key={KEY}", headers=auth, json={
            "model": QWEN, "input": "A sentence for the upstream.", "response_format": "wav"})
        assert speech.status == 200, await speech.text()
        voices = await client.get(f"/v1/audio/voices?token={KEY}", headers=auth)
        assert voices.status == 200
        async with client.ws_connect(f"/v1/audio/speech/stream?api_key={KEY}", headers=auth) as ws:
            await ws.close()
        seen = [*ollama.requests, *tts.requests]
        assert len([r for r in seen if r.path != "/api/tags" and r.path != "/health"]) >= 3
        for received in seen:
            everything = received.query + " ".join(f"{k}: {v}" for k, v in received.headers.items())
            assert KEY not in everything, (received.path, everything)
            assert "aistack=session" not in everything
        assert "keep=1" in ollama.last("/v1/chat/completions").query


@pytest.mark.parametrize("cors", [(), ("https://app.example",)])
async def test_upstream_cors_and_cookies_never_reach_the_browser(gateway, upstreams, cors):
    async with upstreams(BrowserMindedOllama) as (tts, ollama):
        if True:
            client = await gateway(tts.url, ollama.url, cors_allow_origins=cors)
            response = await client.post("/v1/chat/completions", headers={"Origin": "https://evil.example"}, json={
                "model": "llama3.2:1b", "messages": [{"role": "user", "content": "hi"}]})
            assert response.status == 200
            assert "Set-Cookie" not in response.headers
            assert "Access-Control-Allow-Origin" not in response.headers
            assert "Access-Control-Allow-Credentials" not in response.headers
            assert "Access-Control-Expose-Headers" not in response.headers
            if cors:
                assert "Origin" in response.headers.getall("Vary", ())
                allowed = await client.post("/v1/chat/completions", headers={"Origin": "https://app.example"},
                                            json={"model": "llama3.2:1b", "messages": []})
                assert allowed.headers.getall("Access-Control-Allow-Origin") == ["https://app.example"]
                assert "Access-Control-Allow-Credentials" not in allowed.headers
                no_origin = await client.get("/health")
                assert "Origin" in no_origin.headers.getall("Vary", ())


async def test_capture_redacts_keys_in_the_query_even_on_a_401(make_client, tmp_path):
    client = await make_client(api_key=KEY, obs_payload=True)
    response = await client.get(f"/v1/models?api_key={KEY}&access_token={KEY}x&page=2",
                                headers={"X-Request-ID": "cap-401", "X-Goog-Api-Key": KEY})
    assert response.status == 401
    await flush(client, "cap-401")
    folder = capture_folder(tmp_path, "cap-401")
    for path in folder.iterdir():
        assert KEY.encode() not in path.read_bytes(), path.name
    meta = json.loads((folder / "meta.json").read_text())
    assert "page=2" in json.dumps(meta)


async def test_continue_is_sent_only_after_the_key_and_the_size_checks(gateway):
    client = await gateway(api_key=KEY, max_upload_mb=1, plugins={"asr": BackendPlugin(SlowAsr())})

    def ask(headers: bytes) -> bytes:
        request = (b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                   b"Content-Type: multipart/form-data; boundary=b\r\n" + headers + b"\r\n")
        with socket.create_connection(("127.0.0.1", client.port), timeout=3) as sock:
            sock.sendall(request)
            return sock.recv(65536)

    wrong_key = await asyncio.to_thread(ask, b"Content-Length: 500000000\r\nAuthorization: Bearer nope\r\n")
    assert wrong_key.startswith(b"HTTP/1.1 401"), wrong_key[:200]
    too_big = await asyncio.to_thread(ask, f"Content-Length: 500000000\r\nAuthorization: Bearer {KEY}\r\n".encode())
    assert too_big.startswith(b"HTTP/1.1 413"), too_big[:200]
    no_route = (b"POST /v1/nowhere HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 10\r\n"
                b"Authorization: Bearer " + KEY.encode() + b"\r\n\r\n")
    answer = await asyncio.to_thread(raw_exchange, client.port, no_route, read_timeout=3)
    assert answer.startswith(b"HTTP/1.1 404"), answer[:200]
    fits = await asyncio.to_thread(ask, f"Content-Length: 1000\r\nAuthorization: Bearer {KEY}\r\n".encode())
    assert fits.startswith(b"HTTP/1.1 100 Continue"), fits[:200]


# --- observability a client can break -----------------------------------------------------


async def test_lone_surrogate_model_never_breaks_metrics_or_the_log(gateway, upstreams, tmp_path):
    async with upstreams() as (tts, ollama):
        client = await gateway(tts.url, ollama.url, obs_access_log=True, plugins={"tts": TtsPlugin(SineTts())})
        odd = ['"\\ud800"', '"/v1/audio/translations"', '"nonexistent"', '"a\\u0000b"', '"' + "x" * 5000 + '"']
        ids = []
        for number, model in enumerate(odd):
            for path in ("/v1/chat/completions", "/v1/audio/speech"):
                request_id = f"odd-{number}-{path.rsplit('/', 1)[1]}"
                ids.append(request_id)
                body = f'{{"model": {model}, "input": "Hi.", "messages": [{{"role": "user", "content": "hi"}}]}}'
                response = await client.post(path, data=body, headers={
                    "Content-Type": "application/json", "X-Request-ID": request_id})
                assert response.status < 500 or response.status in (502, 503), (model, path, response.status)
        metrics = await client.get("/metrics")
        assert metrics.status == 200, await metrics.text()
        samples = await prometheus_samples(client)
        models = {dict(labels).get("model") for (_, labels) in samples if dict(labels).get("model") is not None}
        assert models <= {"unknown", "sine-tts", "llama3.2:1b"}, models
        await flush(client, *ids)
        lines = (tmp_path / "logs" / f"access-{utc_today()}.jsonl").read_text().splitlines()
        logged = {json.loads(line)["request_id"] for line in lines}
        assert set(ids) <= logged


async def test_upstream_503_is_not_the_slots_busy(gateway, upstreams):
    async with upstreams(QueueFullOllama) as (tts, ollama):
        client = await gateway(tts.url, ollama.url)
        response = await client.post("/v1/chat/completions", json={
            "model": "llama3.2:1b", "messages": [{"role": "user", "content": "hi"}]})
        assert response.status == 503 and response.headers["Retry-After"] == "2"
        assert "maximum pending" in (await response.json())["error"]
        await asyncio.sleep(0.2)
        samples = await prometheus_samples(client)
        classes = {dict(labels).get("class") for (name, labels), value in samples.items()
                   if name == "aistack_requests_total" and value}
        assert "503-busy" not in classes and "5xx" in classes
        assert client.app[slot_key].busy_rejections == 0


async def test_streamed_transcription_logs_what_was_sent(make_client, tmp_path):
    client = await make_client(plugins={"asr": BackendPlugin(SlowAsr(steps=3, step_s=0.02))}, obs_access_log=True)
    wav = tone_wav(tmp_path / "tone.wav", seconds=1.0)
    data = aiohttp.FormData()
    data.add_field("file", wav.read_bytes(), filename="tone.wav", content_type="audio/wav")
    for name, value in (("model", "slow-asr"), ("stream", "true"), ("response_format", "verbose_json")):
        data.add_field(name, value)
    response = await client.post(ASR_URL, data=data, headers={"X-Request-ID": "streamed-asr"})
    body = await response.read()
    assert response.status == 200 and b"transcript.text.done" in body
    await flush(client, "streamed-asr")
    lines = (tmp_path / "logs" / f"access-{utc_today()}.jsonl").read_text().splitlines()
    line = next(json.loads(l) for l in lines if json.loads(l)["request_id"] == "streamed-asr")
    assert line["stream"] is True and line["response_format"] == "verbose_json"
    assert line["bytes_out"] >= len(body) > 0


async def test_one_unserialisable_record_is_skipped_alone(make_client, tmp_path):
    client = await make_client(obs_access_log=True)
    access_log = client.app[observability_key].access_log
    original = access_log.submit

    def poison_every_second(outcome):
        poison_every_second.count += 1
        if poison_every_second.count % 2 == 0:  # json.dumps cannot take an object()
            outcome = attrs.evolve(outcome, measured=attrs.evolve(outcome.measured, requested_model=object()))
        return original(outcome)

    poison_every_second.count = 0
    access_log.submit = poison_every_second
    ids = [f"batch-{i}" for i in range(6)]
    for request_id in ids:
        assert (await client.get("/v1/models", headers={"X-Request-ID": request_id})).status == 200
    await flush(client, *ids)
    lines = (tmp_path / "logs" / f"access-{utc_today()}.jsonl").read_text().splitlines()
    written = {json.loads(line)["request_id"] for line in lines}
    assert len(written & set(ids)) >= 3 and access_log.unserialisable + len(written & set(ids)) == len(ids)


# --- failure paths -------------------------------------------------------------------------


class BreaksAfterFirstChunk(SineTts):
    def __init__(self, model_id: str, error: Exception) -> None:
        super().__init__(model_id=model_id, pieces=5, piece_s=0.2)
        self.error = error

    def synthesize(self, model, options, cancel):
        chunks = super().synthesize(model, options, cancel)
        yield next(chunks)
        raise self.error


@pytest.mark.parametrize("stream_format", ["audio", "sse"])
async def test_tts_stream_that_breaks_never_looks_complete(gateway, stream_format):
    from aistack_core import hookimpl

    class Plugin:
        @hookimpl
        def register_tts_backends(self, register, config):
            register(BreaksAfterFirstChunk("breaks-untyped", RuntimeError("onnx runtime fell over")))
            register(BreaksAfterFirstChunk("breaks-typed", Unknown("the voice engine failed")))

    client = await gateway(plugins={"breaking": Plugin()})
    for model in ("breaks-untyped", "breaks-typed"):
        response = await client.post("/v1/audio/speech", json={
            "model": model, "input": "One. Two. Three.", "stream": True, "stream_format": stream_format,
            "response_format": "pcm", "cache": False})
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
        # The gateway is fine afterwards, and the slot free.
        assert (await client.get("/health")).status == 200
        assert client.app[slot_key].is_free


async def test_failed_chat_does_not_evict_the_speech_model(gateway, tmp_path):
    backend = SlowAsr(steps=1, step_s=0.01)
    client = await gateway(plugins={"asr": BackendPlugin(backend)})  # Ollama: nothing listening
    data = aiohttp.FormData()
    data.add_field("file", wav_bytes(), filename="a.wav", content_type="audio/wav")
    data.add_field("model", "slow-asr")
    assert (await client.post(ASR_URL, data=data)).status == 200
    assert [entry for entry in client.app[model_cache_key].loaded()], "the speech model should be resident"
    chat = await client.post("/v1/chat/completions", json={"model": "llama3.2:1b", "messages": []})
    assert chat.status == 503
    assert_envelope(await chat.json(), "network")
    data = aiohttp.FormData()
    data.add_field("file", wav_bytes(), filename="a.wav", content_type="audio/wav")
    data.add_field("model", "slow-asr")
    assert (await client.post(ASR_URL, data=data)).status == 200
    assert backend.loads == 1, "the speech model was evicted for a chat that never reached Ollama"


async def test_slow_probe_answer_is_kept(gateway, upstreams):
    async with upstreams() as (tts, ollama):
        ollama.faults = Faults(first_byte_delay_s=0.8)
        client = await gateway(None, ollama.url, probe_timeout_s=0.2, probe_cache_s=60)
        first = await client.get("/v1/models")
        assert "llama3.2:1b" not in {m["id"] for m in (await first.json())["data"]}
        await asyncio.sleep(1.0)
        later = await client.get("/v1/models")
        assert "llama3.2:1b" in {m["id"] for m in (await later.json())["data"]}


# --- resources: WebSocket heartbeat and idle limit, TTS cancellation --------------------------


async def wait_until(predicate, timeout_s: float) -> float | None:
    """Seconds until ``predicate()`` held, or None if it never did within ``timeout_s``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if predicate():
            return time.monotonic() - started
        await asyncio.sleep(0.02)
    return None


async def test_websocket_peer_that_stops_answering_pings_is_closed(gateway, upstreams):
    async with upstreams() as (tts, ollama):
        client = await gateway(tts.url, ws_heartbeat_s=0.3, ws_idle_timeout_s=0)
        slot = client.app[slot_key]
        # autoping off and never reading: a peer that vanished without closing.
        ws = await client.ws_connect("/v1/audio/speech/stream", autoping=False)
        try:
            assert await wait_until(lambda: not slot.is_free, 2.0) is not None
            freed = await wait_until(lambda: slot.is_free, 3.0)
            assert freed is not None, "the slot stayed held by a peer that answers no ping"
            session = tts.websocket_sessions[-1]
            assert await wait_until(lambda: session.finished_at is not None, 2.0) is not None
        finally:
            await ws.close()


async def test_websocket_idle_limit_closes_the_session(gateway, upstreams, caplog):
    caplog.set_level(logging.INFO, logger="aistack")
    async with upstreams() as (tts, ollama):
        client = await gateway(tts.url, ws_heartbeat_s=0.2, ws_idle_timeout_s=0.8)
        slot = client.app[slot_key]
        # answers pings, says nothing
        async with client.ws_connect("/v1/audio/speech/stream?access_token=upstream-sekrit&lang=en") as ws:
            opened = time.monotonic()
            message = await ws.receive(timeout=5)
            idle_for = time.monotonic() - opened
            assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), message
            assert ws.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION
            assert 0.7 <= idle_for < 2.5, idle_for
        assert await wait_until(lambda: slot.is_free, 1.0) is not None
        idle_lines = [r.getMessage() for r in caplog.records if "idle for" in r.getMessage()]
        assert idle_lines and "lang=en" in idle_lines[0]
        assert "upstream-sekrit" not in caplog.text, "a credential in the query reached the server log"
        # A session that talks is not idle: messages keep it open past the limit.
        async with client.ws_connect("/v1/audio/speech/stream") as ws:
            reader = asyncio.create_task(ws.receive())  # reading is what answers the pings
            await ws.send_json({"type": "session.config", "voice": "vivian", "response_format": "pcm"})
            for _ in range(4):
                await asyncio.sleep(0.4)
                assert not reader.done(), reader.result()
                await ws.send_json({"type": "input.text", "text": "More words. "})
            reader.cancel()


def test_long_sentences_are_cut_into_small_pieces():
    from aistack_plugins.piper import MAX_PIECE_CHARS, speakable_pieces

    one_sentence = ("the parcel that we sent on Monday, which was heavy and wrapped in brown paper, "
                    "travelled through three cities before it reached the small village by the lake ") * 10
    pieces = speakable_pieces(one_sentence)
    assert len(pieces) >= 10 and all(len(piece) <= MAX_PIECE_CHARS for piece in pieces)
    assert " ".join(pieces).split() == one_sentence.split(), "nothing lost, nothing reordered"
    assert speakable_pieces("Short one. Another short one!") == ["Short one. Another short one!"]
    assert all(len(p) <= MAX_PIECE_CHARS for p in speakable_pieces("x" * 1000))
    assert "".join(speakable_pieces("y" * 1000)) == "y" * 1000


async def test_long_tts_sentence_is_cancelled_within_a_second(gateway):
    """One 1,400-character sentence, streamed; the client hangs up during synthesis."""
    import aistack_plugins.piper

    client = await gateway(plugins={"piper": aistack_plugins.piper})
    slot = client.app[slot_key]
    sentence = ("the orchestra kept playing while the audience, tired but happy after the long evening, "
                "slowly found their coats and walked out into the cold winter night ") * 9
    # No model load inside the measured window: the first request loads the voice.
    warm = await client.post("/v1/audio/speech", json={"model": "piper", "input": "Warm up.", "cache": False})
    assert warm.status == 200
    await warm.read()  # speech streams by default: the slot frees once the body is out
    response = await client.post("/v1/audio/speech", json={
        "model": "piper", "input": sentence, "stream": True, "response_format": "pcm", "cache": False})
    assert response.status == 200
    assert await wait_until(lambda: not slot.is_free, 2.0) is not None
    await asyncio.sleep(0.3)  # mid-piece
    response.close()
    freed_after = await wait_until(lambda: slot.is_free, 5.0)
    assert freed_after is not None and freed_after < 1.0, freed_after


# --- the server itself: raw sockets against `aistack serve` ------------------------------------


FILE_LIMIT_MB = 4


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A real `aistack serve` (no plugins), its port and its log."""
    folder = tmp_path_factory.mktemp("served")
    port = free_port()
    env = {
        **os.environ, "PYTHONPATH": str(ROOT), "AISTACK_LOAD_PLUGINS": "", "AISTACK_PORT": str(port),
        "AISTACK_API_KEY": KEY, "AISTACK_HEADER_TIMEOUT_S": "1.5", "AISTACK_OBS_ACCESS_LOG": "off",
        "AISTACK_UPLOAD_DIR": str(folder / "uploads"), "AISTACK_OBS_LOG_DIR": str(folder / "logs"),
        "AISTACK_TTS_CACHE_DIR": str(folder / "cache"),
    }
    log_path = folder / "server.log"

    def small_disk() -> None:
        # The server's files may grow to FILE_LIMIT_MB only: an upload folder that fills up.
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT_MB << 20, FILE_LIMIT_MB << 20))

    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "aistack_core", "serve"], env=env, stdout=log,
                                   stderr=subprocess.STDOUT, preexec_fn=small_disk)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with contextlib.suppress(OSError):
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                assert process.poll() is None, log_path.read_text()
                time.sleep(0.2)
            yield port, log_path
        finally:
            process.terminate()
            process.wait(timeout=20)


def test_half_sent_request_line_is_closed_after_the_header_timeout(served):
    port, _ = served
    for partial in (b"GET /hea", b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Len"):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            started = time.monotonic()
            sock.sendall(partial)
            try:
                leftover = sock.recv(1024)  # b"" once the server closes
            except ConnectionResetError:
                leftover = b""
            waited = time.monotonic() - started
        assert leftover == b"" or leftover.startswith(b"HTTP/1.1 4"), leftover
        assert 1.0 <= waited < 5.0, waited


def test_slow_headers_cannot_hold_a_connection(served):
    """A client that trickles a header byte now and then is still cut off."""
    port, _ = served
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        started = time.monotonic()
        closed = False
        for byte in b"GET /health HTTP/1.1\r\nX-Slow: " + b"a" * 100:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            time.sleep(0.1)
            if time.monotonic() - started > 6:
                break
        if not closed:
            sock.settimeout(3)
            with contextlib.suppress(ConnectionResetError):
                closed = sock.recv(1024) == b""
    assert closed and time.monotonic() - started < 6


SECRET_IN_BAD_HEADER = b"sk-refused-0123456789"


def test_parser_refusals_are_one_log_line_each(served):
    port, log_path = served
    before = log_path.read_text()
    attacks = {
        "url over 8 KB": b"GET /v1/models?q=" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        "too many headers": b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + b"".join(
            b"X-H%d: v\r\n" % i for i in range(300)) + b"\r\n",
        "TE with CL": (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        "unknown Content-Encoding": (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                                     b"Content-Encoding: br\r\n\r\n{}"),
        "header line over 8 KB": b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n",
        "a key with a control character": b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                                          + SECRET_IN_BAD_HEADER + b"\x01\r\n\r\n",
        "a key in a broken request line": b"GET /v1/models?api_key=" + SECRET_IN_BAD_HEADER + b" HTTP/7.7\r\n\r\n",
    }
    for what, request in attacks.items():
        answer = raw_exchange(port, request, read_timeout=3)
        assert re.match(rb"HTTP/1\.[01] 4\d\d ", answer), (what, answer[:200])
        # In the envelope like every other error, though the app never saw the request.
        error = envelope_of(answer)["error"]
        assert error["kind"] in ("malformed", "overflow") and error["code"] in ("bad_http_request",
                                                                                  "request_too_large"), (what, error)
        assert error["message"].startswith(("The request is not valid HTTP", "The request is too large")), error
        assert SECRET_IN_BAD_HEADER not in answer, (what, answer[:300])
    time.sleep(0.5)
    new_lines = log_path.read_text()[len(before):].splitlines()
    assert not any("Traceback" in line for line in new_lines), "\n".join(new_lines)
    # aiohttp quotes the bytes it refused; the key in them reaches neither the answer nor the log.
    assert SECRET_IN_BAD_HEADER.decode() not in "\n".join(new_lines)
    refusals = [line for line in new_lines if "refused a malformed request" in line]
    assert len(refusals) == len(attacks), "\n".join(new_lines)
    assert all(" ERROR " not in line for line in refusals)
    # Still serving.
    assert status_of(raw_exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")) == 200


def test_expect_continue_on_a_real_server_waits_for_the_key(served):
    port, _ = served
    request = (b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
               b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 500000000\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        first = sock.recv(65536)
    assert first.startswith(b"HTTP/1.1 401"), first[:200]
    assert b"100 Continue" not in first


def test_full_upload_dir_is_a_503_naming_the_setting(served):
    port, _ = served
    body, content_type = multipart([file_part(bytes(FILE_LIMIT_MB * 1024 * 1024 + 4096)), text_part("model", "x")])
    request = (b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
               b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Type: " + content_type.encode() +
               b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    answer = raw_exchange(port, request, read_timeout=20)
    assert status_of(answer) == 503, answer[:400]
    error = envelope_of(answer)["error"]
    assert error["code"] == "upload_dir_unwritable" and "AISTACK_UPLOAD_DIR" in error["message"]


def two_phase_exchange(port: int, head: bytes, tail: bytes, pause_s: float = 0.4) -> bytes:
    """Headers and the start of the body, a pause (the handler is reading now), then the rest."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head)
        time.sleep(pause_s)
        with contextlib.suppress(OSError):
            sock.sendall(tail)
        chunks = []
        with contextlib.suppress(socket.timeout, ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                if _complete(b"".join(chunks)):
                    break
        return b"".join(chunks)


@pytest.mark.parametrize("how", ["stalled", "broken chunk"])
async def test_a_body_that_stops_arriving_ends_the_request(gateway, upstreams, base_config, caplog, how):
    """A body that stalls (or whose chunked framing breaks mid-way: aiohttp's parser then tells
    no one) ends with a 408 after the body idle timeout; the slot and the upload are freed."""
    async with upstreams() as (tts, ollama):
        client = await gateway(tts.url, ollama.url, plugins={"asr": BackendPlugin(SlowAsr(steps=1, step_s=0.01))},
                               env={"AISTACK_BODY_IDLE_TIMEOUT_S": "1"})
        body, content_type = multipart([file_part(wav_bytes()), text_part("model", "slow-asr")])
        for path, ctype in ((ASR_URL, content_type), ("/v1/chat/completions", "application/json"),
                            ("/v1/audio/voices", content_type)):
            head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
                    "Transfer-Encoding: chunked\r\n\r\n").encode() + b"10\r\n" + body[:16] + b"\r\n"
            tail = b"zz-not-hex\r\n" if how == "broken chunk" else b""
            started = time.monotonic()
            answer = await asyncio.to_thread(two_phase_exchange, client.port, head, tail)
            assert re.match(rb"HTTP/1\.[01] 408 ", answer), (path, answer[:300])
            assert_envelope(envelope_of(answer), "malformed")
            assert time.monotonic() - started < 4
            assert client.app[slot_key].is_free
        assert (await client.get("/health")).status == 200
        assert leftovers(base_config.upload_dir) == []
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("aistack")], \
            caplog.text
