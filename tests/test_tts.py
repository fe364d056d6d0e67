"""In-process text-to-speech over HTTP with the real Piper plugin (and the official client)."""

from __future__ import annotations

import asyncio
import io
import json
import struct
import time

import aiohttp
import av
import pytest
from openai import AsyncOpenAI

import aistack_plugins.faster_whisper as faster_whisper_plugin
import aistack_plugins.piper as piper_plugin
from aistack_core.media import audio
from aistack_core.context import slot_key

from .helpers import SENTENCES, BackendPlugin, SlowAsr, word_error_rate
from .test_core import assert_envelope

PIPER = {"piper": piper_plugin}


@pytest.fixture
async def tts_client(make_client):
    return await make_client(plugins=PIPER)


def openai_client(client) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"http://{client.server.host}:{client.server.port}/v1", api_key="unused", max_retries=0)


def decoded_duration(data: bytes, fmt: str, sample_rate: int = 22050) -> float:
    if fmt == "pcm":
        return len(data) / 2 / sample_rate
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        return samples / stream.codec_context.sample_rate


async def speak(client, **fields):
    body = {"model": "tts-1", "voice": "alloy", "input": SENTENCES[0], **fields}
    response = await client.post("/v1/audio/speech", json=body)
    # Speech streams by default: the slot is held until the body has been sent.
    await response.read()
    return response


@pytest.mark.parametrize("fmt, content_type", list(audio.CONTENT_TYPES.items()))
async def test_every_format_decodes_to_plausible_audio(tts_client, fmt, content_type):
    response = await speak(tts_client, response_format=fmt)
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"] == content_type
    seconds = decoded_duration(await response.read(), fmt)
    assert 1.5 < seconds < 6.0, seconds


async def test_default_format_is_mp3_and_models_listed(tts_client):
    response = await tts_client.post("/v1/audio/speech", json={"model": "tts-1", "voice": "alloy", "input": "Hi."})
    assert response.headers["Content-Type"] == "audio/mpeg"
    ids = {m["id"]: m for m in (await (await tts_client.get("/v1/models")).json())["data"]}
    piper_entry = ids["piper-en_US-joe-medium"]
    assert piper_entry["capabilities"] == ["tts"] and "languages" not in piper_entry
    voices = await (await tts_client.get("/v1/voices")).json()
    assert voices["default_model"] == "piper-en_US-joe-medium"
    assert "en_US-joe-medium" in voices["data"][0]["voices"]


async def test_speed_two_is_about_half_as_long(tts_client):
    durations = {}
    for speed in (1.0, 2.0):
        response = await speak(tts_client, response_format="wav", speed=speed, input=" ".join(SENTENCES[:2]))
        durations[speed] = decoded_duration(await response.read(), "wav")
    assert 0.42 < durations[2.0] / durations[1.0] < 0.58, durations


async def test_voices_openai_names_installed_names_and_unknown(tts_client):
    for voice in ("alloy", "cedar", "en_US-joe-medium", "JOE"):
        response = await speak(tts_client, voice=voice, response_format="pcm", input="Hello.")
        assert response.status == 200, (voice, await response.text())
    response = await speak(tts_client, voice="darth", input="Hello.")
    error = assert_envelope(await response.json(), "malformed")
    assert "darth" in error["message"] and "alloy" in error["message"] and "en_US-joe-medium" in error["message"]


async def test_client_errors(tts_client):
    cases = [
        ({"input": ""}, 400, "malformed", "input"),
        ({"input": None}, 400, "malformed", "input"),
        ({"input": "x" * 4097}, 413, "overflow", "4096"),
        ({"speed": 5}, 400, "malformed", "speed"),
        ({"speed": 0.1}, 400, "malformed", "speed"),
        ({"speed": "fast"}, 400, "malformed", "speed"),
        ({"response_format": "ogg"}, 400, "malformed", "response_format"),
        ({"ref_audio": "data:audio/wav;base64,AAAA"}, 400, "malformed", "clone"),
        ({"speaker_wav": "/tmp/me.wav"}, 400, "malformed", "clone"),
    ]
    for fields, status, kind, needle in cases:
        response = await speak(tts_client, **fields)
        assert response.status == status, (fields, await response.text())
        assert needle in assert_envelope(await response.json(), kind)["message"]
    broken = await tts_client.post("/v1/audio/speech", data=b"{not json", headers={"Content-Type": "application/json"})
    assert broken.status == 400


async def test_openai_client_create_and_streaming_response(tts_client):
    client = openai_client(tts_client)
    speech = await client.audio.speech.create(model="tts-1", voice="alloy", input=SENTENCES[1], response_format="wav")
    assert decoded_duration(speech.content, "wav") > 1.5
    async with client.audio.speech.with_streaming_response.create(
        model="tts-1-hd", voice="nova", input=SENTENCES[2], response_format="flac"
    ) as response:
        data = b"".join([chunk async for chunk in response.iter_bytes()])
    assert decoded_duration(data, "flac") > 1.5


async def test_streaming_wav_header_and_first_chunk_before_the_end(tts_client):
    text = " ".join(SENTENCES * 2)  # ten sentences
    response = await tts_client.post(
        "/v1/audio/speech", json={"model": "tts-1", "voice": "alloy", "input": text, "response_format": "wav",
                                  "stream": True, "cache": False},
    )
    assert response.status == 200 and response.headers["Content-Type"] == "audio/wav"
    header = await response.content.readexactly(44)
    assert header[:4] == b"RIFF" and struct.unpack("<I", header[4:8])[0] == 0xFFFFFFFF
    assert header[8:16] == b"WAVEfmt " and header[36:40] == b"data"
    assert struct.unpack("<I", header[40:44])[0] == 0xFFFFFFFF
    first_audio = await response.content.readany()
    # The first sentence's audio is here while the rest is still being synthesized.
    still_synthesizing = not tts_client.app[slot_key].is_free
    rest = await response.read()
    assert first_audio and still_synthesizing
    assert tts_client.app[slot_key].is_free
    assert (len(first_audio) + len(rest)) / 2 / 22050 > 10


async def test_stream_endpoint_pcm_and_sse(tts_client):
    response = await tts_client.post("/v1/audio/speech/stream", json={
        "model": "piper", "voice": "joe", "input": "One. Two.", "response_format": "pcm"})
    assert response.headers["Content-Type"] == "audio/pcm" and len(await response.read()) > 22050
    response = await tts_client.post("/v1/audio/speech", json={
        "model": "tts-1", "voice": "alloy", "input": "One. Two.", "response_format": "pcm",
        "stream": True, "stream_format": "sse"})
    events = [json.loads(line[5:]) for line in (await response.text()).splitlines() if line.startswith("data:")]
    assert [e["type"] for e in events][-1] == "speech.audio.done"
    assert {e["type"] for e in events[:-1]} == {"speech.audio.delta"}


async def test_cache_hit_bypass_and_disabled(make_client, base_config):
    client = await make_client(plugins=PIPER)
    cache_dir = base_config.tts_cache_dir
    first = await speak(client, response_format="opus")
    second = await speak(client, response_format="opus")
    assert first.headers["X-Cache"] == "MISS" and second.headers["X-Cache"] == "HIT"
    assert await first.read() == await second.read()
    entries = sorted(p.name for p in cache_dir.rglob("*") if p.is_file())
    assert len(entries) == 1

    for extra, headers in (({"cache": False}, {}), ({}, {"Cache-Control": "no-cache"}), ({}, {"Cache-Control": "no-store"})):
        body = {"model": "tts-1", "voice": "alloy", "input": f"Bypass {headers or extra}.", **extra}
        response = await client.post("/v1/audio/speech", json=body, headers=headers)
        assert response.headers["X-Cache"] == "BYPASS"
        await response.read()  # streamed: the slot frees once the body is out
    assert sorted(p.name for p in cache_dir.rglob("*") if p.is_file()) == entries  # nothing new on disk


async def test_cache_disabled(make_client, base_config):
    client = await make_client(plugins=PIPER, tts_cache_ttl_min=0)
    response = await speak(client, response_format="pcm")
    assert response.headers["X-Cache"] == "DISABLED"
    assert not base_config.tts_cache_dir.exists()


async def test_corrupt_cache_entry_is_resynthesized(make_client, base_config):
    client = await make_client(plugins=PIPER)
    good = await (await speak(client, response_format="wav")).read()
    for entry in (p for p in base_config.tts_cache_dir.rglob("*") if p.is_file()):
        entry.write_bytes(entry.read_bytes()[:100])
    again = await speak(client, response_format="wav")
    fresh = await again.read()
    # Piper's synthesis is not bit-exact run to run, so compare durations, not bytes.
    assert again.headers["X-Cache"] == "MISS"
    assert abs(decoded_duration(fresh, "wav") - decoded_duration(good, "wav")) < 0.3
    third = await speak(client, response_format="wav")
    assert third.headers["X-Cache"] == "HIT" and await third.read() == fresh


async def test_tts_holds_the_slot(make_client, tmp_path):
    backend = SlowAsr(steps=50, step_s=0.1)
    client = await make_client(plugins={**PIPER, "slow": BackendPlugin(backend)})
    from .helpers import tone_wav
    from .test_core import form

    call = asyncio.create_task(client.post("/v1/audio/transcriptions", data=form(tone_wav(tmp_path / "t.wav"), model="slow-asr")))
    while not backend.running.is_set():
        await asyncio.sleep(0.01)
    response = await speak(client, cache=False)
    assert response.status == 503 and response.headers["Retry-After"] == "5"
    call.cancel()


async def test_round_trip_speech_to_text(make_client, tmp_path):
    client = await make_client(plugins={**PIPER, "faster_whisper": faster_whisper_plugin})
    rates = []
    for text in SENTENCES:
        speech = await (await speak(client, input=text, response_format="mp3")).read()
        form = aiohttp.FormData()
        form.add_field("file", speech, filename="speech.mp3", content_type="audio/mpeg")
        form.add_field("model", "whisper-1")
        result = await (await client.post("/v1/audio/transcriptions", data=form)).json()
        rates.append(word_error_rate(text, result["text"]))
    assert sum(rates) / len(rates) <= 0.2, rates
    assert client.app[slot_key].is_free


async def test_multipart_speech_request_served_in_process(tts_client):
    fields = (("model", "tts-1"), ("voice", "alloy"), ("input", "Hello there."), ("response_format", "wav"))
    for multipart in (True, False):  # multipart/form-data, then urlencoded
        form = aiohttp.FormData(default_to_multipart=multipart)
        for key, value in fields:
            form.add_field(key, value)
        response = await tts_client.post("/v1/audio/speech", data=form)
        assert response.status == 200 and response.headers["Content-Type"] == "audio/wav"
        assert decoded_duration(await response.read(), "wav") > 0.5
    with_clone = aiohttp.FormData()
    for key, value in (("model", "tts-1"), ("input", "Hello there.")):
        with_clone.add_field(key, value)
    with_clone.add_field("audio_sample", b"RIFF....", filename="me.wav", content_type="audio/wav")
    refused = await tts_client.post("/v1/audio/speech", data=with_clone)
    assert refused.status == 400 and "clone" in (await refused.json())["error"]["message"]


async def test_unspeakable_and_odd_input_is_a_client_error(tts_client):
    for text, needle in (("...", "spoken"), ("a\u0000b", "control"), ("a\ud800b", "surrogate")):
        body = json.dumps({"model": "tts-1", "voice": "alloy", "input": text, "response_format": "wav", "cache": False})
        response = await tts_client.post("/v1/audio/speech", data=body, headers={"Content-Type": "application/json"})
        assert response.status == 400, (text, await response.text())
        assert needle in assert_envelope(await response.json(), "malformed")["message"]
    for raw in (b'{"model":"tts-1","input":"hi","speed":' + b"9" * 5000 + b"}", b"[" * 100000):
        response = await tts_client.post("/v1/audio/speech", data=raw, headers={"Content-Type": "application/json"})
        assert response.status == 400


async def test_sse_stream_format_alone_streams(tts_client):
    response = await speak(tts_client, input="Hello.", response_format="pcm", stream_format="sse", cache=False)
    assert response.content_type == "text/event-stream"
    assert "speech.audio.done" in await response.text()
