"""Server-side turn detection: speech probabilities per window in, speech start/stop out.

The detector itself comes from a plugin (``register_vad``; faster-whisper
registers its bundled Silero model); this module only turns its per-window
probabilities into turns with OpenAI's three knobs, ``threshold``,
``prefix_padding_ms`` and ``silence_duration_ms``.  Like Silero's own
helper it uses hysteresis: speech begins at ``threshold`` and only counts
as silence below ``threshold - 0.15``, so a word that dips a little does
not end a turn.

When no plugin registered a detector, :class:`LoudnessStream` gates on
signal level instead: much worse in noise, but the session still works.
"""

from __future__ import annotations

import attrs
import numpy as np

SAMPLE_RATE = 16000
HYSTERESIS = 0.15


@attrs.frozen
class TurnDetection:
    """OpenAI's ``server_vad`` settings, with OpenAI's defaults."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500


@attrs.frozen
class Turn:
    """A change of state, at an absolute sample index of the session's 16 kHz stream."""

    kind: str  # "started" | "stopped"
    sample: int  # started: first speech sample; stopped: where the silence began
    detected_at: int  # the sample at which the detector could tell (stopped: after the silence)
    # stopped: the end of the last window that was not quiet.  A window between the two thresholds
    # neither ends the silence nor counts as quiet (a soft last word), so this may lie after ``sample``.
    speech_end: int | None = None


class SpeechTurns:
    """The turn state machine of one stream.  Pure bookkeeping: cheap, on the event loop."""

    def __init__(self, settings: TurnDetection, window_samples: int, origin: int = 0) -> None:
        self.settings = settings
        self.window = window_samples
        self.origin = origin  # the stream sample the detector's first window starts at
        self.windows_seen = 0
        self.speaking = False
        self._silence_from: int | None = None
        self._heard_until = origin  # the end of the last window that was not quiet
        self._silence_needed = int(settings.silence_duration_ms * SAMPLE_RATE / 1000)
        self._low = max(0.01, settings.threshold - HYSTERESIS)

    def push(self, probabilities: np.ndarray) -> list[Turn]:
        turns: list[Turn] = []
        for probability in probabilities.tolist():
            start = self.origin + self.windows_seen * self.window
            self.windows_seen += 1
            end = start + self.window
            if not self.speaking:
                if probability >= self.settings.threshold:
                    self.speaking = True
                    self._silence_from = None
                    self._heard_until = end
                    turns.append(Turn("started", start, end))
                continue
            if probability >= self._low:
                self._heard_until = end
            if probability >= self.settings.threshold:
                self._silence_from = None
            elif probability < self._low:
                if self._silence_from is None:
                    self._silence_from = start
                if end - self._silence_from >= self._silence_needed:
                    turns.append(Turn("stopped", self._silence_from, end, max(self._silence_from, self._heard_until)))
                    self.speaking = False
                    self._silence_from = None
        return turns

    @property
    def pausing(self) -> bool:
        """Speaking, but the last windows were quiet: the turn may be about to end."""
        return self.speaking and self._silence_from is not None

    @property
    def speech_end(self) -> int | None:
        """While pausing: where the speech heard so far ends (the stop will name it if the pause lasts)."""
        return max(self._silence_from, self._heard_until) if self.pausing else None

    @property
    def silence_from(self) -> int | None:
        """While pausing: where its quiet began, the same for the whole pause (it names the pause)."""
        return self._silence_from if self.pausing else None

    def reset(self) -> None:
        """Forget a turn in progress (the buffer was cleared or committed by hand)."""
        self.speaking = False
        self._silence_from = None


class LoudnessStream:
    """A stand-in detector: the level of each 32 ms window mapped onto [0, 1].

    -50 dBFS and below reads as 0, -30 dBFS and above as 1; a threshold of
    0.5 then means about -40 dBFS.
    """

    window_samples = 512

    def __init__(self) -> None:
        self._pending = np.zeros(0, dtype=np.float32)

    def speech_probabilities(self, samples: np.ndarray) -> np.ndarray:
        data = np.concatenate([self._pending, samples.astype(np.float32, copy=False)])
        count = data.size // self.window_samples
        self._pending = data[count * self.window_samples:]
        if count == 0:
            return np.zeros(0, dtype=np.float32)
        windows = data[: count * self.window_samples].reshape(count, self.window_samples)
        rms = np.sqrt(np.mean(windows * windows, axis=1)) + 1e-9
        return np.clip((20 * np.log10(rms) + 50) / 20, 0.0, 1.0).astype(np.float32)


class LoudnessVad:
    name = "loudness"
    window_samples = LoudnessStream.window_samples

    def open_stream(self) -> LoudnessStream:
        return LoudnessStream()
