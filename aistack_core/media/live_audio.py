"""Live audio for realtime sessions: raw PCM16 or G.711 bytes in, 16 kHz float samples out.

A realtime client sends small base64 chunks of headerless audio (OpenAI's
``pcm16`` is 24 kHz mono little-endian; telephony sends 8 kHz G.711
µ-law/A-law).  Backends want mono float32 at 16 kHz, so every chunk is
decoded here and resampled with PyAV's stateful resampler, which carries
its filter history from chunk to chunk (resampling each chunk alone would
click at every boundary).

Everything here is CPU work of a few hundred microseconds per chunk; the
session calls it in a worker thread together with the voice detector.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import attrs
import av
import numpy as np

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..backends import CancelToken

TARGET_RATE = 16000
PCM_RATES = (8000, 16000, 24000, 32000, 44100, 48000)
G711_RATE = 8000


def _ulaw_table() -> np.ndarray:
    """ITU-T G.711 µ-law byte -> linear int16 (bits are stored inverted; bias 0x84)."""
    code = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (code >> 4) & 0x07
    magnitude = ((((code & 0x0F) << 3) + 0x84) << exponent) - 0x84
    return np.where(code & 0x80, -magnitude, magnitude).astype(np.int16)


def _alaw_table() -> np.ndarray:
    """ITU-T G.711 A-law byte -> linear int16 (even bits toggled with 0x55; sign bit set = positive)."""
    code = np.arange(256, dtype=np.int32) ^ 0x55
    exponent = (code >> 4) & 0x07
    mantissa = code & 0x0F
    magnitude = np.where(
        exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0)
    )
    return np.where(code & 0x80, magnitude, -magnitude).astype(np.int16)


ULAW_TO_LINEAR = _ulaw_table()
ALAW_TO_LINEAR = _alaw_table()


@attrs.frozen
class InputFormat:
    """What the client's audio bytes are: ``pcm16`` at ``rate``, ``g711_ulaw`` or ``g711_alaw``."""

    encoding: str  # "pcm16" | "g711_ulaw" | "g711_alaw"
    rate: int = 24000

    @property
    def bytes_per_second(self) -> int:
        return self.rate * (2 if self.encoding == "pcm16" else 1)

    def duration_of(self, byte_count: int) -> float:
        return byte_count / self.bytes_per_second


class LiveDecoder:
    """Turns one session's chunks into 16 kHz float32, keeping state between chunks."""

    def __init__(self, fmt: InputFormat) -> None:
        self.format = fmt
        self._odd_byte = b""  # a PCM16 sample split across two chunks
        self._resampler = (
            None if fmt.rate == TARGET_RATE
            else av.AudioResampler(format="flt", layout="mono", rate=TARGET_RATE)
        )
        self._pts = 0

    def _linear(self, data: bytes) -> np.ndarray:
        if self.format.encoding == "g711_ulaw":
            return ULAW_TO_LINEAR[np.frombuffer(data, dtype=np.uint8)]
        if self.format.encoding == "g711_alaw":
            return ALAW_TO_LINEAR[np.frombuffer(data, dtype=np.uint8)]
        data = self._odd_byte + data
        usable = len(data) - len(data) % 2
        self._odd_byte = data[usable:]
        return np.frombuffer(data[:usable], dtype="<i2")

    def feed(self, data: bytes) -> np.ndarray:
        """The 16 kHz samples these bytes complete (may be a few samples late: the resampler's delay)."""
        pcm = self._linear(data)
        if pcm.size == 0:
            return np.zeros(0, dtype=np.float32)
        if self._resampler is None:
            return pcm.astype(np.float32) / 32768.0
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm).reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.format.rate
        frame.pts = self._pts
        self._pts += pcm.size
        return _joined(self._resampler.resample(frame))

    def flush(self) -> np.ndarray:
        """What the resampler still holds (the end of a committed buffer)."""
        if self._resampler is None:
            return np.zeros(0, dtype=np.float32)
        samples = _joined(self._resampler.resample(None))
        # A flushed resampler is finished; the next chunk starts a fresh one.
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=TARGET_RATE)
        self._pts = 0
        return samples


def _joined(frames) -> np.ndarray:
    planes = [frame.to_ndarray().reshape(-1) for frame in frames]
    if not planes:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(planes).astype(np.float32, copy=False)


@attrs.frozen
class SampledAudio:
    """An utterance held in memory, satisfying :class:`aistack_core.backends.AudioInput`."""

    pcm16k: np.ndarray = attrs.field(repr=False)
    path: Path | None = None  # nothing on disk: backends read ``samples()``

    @property
    def duration(self) -> float:
        return self.pcm16k.size / TARGET_RATE

    def windows(
        self, sample_rate: int = TARGET_RATE, seconds: float = 600.0, cancel: "CancelToken | None" = None
    ) -> Iterator[tuple[float, np.ndarray]]:
        samples = self.samples(sample_rate)
        size = max(1, int(round(seconds * sample_rate)))
        for start in range(0, samples.size, size):
            if cancel is not None:
                cancel.raise_if_cancelled()
            yield start / sample_rate, samples[start:start + size]

    def samples(self, sample_rate: int = TARGET_RATE, cancel: "CancelToken | None" = None) -> np.ndarray:
        # Held in memory already: nothing to decode, so nothing for ``cancel`` to stop.
        if sample_rate == TARGET_RATE:
            return self.pcm16k
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        frame = av.AudioFrame.from_ndarray(self.pcm16k.reshape(1, -1), format="flt", layout="mono")
        frame.sample_rate = TARGET_RATE
        frame.pts = 0
        return np.concatenate([_joined(resampler.resample(frame)), _joined(resampler.resample(None))])
