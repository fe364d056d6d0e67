"""A toy text-to-speech backend for aistack: honest about being a toy.

It does not speak words anyone could understand.  It reads the text one
syllable at a time and plays each as a short vowel-like sound (a pitched
buzz shaped by two formants, chosen by the syllable's vowel), with hisses
for fricatives (s, f, h, ...), a click for stops (p, t, k, ...), short gaps
between words and longer ones after commas and sentence ends, and a pitch
that falls through a sentence and rises at a question mark.  Letters
outside a-z (other scripts) each become one neutral syllable; digits are
spelt out in English first.  The same text always gives the same audio.

What it shows, as a complete third-party plugin:

* entry points ``aistack`` (the module) and ``aistack.manifests`` (a light
  manifest in its own module: model id, install command, one setting);
* one hook, ``register_tts_backends``, registering an object with the
  ``TtsBackend`` attributes and a blocking ``load()`` and ``synthesize()``;
* ``synthesize`` checks what it can before the first chunk (so a bad voice
  or unspeakable text is a 400, not a broken stream), then yields one
  int16 chunk per sentence, checking the cancel token between sentences
  and words;
* its tests (``tests/``) use ``aistack_core.testing``.
"""

from __future__ import annotations

import hashlib
import re
from typing import Iterator

import numpy as np

from aistack_core import CancelToken, Config, Malformed, ModelCard, SpeechOptions, hookimpl, split_sentences

from aistack_tiny_tts_manifest import MANIFEST, PITCH_HZ

AISTACK_PLUGIN_API = 1
AISTACK_MANIFEST = MANIFEST

SAMPLE_RATE = 16000
PROVIDER = "TinyTTS"
# Base pitch per voice, Hz.  "robot" keeps one pitch for everything.
VOICE_PITCH = {"low": 110.0, "high": 210.0, "robot": 140.0}
# Two formants per vowel (Hz): roughly the classic values for an adult voice.
FORMANTS = {
    "a": (730, 1090), "e": (530, 1840), "i": (270, 2290), "o": (570, 840), "u": (300, 870),
    "y": (270, 2290), "neutral": (500, 1500), "nasal": (280, 1000),
}
FRICATIVES = set("fhsvzjcx")
STOPS = set("bdgkpqt")
SONORANTS = set("lmnrw")
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Durations at speed 1, in seconds.
VOWEL_S = 0.16
FRICATIVE_S = 0.07
STOP_GAP_S = 0.03
STOP_BURST_S = 0.012
SONORANT_S = 0.05
WORD_GAP_S = 0.07
COMMA_GAP_S = 0.18
SENTENCE_GAP_S = 0.3
# Consonants sounded before and after a syllable's vowel; the rest of a long cluster is skipped.
MAX_CLUSTER = 3

_WORD = re.compile(r"[^\W_]+|[,;:]", re.UNICODE)
_VOWEL_GROUP = re.compile(r"[^aeiouy]*[aeiouy]+")


def syllables(word: str) -> list[str]:
    """A Latin word cut after each vowel group (trailing consonants join the last);
    in other scripts, each letter is a syllable of its own."""
    lowered = word.lower()
    if not lowered.isascii():
        return [char for char in lowered if char.isalpha()]
    found = _VOWEL_GROUP.findall(lowered)
    if not found:
        return [lowered]
    found[-1] += lowered[sum(len(part) for part in found):]
    return found


def words_of(sentence: str) -> list[str]:
    out: list[str] = []
    for token in _WORD.findall(sentence):
        if token.isdigit():
            out.extend(DIGITS[int(d)] for d in token)
        else:
            out.append(token)
    return out


def speakable(text: str) -> bool:
    return any(char.isalnum() for char in text)


class TinySpeaker:
    """The "model": pure functions of text, pitch and speed."""

    def __init__(self, pitch_hz: float | None) -> None:
        self.pitch_hz = pitch_hz

    def _noise(self, seed: str, seconds: float) -> np.ndarray:
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8], "little"))
        return rng.standard_normal(max(1, int(seconds * SAMPLE_RATE))).astype(np.float32)

    def _voiced(self, seconds: float, f0_start: float, f0_end: float, formants: tuple[int, int],
                level: float) -> np.ndarray:
        count = max(1, int(seconds * SAMPLE_RATE))
        f0 = np.linspace(f0_start, f0_end, count)
        phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
        harmonics = np.arange(1, int(4000 / max(f0_start, f0_end)) + 1)
        centre = float(np.mean(f0))
        # A glottal-like source (harmonics fading with their number) shaped by the two formant
        # peaks (resonance curves); the floor keeps the low harmonics, so the pitch is heard.
        resonance = sum(1.0 / (1.0 + ((harmonics * centre - f) / 90.0) ** 2) for f in formants)
        weights = (0.2 + resonance) / harmonics**0.7
        # sum_k w_k sin(k phase) = Im(sum_k w_k z^k) with z = e^(i phase), by Horner's rule:
        # a multiply-add per harmonic instead of a sine per harmonic and sample.
        z = np.exp(1j * phase)
        total = np.zeros_like(z)
        for weight in weights[::-1]:
            total = (total + weight) * z
        wave = total.imag
        envelope = np.minimum(1.0, np.minimum(np.arange(count), np.arange(count)[::-1]) / (0.012 * SAMPLE_RATE))
        peak = float(np.max(np.abs(wave))) or 1.0
        return (level * envelope * wave / peak).astype(np.float32)

    def _syllable(self, syllable: str, f0: float, f0_next: float, scale: float) -> list[np.ndarray]:
        parts: list[np.ndarray] = []
        vowels = [char for char in syllable if char in "aeiouy"]
        vowel = vowels[0] if vowels else ("neutral" if not syllable.isascii() else None)
        # One vowel sound per syllable, a little longer for a vowel group ("ee", "oa"), and
        # at most a few consonants each side: "aaaa..." or "bbbb..." stays one short syllable.
        vowel_s = VOWEL_S * min(2.0, 1.0 + 0.25 * (len(vowels) - 1)) if vowels else VOWEL_S
        head = syllable[: syllable.index(vowel)] if vowels else syllable
        tail = syllable[len(head) + len(vowels):] if vowels else ""
        for char in [*head[:MAX_CLUSTER], *(vowel if vowels else ""), *tail[:MAX_CLUSTER]]:
            if char in FRICATIVES:
                hiss = self._noise(syllable + char, FRICATIVE_S * scale)
                if char in "sxzc":  # sibilants are bright: keep the high part of the noise
                    hiss = np.diff(hiss, prepend=0.0).astype(np.float32)
                parts.append(0.12 * hiss / (float(np.max(np.abs(hiss))) or 1.0))
            elif char in STOPS:
                parts.append(np.zeros(int(STOP_GAP_S * scale * SAMPLE_RATE), dtype=np.float32))
                burst = self._noise(syllable + char, STOP_BURST_S * scale)
                parts.append(0.25 * burst / (float(np.max(np.abs(burst))) or 1.0))
            elif char in SONORANTS:
                parts.append(self._voiced(SONORANT_S * scale, f0, f0, FORMANTS["nasal"], 0.25))
            elif char in "aeiouy":
                parts.append(self._voiced(vowel_s * scale, f0, f0_next, FORMANTS[vowel], 0.6))
        if vowel == "neutral":
            parts.append(self._voiced(VOWEL_S * scale, f0, f0_next, FORMANTS["neutral"], 0.6))
        return parts

    def sentence(self, text: str, base_hz: float, speed: float, monotone: bool,
                 cancel: CancelToken) -> np.ndarray:
        scale = 1.0 / speed
        units = [(word, syllables(word)) for word in words_of(text)]
        total = max(1, sum(len(parts) for word, parts in units if word not in ",;:"))
        question = text.rstrip().endswith("?")
        parts: list[np.ndarray] = []
        index = 0
        for word, word_syllables in units:
            cancel.raise_if_cancelled()
            if word in ",;:":
                parts.append(np.zeros(int(COMMA_GAP_S * scale * SAMPLE_RATE), dtype=np.float32))
                continue
            for syllable in word_syllables:
                # Declination through the sentence (from 1.1 to 0.9 of the base pitch);
                # a question rises over its last two syllables.
                f0 = base_hz if monotone else base_hz * (1.1 - 0.2 * index / total)
                f0_next = base_hz if monotone else base_hz * (1.1 - 0.2 * (index + 1) / total)
                if question and not monotone and index >= total - 2:
                    f0_next = f0 * 1.35
                parts.extend(self._syllable(syllable, f0, f0_next, scale))
                index += 1
            parts.append(np.zeros(int(WORD_GAP_S * scale * SAMPLE_RATE), dtype=np.float32))
        parts.append(np.zeros(int(SENTENCE_GAP_S * scale * SAMPLE_RATE), dtype=np.float32))
        audio = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
        return (np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16)


class TinyTts:
    """Satisfies ``aistack_core.TtsBackend``."""

    card = ModelCard(
        id="tiny-tts",
        capabilities=("tts",),
        owned_by="aistack-examples",
        provider=PROVIDER,
        supports_streaming=True,
        auto_priority=1000,  # never OpenAI's tts-1 default while a real voice is installed
    )
    voices = tuple(VOICE_PITCH)
    default_voice = "low"
    sample_rate = SAMPLE_RATE
    native_speed = True  # durations scale with 1/speed; the core need not time-stretch

    def __init__(self, pitch_hz: float | None = None) -> None:
        if pitch_hz is not None and not 60.0 <= pitch_hz <= 400.0:
            raise ValueError(f"{PITCH_HZ.name}: expected 60 to 400 Hz, got {pitch_hz:g}")
        self.pitch_hz = pitch_hz

    def load(self) -> TinySpeaker:
        return TinySpeaker(self.pitch_hz)

    def synthesize(self, model: TinySpeaker, options: SpeechOptions, cancel: CancelToken) -> Iterator[np.ndarray]:
        # Checked here, before the first chunk: once audio streams, an error can only cut the stream.
        if options.voice not in VOICE_PITCH:
            raise Malformed(f"tiny-tts has the voices {', '.join(VOICE_PITCH)}, not {options.voice!r}.",
                            provider=PROVIDER)
        if not speakable(options.text):
            raise Malformed("tiny-tts found nothing to say: the input has no letters or digits.", provider=PROVIDER)
        return self._chunks(model, options, cancel)

    def _chunks(self, model: TinySpeaker, options: SpeechOptions, cancel: CancelToken) -> Iterator[np.ndarray]:
        base = model.pitch_hz or VOICE_PITCH[options.voice]
        monotone = options.voice == "robot"
        for sentence in split_sentences(options.text):
            cancel.raise_if_cancelled()
            if speakable(sentence):
                yield model.sentence(sentence, base, options.speed, monotone, cancel)


@hookimpl
def register_tts_backends(register, config: Config) -> None:
    register(TinyTts(PITCH_HZ.read(config)))
