"""Live transcription over ``/v1/realtime``: the official openai client against the running app.

Speech is synthesized with Piper, resampled to what a realtime client sends
(24 kHz PCM16, or 8 kHz G.711) and streamed in 20-100 ms chunks, at real-time
pace or faster.  Transcription is the bundled tiny.en through the real
faster-whisper plugin; slot contention and cancellation use the timing-exact
SlowAsr test backend.
"""

from __future__ import annotations

import asyncio
import audioop  # noqa: F401 - only to cross-check the G.711 tables (deprecated, still in 3.11)
import base64
import functools
import json
import time
import warnings

import aiohttp
import av
import numpy as np
import pytest
from openai import AsyncOpenAI

from aistack_core import hookimpl
from aistack_core.media.live_audio import ALAW_TO_LINEAR, ULAW_TO_LINEAR, InputFormat, LiveDecoder
from aistack_core.media.live_transcript import LiveTranscript
from aistack_core.media.vad import SpeechTurns, TurnDetection
from aistack_core.plugins import load_plugins
from aistack_core.registry import Registry
from aistack_plugins import faster_whisper as fw

from . import helpers

warnings.filterwarnings("ignore", category=DeprecationWarning)

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
