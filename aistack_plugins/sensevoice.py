"""Speech-to-text with Alibaba's SenseVoice Small through FunASR.

Registers ``iic/SenseVoiceSmall`` (alias ``sensevoice``): Mandarin,
Cantonese, English, Japanese and Korean.  The fsmn-vad model cuts the audio
into speech stretches first; each stretch is then decoded on its own, as the
core pulls segments, so a streamed request gets one delta per stretch as soon
as it is ready and a cancelled one stops at the next stretch.

SenseVoice prefixes its text with rich-transcription tags
(``<|en|><|NEUTRAL|><|Speech|><|withitn|>``); they are removed from the text
and reported as the segment's ``language``, ``emotion`` and ``event``.

Both models are read from local folders only: ``AISTACK_SENSEVOICE_MODEL``
and ``AISTACK_SENSEVOICE_VAD_MODEL`` may name them, else the ModelScope cache
is searched for the default ids; FunASR downloads only when
``AISTACK_ALLOW_DOWNLOADS=on``.

Word timestamps are not offered: FunASR's SenseVoice word-timestamp step
re-tokenises the decoded text and fails or misplaces words for English and
Japanese (QwenAudio/SenseVoice#167, #240), so segments carry the VAD
stretch's start and end only.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator

import attrs
import numpy as np
import torch

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
    hookimpl,
    is_out_of_memory,
    normalize_language,
    quiet_windows,
)

from .manifests import SENSEVOICE, SENSEVOICE_MODEL, SENSEVOICE_VAD_MODEL

# Found by the loader and by in-memory registration (tests); the entry point names it too.
AISTACK_MANIFEST = SENSEVOICE


@contextlib.contextmanager
def _root_logging_untouched() -> Iterator[None]:
    """Undo what FunASR does to the root logger inside the block.

    One of its modules calls ``logging.basicConfig(level=INFO)`` when
    imported, and ``AutoModel`` calls it again; on a host that has not
    configured the root logger yet, that adds a stderr handler and turns on
    every library's INFO chatter.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)


with _root_logging_untouched():
    import funasr


log = logging.getLogger("aistack.plugins.sensevoice")

PROVIDER = "SenseVoice"
MODEL_ID = "iic/SenseVoiceSmall"
ALIAS = "sensevoice"
VAD_MODEL_ID = "iic/speech_fsmn_vad_zh-cn-16k-common-pytorch"
SAMPLE_RATE = 16000
LANGUAGES = ("zh", "yue", "en", "ja", "ko")
# English stays with Parakeet (or Whisper) under ``auto``.
AUTO_LANGUAGES = ("zh", "yue", "ja", "ko")
AUTO_PRIORITY = 10
UNKNOWN_LANGUAGE = "unknown"
# Long files are read and searched for speech this many seconds at a time (cut in a
# pause), so memory holds one window and not the file.
WINDOW_S = 600.0
PIECE_S = 60.0
# SenseVoice handles up to about 30 s at once; the VAD cuts longer speech there.
MAX_SEGMENT_MS = 30000
# What an operator might send for the languages SenseVoice knows.
LANGUAGE_SYNONYMS = {"cmn": "zh", "cn": "zh", "jp": "ja", "kr": "ko", "cantonese": "yue", "zh-yue": "yue"}

EMOTIONS = {
    "HAPPY": "happy", "SAD": "sad", "ANGRY": "angry", "NEUTRAL": "neutral",
    "FEARFUL": "fearful", "DISGUSTED": "disgusted", "SURPRISED": "surprised",
}
EVENTS = {
    "Speech": "speech", "BGM": "bgm", "Laughter": "laughter", "Applause": "applause",
    "Cry": "cry", "Sneeze": "sneeze", "Breath": "breath", "Cough": "cough",
}
_TAG = re.compile(r"<\|([^|<>]*)\|>")

CARD = ModelCard(
    id=MODEL_ID,
    capabilities=("asr",),
    owned_by="alibaba",
    provider=PROVIDER,
    aliases=(ALIAS,),
    languages=LANGUAGES,
    supports_streaming=True,
    auto_languages=AUTO_LANGUAGES,
    auto_priority=AUTO_PRIORITY,
    can_translate=False,
)


# --- rich transcription ---------------------------------------------------------


@attrs.frozen
class RichText:
    """SenseVoice's output split into plain text and what its tags said."""

    text: str
    language: str | None = None
    emotion: str | None = None
    event: str | None = None

    @classmethod
    def parse(cls, raw: str) -> "RichText":
        language = emotion = event = None
        for tag in _TAG.findall(raw):
            if tag in LANGUAGES and language is None:
                language = tag
            elif tag in EMOTIONS and emotion is None:
                emotion = EMOTIONS[tag]
            elif tag in EVENTS and event is None:
                event = EVENTS[tag]
            # withitn/woitn, nospeech, EMO_UNKNOWN, Event_UNK and unknown tags say nothing useful.
        text = re.sub(r"\s+", " ", _TAG.sub(" ", raw)).strip()
        # Tags between two Chinese or Japanese characters must not leave a space behind.
        text = re.sub(r"(?<=[\u3000-\u30ff\u3400-\u9fff]) (?=[\u3000-\u30ff\u3400-\u9fff])", "", text)
        return cls(text=text, language=language, emotion=emotion, event=event)

    def extra(self) -> dict[str, str]:
        fields = {"language": self.language, "emotion": self.emotion, "event": self.event}
        return {name: value for name, value in fields.items() if value is not None}


# --- where the weights are ----------------------------------------------------


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or "\\" in name or Path(name).expanduser().is_dir()


def is_model_folder(folder: Path) -> bool:
    return folder.is_dir() and (folder / "model.pt").is_file() and (folder / "config.yaml").is_file()


def modelscope_cache_folder(model_id: str) -> Path | None:
    """The model's folder in the ModelScope cache, if complete (no network).

    ModelScope keeps models under ``$MODELSCOPE_CACHE`` (default
    ``~/.cache/modelscope/hub``), in ``models/<id>`` or, before 1.20, ``<id>``.
    """
    root = Path(os.environ.get("MODELSCOPE_CACHE") or Path.home() / ".cache" / "modelscope" / "hub").expanduser()
    for folder in (root / "models" / model_id, root / model_id):
        if is_model_folder(folder):
            return folder
    return None


def resolve_model(configured: str | None, default_id: str, variable: str, allow_downloads: bool) -> str:
    """A local folder for FunASR, or the hub id when it may download."""
    name = (configured or default_id).strip()
    if _looks_like_path(name):
        folder = Path(name).expanduser()
        if not is_model_folder(folder):
            raise Network(
                f"{variable}={name} is not a FunASR model folder (it needs config.yaml and model.pt).",
                provider=PROVIDER,
            )
        return str(folder)
    cached = modelscope_cache_folder(name)
    if cached is not None:
        return str(cached)
    if allow_downloads:
        return name
    raise Network(
        f"{name} is not available locally: it is not in the ModelScope cache. Download it once "
        f"(modelscope download --model {name}), set {variable} to its folder, or allow downloads with "
        f"AISTACK_ALLOW_DOWNLOADS=on.",
        provider=PROVIDER,
    )


# --- the loaded models --------------------------------------------------------------


@attrs.define
class LoadedSenseVoice:
    """Both FunASR models; ``stretches_decoded`` counts SenseVoice calls."""

    asr: Any  # funasr.AutoModel for SenseVoice
    vad: Any  # funasr.AutoModel for fsmn-vad
    device: str
    stretches_decoded: int = 0

    def speech_spans(self, samples: np.ndarray) -> list[tuple[int, int]]:
        """Speech stretches as (start, end) sample indices."""
        if len(samples) == 0:
            return []
        results = self.vad.generate(input=samples, disable_pbar=True)
        spans = results[0].get("value", []) if results else []
        samples_per_ms = SAMPLE_RATE // 1000
        found = []
        for start_ms, end_ms in spans:
            start = max(0, int(start_ms) * samples_per_ms)
            end = min(len(samples), int(end_ms) * samples_per_ms)
            if end > start:
                found.append((start, end))
        return found

    def decode(self, samples: np.ndarray, language: str) -> RichText:
        results = self.asr.generate(input=samples, language=language, use_itn=True, disable_pbar=True)
        self.stretches_decoded += 1
        return RichText.parse(results[0].get("text", "") if results else "")


# --- the backend ------------------------------------------------------------------


@attrs.define
class SenseVoiceBackend:
    config: Config
    card: ModelCard = CARD

    def _model_sources(self) -> tuple[str, str]:
        """Where SenseVoice and its VAD load from (local folders, or hub ids when downloads are allowed)."""
        allow = self.config.allow_downloads
        return (
            resolve_model(SENSEVOICE_MODEL.read(self.config), MODEL_ID, SENSEVOICE_MODEL.name, allow),
            resolve_model(SENSEVOICE_VAD_MODEL.read(self.config), VAD_MODEL_ID, SENSEVOICE_VAD_MODEL.name, allow),
        )

    def unavailable(self) -> str | None:
        """Why this model cannot serve now (no local weights), or None; cheap file checks only."""
        try:
            self._model_sources()
        except Network as exc:
            return exc.message
        return None

    def load(self, device: Device | None = None) -> LoadedSenseVoice:
        model, vad = self._model_sources()
        if device is None:
            device_name = "cuda:0" if torch.cuda.is_available() else "cpu"
        else:
            device_name = device.qualified_name  # FunASR moves both models .to() this device
        common = {
            "device": device_name,
            "disable_update": True,  # no version check against the network
            "disable_pbar": True,
            "disable_log": True,
            # AutoModel sets the root logger to this level while it loads.
            "log_level": logging.getLevelName(logging.getLogger().getEffectiveLevel()),
            # AutoModel sets torch's global thread count to this; keep ours.
            "ncpu": torch.get_num_threads(),
        }
        log.info("loading SenseVoice from %s and fsmn-vad from %s on %s", model, vad, device_name)
        try:
            with _root_logging_untouched():
                asr_model = funasr.AutoModel(model=model, **common)
                vad_model = funasr.AutoModel(model=vad, max_single_segment_time=MAX_SEGMENT_MS, **common)
        except Exception as exc:
            if is_out_of_memory(exc):
                raise Overflow("Not enough GPU memory to load SenseVoice.", provider=PROVIDER) from exc
            log.warning("loading SenseVoice from %s and %s failed", model, vad, exc_info=True)
            raise Network(
                f"Could not load SenseVoice ({model}) with fsmn-vad ({vad}): {type(exc).__name__}: {exc}",
                provider=PROVIDER,
            ) from exc
        return LoadedSenseVoice(asr=asr_model, vad=vad_model, device=device_name)

    def _language(self, options: TranscriptionOptions) -> str:
        """The language query SenseVoice gets: one it knows, or ``auto``."""
        requested = normalize_language(options.language, LANGUAGE_SYNONYMS)
        if requested is None:
            return "auto"
        if requested not in LANGUAGES:
            raise Malformed(
                f"SenseVoice transcribes {', '.join(LANGUAGES)}; language={options.language!r} is not among them. "
                f"Use model=auto, Parakeet for European languages, or a Whisper model.",
                provider=PROVIDER,
            )
        return requested

    def transcribe(
        self, model: LoadedSenseVoice, audio: AudioInput, options: TranscriptionOptions, cancel: CancelToken
    ) -> Transcription:
        if options.translate:
            raise Malformed(
                "SenseVoice cannot translate; translate=true needs a multilingual Whisper model.", provider=PROVIDER
            )
        query = self._language(options)
        cancel.raise_if_cancelled()
        duration = float(audio.duration)
        stretches = self._stretches(model, audio, cancel)
        # Decode the first stretch now: the first delta needs it anyway, and
        # it tells the language before the transcription is handed back.
        first_stretch = next(stretches, None)
        cancel.raise_if_cancelled()
        first = self._guarded(lambda: model.decode(first_stretch[2], query)) if first_stretch else None
        # The hint steers SenseVoice but does not bind it: what it detected wins.
        detected = first.language if first is not None else None
        language = detected or (query if query != "auto" else UNKNOWN_LANGUAGE)
        result = Transcription(language=language, duration=duration, segments=())
        result.segments = self._segments(model, first_stretch, first, stretches, query, duration, cancel, result)
        return result

    def _stretches(
        self, model: LoadedSenseVoice, audio: AudioInput, cancel: CancelToken
    ) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(start, end, samples)`` of each speech stretch, found one window of the file at a time."""
        for offset, window in quiet_windows(audio.windows(SAMPLE_RATE, PIECE_S, cancel), WINDOW_S):
            cancel.raise_if_cancelled()
            window = np.ascontiguousarray(window, dtype=np.float32)
            for start, end in self._guarded(lambda: model.speech_spans(window)):
                yield offset + start, offset + end, window[start:end]

    def _segments(
        self,
        model: LoadedSenseVoice,
        first_stretch: tuple[int, int, np.ndarray] | None,
        first: RichText,
        stretches: Iterator[tuple[int, int, np.ndarray]],
        query: str,
        duration: float,
        cancel: CancelToken,
        result: Transcription,
    ) -> Iterator[Segment]:
        if first_stretch is None:
            return
        next_id = 0
        for index, (start, end, samples) in enumerate(itertools.chain([first_stretch], stretches)):
            if index == 0:
                rich = first  # decoded already, for the language
            else:
                cancel.raise_if_cancelled()
                rich = self._guarded(lambda: model.decode(samples, query))
            if result.language == UNKNOWN_LANGUAGE and rich.language:
                # The first stretch had no speech SenseVoice could name; the core
                # reads the language once the segments are consumed.
                result.language = rich.language
            if not rich.text:
                continue  # a stretch of noise or silence: nothing to say, not an error
            begin = min(start / SAMPLE_RATE, duration)
            yield Segment(
                id=next_id,
                start=begin,
                end=max(begin, min(end / SAMPLE_RATE, duration)),
                text=rich.text,
                extra=rich.extra(),
            )
            next_id += 1

    @staticmethod
    def _guarded(work):
        try:
            return work()
        except Exception as exc:
            if is_out_of_memory(exc):
                raise Overflow(
                    "SenseVoice ran out of GPU memory; send shorter audio or free the GPU.", provider=PROVIDER
                ) from exc
            raise


@hookimpl
def register_asr_backends(register, config: Config) -> None:
    register(SenseVoiceBackend(config))


@hookimpl
def list_devices(config: Config) -> list[str]:
    """The GPUs torch can run SenseVoice on (AISTACK_DEVICES=auto)."""
    return torch_gpus(torch)


@hookimpl
def device_free_memory_mb(device: str) -> float | None:
    return torch_free_memory_mb(torch, device)


@hookimpl
def doctor_checks(config: Config) -> list[DoctorCheck]:
    """Whether torch sees a GPU, and whether the SenseVoice weights are on disk."""
    checks = [torch_gpu_check(torch, "SenseVoice")]
    missing = SenseVoiceBackend(config).unavailable()
    if missing:
        checks.append(DoctorCheck("SenseVoice weights", "warn", missing))
    else:
        checks.append(DoctorCheck("SenseVoice weights", "ok", "found on disk"))
    return checks
