"""tiny-tts behind the real gateway, tested with aistack_core.testing."""

from __future__ import annotations

import io
import wave

import numpy as np
import pytest

import aistack_tiny_tts
from aistack_core import Cancelled, CancelToken
from aistack_core.testing import serve, synthesize

RATE = aistack_tiny_tts.SAMPLE_RATE


def wav_samples(body: bytes) -> np.ndarray:
    with wave.open(io.BytesIO(body)) as audio:
        assert audio.getframerate() == RATE and audio.getnchannels() == 1
        return np.frombuffer(audio.readframes(audio.getnframes()), dtype=np.int16).astype(np.float32) / 32768


def bursts(samples: np.ndarray, frame_s: float = 0.01) -> int:
    """Stretches of sound separated by at least 40 ms of silence."""
    frame = int(RATE * frame_s)
    count = len(samples) // frame
    loud = np.sqrt(np.mean(samples[: count * frame].reshape(count, frame) ** 2, axis=1)) > 0.01
    found, quiet = 0, 4
    for is_loud in loud:
        if is_loud and quiet >= 4:
            found += 1
        quiet = 0 if is_loud else quiet + 1
    return found


def pitch(samples: np.ndarray) -> float:
    """The fundamental of the loudest 40 ms, by autocorrelation."""
    window = int(0.04 * RATE)
    energy = np.convolve(samples**2, np.ones(window), mode="valid")
    start = int(np.argmax(energy))
    piece = samples[start:start + window]
    correlation = np.correlate(piece, piece, mode="full")[window - 1:]
    low, high = RATE // 400, RATE // 60
    return RATE / (low + int(np.argmax(correlation[low:high])))


async def speak(client, text: str, **fields) -> np.ndarray:
    body = {"model": "tiny-tts", "input": text, "response_format": "wav", "cache": False, **fields}
    response = await client.post("/v1/audio/speech", json=body)
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"].startswith("audio/wav")
    return wav_samples(await response.read())


async def test_each_syllable_is_a_sound_and_words_are_apart():
    async with serve(plugins=[aistack_tiny_tts]) as client:
        assert bursts(await speak(client, "cat dog sun")) == 3
        assert bursts(await speak(client, "a a a a a")) == 5
        one, three = await speak(client, "Hello."), await speak(client, "Hello. Hello again. And once more.")
        assert len(three) > 2.5 * len(one)


async def test_voices_and_the_pitch_setting():
    async with serve(plugins=[aistack_tiny_tts]) as client:
        low, high = pitch(await speak(client, "a", voice="low")), pitch(await speak(client, "a", voice="high"))
        assert abs(low - 110) < 15 and abs(high - 210) < 25, (low, high)
    async with serve(plugins=[aistack_tiny_tts], settings={"AISTACK_TINY_TTS_PITCH_HZ": "300"}) as client:
        assert abs(pitch(await speak(client, "a", voice="low")) - 300) < 35


async def test_speed_is_native_and_the_audio_repeatable():
    async with serve(plugins=[aistack_tiny_tts]) as client:
        normal = await speak(client, "The quick brown fox jumps over the lazy dog.")
        fast = await speak(client, "The quick brown fox jumps over the lazy dog.", speed=2.0)
        assert 0.4 < len(fast) / len(normal) < 0.6
        assert np.array_equal(normal, await speak(client, "The quick brown fox jumps over the lazy dog."))


async def test_stream_and_other_scripts():
    async with serve(plugins=[aistack_tiny_tts]) as client:
        response = await client.post("/v1/audio/speech", json={
            "model": "tiny-tts", "input": "First sentence. Second one! 你好。", "response_format": "pcm", "stream": True,
        })
        assert response.status == 200
        pcm = await response.read()
        assert len(pcm) > RATE * 2  # more than half a second of 16-bit audio
        models = {m["id"] for m in (await (await client.get("/v1/models")).json())["data"]}
        assert "tiny-tts" in models


async def test_a_long_run_of_one_letter_stays_one_short_syllable():
    async with serve(plugins=[aistack_tiny_tts]) as client:
        for text in ("a" * 4000, "b" * 4000):
            assert len(await speak(client, text)) < RATE  # under a second, not minutes of audio


async def test_client_mistakes_are_400s():
    async with serve(plugins=[aistack_tiny_tts]) as client:
        nothing = await client.post("/v1/audio/speech", json={"model": "tiny-tts", "input": "?! ..."})
        assert nothing.status == 400 and "nothing to say" in (await nothing.json())["error"]["message"]
        voice = await client.post("/v1/audio/speech", json={"model": "tiny-tts", "input": "Hi.", "voice": "opera"})
        assert voice.status == 400 and "opera" in (await voice.json())["error"]["message"]


async def test_a_bad_setting_skips_the_plugin_with_the_reason():
    async with serve(plugins=[aistack_tiny_tts], settings={"AISTACK_TINY_TTS_PITCH_HZ": "900"}) as client:
        record = next(p for p in (await (await client.get("/-/plugins")).json())["plugins"] if p["name"] == "tiny_tts")
        assert record["status"] == "skipped" and "AISTACK_TINY_TTS_PITCH_HZ" in record["error"]
        assert record["install_hint"] == "pip install ./examples/aistack-tiny-tts"


def test_cancel_stops_between_sentences():
    cancel = CancelToken()
    backend = aistack_tiny_tts.TinyTts()
    chunks = backend.synthesize(backend.load(), aistack_tiny_tts_options("One. Two. Three."), cancel)
    next(chunks)
    cancel.cancel("client disconnected")
    with pytest.raises(Cancelled):
        next(chunks)
    assert len(synthesize(backend, "One. Two.")) > 0


def aistack_tiny_tts_options(text: str):
    from aistack_core import SpeechOptions

    return SpeechOptions(text=text, voice="low")
