"""Speech-to-text over HTTP with the real faster-whisper plugin and Piper-made speech."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import aiohttp
import numpy as np
import pytest
from openai import AsyncOpenAI

import aistack_plugins.faster_whisper as faster_whisper_plugin
from aistack_core.media import audio
from aistack_core.app import create_app
from aistack_core.context import model_cache_key, slot_key

from .upstreams import serve
from .helpers import sse_events, SENTENCES, BackendPlugin, SlowAsr, synthesize_pcm, tone_wav, word_error_rate, write_wav
from .test_core import assert_envelope, form

WHISPER = {"faster_whisper": faster_whisper_plugin}


@pytest.fixture
async def whisper_client(make_client):
    return await make_client(plugins=WHISPER)


def openai_client(client) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"http://{client.server.host}:{client.server.port}/v1", api_key="unused", max_retries=0)


async def test_word_error_rate_on_synthesized_sentences(whisper_client, sentences_wav):
    rates = []
    for text, path in sentences_wav:
        response = await whisper_client.post("/v1/audio/transcriptions", data=form(path, model="whisper-tiny.en"))
        assert response.status == 200
        rates.append(word_error_rate(text, (await response.json())["text"]))
    assert np.mean(rates) <= 0.2, rates


async def test_response_formats(whisper_client, sentences_wav):
    text, path = sentences_wav[1]
    post = lambda fmt: whisper_client.post(  # noqa: E731
        "/v1/audio/transcriptions", data=form(path, model="whisper-1", response_format=fmt)
    )
    as_json = await (await post("json")).json()
    assert set(as_json) == {"text", "usage"} and word_error_rate(text, as_json["text"]) <= 0.2
    assert as_json["usage"]["type"] == "duration" and as_json["usage"]["seconds"] > 0

    verbose = await (await post("verbose_json")).json()
    assert verbose["task"] == "transcribe" and verbose["language"] == "en"
    assert abs(verbose["duration"] - audio.probe(path).duration) < 0.05
    assert verbose["segments"] and verbose["words"]
    for segment in verbose["segments"]:
        assert {"id", "start", "end", "text", "avg_logprob", "no_speech_prob"} <= set(segment)
    starts = [w["start"] for w in verbose["words"]]
    assert starts == sorted(starts)
    assert all(0 <= w["start"] <= w["end"] <= verbose["duration"] + 0.01 for w in verbose["words"])

    plain = await post("text")
    assert plain.content_type == "text/plain" and word_error_rate(text, await plain.text()) <= 0.2

    srt = await (await post("srt")).text()
    assert srt.startswith("1\n00:00:0") and " --> " in srt and "," in srt.splitlines()[1]
    vtt = await (await post("vtt")).text()
    assert vtt.startswith("WEBVTT\n\n00:00:0") and " --> " in vtt


async def test_openai_client_unchanged(whisper_client, sentences_wav):
    text, path = sentences_wav[2]
    client = openai_client(whisper_client)
    result = await client.audio.transcriptions.create(model="whisper-1", file=path.open("rb"))
    assert word_error_rate(text, result.text) <= 0.2
    verbose = await client.audio.transcriptions.create(
        model="whisper-1", file=path.open("rb"), response_format="verbose_json", timestamp_granularities=["word"]
    )
    assert verbose.words and verbose.segments
    srt = await client.audio.transcriptions.create(model="whisper-1", file=path.open("rb"), response_format="srt")
    assert " --> " in srt

    stream = await client.audio.transcriptions.create(model="whisper-1", file=path.open("rb"), stream=True)
    kinds, deltas, done = [], [], None
    async for event in stream:
        kinds.append(event.type)
        if event.type == "transcript.text.delta":
            deltas.append(event.delta)
        elif event.type == "transcript.text.done":
            done = event
    assert kinds[-1] == "transcript.text.done" and set(kinds[:-1]) == {"transcript.text.delta"}
    assert word_error_rate(text, " ".join(deltas)) <= 0.2 and done.text


async def test_sse_event_sequence(whisper_client, sentences_wav):
    path = sentences_wav[0][1]
    response = await whisper_client.post("/v1/audio/transcriptions", data=form(path, model="whisper-1", stream="true"))
    assert response.status == 200 and response.content_type == "text/event-stream"
    events = await sse_events(response)
    assert [e["type"] for e in events][-1] == "transcript.text.done"
    deltas = events[:-1]
    assert deltas and all(e["type"] == "transcript.text.delta" for e in deltas)
    for event in deltas:
        segment = event["segment"]
        # Word alignment costs time: streamed segments carry words only when asked for.
        assert segment["start"] <= segment["end"] and "words" not in segment
    assert events[-1]["language"] == "en" and events[-1]["duration"] > 1
    assert "".join(e["delta"] for e in deltas) == events[-1]["text"]
    assert events[-1]["usage"]["type"] == "duration"

    response = await whisper_client.post("/v1/audio/transcriptions", data=form(
        path, model="whisper-1", stream="true", **{"timestamp_granularities[]": "word"}))
    deltas = (await sse_events(response))[:-1]
    assert deltas and all(event["segment"]["words"] for event in deltas)


async def test_warning_downgrade_for_a_backend_that_cannot_stream(make_client, tmp_path):
    client = await make_client(plugins={"slow": BackendPlugin(SlowAsr(streaming=False, steps=3, step_s=0.01))})
    wav = tone_wav(tmp_path / "tone.wav")
    response = await client.post("/v1/audio/transcriptions", data=form(wav, model="slow-asr", stream="true"))
    events = await sse_events(response)
    assert [e["type"] for e in events] == ["warning", "transcript.text.delta", "transcript.text.done"]
    assert events[0]["model"] == "slow-asr" and events[0]["code"] and events[0]["message"]
    assert events[1]["delta"] == "part 0. part 1. part 2."


async def test_subtitle_granularity_limits(whisper_client, tmp_path):
    pcm, rate = synthesize_pcm(" ".join(SENTENCES))
    path = write_wav(tmp_path / "long.wav", pcm, rate)
    response = await whisper_client.post(
        "/v1/audio/transcriptions",
        data=form(path, model="whisper-1", response_format="verbose_json", segment_granularity="subtitle"),
    )
    body = await response.json()
    assert len(body["segments"]) >= 3
    for cue in body["segments"]:
        assert len(cue["text"]) <= 70 and cue["end"] - cue["start"] <= 7.0 + 1e-6
    assert [c["id"] for c in body["segments"]] == list(range(len(body["segments"])))


async def test_compressed_upload_and_model_cached_once(whisper_client, tmp_path):
    pcm, rate = synthesize_pcm(SENTENCES[3])
    mp3 = tmp_path / "speech.mp3"
    mp3.write_bytes(audio.encode(pcm, rate, "mp3"))
    for _ in range(2):
        response = await whisper_client.post("/v1/audio/transcriptions", data=form(mp3, model="tiny"))
        assert word_error_rate(SENTENCES[3], (await response.json())["text"]) <= 0.2
    cache = whisper_client.app[model_cache_key]
    assert cache.loads == 1 and [m["key"] for m in cache.loaded()] == ["asr:whisper-tiny.en"]


async def test_auto_with_only_whisper_installed(whisper_client, sentences_wav):
    for language in ("en", "de", "ja", ""):
        response = await whisper_client.post(
            "/v1/audio/transcriptions", data=form(sentences_wav[0][1], model="auto", language=language)
        )
        assert response.status == 200, await response.text()
    models = (await (await whisper_client.get("/v1/models")).json())["data"]
    auto = next(m for m in models if m["id"] == "auto")
    assert auto["supports_streaming"] is True and auto["is_routing_alias"] is True


async def test_client_errors(whisper_client, sentences_wav, tmp_path):
    path = sentences_wav[0][1]
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    cases = [
        (form(path, model="whisper-tiny.en", translate="true"), 400, "malformed", "translate"),
        (form(empty, model="whisper-1"), 400, "malformed", "audio"),
        (form(path, model="whisper-1", stream="maybe"), 400, "malformed", "stream"),
        (form(path, model="whisper-1", segment_granularity="word"), 400, "malformed", "segment_granularity"),
        (form(path, model="whisper-large-v3"), 400, "malformed", "no copy of this model"),
    ]
    for data, status, kind, needle in cases:
        response = await whisper_client.post("/v1/audio/transcriptions", data=data)
        assert response.status == status, await response.text()
        assert needle in assert_envelope(await response.json(), kind)["message"]
    not_multipart = await whisper_client.post("/v1/audio/transcriptions", json={"model": "whisper-1"})
    assert not_multipart.status == 400
    assert list((tmp_path / "uploads").iterdir()) == []


async def test_event_loop_stays_free_during_transcription(make_client, tmp_path):
    backend = SlowAsr(steps=10, step_s=0.1)
    client = await make_client(plugins={"slow": BackendPlugin(backend)})
    wav = tone_wav(tmp_path / "tone.wav")
    call = asyncio.create_task(client.post("/v1/audio/transcriptions", data=form(wav, model="slow-asr")))
    while not backend.running.is_set():
        await asyncio.sleep(0.01)
    started = time.monotonic()
    health = await client.get("/health")
    assert health.status == 200 and time.monotonic() - started < 0.2
    assert (await call).status == 200


@pytest.mark.parametrize("stream", [True, False])
async def test_disconnect_frees_the_slot_within_a_second(plugin_set, base_config, tmp_path, stream):
    # Served as `aistack serve` serves it (no handler cancellation), so the
    # gateway's own disconnect watcher is what frees the slot.
    backend = SlowAsr(steps=100, step_s=0.1)
    plugin_set.register(BackendPlugin(backend), name="slow")
    base_config.upload_dir.mkdir(parents=True)
    app = create_app(base_config, plugins=plugin_set)
    wav = tone_wav(tmp_path / "tone.wav")
    async with serve(app) as base_url, aiohttp.ClientSession() as session:
        url = base_url + "/v1/audio/transcriptions"
        if stream:
            response = await session.post(url, data=form(wav, model="slow-asr", stream="true"))
            await response.content.readline()  # the first event arrived: the stream is live
            response.close()  # hang up mid-transcription
        else:
            call = asyncio.create_task(session.post(url, data=form(wav, model="slow-asr")))
            while not backend.running.is_set():
                await asyncio.sleep(0.01)
            call.cancel()  # hang up while the server is still working, before any response
            with contextlib.suppress(asyncio.CancelledError):
                await call
        closed_at = time.monotonic()
        slot = app[slot_key]
        while (not slot.is_free or backend.running.is_set()) and time.monotonic() - closed_at < 3:
            await asyncio.sleep(0.02)
        assert slot.is_free and not backend.running.is_set()
        assert time.monotonic() - closed_at < 1.0
        assert list(base_config.upload_dir.iterdir()) == []


async def test_broken_multipart_bodies_are_client_errors(whisper_client):
    for content_type, body in (
        ("multipart/form-data; boundary=zzz", b"garbage"),
        ("multipart/form-data", b"--x\r\n"),
        ("multipart/form-data; boundary=zzz", b'--zzz\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1'),
    ):
        response = await whisper_client.post("/v1/audio/transcriptions", data=body, headers={"Content-Type": content_type})
        assert response.status == 400, await response.text()
        assert_envelope(await response.json(), "malformed")


async def test_model_retrieve_by_alias(whisper_client):
    client = openai_client(whisper_client)
    model = await client.models.retrieve("whisper-1")
    assert model.id == "whisper-tiny.en"
