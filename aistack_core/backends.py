"""What a plugin implements, and the value objects that cross the border.

A backend plugin registers objects that satisfy one of the protocols
below.  The core calls them; they never see HTTP.  Blocking methods
(``load``, ``transcribe``, ``synthesize``) always run in a worker thread.
"""

from __future__ import annotations

import inspect
import ipaddress
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable, Iterator, Protocol, runtime_checkable

import attrs
from yarl import URL

from .devices import Device
from .errors import Cancelled

if TYPE_CHECKING:  # pragma: no cover - typing only
    import aiohttp
    import numpy


@attrs.frozen
class ModelCard:
    """One entry of ``/v1/models`` and what the core needs to route to it.

    ``provider`` is the name shown in error envelopes ("Faster-Whisper").
    ``aliases`` resolve to this card but are not listed.  For ASR,
    ``auto_languages`` are the languages this backend is the preferred
    choice for under the ``auto`` alias, and ``auto_priority`` orders the
    fallback (lower wins) when no preferred backend is installed.
    """

    id: str
    capabilities: tuple[str, ...]
    owned_by: str
    provider: str
    aliases: tuple[str, ...] = ()
    languages: tuple[str, ...] | None = None
    supports_streaming: bool = False
    auto_languages: tuple[str, ...] = ()
    auto_priority: int = 100
    can_translate: bool = False

    def to_openai(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "id": self.id,
            "object": "model",
            "created": 0,
            "owned_by": self.owned_by,
            "capabilities": list(self.capabilities),
            "supports_streaming": self.supports_streaming,
            "is_routing_alias": False,
        }
        if self.languages is not None and "asr" in self.capabilities:
            entry["languages"] = list(self.languages)
        return entry


class CancelToken:
    """Set by the core when the client goes away; checked by workers between steps."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def cancel(self, reason: str = "client disconnected") -> None:
        self.reason = reason
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled(f"Request cancelled: {self.reason}.")


# --- speech-to-text -----------------------------------------------------------


@attrs.frozen
class Word:
    start: float
    end: float
    word: str
    probability: float | None = None


@attrs.frozen
class Segment:
    """One decoded stretch of speech.  Optional scores follow OpenAI's verbose_json.

    ``seek`` and ``tokens`` are Whisper's (the window offset in 10 ms frames
    and the token ids); other backends leave them unset.
    """

    id: int
    start: float
    end: float
    text: str
    words: tuple[Word, ...] = ()
    seek: int | None = None
    tokens: tuple[int, ...] = ()
    avg_logprob: float | None = None
    no_speech_prob: float | None = None
    compression_ratio: float | None = None
    temperature: float | None = None
    extra: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class VadSettings:
    """Voice-activity cutting the client asked for (OpenAI's ``chunking_strategy``).

    ``threshold`` is the speech probability above which audio counts as
    speech; a pause of ``silence_duration_ms`` ends a chunk, and
    ``prefix_padding_ms`` of audio is kept around each.  Backends without a
    VAD ignore it.
    """

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 200


@attrs.frozen
class TranscriptionOptions:
    language: str | None = None
    translate: bool = False
    prompt: str | None = None
    temperature: float | None = None
    word_timestamps: bool = True
    stream: bool = False
    vad: VadSettings | None = None


@attrs.define
class Transcription:
    """A backend's answer.  ``segments`` may be a lazy iterator: the core pulls
    one segment at a time (in a thread) and streams it when asked to."""

    language: str
    duration: float
    segments: Iterable[Segment]
    extra: dict[str, Any] = attrs.field(factory=dict)


class AudioInput(Protocol):
    """The uploaded audio, already validated as decodable by the core.

    Its sample rate and channel count are plausible for speech and it is no
    longer than ``AISTACK_MAX_AUDIO_MIN``; decoding it again stops with
    ``Overflow`` should the file turn out longer than its header said.
    """

    path: Path
    duration: float

    def samples(self, sample_rate: int = 16000, cancel: CancelToken | None = None) -> "numpy.ndarray":
        """Mono float32 samples in [-1, 1] at ``sample_rate`` (decoded on call).

        This holds the whole file in memory (about 230 MB per hour at
        16 kHz); backends that can work piecewise should read ``windows``.
        """

    def windows(
        self, sample_rate: int = 16000, seconds: float = 600.0, cancel: CancelToken | None = None
    ) -> Iterator[tuple[float, "numpy.ndarray"]]:
        """``(offset_s, samples)`` for consecutive windows of ``seconds``, decoded as they are pulled.

        Memory stays at one window whatever the length.  Cut points fall
        wherever the clock says, possibly mid-word: a backend that needs
        clean cuts keeps the tail of one window and prepends it to the next.
        Offsets are the window's start in the file, to add to its timestamps.
        ``cancel`` is checked while decoding (raises ``Cancelled``).
        """


@runtime_checkable
class AsrBackend(Protocol):
    card: ModelCard

    def load(self, device: Device | None = None) -> Any:
        """Load the model onto ``device`` (blocking).  The core caches what this returns.

        A backend whose ``load`` takes no ``device`` parameter cannot choose
        where it runs: the core then uses it on its first device only.
        """

    def transcribe(
        self, model: Any, audio: AudioInput, options: TranscriptionOptions, cancel: CancelToken
    ) -> Transcription:
        """Transcribe ``audio`` with the loaded ``model``.  Raise typed errors."""

    # Optional: ``def unavailable(self) -> str | None`` says why the backend cannot
    # serve right now (e.g. its weights are not on disk), or None.  The core then
    # hides it from /v1/models and from ``auto``; an explicit request still reaches
    # ``load`` and gets the plugin's own 503.  Keep it to cheap file checks.


def backend_unavailable(backend: Any) -> str | None:
    check = getattr(backend, "unavailable", None)
    return check() if check is not None else None


def chooses_device(backend: Any) -> bool:
    """Whether the backend's ``load`` takes the device to load onto (older plugins' does not)."""
    try:
        parameters = inspect.signature(backend.load).parameters
    except (TypeError, ValueError):
        return False
    return "device" in parameters


def load_on(backend: Any, device: Device) -> Any:
    """Call ``backend.load`` for ``device`` (blocking), the old way when it cannot choose."""
    return backend.load(device=device) if chooses_device(backend) else backend.load()


# --- voice activity detection ---------------------------------------------------


class VoiceActivityStream(Protocol):
    """One live audio stream's detector state (recurrent state, leftover samples)."""

    def speech_probabilities(self, samples: "numpy.ndarray") -> "numpy.ndarray":
        """Feed mono float32 samples at 16 kHz; return one speech probability in
        [0, 1] per complete window of ``window_samples`` now available, in order.

        Samples that do not fill a window are kept for the next call, so
        window ``n`` always covers stream samples ``n*w .. (n+1)*w``.  Blocking:
        the core calls it in a worker thread.
        """


@runtime_checkable
class VadProvider(Protocol):
    """A voice activity detector the realtime sessions use for server-side turn detection.

    ``window_samples`` is the detector's window at 16 kHz (512 for Silero).
    ``open_stream`` may load the detector on first call (blocking; called in
    a worker thread) and must be safe to call from several threads.
    """

    name: str
    window_samples: int

    def open_stream(self) -> VoiceActivityStream:
        """A fresh detector state for one audio stream."""


# --- text-to-speech -----------------------------------------------------------


@attrs.frozen
class SpeechOptions:
    text: str
    voice: str
    speed: float = 1.0
    language: str | None = None
    instructions: str | None = None


@runtime_checkable
class TtsBackend(Protocol):
    """An in-process synthesizer.

    ``synthesize`` yields mono int16 numpy arrays at ``sample_rate``, one per
    sentence or smaller piece, so the core can stream as it goes.  When
    ``native_speed`` is false the core time-stretches for ``speed`` itself.
    """

    card: ModelCard
    voices: tuple[str, ...]
    default_voice: str
    sample_rate: int
    native_speed: bool

    def load(self, device: Device | None = None) -> Any:
        """Load the voice models (blocking); ``device`` as for :meth:`AsrBackend.load`."""

    def synthesize(self, model: Any, options: SpeechOptions, cancel: CancelToken) -> Iterator["numpy.ndarray"]:
        """Yield audio chunks for ``options.text``."""


# --- speaker diarization ------------------------------------------------------


@attrs.frozen
class SpeakerTurn:
    """One stretch of time in which one speaker talks.

    ``speaker`` is the backend's own label ("0", "spk1"): the core relabels
    turns "A", "B", ... (or with known names) before a client sees them.
    ``embedding``, when the backend has one, is a speaker vector for this
    turn; the core compares such vectors by cosine similarity only.
    """

    start: float
    end: float
    speaker: str
    embedding: tuple[float, ...] | None = attrs.field(default=None, repr=False)

    @property
    def duration(self) -> float:
        return max(0.0, self.end - self.start)


@attrs.frozen
class DiarizationOptions:
    """What the client asked for; ``None`` lets the backend decide."""

    num_speakers: int | None = None
    min_speakers: int | None = None
    max_speakers: int | None = None


@runtime_checkable
class DiarizationBackend(Protocol):
    """An in-process diarizer: who spoke when.

    ``max_speakers`` is the most speakers it can tell apart in one
    recording.  ``diarize`` returns turns in any order (overlaps allowed);
    ``embed`` turns a short mono float32 clip at 16 kHz into a speaker
    vector, so the core can match turns to known speakers' reference clips.
    """

    card: ModelCard
    max_speakers: int

    def load(self) -> Any:
        """Load the model (blocking).  The core caches what this returns."""

    def diarize(
        self, model: Any, audio: AudioInput, options: DiarizationOptions, cancel: CancelToken
    ) -> list[SpeakerTurn]:
        """The speaker turns of ``audio``.  Raise typed errors."""

    def embed(self, model: Any, samples: "numpy.ndarray", cancel: CancelToken) -> tuple[float, ...]:
        """A speaker vector for ``samples`` (mono float32 at 16 kHz)."""


# --- upstream proxies ---------------------------------------------------------

# ``probe(session, base_url)``: what the upstream at ``base_url`` serves now.
ModelProbe = Callable[["aiohttp.ClientSession", str], Awaitable[list[ModelCard]]]
JsonRewrite = Callable[[dict[str, Any]], dict[str, Any]]
MemoryRelease = Callable[["aiohttp.ClientSession", str], Awaitable[list[str]]]

_THIS_MACHINE_NAMES = frozenset({"localhost", "host.docker.internal", "0.0.0.0", "::"})


def upstream_urls(value: "str | Iterable[str]") -> tuple[str, ...]:
    """One URL, several comma-separated ones, or an iterable of them, as a tuple without trailing slashes."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    urls = tuple(part.strip().rstrip("/") for part in parts if part.strip())
    if not urls:
        raise ValueError("an upstream needs at least one URL")
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"upstream URL {url!r} must start with http:// or https://")
    return urls


def runs_on_this_machine(url: str) -> bool:
    """Whether ``url`` names this machine: loopback, ``localhost``, Docker's host alias, our host name.

    Only what needs no DNS lookup is recognised; an upstream on this machine
    reached through a LAN address has to be declared local by its plugin's
    settings.
    """
    host = (URL(url).host or "").strip("[]").lower()
    if host in _THIS_MACHINE_NAMES or host.endswith(".localhost") or host == socket.gethostname().lower():
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@attrs.frozen
class Upstream:
    """An HTTP service the gateway forwards to (Qwen3-TTS, Ollama, an OpenAI-compatible engine).

    ``base_url`` is one URL, or several replicas of the same service (a
    comma-separated string or a tuple); they are kept as ``urls``.  Requests
    go to the first replica not known to be down; one that refused a
    connection or failed its probe is skipped until its probe answers again
    (upstreams.py).  ``routes`` are the gateway paths it serves (a trailing
    ``*`` matches a prefix).  ``probe(session, base_url)`` lists what one
    replica can serve now; it is called with a short deadline and may raise
    or hang, which simply hides its models.  ``unreachable_hint`` is the 503
    message when nothing listens.  ``rewrite_json`` may adjust a JSON
    request body before it is sent.  ``timeout_status`` is what a read
    timeout before the answer's headers becomes: 504 for an upstream that is
    merely slow to answer, 502 where the upstream's own contract treats every
    transport failure as a bad gateway (Qwen3-TTS).  ``headers`` are added to
    every request sent upstream.

    ``devices`` are the gateway devices (``AISTACK_DEVICES`` names) the
    engine's work runs on: a proxied request takes the slot of one of them.
    None means the default: every device when ``uses_local_gpu`` (its work
    runs on this machine), none otherwise (a remote engine's work takes no
    slot); ``("all",)`` every device; ``()`` none.  ``release_memory``, when
    given, asks the engine to free what it holds idle on a device before an
    in-process model loads there; it is called with the upstream's session
    and the device name and returns what it released (for the log).

    When several upstreams share a capability, a request goes to the one
    whose probe lists its ``model``; a model nobody lists goes to the first
    ``catch_all`` upstream, whose own answer then tells the client what it
    has.  An upstream that serves only what it lists sets ``catch_all`` False.
    """

    name: str
    capability: str
    urls: tuple[str, ...] = attrs.field(alias="base_url", converter=upstream_urls)
    provider: str
    routes: tuple[str, ...]
    probe: ModelProbe
    unreachable_hint: str
    connect_timeout: float = 5.0
    read_timeout: float = 600.0
    rewrite_json: JsonRewrite | None = None
    evict_before: tuple[str, ...] = ()
    timeout_status: int = 504
    # Headers the upstream itself needs (its own API key, from the plugin's
    # settings); the client's credentials for the gateway are never forwarded.
    headers: tuple[tuple[str, str], ...] = attrs.field(default=(), repr=False)
    # False for an engine on another machine: its work does not take a local GPU slot.
    uses_local_gpu: bool = True
    catch_all: bool = True
    # Which of the gateway's devices its work occupies (None: all if uses_local_gpu, else none).
    devices: tuple[str, ...] | None = None
    release_memory: MemoryRelease | None = None

    @property
    def base_url(self) -> str:
        """The first replica: the one named where the upstream as a whole is meant."""
        return self.urls[0]


# --- aistack doctor -------------------------------------------------------------

CHECK_STATUSES = ("ok", "warn", "fail")


@attrs.frozen
class DoctorCheck:
    """One finding of ``aistack doctor``.

    ``name`` says what was checked ("GPU visible to the library"), ``detail`` what was
    found, and ``fix``, for a ``warn`` or ``fail``, the command or setting
    that mends it.
    """

    name: str
    status: str = attrs.field(validator=attrs.validators.in_(CHECK_STATUSES))
    detail: str
    fix: str | None = None

    def to_json(self) -> dict:
        return attrs.asdict(self)
