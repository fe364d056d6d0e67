"""Live transcription over ``/v1/realtime``: the official openai client against the running app.

Speech is synthesized with Piper, resampled to what a realtime client sends
(24 kHz PCM16, or 8 kHz G.711) and streamed in 20-100 ms chunks, at real-time
pace or faster.  Transcription is the bundled tiny.en through the real
faster-whisper plugin; slot contention and cancellation use the timing-exact
SlowAsr test backend.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import time

import aiohttp
import attrs
import av
import numpy as np
import pytest
from openai import AsyncOpenAI

from aistack_core import Segment, Transcription, hookimpl
from aistack_core.config import Config
from aistack_core.context import registry_key, slot_key
from aistack_core.media.live_audio import ALAW_TO_LINEAR, ULAW_TO_LINEAR, InputFormat, LiveDecoder
from aistack_core.media.live_transcript import LiveTranscript
from aistack_core.media.vad import SpeechTurns, TurnDetection
from aistack_core.observe.middleware import observability_key
from aistack_core.plugins import load_plugins
from aistack_core.registry import Registry
from aistack_plugins import faster_whisper as fw

from . import helpers

UTTERANCES = [
    "Please call me back when you arrive at the station.",
    "The weather today is sunny with a light breeze.",
    "She bought three apples and a loaf of bread.",
]
LONG_UTTERANCE = (
    "Yesterday afternoon my neighbour repaired the old wooden fence behind the garden, "
    "and then we walked down to the river to watch the boats."
)
VAD = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 400}


# --- audio -----------------------------------------------------------------------------


def _resample(pcm: np.ndarray, rate: int, target: int) -> np.ndarray:
    resampler = av.AudioResampler(format="s16", layout="mono", rate=target)
    frame = av.AudioFrame.from_ndarray(pcm.astype(np.int16).reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate, frame.pts = rate, 0
    frames = [*resampler.resample(frame), *resampler.resample(None)]
    return np.concatenate([f.to_ndarray().reshape(-1) for f in frames]).astype(np.int16)


@functools.lru_cache(maxsize=None)
def speech(text: str, rate: int = 24000) -> np.ndarray:
    pcm, source_rate = helpers.synthesize_pcm(text)
    return _resample(pcm, source_rate, rate)


def silence(seconds: float, rate: int = 24000) -> np.ndarray:
    # A faint noise floor, as a real microphone has; pure zeros would be too easy.
    return (np.random.default_rng(7).normal(0, 30, int(seconds * rate))).astype(np.int16)


def ulaw_encode(pcm: np.ndarray) -> bytes:
    """Nearest µ-law code for each sample, through the decoder's own table (exact inverse for G.711)."""
    order = np.argsort(ULAW_TO_LINEAR)
    values = ULAW_TO_LINEAR[order].astype(np.int32)
    index = np.clip(np.searchsorted(values, pcm.astype(np.int32)), 1, 255)
    nearer = np.where(np.abs(values[index - 1] - pcm) <= np.abs(values[index] - pcm), index - 1, index)
    return order[nearer].astype(np.uint8).tobytes()


async def stream(connection, data: bytes, bytes_per_second: int, chunk_ms: int, pace: float | None) -> None:
    """Append ``data`` in ``chunk_ms`` pieces; ``pace`` 1.0 = real time, None = as fast as possible."""
    step = max(2, bytes_per_second * chunk_ms // 1000) // 2 * 2
    started = time.monotonic()
    for offset in range(0, len(data), step):
        await connection.input_audio_buffer.append(audio=base64.b64encode(data[offset:offset + step]).decode())
        if pace:
            ahead = started + (offset + step) / bytes_per_second / pace - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)


# --- the app and the client ---------------------------------------------------------------


@pytest.fixture
async def whisper_app(make_client):
    return await make_client(plugins={"faster_whisper": fw})


def openai_client(client, api_key: str = "sk-local") -> AsyncOpenAI:
    return AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=api_key, max_retries=0)


def connect(client, **kwargs):
    return openai_client(client, kwargs.pop("api_key", "sk-local")).realtime.connect(
        extra_query={"intent": "transcription"}, max_retries=0, **kwargs)


def session_update(turn_detection=VAD, model="whisper-1", fmt=None, **more) -> dict:
    audio_input = {"format": fmt or {"type": "audio/pcm", "rate": 24000},
                   "transcription": {"model": model, "language": "en"}, "turn_detection": turn_detection}
    return {"type": "transcription", "audio": {"input": audio_input}, **more}


async def events_until(connection, wanted: str, count: int = 1, timeout: float = 60.0) -> list:
    """Every event up to and including the ``count``-th of type ``wanted``."""
    seen, found = [], 0
    async with asyncio.timeout(timeout):
        while found < count:
            event = await connection.recv()
            seen.append(event)
            found += event.type == wanted
    return seen


def of_type(events, kind):
    return [e for e in events if e.type == kind]


# --- the protocol, with real speech ---------------------------------------------------------------


@pytest.mark.parametrize("chunk_ms,pace", [(20, 1.0), (100, 4.0)])
async def test_server_vad_finds_each_utterance_and_transcribes_it(whisper_app, chunk_ms, pace):
    audio = np.concatenate([silence(0.6)] + [part for text in UTTERANCES for part in (speech(text), silence(1.0))])
    async with connect(whisper_app) as connection:
        created = await connection.recv()
        assert created.type == "session.created" and created.session.type == "transcription"
        await connection.session.update(session=session_update())
        updated = await connection.recv()
        assert updated.type == "session.updated"
        assert updated.session.audio.input.turn_detection.silence_duration_ms == 400
        sender = asyncio.create_task(stream(connection, audio.tobytes(), 48000, chunk_ms, pace))
        events = await events_until(connection, "conversation.item.input_audio_transcription.completed",
                                    count=len(UTTERANCES))
        await sender
    started = of_type(events, "input_audio_buffer.speech_started")
    stopped = of_type(events, "input_audio_buffer.speech_stopped")
    completed = of_type(events, "conversation.item.input_audio_transcription.completed")
    assert len(started) == len(stopped) == len(completed) == len(UTTERANCES)
    # The boundaries sit where the speech is: each start after the previous stop, in order.
    ends = 0
    for begin, end in zip(started, stopped):
        assert begin.item_id == end.item_id
        assert ends <= begin.audio_start_ms < end.audio_end_ms
        ends = end.audio_end_ms
    for reference, event in zip(UTTERANCES, completed):
        assert helpers.word_error_rate(reference, event.transcript) <= 0.2, event.transcript
        assert event.usage.type == "duration" and 1.0 < event.usage.seconds < 6.0
    committed = of_type(events, "input_audio_buffer.committed")
    assert [c.item_id for c in committed] == [s.item_id for s in stopped]
    assert committed[1].previous_item_id == committed[0].item_id


async def test_manual_commit_with_turn_detection_off(whisper_app):
    text = UTTERANCES[0]
    async with connect(whisper_app) as connection:
        await connection.recv()
        await connection.session.update(session=session_update(turn_detection=None))
        assert (await connection.recv()).session.audio.input.turn_detection is None
        await stream(connection, np.concatenate([silence(0.3), speech(text), silence(0.3)]).tobytes(), 48000, 50, None)
        await connection.input_audio_buffer.commit()
        events = await events_until(connection, "conversation.item.input_audio_transcription.completed")
        assert not of_type(events, "input_audio_buffer.speech_started")  # no VAD: no turns
        assert of_type(events, "input_audio_buffer.committed")[0].item_id == events[-1].item_id
        assert helpers.word_error_rate(text, events[-1].transcript) <= 0.2
        # The buffer is empty after a commit; a second commit is a client mistake, and the session lives on.
        await connection.input_audio_buffer.commit(event_id="evt_again")
        error = (await events_until(connection, "error"))[-1]
        assert error.error.code == "input_audio_buffer_commit_empty" and error.error.event_id == "evt_again"
        await connection.input_audio_buffer.append(audio=base64.b64encode(speech(UTTERANCES[2]).tobytes()).decode())
        await connection.input_audio_buffer.clear()
        assert (await events_until(connection, "input_audio_buffer.cleared"))[-1].type == "input_audio_buffer.cleared"


async def warm_up(client, tmp_path) -> None:
    """Load the model once, as a running server has it: the first decode would otherwise include the load."""
    with (tmp_path / "warm.wav").open("rb") if (tmp_path / "warm.wav").exists() else \
            helpers.synthesize_wav(UTTERANCES[0], tmp_path / "warm.wav").open("rb") as upload:
        response = await client.post("/v1/audio/transcriptions", data={"file": upload, "model": "whisper-1"})
    assert response.status == 200


async def test_partial_deltas_on_a_long_utterance_read_as_the_completed_text(whisper_app, tmp_path):
    audio = np.concatenate([silence(0.5), speech(LONG_UTTERANCE), silence(1.0)])
    assert len(audio) / 24000 > 7
    await warm_up(whisper_app, tmp_path)
    async with connect(whisper_app) as connection:
        await connection.recv()
        # Piper pauses at the comma: a longer silence keeps the sentence one turn.
        await connection.session.update(session=session_update(turn_detection={**VAD, "silence_duration_ms": 900}))
        await connection.recv()
        sender = asyncio.create_task(stream(connection, audio.tobytes(), 48000, 40, 1.0))
        events = await events_until(connection, "conversation.item.input_audio_transcription.completed")
        await sender
    kinds = [e.type for e in events]
    deltas = of_type(events, "conversation.item.input_audio_transcription.delta")
    completed = events[-1]
    # Words arrived while the person was still speaking...
    assert kinds.index("conversation.item.input_audio_transcription.delta") < kinds.index(
        "input_audio_buffer.speech_stopped")
    assert len(deltas) >= 2
    assert {d.item_id for d in deltas} == {completed.item_id}
    # ...and what the client assembled is exactly the final transcript, which is right.
    assert "".join(d.delta for d in deltas) == completed.transcript
    assert helpers.word_error_rate(LONG_UTTERANCE, completed.transcript) <= 0.2, completed.transcript


async def test_a_turn_ending_in_a_pause_is_decoded_during_the_pause(whisper_app, tmp_path):
    # Two sentences with a short pause between them make one turn (the pause is shorter than
    # silence_duration_ms); the decode started in that pause must not pass for the final text.
    first, second = UTTERANCES[0], UTTERANCES[2]
    audio = np.concatenate([silence(0.5), speech(first), silence(0.35), speech(second), silence(1.2)])
    await warm_up(whisper_app, tmp_path)
    async with connect(whisper_app) as connection:
        await connection.recv()
        await connection.session.update(session=session_update(
            turn_detection={**VAD, "silence_duration_ms": 800}, include=["item.input_audio_transcription.logprobs"]))
        await connection.recv()
        sender = asyncio.create_task(stream(connection, audio.tobytes(), 48000, 40, 1.0))
        events = await events_until(connection, "conversation.item.input_audio_transcription.completed")
        await sender
    completed = events[-1]
    assert len(of_type(events, "input_audio_buffer.speech_stopped")) == 1
    assert helpers.word_error_rate(f"{first} {second}", completed.transcript) <= 0.2, completed.transcript
    deltas = of_type(events, "conversation.item.input_audio_transcription.delta")
    assert "".join(d.delta for d in deltas) == completed.transcript
    # logprobs were asked for: the decode made in the closing pause had the word timings too.
    assert completed.logprobs and len(completed.logprobs) >= len(completed.transcript.split()) - 2
    recent = (await (await whisper_app.get("/admin/api/metrics?recent=1")).json())["realtime"]["recent_utterances"]
    # The closing pause was long enough to decode the whole turn before the detector ended it.
    assert recent[0]["item_id"] == completed.item_id and recent[0]["early_final"] is True
    assert recent[0]["partials"] >= 2  # the pause between the sentences was decoded too, as a partial


def test_only_a_decode_that_heard_all_the_speech_stands_in_for_the_final():
    from aistack_core.backends import TranscriptionOptions
    from aistack_core.routes.realtime import UNHEARD_TAIL_SAMPLES, Decoded, Utterance

    plain, timed = TranscriptionOptions(language="en", word_timestamps=False), TranscriptionOptions(language="en")

    def decoded(end, options=plain, model="m"):
        return Decoded(end, 14000, model, options, "en", [], 0.4)

    utterance = Utterance("item_1", LiveTranscript(), speech_end=16000)
    assert utterance.decoded_whole("m", plain) is None  # nothing decoded yet
    utterance.decoded = decoded(14000)  # made in an earlier pause: speech followed
    assert utterance.decoded_whole("m", plain) is None
    # Up to 100 ms of soft sound (a word fading out) after its audio ended: it still heard the speech.
    utterance.decoded = decoded(16000 - UNHEARD_TAIL_SAMPLES)
    assert utterance.decoded_whole("m", plain) is utterance.decoded
    utterance.decoded = decoded(16000 - UNHEARD_TAIL_SAMPLES - 1)
    assert utterance.decoded_whole("m", plain) is None
    utterance.decoded = decoded(16512)  # made in the pause that ended the turn
    assert utterance.decoded_whole("m", plain) is utterance.decoded
    assert utterance.decoded_whole("m", timed) is None  # logprobs need word timings it did not take
    assert utterance.decoded_whole("other", plain) is None  # the model changed since
    assert utterance.decoded_whole("m", attrs.evolve(plain, prompt="names")) is None  # so did the prompt
    utterance.decoded = decoded(16512, timed)
    assert utterance.decoded_whole("m", timed) is utterance.decoded
    assert utterance.decoded_whole("m", plain) is utterance.decoded  # word timings are extra, never missing


async def test_g711_ulaw_and_16khz_pcm_inputs(whisper_app):
    text = UTTERANCES[1]
    ulaw = ulaw_encode(np.concatenate([silence(0.3, 8000), speech(text, 8000), silence(0.3, 8000)]))
    pcm16k = np.concatenate([silence(0.3, 16000), speech(text, 16000), silence(0.3, 16000)]).tobytes()
    async with connect(whisper_app) as connection:
        await connection.recv()
        for fmt, data, rate in (({"type": "audio/pcmu"}, ulaw, 8000), ({"type": "audio/pcm", "rate": 16000}, pcm16k, 32000)):
            await connection.session.update(session=session_update(turn_detection=None, fmt=fmt))
            await connection.recv()
            await stream(connection, data, rate, 60, None)
            await connection.input_audio_buffer.commit()
            done = (await events_until(connection, "conversation.item.input_audio_transcription.completed"))[-1]
            assert helpers.word_error_rate(text, done.transcript) <= 0.2, (fmt, done.transcript)


async def test_beta_dialect_and_logprobs(whisper_app):
    # The beta client always dials wss:// from base_url; a plain ws:// server needs websocket_base_url.
    client = AsyncOpenAI(base_url=str(whisper_app.make_url("/v1")), api_key="sk-local", max_retries=0,
                         websocket_base_url=str(whisper_app.make_url("/v1")).replace("http://", "ws://"))
    text = UTTERANCES[2]
    async with client.beta.realtime.connect(model="gpt-4o-transcribe", extra_query={"intent": "transcription"}) as connection:
        created = json.loads(await connection.recv_bytes())
        assert created["type"] == "transcription_session.created"
        assert created["session"]["input_audio_format"] == "pcm16"
        await connection.transcription_session.update(session={
            "input_audio_format": "pcm16",
            "input_audio_transcription": {"model": "gpt-4o-transcribe", "language": "en"},
            "turn_detection": None,
            "include": ["item.input_audio_transcription.logprobs"],
        })
        updated = json.loads(await connection.recv_bytes())
        assert updated["type"] == "transcription_session.updated" and updated["session"]["turn_detection"] is None
        await connection.input_audio_buffer.append(audio=base64.b64encode(speech(text).tobytes()).decode())
        await connection.input_audio_buffer.commit()
        while (event := json.loads(await connection.recv_bytes()))["type"] != \
                "conversation.item.input_audio_transcription.completed":
            assert event["type"] != "error", event
    assert helpers.word_error_rate(text, event["transcript"]) <= 0.2
    assert event["logprobs"] and all(p["logprob"] <= 0 and bytes(p["bytes"]).decode() == p["token"]
                                     for p in event["logprobs"])


# --- client mistakes never end the session ----------------------------------------------------


async def raw_session(client, path="/v1/realtime?intent=transcription", **kwargs):
    ws = await client.ws_connect(path, **kwargs)
    created = await ws.receive_json(timeout=10)
    assert created["type"] == "session.created"
    return ws


async def test_bad_events_get_error_events_and_the_session_stays_open(whisper_app):
    ws = await raw_session(whisper_app)
    bad = [
        ("{not json", "invalid_json", None),
        ("[1, 2]", "invalid_event", None),
        (json.dumps({"event_id": "e1"}), "invalid_event", "type"),
        (json.dumps({"type": "no.such.event", "event_id": "e2"}), "unknown_event", "type"),
        (json.dumps({"type": "response.create"}), "invalid_event_type", "type"),
        (json.dumps({"type": "input_audio_buffer.append", "audio": "%%%not base64%%%"}), "invalid_base64", "audio"),
        (json.dumps({"type": "input_audio_buffer.append", "audio": 12}), "invalid_request", "audio"),
        (json.dumps({"type": "input_audio_buffer.commit"}), "input_audio_buffer_commit_empty", None),
        (json.dumps({"type": "session.update", "session": "loud"}), "invalid_request", "session"),
        (json.dumps({"type": "session.update", "session": {"type": "realtime"}}), "unsupported_session_type",
         "session.type"),
        (json.dumps({"type": "session.update", "session": {"audio": {"input": {
            "turn_detection": {"type": "server_vad", "threshold": 2}}}}}), "invalid_request",
         "session.audio.input.turn_detection.threshold"),
        (json.dumps({"type": "session.update", "session": {"audio": {"input": {
            "format": {"type": "audio/pcm", "rate": 11025}}}}}), "invalid_request", "session.audio.input.format.rate"),
        (json.dumps({"type": "session.update", "session": {"audio": {"input": {
            "transcription": {"model": "no-such-model"}}}}}), "model_not_found",
         "session.audio.input.transcription.model"),
        (json.dumps({"type": "session.update", "session": {"include": ["everything"]}}), "invalid_request",
         "session.include"),
        (json.dumps({"type": "session.update", "session": {"audio": {"input": {
            "transcription": {"model": "whisper-tiny.en", "language": "de"}}}}}), "unsupported_language",
         "session.audio.input.transcription.language"),
    ]
    for message, code, param in bad:
        await ws.send_str(message)
        event = await ws.receive_json(timeout=10)
        assert event["type"] == "error", (message, event)
        error = event["error"]
        assert (error["code"], error["param"]) == (code, param), (message, error)
        assert error["type"] == "invalid_request_error" and error["kind"] == "malformed" and error["message"]
        assert error["provider"] in ("aistack", "Faster-Whisper")
    await ws.send_bytes(b"\x00\x01")
    assert (await ws.receive_json(timeout=10))["error"]["code"] == "invalid_event"
    # A valid update after all that still works, and so does audio.
    await ws.send_json({"type": "session.update", "event_id": "ok",
                        "session": {"audio": {"input": {"turn_detection": None}}}})
    assert (await ws.receive_json(timeout=10))["type"] == "session.updated"
    await ws.send_json({"type": "input_audio_buffer.append", "audio": base64.b64encode(speech(UTTERANCES[0]).tobytes()).decode()})
    await ws.send_json({"type": "input_audio_buffer.commit"})
    kinds = []
    while not kinds or kinds[-1] != "conversation.item.input_audio_transcription.completed":
        kinds.append((await ws.receive_json(timeout=60))["type"])
    assert "error" not in kinds
    await ws.close()


async def test_oversized_append_and_full_buffer(make_client):
    client = await make_client(plugins={"test-asr": helpers.BackendPlugin(helpers.SlowAsr())})
    ws = await raw_session(client)
    await ws.send_json({"type": "input_audio_buffer.append",
                        "audio": base64.b64encode(b"\0" * (15 * 1024 * 1024 + 2)).decode()})
    error = (await ws.receive_json(timeout=30))["error"]
    assert (error["code"], error["kind"], error["type"]) == ("audio_too_large", "overflow", "invalid_request_error")
    await ws.send_json({"type": "session.update", "session": {"audio": {"input": {"turn_detection": None}}}})
    await ws.receive_json(timeout=10)
    # Manual mode: the buffer holds at most AISTACK_REALTIME_MAX_BUFFER_S (30 s).
    await ws.send_json({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"\0" * 48000 * 31).decode()})
    assert (await ws.receive_json(timeout=10))["error"]["code"] == "input_audio_buffer_full"
    await ws.close()


async def test_session_audio_limit(make_client):
    client = await make_client(plugins={"test-asr": helpers.BackendPlugin(helpers.SlowAsr())},
                               max_audio_min=0.02)
    ws = await raw_session(client)
    await ws.send_json({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"\0" * 48000).decode()})
    await ws.send_json({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"\0" * 48000).decode()})
    error = (await ws.receive_json(timeout=10))["error"]
    assert error["code"] == "audio_too_long" and "0.02 minutes" in error["message"]
    await ws.send_json({"type": "input_audio_buffer.clear"})
    assert (await ws.receive_json(timeout=10))["type"] == "input_audio_buffer.cleared"
    await ws.close()


async def test_plain_get_and_other_intents_are_refused(whisper_app):
    response = await whisper_app.get("/v1/realtime")
    assert response.status == 426
    assert (await response.json())["error"]["code"] == "websocket_required"
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await whisper_app.ws_connect("/v1/realtime?intent=conversation")
    assert refused.value.status == 400


# --- the GPU slot ------------------------------------------------------------------------------


def pcm_b64(seconds: float, rate: int = 24000) -> str:
    tone = (0.2 * 32767 * np.sin(2 * np.pi * 220 * np.arange(int(seconds * rate)) / rate)).astype(np.int16)
    return base64.b64encode(tone.tobytes()).decode()


async def receive_until(ws, wanted: str, timeout: float = 30.0) -> list[dict]:
    events = []
    async with asyncio.timeout(timeout):
        while not events or events[-1]["type"] != wanted:
            events.append(await ws.receive_json())
    return events


async def manual_session(client, model: str, **kwargs):
    ws = await raw_session(client, **kwargs)
    await ws.send_json({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
        "transcription": {"model": model}, "turn_detection": None}}}})
    assert (await ws.receive_json(timeout=10))["type"] == "session.updated"
    return ws


async def post_transcription(client, path, model="fast-asr"):
    with path.open("rb") as upload:
        return await client.post("/v1/audio/transcriptions", data={"file": upload, "model": model})


@pytest.fixture
async def slot_app(make_client):
    slow = helpers.SlowAsr("slow-asr", steps=5, step_s=0.1)
    fast = helpers.SlowAsr("fast-asr", steps=1, step_s=0.0)
    client = await make_client(plugins={"test-asr": helpers.BackendPlugin(slow, fast)}, realtime_max_buffer_s=1.5)
    return client, slow


async def test_the_slot_is_held_only_while_an_utterance_is_decoded(slot_app, tmp_path):
    client, slow = slot_app
    wav = helpers.tone_wav(tmp_path / "tone.wav", seconds=0.5)
    ws = await manual_session(client, "slow-asr")
    await ws.send_json({"type": "input_audio_buffer.append", "audio": pcm_b64(1.0)})
    # Audio waiting in the session does not hold the slot: another app transcribes.
    assert (await post_transcription(client, wav)).status == 200
    await ws.send_json({"type": "input_audio_buffer.commit"})
    assert await asyncio.to_thread(slow.running.wait, 10)
    busy = await post_transcription(client, wav)
    assert busy.status == 503 and busy.headers["Retry-After"] == "5"
    assert (await busy.json())["error"]["code"] == "gpu_busy"
    events = await receive_until(ws, "conversation.item.input_audio_transcription.completed")
    assert events[-1]["transcript"] == "part 0. part 1. part 2. part 3. part 4."
    assert (await post_transcription(client, wav)).status == 200
    await ws.close()


async def test_utterances_wait_for_a_busy_slot_up_to_the_bound(slot_app, tmp_path):
    client, slow = slot_app
    ws = await manual_session(client, "fast-asr")
    # Another app holds the slot for about a second.
    other = asyncio.create_task(post_transcription(client, helpers.tone_wav(tmp_path / "t.wav", 0.5), "slow-asr"))
    assert await asyncio.to_thread(slow.running.wait, 10)
    for seconds, event_id in ((1.0, "first"), (1.0, "second")):
        await ws.send_json({"type": "input_audio_buffer.append", "audio": pcm_b64(seconds)})
        await ws.send_json({"type": "input_audio_buffer.commit", "event_id": event_id})
    events = await receive_until(ws, "conversation.item.input_audio_transcription.completed")
    committed = [e["item_id"] for e in events if e["type"] == "input_audio_buffer.committed"]
    assert len(committed) == 2
    # The second second of audio would exceed the 1.5 s bound: dropped with gpu_busy, the session lives on.
    error = next(e for e in events if e["type"] == "error")["error"]
    assert error["code"] == "gpu_busy" and error["kind"] == "network"
    failed = next(e for e in events if e["type"] == "conversation.item.input_audio_transcription.failed")
    assert failed["item_id"] == committed[1] and failed["error"]["code"] == "gpu_busy"
    # The first waited in the session and was transcribed once the other app was done.
    assert other.done() and (await other).status == 200
    assert events[-1]["item_id"] == committed[0] and events[-1]["transcript"] == "part 0."
    await ws.close()


async def test_hang_up_cancels_the_decode_and_frees_the_slot(make_client):
    slow = helpers.SlowAsr("slow-asr", steps=100, step_s=0.1)  # a 10 s decode
    client = await make_client(plugins={"test-asr": helpers.BackendPlugin(slow)})
    slot = client.app[slot_key]
    ws = await manual_session(client, "slow-asr")
    await ws.send_json({"type": "input_audio_buffer.append", "audio": pcm_b64(1.0)})
    await ws.send_json({"type": "input_audio_buffer.commit"})
    assert await asyncio.to_thread(slow.running.wait, 10)
    assert not slot.is_free
    hung_up = time.monotonic()
    await ws.close()
    async with asyncio.timeout(5):
        while not slot.is_free:
            await asyncio.sleep(0.02)
    assert time.monotonic() - hung_up < 1.0
    assert slow.cancelled_at is not None and slow.cancelled_at - hung_up < 1.0


class LevelAsr(helpers.SlowAsr):
    """A test ASR backend that hears levels: a word per stretch of sound, "loud" or "soft".

    It takes ``step_s`` a decode, and counts its decodes.
    """

    def __init__(self, model_id: str = "level-asr", step_s: float = 0.0) -> None:
        super().__init__(model_id, steps=1, step_s=step_s)
        self.decodes = 0

    def transcribe(self, model, audio, options, cancel):
        samples = audio.samples(16000)
        count = samples.size // 512
        rms = np.sqrt(np.square(samples[: count * 512].astype(np.float64)).reshape(count, 512).mean(axis=1))
        words, previous = [], None
        for level in rms:
            kind = "loud" if level > 10 ** (-30 / 20) else "soft" if level > 10 ** (-50 / 20) else None
            if kind is not None and kind != previous:
                words.append(kind)
            previous = kind
        time.sleep(self.step_s)
        self.decodes += 1
        text = " ".join(words) + "."
        segments = [Segment(id=0, start=0.0, end=audio.duration, text=text)] if words else []
        return Transcription(language="en", duration=audio.duration, segments=iter(segments))


def tone(seconds: float, dbfs: float, rate: int = 24000) -> np.ndarray:
    amplitude = 10 ** (dbfs / 20) * np.sqrt(2) * 32767
    return (amplitude * np.sin(2 * np.pi * 220 * np.arange(int(seconds * rate)) / rate)).astype(np.int16)


async def vad_session(client, model: str, silence_ms: int = 400):
    ws = await raw_session(client)
    await ws.send_json({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
        "transcription": {"model": model}, "turn_detection": {
            "type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 0, "silence_duration_ms": silence_ms}}}}})
    assert (await ws.receive_json(timeout=10))["type"] == "session.updated"
    return ws


async def send_pcm(ws, pcm: np.ndarray, chunk_ms: int = 40, pace: float | None = None) -> None:
    step = 24000 * chunk_ms // 1000
    started = time.monotonic()
    for offset in range(0, pcm.size, step):
        await ws.send_json({"type": "input_audio_buffer.append",
                            "audio": base64.b64encode(pcm[offset:offset + step].tobytes()).decode()})
        ahead = started + (offset + step) / 24000 / pace - time.monotonic() if pace else 0.0
        await asyncio.sleep(max(ahead, 0.005))


async def test_a_soft_word_after_the_closing_pause_began_is_in_the_final(make_client):
    # The loudness detector: -20 dBFS is speech, -41.5 dBFS lies between the thresholds (0.425, which
    # neither ends the pause nor counts as silence), digital silence is silence.  The early final starts
    # at the first quiet window; the soft word after it is still part of the turn, and the final decode
    # (up to the detection point) always heard it.
    level = LevelAsr()
    client = await make_client(plugins={"test-asr": helpers.BackendPlugin(level)}, realtime_partial_s=100.0)
    ws = await vad_session(client, "level-asr")
    quiet = np.zeros(24000, dtype=np.int16)
    await send_pcm(ws, np.concatenate([quiet[:7200], tone(0.6, -20), quiet[:3600], tone(0.3, -41.5), quiet]))
    events = await receive_until(ws, "conversation.item.input_audio_transcription.completed")
    assert len([e for e in events if e["type"] == "input_audio_buffer.speech_stopped"]) == 1
    assert events[-1]["transcript"] == "loud soft."
    await ws.close()


async def test_a_session_update_between_the_early_final_and_the_stop_is_obeyed(make_client):
    first, second = helpers.SlowAsr("fast-asr", steps=1, step_s=0.0), helpers.SlowAsr("two-asr", steps=2, step_s=0.0)
    client = await make_client(plugins={"test-asr": helpers.BackendPlugin(first, second)}, realtime_partial_s=100.0)
    ws = await vad_session(client, "fast-asr", silence_ms=600)
    quiet = np.zeros(24000, dtype=np.int16)
    await send_pcm(ws, np.concatenate([quiet[:7200], tone(0.6, -20), quiet[:4800]]))
    await asyncio.sleep(0.2)  # the early final (with fast-asr) is done
    # Only the model changes, so the turn in progress goes on.
    await ws.send_json({"type": "session.update", "session": {"audio": {"input": {
        "transcription": {"model": "two-asr"}}}}})
    await send_pcm(ws, quiet)
    events = await receive_until(ws, "conversation.item.input_audio_transcription.completed")
    assert any(e["type"] == "session.updated" for e in events)
    assert events[-1]["transcript"] == "part 0. part 1."  # the model in effect when the turn ended
    await ws.close()


async def test_speech_with_many_short_pauses_keeps_the_slot_busy_at_most_half_the_time(make_client):
    # Each early final takes 0.3 s; the speaker pauses (shorter than the turn's silence) every 0.35 s, in
    # real time.  Without spacing, a pause would find the last decode done and start the next one.
    level = LevelAsr(step_s=0.3)
    client = await make_client(plugins={"test-asr": helpers.BackendPlugin(level)}, realtime_partial_s=100.0)
    ws = await vad_session(client, "level-asr")
    quiet = np.zeros(24000, dtype=np.int16)
    talk = np.concatenate([quiet[:7200]] + [np.concatenate([tone(0.2, -20), quiet[:3600]])] * 12)
    started = time.monotonic()
    await send_pcm(ws, talk, chunk_ms=20, pace=1.0)
    talked_s = time.monotonic() - started
    early = level.decodes
    await send_pcm(ws, quiet)
    events = await receive_until(ws, "conversation.item.input_audio_transcription.completed")
    assert len([e for e in events if e["type"] == "input_audio_buffer.speech_stopped"]) == 1
    assert early * level.step_s <= 0.6 * talked_s, (early, talked_s)
    await ws.close()


async def test_partials_off_stay_off_after_an_early_final(make_client):
    # AISTACK_REALTIME_PARTIAL_S=0: no decodes while speaking.  The early final in a pause is not a
    # regular partial, and must not switch them on for the rest of the turn.
    level = LevelAsr()
    client = await make_client(plugins={"test-asr": helpers.BackendPlugin(level)}, realtime_partial_s=0.0)
    ws = await vad_session(client, "level-asr")
    quiet = np.zeros(24000, dtype=np.int16)
    await send_pcm(ws, np.concatenate([quiet[:7200], tone(0.6, -20), quiet[:3600]]))
    await asyncio.sleep(0.2)
    paused = level.decodes
    await send_pcm(ws, tone(2.0, -20))
    assert level.decodes == paused, (paused, level.decodes)
    await send_pcm(ws, quiet)
    events = await receive_until(ws, "conversation.item.input_audio_transcription.completed")
    assert events[-1]["transcript"] == "loud loud."  # one turn: the pause was shorter than its silence
    await ws.close()


async def test_idle_sessions_are_closed(make_client):
    client = await make_client(plugins={"test-asr": helpers.BackendPlugin(helpers.SlowAsr())}, ws_idle_timeout_s=0.3)
    ws = await raw_session(client)
    message = await ws.receive(timeout=5)
    assert message.type == aiohttp.WSMsgType.CLOSE and ws.close_code == 1008


# --- limits and the key -----------------------------------------------------------------------


async def test_max_sessions(make_client):
    client = await make_client(plugins={"test-asr": helpers.BackendPlugin(helpers.SlowAsr())}, realtime_max_sessions=1)
    first = await raw_session(client)
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/v1/realtime?intent=transcription")
    assert refused.value.status == 503 and refused.value.headers["Retry-After"] == "5"
    # A plain upgrade request shows the envelope.
    response = await client.get("/v1/realtime", headers={
        "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": base64.b64encode(b"0123456789abcdef").decode()})
    assert response.status == 503
    assert (await response.json())["error"]["code"] == "too_many_sessions"
    await first.close()
    async with asyncio.timeout(5):
        while client.app[observability_key].realtime.active:
            await asyncio.sleep(0.02)
    second = await raw_session(client)
    await second.close()


async def test_the_api_key_by_header_or_browser_subprotocol(make_client):
    client = await make_client(plugins={"test-asr": helpers.BackendPlugin(helpers.SlowAsr())}, api_key="s3cret")
    async with connect(client, api_key="s3cret") as connection:
        assert (await connection.recv()).type == "session.created"
    with pytest.raises(Exception) as wrong:
        async with connect(client, api_key="guess"):
            pass
    assert "401" in str(wrong.value)
    ws = await raw_session(client, protocols=("realtime", "openai-insecure-api-key.s3cret"))
    assert ws.protocol == "realtime"
    await ws.close()
    for protocols in ((), ("realtime", "openai-insecure-api-key.nope"), ("openai-insecure-api-key.",)):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect("/v1/realtime?intent=transcription", protocols=protocols)
        assert refused.value.status == 401
    # The subprotocol is a realtime affordance only.
    response = await client.get("/v1/models", headers={"Sec-WebSocket-Protocol": "openai-insecure-api-key.s3cret"})
    assert response.status == 401


# --- the hook, and the mechanisms -----------------------------------------------------------------


class LoudWindows:
    """A test detector: speech wherever a 512-sample window is louder than -30 dBFS."""

    window_samples = 512

    def __init__(self, calls: list) -> None:
        self.calls = calls
        self.pending = np.zeros(0, dtype=np.float32)

    def speech_probabilities(self, samples):
        self.calls.append(samples.size)
        data = np.concatenate([self.pending, samples])
        count = data.size // 512
        self.pending = data[count * 512:]
        windows = data[: count * 512].reshape(count, 512)
        return (np.sqrt((windows ** 2).mean(axis=1)) > 0.03).astype(np.float32)


class LoudVadPlugin:
    def __init__(self) -> None:
        self.calls: list[int] = []

    @hookimpl
    def register_vad(self, register, config):
        provider = type("LoudVad", (), {"name": "loud", "window_samples": 512,
                                        "open_stream": lambda _self: LoudWindows(self.calls)})()
        register(provider)


async def test_hook_register_vad(make_client):
    plugin = LoudVadPlugin()
    client = await make_client(plugins={"test-asr": helpers.BackendPlugin(helpers.SlowAsr("fast-asr", steps=1,
                                                                                        step_s=0.0)),
                                        "loud-vad": plugin})
    assert client.app[registry_key].vad_provider().name == "loud"
    ws = await raw_session(client)
    await ws.send_json({"type": "session.update", "session": {"audio": {"input": {
        "transcription": {"model": "fast-asr"},
        "turn_detection": {"type": "server_vad", "prefix_padding_ms": 0, "silence_duration_ms": 200}}}}})
    await ws.receive_json(timeout=10)
    quiet = base64.b64encode(np.zeros(24000, dtype=np.int16).tobytes()).decode()  # 1 s
    for audio in (quiet, pcm_b64(1.0), quiet):
        await ws.send_json({"type": "input_audio_buffer.append", "audio": audio})
    events = await receive_until(ws, "conversation.item.input_audio_transcription.completed")
    started = next(e for e in events if e["type"] == "input_audio_buffer.speech_started")
    stopped = next(e for e in events if e["type"] == "input_audio_buffer.speech_stopped")
    # The plugin's detector drew the boundaries: the tone runs from 1.0 s to 2.0 s.
    assert abs(started["audio_start_ms"] - 1000) <= 40
    assert 2000 + 200 - 40 <= stopped["audio_end_ms"] <= 2000 + 200 + 80
    assert sum(plugin.calls) >= 3 * 16000 - 512
    await ws.close()

    # The registry checks what is registered, and records who registered it.
    plugins = load_plugins(load_entrypoints=False)
    plugins.register(fw, name="faster_whisper")
    plugins.register(LoudVadPlugin(), name="loud-vad")
    plugins.register(LoudVadPlugin(), name="loud-again")
    registry = Registry.from_plugins(plugins, Config())
    assert "vad:silero" in plugins.records["faster_whisper"].registered
    assert sorted(registry.vad) == ["loud", "silero"]
    clashed = [r for r in plugins.records.values() if r.status == "skipped"]
    assert len(clashed) == 1 and "already registered" in clashed[0].error


def test_silero_streams_exactly_as_it_scores_whole_files():
    from faster_whisper.vad import get_vad_model

    samples = np.concatenate([np.zeros(8000), speech(UTTERANCES[0], 16000)]).astype(np.float32) / 32768
    samples = samples[: samples.size // 512 * 512]
    stream_ = fw.SileroVad().open_stream()
    rng = np.random.default_rng(3)
    pieces, offset = [], 0
    while offset < samples.size:
        size = int(rng.integers(100, 2000))
        pieces.append(stream_.speech_probabilities(samples[offset:offset + size]))
        offset += size
    streamed = np.concatenate(pieces)
    whole = get_vad_model()(samples)
    # Batch shapes change float rounding a little, nothing more.
    assert streamed.shape == whole.shape and np.allclose(streamed, whole, atol=2e-3)
    assert whole.max() > 0.9 and whole[:12].max() < 0.5  # speech found, none in the half second before it


def test_turns_follow_threshold_and_silence():
    turns = SpeechTurns(TurnDetection(threshold=0.5, prefix_padding_ms=0, silence_duration_ms=96), 512, origin=1000)
    probabilities = np.array([0.1, 0.9, 0.8, 0.4, 0.9, 0.2, 0.1, 0.0, 0.9], dtype=np.float32)
    found = turns.push(probabilities)
    # 0.4 is between the thresholds: still speech.  Three quiet windows (96 ms) end the turn.
    assert [(t.kind, t.sample) for t in found] == [("started", 1000 + 512), ("stopped", 1000 + 5 * 512),
                                                   ("started", 1000 + 8 * 512)]
    assert found[1].detected_at == 1000 + 8 * 512


def test_live_transcript_deltas_always_add_up():
    transcript = LiveTranscript()
    deltas = [transcript.partial("The quick"), transcript.partial("The quick brown fox"),
              transcript.partial("The quick brown box jumps"), transcript.final("The quick brown fox jumps over it.")]
    assert deltas[0] == "" and "".join(deltas) == transcript.text
    assert transcript.text == "The quick brown fox jumps over it."


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_g711_tables_match_the_standard():
    import audioop as reference  # deprecated, still in 3.11: the reference implementation of G.711

    codes = bytes(range(256))
    assert np.array_equal(np.frombuffer(reference.ulaw2lin(codes, 2), "<i2"), ULAW_TO_LINEAR)
    assert np.array_equal(np.frombuffer(reference.alaw2lin(codes, 2), "<i2"), ALAW_TO_LINEAR)
    decoder = LiveDecoder(InputFormat("pcm16", 24000))
    data = (np.sin(np.arange(24000) / 24000 * 2 * np.pi * 300) * 8000).astype("<i2").tobytes()
    out = np.concatenate([decoder.feed(data[i:i + 999]) for i in range(0, len(data), 999)] + [decoder.flush()])
    assert abs(out.size - 16000) <= 1  # odd-sized chunks split samples; nothing lost or doubled


# --- observability ---------------------------------------------------------------------------------


async def test_sessions_and_utterances_are_observed(make_client, tmp_path):
    fast = helpers.SlowAsr("fast-asr", steps=1, step_s=0.0)
    client = await make_client(plugins={"test-asr": helpers.BackendPlugin(fast)}, obs_access_log=True)
    ws = await manual_session(client, "fast-asr")
    for _ in range(2):
        await ws.send_json({"type": "input_audio_buffer.append", "audio": pcm_b64(0.5)})
        await ws.send_json({"type": "input_audio_buffer.commit"})
        await receive_until(ws, "conversation.item.input_audio_transcription.completed")
    await ws.close()
    async with asyncio.timeout(5):
        while True:
            body = await (await client.get("/admin/api/metrics?recent=5")).json()
            if body["realtime"]["sessions_active"] == 0 and any(r["path"] == "/v1/realtime"
                                                                 for r in body["metrics"]["recent"]):
                break
            await asyncio.sleep(0.05)
    realtime = body["realtime"]
    assert realtime["sessions_total"] == 1 and realtime["utterances"] == {"completed": 2}
    assert len(realtime["recent_utterances"]) == 2 and realtime["final_latency_ms"]["p50"] is not None
    record = next(r for r in body["metrics"]["recent"] if r["path"] == "/v1/realtime")
    assert record["utterances"] == 2 and record["model"] == "fast-asr" and record["final_latency_p50_s"] >= 0
    assert record["status"] == 101 and record["class"] == "2xx" and record["audio_sec"] == 1.0
    text = await (await client.get("/metrics")).text()
    assert 'aistack_realtime_utterances_total{outcome="completed"} 2.0' in text
    assert "aistack_realtime_final_latency_seconds_count 2.0" in text


async def test_browser_origins_follow_the_cors_rules(make_client):
    plugins = {"test-asr": helpers.BackendPlugin(helpers.SlowAsr())}
    client = await make_client(plugins=plugins)
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/v1/realtime", origin="http://evil.example")
    assert refused.value.status == 403
    same = f"http://{client.server.host}:{client.server.port}"
    ws = await raw_session(client, "/v1/realtime", origin=same)
    await ws.close()


async def test_listed_origins_may_open_sessions(make_client):
    plugins = {"test-asr": helpers.BackendPlugin(helpers.SlowAsr())}
    client = await make_client(plugins=plugins, cors_allow_origins=("http://app.example",))
    ws = await raw_session(client, "/v1/realtime", origin="http://app.example")
    await ws.close()
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/v1/realtime", origin="http://other.example")
    assert refused.value.status == 403
