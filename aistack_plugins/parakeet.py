"""Speech-to-text with NVIDIA Parakeet TDT 0.6B v3 through NeMo.

Registers ``nvidia/parakeet-tdt-0.6b-v3`` (alias ``parakeet``): English and
24 other European languages, punctuated and capitalised, with word times
straight from the model.  It does not stream; the core downgrades ``stream``
requests to a warning plus one delta.

Where the weights come from, in order:

* ``AISTACK_PARAKEET_MODEL`` naming a local ``.nemo`` file;
* the ``.nemo`` file of that (or the default) hub id already in the local
  Hugging Face cache, read without network access;
* with ``AISTACK_ALLOW_DOWNLOADS=on``, NeMo's own download on first use.

Long recordings are read and decoded in windows of ``window_s`` (cut at the
quietest moment near each boundary, ``aistack_core.quiet_windows``), so
memory holds one window and cancellation is honoured between windows,
and any window longer than ``AISTACK_PARAKEET_LOCAL_ATTENTION_ABOVE_S``
runs the encoder with local attention, whose memory grows linearly with
the audio instead of quadratically.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

import attrs
import numpy as np
import torch
from nemo.collections.asr.models import ASRModel

from aistack_core import (
    torch_free_memory_mb,
    torch_gpu_check,
    torch_gpus,
    AudioInput,
    CancelToken,
    DoctorCheck,
    Config,
    Device,
    Malformed,
    ModelCard,
    Network,
    Overflow,
    Segment,
    Transcription,
    TranscriptionOptions,
    Word,
    clamp_words,
    hookimpl,
    is_out_of_memory,
    normalize_language,
    quiet_windows,
    sentence_segments,
)

from .manifests import PARAKEET, PARAKEET_LOCAL_ATTENTION_ABOVE_S, PARAKEET_MODEL
from .nemo_weights import resolve_nemo_weights

# Found by the loader and by in-memory registration (tests); the entry point names it too.
AISTACK_MANIFEST = PARAKEET

log = logging.getLogger("aistack.plugins.parakeet")

PROVIDER = "Parakeet"
MODEL_ID = "nvidia/parakeet-tdt-0.6b-v3"
ALIAS = "parakeet"
SAMPLE_RATE = 16000
# Parakeet TDT 0.6B v3: English plus 24 European languages.
LANGUAGES = (
    "bg", "cs", "da", "de", "el", "en", "es", "et", "fi", "fr", "hr", "hu", "it",
    "lt", "lv", "mt", "nl", "pl", "pt", "ro", "ru", "sk", "sl", "sv", "uk",
)
# Under ``auto`` every language Parakeet knows goes to it, English included:
# it is the most accurate local model for all of them.
AUTO_LANGUAGES = LANGUAGES
AUTO_PRIORITY = 10
# The model reports no language; this is what a request without a hint gets.
UNKNOWN_LANGUAGE = "unknown"

# NeMo's recipe for long audio: a sliding window of 128 frames each side
# (about 10 s of context at 80 ms per frame).
LOCAL_ATTENTION = "rel_pos_local_attn"
LOCAL_ATTENTION_CONTEXT = [128, 128]
# Long files are decoded this many seconds at a time, so a cancelled request
# stops within one window; local attention keeps a window's memory bounded.
DEFAULT_WINDOW_S = 600.0
# Audio is read from the file this much at a time while a window is assembled.
PIECE_S = 60.0
# NeMo pads anything shorter than this (1 s) before decoding.
MIN_SAMPLES = SAMPLE_RATE

CARD = ModelCard(
    id=MODEL_ID,
    capabilities=("asr",),
    owned_by="nvidia",
    provider=PROVIDER,
    aliases=(ALIAS,),
    languages=LANGUAGES,
    supports_streaming=False,
    auto_languages=AUTO_LANGUAGES,
    auto_priority=AUTO_PRIORITY,
    can_translate=False,
)


# --- where the weights are ----------------------------------------------------


def resolve_weights(config: Config) -> Path | str:
    """A local ``.nemo`` path, or the hub id when NeMo may download it."""
    return resolve_nemo_weights(
        PARAKEET_MODEL.read(config) or MODEL_ID, setting=PARAKEET_MODEL.name, default_id=MODEL_ID,
        what="Parakeet", provider=PROVIDER, allow_downloads=config.allow_downloads,
    )


# --- the loaded model -----------------------------------------------------------


class LoadedParakeet:
    """The NeMo model plus the encoder settings it was trained with.

    The attention mode is switched per window and restored for short audio,
    so a long file does not leave a short one decoding with the (slightly
    less accurate) local attention.  ``windows_decoded`` counts model calls.
    """

    def __init__(self, model: Any, device: str) -> None:
        self.model = model
        self.device = device
        encoder = model.cfg.encoder
        self.full_attention = encoder.get("self_attention_model", "rel_pos")
        self.full_context = list(encoder.get("att_context_size", [-1, -1]))
        self.full_chunking = encoder.get("subsampling_conv_chunking_factor", 1)
        self.local_attention = self.full_attention == LOCAL_ATTENTION
        self.windows_decoded = 0
        self._lock = threading.Lock()

    def use_local_attention(self, local: bool) -> None:
        if local == self.local_attention:
            return
        if local:
            self.model.change_attention_model(LOCAL_ATTENTION, LOCAL_ATTENTION_CONTEXT)
            # Chunk the subsampling convolutions too; they are the other
            # memory peak on very long inputs (1 = let NeMo pick the factor).
            self.model.change_subsampling_conv_chunking_factor(1)
        else:
            self.model.change_attention_model(self.full_attention, self.full_context)
            self.model.change_subsampling_conv_chunking_factor(self.full_chunking)
        self.local_attention = local

    def words(self, samples: np.ndarray, local_attention: bool) -> list[Word]:
        """Decode one window; word times are relative to its start.

        Words the model places entirely after the end of ``samples`` (in
        padding) are dropped; the caller clamps the rest.
        """
        seconds = len(samples) / SAMPLE_RATE
        if len(samples) < MIN_SAMPLES:
            # NeMo pads inputs under a second on both sides, which would shift
            # every timestamp; padding the end ourselves keeps them true.
            samples = np.concatenate([samples, np.zeros(MIN_SAMPLES - len(samples), dtype=np.float32)])
        with self._lock:
            self.use_local_attention(local_attention)
            hypotheses = self.model.transcribe([samples], batch_size=1, timestamps=True, verbose=False)
            self.windows_decoded += 1
        if isinstance(hypotheses, tuple):  # some NeMo versions return (best, n-best)
            hypotheses = hypotheses[0]
        if not hypotheses:
            return []
        entries = (hypotheses[0].timestamp or {}).get("word", [])
        words = [_word(entry) for entry in entries if str(entry.get("word", "")).strip()]
        return [word for word in words if word.start < seconds]


def _word(entry: dict) -> Word:
    # NeMo gives each word its frame offsets and, after converting with the
    # encoder's frame length, 'start' and 'end' in seconds.
    return Word(start=float(entry["start"]), end=float(entry["end"]), word=str(entry["word"]).strip())


# --- windows ----------------------------------------------------------------------


# --- the backend ------------------------------------------------------------------


@attrs.define
class ParakeetBackend:
    config: Config
    window_s: float = DEFAULT_WINDOW_S
    card: ModelCard = CARD

    @property
    def local_attention_above_s(self) -> float:
        return PARAKEET_LOCAL_ATTENTION_ABOVE_S.read(self.config)

    def unavailable(self) -> str | None:
        """Why this model cannot serve now (no local weights), or None; cheap file checks only."""
        try:
            resolve_weights(self.config)
        except Network as exc:
            return exc.message
        return None

    def load(self, device: Device | None = None) -> LoadedParakeet:
        source = resolve_weights(self.config)
        if device is None:
            device_name = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            device_name = device.qualified_name  # "cuda:1" or "cpu": the gateway's device
        location = torch.device(device_name)
        log.info("loading Parakeet from %s on %s", source, device_name)
        try:
            if isinstance(source, Path):
                model = ASRModel.restore_from(str(source), map_location=location)
            else:
                model = ASRModel.from_pretrained(source, map_location=location)
        except Exception as exc:
            if is_out_of_memory(exc):
                raise Overflow(
                    "Not enough GPU memory to load Parakeet; free the GPU or use a smaller Whisper model.",
                    provider=PROVIDER,
                ) from exc
            log.warning("loading Parakeet from %s failed", source, exc_info=True)
            verb = "download" if isinstance(source, str) else "load"
            raise Network(
                f"Could not {verb} Parakeet from {source}: {type(exc).__name__}: {exc}", provider=PROVIDER
            ) from exc
        model.eval()
        return LoadedParakeet(model, device_name)

    def _language(self, options: TranscriptionOptions) -> str:
        requested = normalize_language(options.language)
        if requested is None:
            return UNKNOWN_LANGUAGE
        if requested not in LANGUAGES:
            raise Malformed(
                f"Parakeet transcribes {', '.join(LANGUAGES)}; language={options.language!r} is not among them. "
                f"Use model=auto, SenseVoice for Chinese, Japanese, Korean and Cantonese, or a Whisper model.",
                provider=PROVIDER,
            )
        # Parakeet takes no language prompt: the hint only labels the result.
        return requested

    def transcribe(
        self, model: LoadedParakeet, audio: AudioInput, options: TranscriptionOptions, cancel: CancelToken
    ) -> Transcription:
        if options.translate:
            raise Malformed(
                "Parakeet cannot translate; translate=true needs a multilingual Whisper model.", provider=PROVIDER
            )
        language = self._language(options)
        cancel.raise_if_cancelled()
        duration = float(audio.duration)
        return Transcription(
            language=language, duration=duration, segments=self._segments(model, audio, duration, cancel)
        )

    def _segments(
        self, model: LoadedParakeet, audio: AudioInput, duration: float, cancel: CancelToken
    ) -> Iterator[Segment]:
        next_id = 0
        # Decoded only as far as the window being transcribed: memory is one window, not the file.
        for start, window in quiet_windows(audio.windows(SAMPLE_RATE, PIECE_S, cancel), self.window_s):
            cancel.raise_if_cancelled()
            window = np.ascontiguousarray(window, dtype=np.float32)
            end = start + len(window)
            offset = start / SAMPLE_RATE
            local = len(window) / SAMPLE_RATE > self.local_attention_above_s
            try:
                words = model.words(window, local_attention=local)
            except Exception as exc:
                if is_out_of_memory(exc):
                    raise Overflow(
                        f"Parakeet ran out of memory on {len(window) / SAMPLE_RATE:.0f} s of audio; lower "
                        f"AISTACK_PARAKEET_LOCAL_ATTENTION_ABOVE_S or send shorter audio.",
                        provider=PROVIDER,
                    ) from exc
                raise
            # A TDT model can push the last word past the end of the audio.
            timed = clamp_words(_shifted(words, offset), min(duration, end / SAMPLE_RATE))
            for segment in sentence_segments(timed, start_id=next_id):
                next_id += 1
                yield segment


def _shifted(words: Sequence[Word], offset: float) -> list[Word]:
    if not offset:
        return list(words)
    return [attrs.evolve(word, start=word.start + offset, end=word.end + offset) for word in words]


@hookimpl
def register_asr_backends(register, config: Config) -> None:
    register(ParakeetBackend(config))


@hookimpl
def list_devices(config: Config) -> list[str]:
    """The GPUs torch can run Parakeet on (AISTACK_DEVICES=auto)."""
    return torch_gpus(torch)


@hookimpl
def device_free_memory_mb(device: str) -> float | None:
    return torch_free_memory_mb(torch, device)


@hookimpl
def doctor_checks(config: Config) -> list[DoctorCheck]:
    """Whether torch sees a GPU, and whether the Parakeet weights are on disk."""
    checks = [torch_gpu_check(torch, "Parakeet")]
    missing = ParakeetBackend(config).unavailable()
    if missing:
        checks.append(DoctorCheck("Parakeet weights", "warn", missing))
    else:
        checks.append(DoctorCheck("Parakeet weights", "ok", "found on disk"))
    return checks
