"""``GET /v1/realtime``: OpenAI's Realtime API, transcription sessions, over a WebSocket.

The client streams base64 audio (``input_audio_buffer.append``); the
gateway finds the turns itself (server VAD, on the CPU, off the event loop)
or waits for ``input_audio_buffer.commit``, and answers each utterance with
``conversation.item.input_audio_transcription.delta`` events while it is
being spoken and one ``...completed`` when it is over.  Both of OpenAI's
dialects are served: the GA one (``session.update`` with
``session.type = "transcription"``) and the beta one
(``transcription_session.update``, picked by ``OpenAI-Beta: realtime=v1``).

The GPU slot is taken only to decode (one partial, or one utterance) and
released in between, so a session that listens to silence never blocks
anyone.  When another app holds the slot, finished utterances wait in the
session (at most ``AISTACK_REALTIME_MAX_BUFFER_S`` of audio) and are
decoded as soon as it frees; partial decodes are simply skipped.

A client mistake is an ``error`` event in OpenAI's shape (with our
``kind``/``provider`` added) and the session stays open.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import secrets
import statistics
import time
from collections import deque
from typing import Any

import attrs
import numpy as np
from aiohttp import WSMsgType, hdrs, web

from .. import security
from ..backends import Segment, TranscriptionOptions
from ..context import config_key, registry_key, slot_key
from ..errors import AistackError, Busy, Malformed, Network, Overflow, Unknown
from ..inference import Inference, candidate_devices, client_gone, inference
from ..media.live_audio import PCM_RATES, TARGET_RATE, InputFormat, LiveDecoder, SampledAudio
from ..media.live_transcript import LiveTranscript
from ..media.transcript import duration_usage, join_text
from ..media.vad import LoudnessVad, SpeechTurns, TurnDetection
from ..observe.middleware import observability_key
from ..observe.realtime import UtteranceRecord
from ..observe.record import request_info
from ..helpers import normalize_language
from ..registry import AUTO_ALIAS
from ..slot import RETRY_AFTER_S

log = logging.getLogger("aistack.routes.realtime")

MAX_APPEND_BYTES = 15 * 1024 * 1024  # OpenAI's limit for one append's audio
# A frame bigger than this closes the session (1009): base64 of 15 MiB plus the JSON around it fits.
MAX_MESSAGE_BYTES = 24 * 1024 * 1024
MIN_COMMIT_S = 0.1  # OpenAI refuses to commit less than 100 ms
SLOT_POLL_S = 0.02
DEFAULT_MAX_AUDIO_MIN = 240.0
LOGPROBS_INCLUDE = "item.input_audio_transcription.logprobs"
# OpenAI's transcription model names that nothing here registers: they mean "the best we have".
OPENAI_TRANSCRIBE_IDS = frozenset({
    "gpt-4o-transcribe", "gpt-4o-mini-transcribe", "gpt-4o-mini-transcribe-2025-12-15", "gpt-transcribe",
    "gpt-live-transcribe", "gpt-realtime-whisper", "gpt-4o-transcribe-diarize",
})
# semantic_vad's eagerness, approximated by how long a pause ends a turn.
EAGERNESS_SILENCE_MS = {"low": 1000, "medium": 500, "auto": 500, "high": 300}
ENCODINGS = {"pcm16": "pcm16", "audio/pcm": "pcm16", "g711_ulaw": "g711_ulaw", "audio/pcmu": "g711_ulaw",
             "g711_alaw": "g711_alaw", "audio/pcma": "g711_alaw"}
GA_FORMAT_TYPES = {"pcm16": "audio/pcm", "g711_ulaw": "audio/pcmu", "g711_alaw": "audio/pcma"}


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


# --- session settings --------------------------------------------------------------


@attrs.frozen
class SessionSettings:
    format: InputFormat = InputFormat("pcm16", 24000)
    model: str = AUTO_ALIAS  # what the client asked for (shown back); ``entry`` is what serves it
    language: str | None = None
    prompt: str | None = None
    turn_detection: TurnDetection | None = TurnDetection()
    turn_type: str = "server_vad"
    logprobs: bool = False


def _object(value: Any, param: str) -> dict:
    if not isinstance(value, dict):
        raise Malformed(f"'{param}' must be an object.", param=param)
    return value


def _number(value: Any, param: str, low: float, high: float, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and value != int(value)):
        kind = "a whole number" if integer else "a number"
        raise Malformed(f"'{param}' must be {kind} from {low:g} to {high:g}.", param=param)
    if not low <= value <= high:
        raise Malformed(f"'{param}' must be from {low:g} to {high:g}; got {value}.", param=param)
    return int(value) if integer else float(value)


def _optional_text(value: Any, param: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise Malformed(f"'{param}' must be a string.", param=param)
    return value.strip() or None


def parse_format(value: Any, param: str) -> InputFormat:
    if isinstance(value, str):
        encoding, rate = ENCODINGS.get(value), None
    elif isinstance(value, dict):
        encoding = ENCODINGS.get(value.get("type", "audio/pcm"))
        rate = value.get("rate")
    else:
        encoding, rate = None, None
    if encoding is None:
        raise Malformed(
            f"'{param}' must be pcm16, g711_ulaw or g711_alaw (or {{\"type\": \"audio/pcm\", \"rate\": 24000}}, "
            "audio/pcmu, audio/pcma).", param=param,
        )
    if encoding != "pcm16":
        if rate not in (None, 8000):
            raise Malformed(f"G.711 audio is 8000 Hz; '{param}.rate' was {rate}.", param=f"{param}.rate")
        return InputFormat(encoding, 8000)
    if rate is None:
        return InputFormat("pcm16", 24000)
    if isinstance(rate, bool) or rate not in PCM_RATES:
        raise Malformed(
            f"'{param}.rate' must be one of {', '.join(map(str, PCM_RATES))} (OpenAI sends 24000).",
            param=f"{param}.rate",
        )
    return InputFormat("pcm16", int(rate))


def parse_turn_detection(value: Any, param: str) -> tuple[TurnDetection | None, str]:
    if value is None:
        return None, "none"
    value = _object(value, param)
    kind = value.get("type", "server_vad")
    if kind not in ("server_vad", "semantic_vad"):
        raise Malformed(f"'{param}.type' must be server_vad or semantic_vad (or send null).", param=f"{param}.type")
    defaults = TurnDetection()
    if kind == "semantic_vad":
        eagerness = value.get("eagerness") or "auto"
        if eagerness not in EAGERNESS_SILENCE_MS:
            raise Malformed(f"'{param}.eagerness' must be low, medium, high or auto.", param=f"{param}.eagerness")
        return TurnDetection(silence_duration_ms=EAGERNESS_SILENCE_MS[eagerness]), kind
    threshold = value.get("threshold")
    padding = value.get("prefix_padding_ms")
    silence = value.get("silence_duration_ms")
    return TurnDetection(
        threshold=defaults.threshold if threshold is None else _number(threshold, f"{param}.threshold", 0.0, 1.0),
        prefix_padding_ms=defaults.prefix_padding_ms if padding is None
        else _number(padding, f"{param}.prefix_padding_ms", 0, 10000, integer=True),
        silence_duration_ms=defaults.silence_duration_ms if silence is None
        else _number(silence, f"{param}.silence_duration_ms", 0, 10000, integer=True),
    ), kind


def apply_update(settings: SessionSettings, session: Any, param: str) -> SessionSettings:
    """The settings after an update; only what the update names changes.

    Reads both dialects: GA (``session.audio.input.*``, ``session.type``)
    and beta (``input_audio_format``, ``input_audio_transcription``,
    ``turn_detection`` at the top).
    """
    session = _object(session, param)
    changes: dict[str, Any] = {}
    kind = session.get("type")
    if kind not in (None, "transcription"):
        raise Malformed(
            f"This server serves transcription sessions only; '{param}.type' must be \"transcription\".",
            param=f"{param}.type", code="unsupported_session_type",
        )
    audio_input: dict = {}
    if "audio" in session and session["audio"] is not None:
        audio = _object(session["audio"], f"{param}.audio")
        if audio.get("input") is not None:
            audio_input = _object(audio["input"], f"{param}.audio.input")
    sources = (
        (audio_input, f"{param}.audio.input", "format", "transcription", "turn_detection"),
        (session, param, "input_audio_format", "input_audio_transcription", "turn_detection"),
    )
    for source, prefix, format_key, transcription_key, turn_key in sources:
        if format_key in source and source[format_key] is not None:
            changes["format"] = parse_format(source[format_key], f"{prefix}.{format_key}")
        if source.get(transcription_key) is not None:
            where = f"{prefix}.{transcription_key}"
            transcription = _object(source[transcription_key], where)
            if "model" in transcription:
                changes["model"] = _optional_text(transcription["model"], f"{where}.model") or AUTO_ALIAS
            if "language" in transcription:
                changes["language"] = _optional_text(transcription["language"], f"{where}.language")
            if "prompt" in transcription:
                changes["prompt"] = _optional_text(transcription["prompt"], f"{where}.prompt")
        if turn_key in source:
            changes["turn_detection"], changes["turn_type"] = parse_turn_detection(
                source[turn_key], f"{prefix}.{turn_key}"
            )
    if "include" in session:
        include = session["include"]
        if include is None:
            include = []
        if not isinstance(include, list) or any(item != LOGPROBS_INCLUDE for item in include):
            raise Malformed(f"'{param}.include' may only list {LOGPROBS_INCLUDE!r}.", param=f"{param}.include")
        changes["logprobs"] = LOGPROBS_INCLUDE in include
    return attrs.evolve(settings, **changes)


# --- one utterance ----------------------------------------------------------------------


# At most this share of an utterance's length goes to decoding it in its pauses.
EARLY_FINAL_SHARE = 0.5
# An early final may stand in for the final though this much soft sound (between the
# detector's two thresholds: a word fading out) came after its audio ended.  A word is
# longer; without it, one soft window after the first quiet one (common as speech decays)
# would throw the early final away and make `completed` wait for a decode after the stop.
UNHEARD_TAIL_SAMPLES = TARGET_RATE // 10


def heard_to(end: int, speech_end: int) -> bool:
    """Whether audio decoded up to ``end`` heard the speech that ended at ``speech_end``."""
    return end + UNHEARD_TAIL_SAMPLES >= speech_end


@attrs.frozen
class Decoded:
    """One decode of an utterance so far: its audio ran up to ``end`` (an absolute sample)."""

    end: int
    pause: int | None  # an early final: where the quiet of its pause began (None: a regular partial)
    model: str  # the model id and options it was made with: after a session.update that
    options: TranscriptionOptions  # changes them it is a mere partial
    language: str
    segments: list[Segment]
    seconds: float  # decode time


@attrs.define
class Utterance:
    item_id: str
    transcript: LiveTranscript
    samples: np.ndarray | None = None  # set once committed
    ended_at: float | None = None  # monotonic: when the end of speech was known (stop detected, commit)
    speech_end: int | None = None  # absolute sample where the speech ended (the turn's silence began)
    decoded: Decoded | None = None  # the latest partial decode, which may already hold the whole speech
    partials: int = 0
    pause_decode_s: float = 0.0  # decode time spent on early finals (held to EARLY_FINAL_SHARE)

    def decoded_whole(self, model: str, options: TranscriptionOptions) -> Decoded | None:
        """A partial decode that heard all of the speech as the final decode would (``model``,
        ``options``), so that decode would repeat it.  Word timings are extra, never missing:
        a decode with them serves a final without."""
        decoded = self.decoded
        if decoded is None or self.speech_end is None or not heard_to(decoded.end, self.speech_end):
            return None
        if decoded.model != model or decoded.options not in (options, attrs.evolve(options, word_timestamps=True)):
            return None
        return decoded

    @property
    def duration(self) -> float:
        return 0.0 if self.samples is None else self.samples.size / TARGET_RATE


def _decode(run: Inference, audio: SampledAudio, options: TranscriptionOptions) -> tuple[str, list[Segment]]:
    """Worker-thread body: the whole utterance, segment by segment, cancellable between them."""
    run.cancel.raise_if_cancelled()
    result = run.entry.backend.transcribe(run.model, audio, options, run.cancel)
    segments: list[Segment] = []
    for segment in result.segments:
        run.cancel.raise_if_cancelled()
        segments.append(segment)
    return result.language, segments


class ChunkBuffer:
    """The session's 16 kHz audio since ``start`` (an absolute sample index), kept as chunks."""

    def __init__(self) -> None:
        self.chunks: list[np.ndarray] = []
        self.start = 0
        self.end = 0

    def append(self, samples: np.ndarray) -> None:
        if samples.size:
            self.chunks.append(samples)
            self.end += samples.size

    def slice(self, begin: int, end: int) -> np.ndarray:
        begin, end = max(begin, self.start), min(end, self.end)
        if end <= begin:
            return np.zeros(0, dtype=np.float32)
        joined = np.concatenate(self.chunks) if len(self.chunks) != 1 else self.chunks[0]
        self.chunks = [joined]
        return joined[begin - self.start:end - self.start].copy()

    def drop_before(self, sample: int) -> None:
        sample = min(max(sample, self.start), self.end)
        if sample == self.start:
            return
        joined = np.concatenate(self.chunks) if self.chunks else np.zeros(0, dtype=np.float32)
        rest = joined[sample - self.start:]
        self.chunks = [rest] if rest.size else []
        self.start = sample

    def clear(self) -> None:
        self.drop_before(self.end)

    @property
    def seconds(self) -> float:
        return (self.end - self.start) / TARGET_RATE


# --- the session ----------------------------------------------------------------------------


class RealtimeSession:
    def __init__(self, request: web.Request, ws: web.WebSocketResponse, entry: Any, beta: bool) -> None:
        app = request.app
        self.request = request
        self.ws = ws
        self.config = app[config_key]
        self.registry = app[registry_key]
        self.slot = app[slot_key]
        self.stats = app[observability_key].realtime
        self.info = request_info(request)
        self.beta = beta
        self.id = _new_id("sess")
        self.settings = SessionSettings()
        self.entry = entry
        self.decoder = LiveDecoder(self.settings.format)
        self.vad = self.registry.vad_provider() or LoudnessVad()
        self.vad_stream: Any = None
        self.turns: SpeechTurns | None = None
        self.buffer = ChunkBuffer()
        self.current: Utterance | None = None  # the utterance being spoken (server VAD)
        self.speech_start = 0  # absolute sample where the current utterance begins
        self.next_partial = 0  # utterance length (samples) at which the next partial decode starts
        self.last_item_id: str | None = None
        self.queue: deque[Utterance] = deque()
        self.queued = asyncio.Event()
        self.partial_task: asyncio.Task | None = None
        self.partial_end = 0  # absolute sample where the audio of the partial in flight ends
        self.decoder_task: asyncio.Task | None = None
        self.audio_s = 0.0  # all audio received, for AISTACK_MAX_AUDIO_MIN
        self.max_audio_s = 60 * float(getattr(self.config, "max_audio_min", None)
                                      or self.config.env_float("AISTACK_MAX_AUDIO_MIN", DEFAULT_MAX_AUDIO_MIN))
        self.send_lock = asyncio.Lock()
        # For the access-log line
        self.utterances = 0
        self.partials = 0
        self.decode_s = 0.0
        self.decoded_audio_s = 0.0
        self.final_latencies: list[float] = []
        self.seconds_per_second = 0.0  # decode time per second of audio, smoothed: spaces the partials
        self.last_decode_s = 0.0  # how long the last decode took: spaces the early finals
        self._start_turns()

    # --- sending -----------------------------------------------------------------

    async def send(self, event: dict[str, Any]) -> None:
        if self.ws.closed:
            return
        message = json.dumps({"event_id": _new_id("event"), **event}, ensure_ascii=False)
        async with self.send_lock:
            with contextlib.suppress(ConnectionError, RuntimeError):  # the peer is gone: the read loop ends
                await self.ws.send_str(message)

    async def send_error(self, exc: AistackError, client_event_id: str | None = None) -> None:
        error = exc.envelope()["error"]
        error["event_id"] = client_event_id
        await self.send({"type": "error", "error": error})

    def session_json(self) -> dict[str, Any]:
        s = self.settings
        turn: dict[str, Any] | None = None
        if s.turn_detection is not None:
            turn = {"type": s.turn_type, "threshold": s.turn_detection.threshold,
                    "prefix_padding_ms": s.turn_detection.prefix_padding_ms,
                    "silence_duration_ms": s.turn_detection.silence_duration_ms}
        transcription = {"model": s.model, "language": s.language, "prompt": s.prompt or ""}
        include = [LOGPROBS_INCLUDE] if s.logprobs else []
        if self.beta:
            return {
                "id": self.id, "object": "realtime.transcription_session",
                "input_audio_format": s.format.encoding,
                "input_audio_transcription": transcription,
                "turn_detection": turn, "input_audio_noise_reduction": None, "include": include,
            }
        fmt: dict[str, Any] = {"type": GA_FORMAT_TYPES[s.format.encoding]}
        if s.format.encoding == "pcm16":
            fmt["rate"] = s.format.rate
        return {
            "type": "transcription", "id": self.id, "object": "realtime.transcription_session",
            "audio": {"input": {"format": fmt, "transcription": transcription, "turn_detection": turn,
                                "noise_reduction": None}},
            "include": include,
        }

    # --- the read loop -------------------------------------------------------------------

    async def run(self) -> None:
        self.decoder_task = asyncio.create_task(self._decode_loop())
        await self.send({"type": "transcription_session.created" if self.beta else "session.created",
                         "session": self.session_json()})
        idle_s = self.config.ws_idle_timeout_s if self.config.ws_idle_timeout_s > 0 else None
        try:
            while True:
                try:
                    message = await self.ws.receive(timeout=idle_s)
                except asyncio.TimeoutError:
                    log.info("realtime session %s idle for %g s; closing it", self.id, idle_s)
                    await self.ws.close(code=1008, message=b"idle timeout")
                    break
                if message.type == WSMsgType.TEXT:
                    await self.handle(message.data)
                elif message.type == WSMsgType.BINARY:
                    await self.send_error(Malformed(
                        "Send events as JSON text frames; audio goes base64 in input_audio_buffer.append.",
                        code="invalid_event"))
                else:  # CLOSE, CLOSING, CLOSED, ERROR (a missed heartbeat ends up here too)
                    break
        finally:
            await self.close()

    async def close(self) -> None:
        for task in (self.partial_task, self.decoder_task):
            if task is not None and not task.done():
                task.cancel()
        self._describe()  # first: the wait below may itself be cut short by a server shutdown
        # The cancelled tasks wait for their worker threads (finish_in_thread) before they
        # release the slot, so once this returns nothing of the session computes any more.
        await asyncio.gather(*(t for t in (self.partial_task, self.decoder_task) if t is not None),
                             return_exceptions=True)
        self._describe()

    def _describe(self) -> None:
        """The session's access-log line: one per session, with its counts and latencies."""
        info = self.info
        info.capability = "asr"
        info.model = self.entry.card.id
        info.provider = self.entry.card.provider
        info.slot_busy = False
        info.utterances = self.utterances
        info.partials = self.partials
        info.inference_s = round(self.decode_s, 4) if self.decode_s else None
        info.audio_sec = round(self.audio_s, 3)
        info.rtf = self.decode_s / self.decoded_audio_s if self.decoded_audio_s else None
        if self.final_latencies:
            info.final_latency_p50_s = statistics.median(self.final_latencies)
            info.final_latency_max_s = max(self.final_latencies)

    async def handle(self, data: str) -> None:
        client_event_id = None
        try:
            try:
                event = json.loads(data)
            except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON
                raise Malformed("Every message must be one JSON object (an event).", code="invalid_json") from None
            if not isinstance(event, dict):
                raise Malformed("Every message must be one JSON object (an event).", code="invalid_event")
            client_event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
            kind = event.get("type")
            if not isinstance(kind, str):
                raise Malformed("The event has no 'type'.", param="type", code="invalid_event")
            handler = self.HANDLERS.get(kind)
            if handler is None:
                raise Malformed(
                    f"Unknown or unsupported event type {kind[:80]!r}: a transcription session takes "
                    "session.update (or transcription_session.update) and input_audio_buffer.append/commit/clear.",
                    param="type", code="invalid_event_type" if kind in _CONVERSATION_EVENTS else "unknown_event",
                )
            await handler(self, event)
        except AistackError as exc:
            await self.send_error(exc, client_event_id)
        except Exception as exc:  # noqa: BLE001 - one bad event must not end the session
            log.exception("realtime event failed")
            await self.send_error(Unknown(f"The event could not be handled: {type(exc).__name__}."), client_event_id)

    # --- client events ------------------------------------------------------------------

    async def on_update(self, event: dict) -> None:
        param = "session"
        settings = apply_update(self.settings, event.get("session"), param)
        entry = self.entry
        if (settings.model, settings.language) != (self.settings.model, self.settings.language):
            entry = await asyncio.to_thread(self._resolve, settings)
        if settings.format != self.settings.format:
            self.decoder = LiveDecoder(settings.format)
        turns_changed = settings.turn_detection != self.settings.turn_detection
        self.settings, self.entry = settings, entry
        if turns_changed:
            self._end_turn()
            self._start_turns()
        self.info.requested_model = settings.model
        updated = "transcription_session.updated" if event["type"].startswith("transcription_session") \
            else "session.updated"
        await self.send({"type": updated, "session": self.session_json()})

    def _resolve(self, settings: SessionSettings) -> Any:
        model = settings.model
        if model.lower() in OPENAI_TRANSCRIBE_IDS and self.registry.find("asr", model) is None:
            model = AUTO_ALIAS
        try:
            entry = self.registry.resolve_asr(model, settings.language)
        except AistackError as exc:
            exc.param = "session.audio.input.transcription.model"
            raise
        card, language = entry.card, normalize_language(settings.language)
        if model.lower() != AUTO_ALIAS and language and card.languages is not None and language not in card.languages:
            raise Malformed(
                f"{card.id} does not transcribe {settings.language!r}; it knows {', '.join(card.languages[:20])}"
                f"{' ...' if len(card.languages) > 20 else ''}. Choose another model or 'auto'.",
                provider=card.provider, param="session.audio.input.transcription.language",
                code="unsupported_language",
            )
        return entry

    async def on_append(self, event: dict) -> None:
        audio = event.get("audio")
        if not isinstance(audio, str):
            raise Malformed("'audio' must be a base64 string of audio bytes.", param="audio")
        # The decoded size, known before decoding: a too-big chunk costs no work.
        if len(audio) * 3 // 4 - (len(audio) - len(audio.rstrip("="))) > MAX_APPEND_BYTES:
            raise Overflow("One append may carry at most 15 MiB of audio; send smaller chunks.", param="audio",
                           code="audio_too_large")
        try:
            data = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise Malformed("'audio' is not valid base64.", param="audio", code="invalid_base64") from None
        seconds = self.settings.format.duration_of(len(data))
        if self.audio_s + seconds > self.max_audio_s:
            raise Overflow(
                f"This session has received its limit of {self.max_audio_s / 60:g} minutes of audio "
                "(AISTACK_MAX_AUDIO_MIN); open a new session.", param="audio", code="audio_too_long",
            )
        if self.turns is None and self.buffer.seconds + seconds > self.config.realtime_max_buffer_s:
            raise Overflow(
                f"The input buffer holds at most {self.config.realtime_max_buffer_s:g} s of audio "
                "(AISTACK_REALTIME_MAX_BUFFER_S): commit or clear it. This chunk was dropped.",
                param="audio", code="input_audio_buffer_full",
            )
        if not data:
            return
        self.audio_s += seconds
        samples, probabilities = await asyncio.to_thread(self._ingest, data)
        self.buffer.append(samples)
        if self.turns is None:
            return
        for turn in self.turns.push(probabilities):
            if turn.kind == "started":
                await self._speech_started(turn.sample)
            else:
                await self._speech_stopped(turn.speech_end, turn.detected_at)
        if self.current is None:
            keep = self.settings.turn_detection.prefix_padding_ms * TARGET_RATE // 1000 + 2 * self.vad.window_samples
            if self.buffer.end - self.buffer.start > 2 * keep:
                self.buffer.drop_before(self.buffer.end - keep)
            return
        spoken = self.buffer.end - self.speech_start
        if spoken >= self.config.realtime_max_buffer_s * TARGET_RATE:
            # A turn with no pause this long: cut it here and carry on with a new one.
            await self._speech_stopped(self.buffer.end, self.buffer.end)
            await self._speech_started(self.buffer.end, padded=False)
        elif self.turns.pausing:
            self._maybe_early_final()
        elif spoken >= self.next_partial:
            # Not in a pause: one started in a pause runs up to its start and is the early
            # final above, which the final decode can reuse.
            self._maybe_partial()

    def _ingest(self, data: bytes) -> tuple[np.ndarray, np.ndarray | None]:
        """Worker thread: bytes -> 16 kHz samples -> speech probabilities (when VAD is on)."""
        samples = self.decoder.feed(data)
        if self.turns is None:
            return samples, None
        if self.vad_stream is None:
            self.vad_stream = self.vad.open_stream()
        return samples, self.vad_stream.speech_probabilities(samples)

    def _maybe_early_final(self) -> None:
        """In a pause that may end the turn: decode the speech so far, with the final's options.

        If the pause lasts ``silence_duration_ms`` the turn ends and this decode
        heard all of its speech (what follows is silence), so it is the final
        text: the decode ran while the detector was still waiting, and
        ``completed`` follows ``speech_stopped`` at once.  If speech resumes,
        it was one more partial.
        """
        # It starts at the first quiet window: a decode takes about as long as OpenAI's default
        # 500 ms wait (tiny.en, 2 cores), and waiting longer before it (0.15 of the wait was
        # tried) only moved `completed` later; a pause that ends early still yields a partial.
        speech_end = self.turns.speech_end  # after a soft word in the pause, that word's end
        if speech_end is None:
            return
        decoded = self.current.decoded
        if (decoded is not None and heard_to(decoded.end, speech_end)) or (
                self.partial_task is not None and not self.partial_task.done()
                and heard_to(self.partial_end, speech_end)):
            return  # this pause is decoded already, or being decoded
        # A budget: an utterance's early finals may take at most half of its length in decode
        # time, so a speaker (or a client) who pauses every few words cannot keep the slot
        # busy more than about half the time, while the decodes a turn's last pauses need
        # (speech that resumed for a moment, a soft last word) still run at once.
        spoken_s = (self.buffer.end - self.speech_start) / TARGET_RATE
        if self.current.pause_decode_s + self.last_decode_s > EARLY_FINAL_SHARE * spoken_s:
            return
        self._maybe_partial(words=self.settings.logprobs, pause=self.turns.silence_from)

    async def on_commit(self, event: dict) -> None:
        begin = self.speech_start if self.current is not None else self.buffer.start
        if (self.buffer.end - begin) / TARGET_RATE < MIN_COMMIT_S:
            raise Malformed(
                f"Buffer too small: a commit needs at least {MIN_COMMIT_S * 1000:g} ms of audio; "
                f"there is {(self.buffer.end - begin) / TARGET_RATE * 1000:.0f} ms.",
                code="input_audio_buffer_commit_empty",
            )
        utterance = self.current or Utterance(_new_id("item"), LiveTranscript())
        self.current = None
        if self.turns is not None:
            self.turns.reset()
        await self._commit(utterance, begin, self.buffer.end, self.buffer.end)

    async def on_clear(self, event: dict) -> None:
        self._end_turn()
        self.buffer.clear()
        await self.send({"type": "input_audio_buffer.cleared"})

    HANDLERS = {
        "session.update": on_update,
        "transcription_session.update": on_update,
        "input_audio_buffer.append": on_append,
        "input_audio_buffer.commit": on_commit,
        "input_audio_buffer.clear": on_clear,
    }

    # --- turns ------------------------------------------------------------------------------

    def _start_turns(self) -> None:
        detection = self.settings.turn_detection
        if detection is None:
            self.turns = None
            return
        self.turns = SpeechTurns(detection, self.vad.window_samples, origin=self.buffer.end)
        self.vad_stream = None  # fresh detector state, aligned with the new origin

    def _end_turn(self) -> None:
        """Forget the utterance being spoken (cleared, or turn detection changed)."""
        if self.partial_task is not None and not self.partial_task.done():
            self.partial_task.cancel()
        self.current = None
        if self.turns is not None:
            self.turns.reset()

    async def _speech_started(self, sample: int, padded: bool = True) -> None:
        padding = self.settings.turn_detection.prefix_padding_ms * TARGET_RATE // 1000 if padded else 0
        self.speech_start = max(self.buffer.start, sample - padding)
        self.current = Utterance(_new_id("item"), LiveTranscript())
        self.next_partial = int(self.config.realtime_partial_s * TARGET_RATE) if self.config.realtime_partial_s > 0 \
            else 1 << 62
        await self.send({"type": "input_audio_buffer.speech_started",
                         "audio_start_ms": self.speech_start * 1000 // TARGET_RATE,
                         "item_id": self.current.item_id})

    async def _speech_stopped(self, speech_end: int, detected_at: int) -> None:
        utterance, self.current = self.current, None
        if utterance is None:
            return
        await self.send({"type": "input_audio_buffer.speech_stopped",
                         "audio_end_ms": detected_at * 1000 // TARGET_RATE, "item_id": utterance.item_id})
        # Up to the detection point: the trailing silence costs little and keeps a last soft word.
        await self._commit(utterance, self.speech_start, detected_at, speech_end)

    async def _commit(self, utterance: Utterance, begin: int, end: int, speech_end: int) -> None:
        utterance.samples = self.buffer.slice(begin, end)
        utterance.ended_at = time.monotonic()
        utterance.speech_end = speech_end
        self.buffer.drop_before(end)
        if self.partial_task is not None and not self.partial_task.done() and not heard_to(self.partial_end, speech_end):
            self.partial_task.cancel()  # the final decode supersedes it (an early final it waits for)
        await self.send({"type": "input_audio_buffer.committed", "item_id": utterance.item_id,
                         "previous_item_id": self.last_item_id})
        self.last_item_id = utterance.item_id
        waiting = sum(u.duration for u in self.queue)
        if waiting + utterance.duration > self.config.realtime_max_buffer_s:
            await self._drop(utterance, waiting)
            return
        self.queue.append(utterance)
        self.queued.set()

    async def _drop(self, utterance: Utterance, waiting: float) -> None:
        busy = Busy(
            f"The GPU is busy and this session already holds {waiting:.1f} s of audio waiting for it "
            f"(AISTACK_REALTIME_MAX_BUFFER_S={self.config.realtime_max_buffer_s:g}); "
            f"the utterance {utterance.item_id} ({utterance.duration:.1f} s) was dropped.",
            retry_after=RETRY_AFTER_S,
        )
        await self.send_error(busy)
        await self._failed(utterance, busy, outcome="dropped")

    async def _failed(self, utterance: Utterance, exc: AistackError, outcome: str = "failed") -> None:
        error = exc.envelope()["error"]
        await self.send({"type": "conversation.item.input_audio_transcription.failed",
                         "item_id": utterance.item_id, "content_index": 0, "error": error})
        self.stats.utterance(UtteranceRecord(time.time(), self.info.request_id, utterance.item_id,
                                             self.entry.card.id, utterance.duration, outcome,
                                             partials=utterance.partials))

    # --- decoding ------------------------------------------------------------------------------

    def _options(self, words: bool) -> TranscriptionOptions:
        language = self.settings.language
        card = self.entry.card
        if (self.settings.model.lower() in (AUTO_ALIAS, *OPENAI_TRANSCRIBE_IDS) and language
                and card.languages is not None and normalize_language(language) not in card.languages):
            language = None  # `auto` fell back to a model without this language: let it detect
        return TranscriptionOptions(language=language, prompt=self.settings.prompt, word_timestamps=words)

    def _maybe_partial(self, words: bool = False, pause: int | None = None) -> None:
        """Start a partial decode of the utterance so far, if nothing else is decoding."""
        if (self.partial_task is not None and not self.partial_task.done()) or self.queue or not self._slot_free():
            return
        utterance = self.current
        assert utterance is not None
        samples = self.buffer.slice(self.speech_start, self.buffer.end)
        self.partial_end = self.buffer.end
        # On a slow or shared machine a partial can take longer than the interval: space them
        # to at least twice the expected decode time, so partials use at most about half the
        # time and the final decode (which waits for a partial in flight) is rarely held up.
        expected_s = self.seconds_per_second * samples.size / TARGET_RATE
        if self.config.realtime_partial_s > 0:  # else they stay off (an early final is no regular partial)
            self.next_partial = samples.size + int(max(self.config.realtime_partial_s, 2 * expected_s) * TARGET_RATE)
        self.partial_task = asyncio.create_task(self._partial(utterance, samples, self.buffer.end, words, pause))

    async def _partial(self, utterance: Utterance, samples: np.ndarray, end: int, words: bool,
                       pause: int | None) -> None:
        entry, options = self.entry, self._options(words)
        try:
            async with inference(self.request, "asr", entry, watch_disconnect=False) as run:
                started = time.monotonic()
                language, segments = await run.in_thread(_decode, run, SampledAudio(samples), options)
                elapsed = time.monotonic() - started
        except Busy:
            return  # a partial is a courtesy: skip it rather than wait
        except AistackError as exc:
            log.info("realtime partial decode failed: %s", exc.message)
            return
        except asyncio.CancelledError:
            return
        except Exception:  # noqa: BLE001 - a failed partial must not end the session; the final will report
            log.exception("realtime partial decode failed")
            return
        self.partials += 1
        utterance.partials += 1
        if pause is not None:
            utterance.pause_decode_s += elapsed
        self._learn_speed(elapsed, samples.size / TARGET_RATE)
        self.decode_s += elapsed
        self.stats.decoded(elapsed, partial=True)
        utterance.decoded = Decoded(end, pause, entry.card.id, options, language, segments, elapsed)
        if utterance.samples is not None:
            return  # committed meanwhile: the final decode speaks for it (and may be this one)
        delta = utterance.transcript.partial(join_text(segments))
        if delta:
            await self.send({"type": "conversation.item.input_audio_transcription.delta",
                             "item_id": utterance.item_id, "content_index": 0, "delta": delta})

    async def _decode_loop(self) -> None:
        while True:
            while not self.queue:
                self.queued.clear()
                await self.queued.wait()
            utterance = self.queue[0]
            if self.partial_task is not None:
                await asyncio.gather(self.partial_task, return_exceptions=True)
            try:
                await self._final(utterance)
            finally:
                if self.queue and self.queue[0] is utterance:
                    self.queue.popleft()

    async def _final(self, utterance: Utterance) -> None:
        audio = SampledAudio(utterance.samples)
        words = self.settings.logprobs
        early = utterance.decoded_whole(self.entry.card.id, self._options(words))
        if early is not None:
            await self._completed(utterance, audio, words, early.language, early.segments, early.seconds, 0.0,
                                  early=True)
            return
        while True:
            try:
                async with inference(self.request, "asr", self.entry, watch_disconnect=False) as run:
                    run.audio_seconds = audio.duration
                    slot_wait = run.info.slot_wait_s
                    started = time.monotonic()
                    language, segments = await run.in_thread(_decode, run, audio, self._options(words))
                    elapsed = time.monotonic() - started
                break
            except Busy:
                await self._slot_freed()
            except AistackError as exc:
                await self._failed(utterance, exc)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - reported to the client as the item's failure
                log.exception("realtime decode failed")
                await self._failed(utterance, Unknown(f"Transcription failed: {type(exc).__name__}: {exc}"))
                return
        self._learn_speed(elapsed, audio.duration)
        self.decode_s += elapsed
        self.stats.decoded(elapsed, partial=False)
        await self._completed(utterance, audio, words, language, segments, elapsed, slot_wait)

    async def _completed(self, utterance: Utterance, audio: SampledAudio, words: bool, language: str,
                         segments: list[Segment], elapsed: float, slot_wait: float | None,
                         early: bool = False) -> None:
        """The last delta and ``completed``, from the final decode or an early final that heard it all."""
        self.decoded_audio_s += audio.duration
        delta = utterance.transcript.final(join_text(segments))
        if delta:
            await self.send({"type": "conversation.item.input_audio_transcription.delta",
                             "item_id": utterance.item_id, "content_index": 0, "delta": delta})
        completed: dict[str, Any] = {
            "type": "conversation.item.input_audio_transcription.completed",
            "item_id": utterance.item_id, "content_index": 0,
            "transcript": utterance.transcript.text, "usage": duration_usage(audio.duration),
        }
        if words:
            completed["logprobs"] = [
                {"token": word.word, "bytes": list(word.word.encode("utf-8")),
                 "logprob": float(np.log(max(word.probability, 1e-12)))}
                for segment in segments for word in segment.words if word.probability is not None
            ]
        await self.send(completed)
        latency = time.monotonic() - utterance.ended_at
        self.utterances += 1
        self.final_latencies.append(latency)
        self.info.language = language
        self.stats.utterance(UtteranceRecord(time.time(), self.info.request_id, utterance.item_id,
                                             self.entry.card.id, audio.duration, "completed", slot_wait, elapsed,
                                             latency, utterance.partials, early))

    def _learn_speed(self, elapsed: float, audio_s: float) -> None:
        self.last_decode_s = elapsed
        if audio_s > 0:
            self.seconds_per_second = 0.7 * self.seconds_per_second + 0.3 * (elapsed / audio_s)

    def _slot_free(self) -> bool:
        # A device that can run this session's model is free (one of several may be).
        return self.slot.can_take(candidate_devices(self.slot, self.entry.backend))

    async def _slot_freed(self) -> None:
        while not self._slot_free():
            await asyncio.sleep(SLOT_POLL_S)


_CONVERSATION_EVENTS = frozenset({
    "response.create", "response.cancel", "conversation.item.create", "conversation.item.delete",
    "conversation.item.truncate", "conversation.item.retrieve", "output_audio_buffer.clear",
})


# --- the handler -------------------------------------------------------------------------------


def _check_origin(request: web.Request, config) -> None:
    """Browsers do not apply CORS to WebSockets, so the origin rules are applied here.

    A page may open a session when it comes from the gateway's own origin or
    from one listed in ``AISTACK_CORS_ALLOW_ORIGINS`` (as it could call the
    HTTP routes); clients that are not browsers send no ``Origin``.
    """
    origin = request.headers.get(hdrs.ORIGIN)
    if origin is None:
        return
    if origin.split("://", 1)[-1].rstrip("/") == request.host:
        return
    if config.cors_allow_origins and security.CorsPolicy(config.cors_allow_origins).allows(origin.rstrip("/")):
        return
    raise Malformed(
        f"Origin {origin[:100]!r} may not open realtime sessions; add it to AISTACK_CORS_ALLOW_ORIGINS.",
        status=403, code="origin_not_allowed",
    )


async def get_realtime(request: web.Request) -> web.StreamResponse:
    app = request.app
    config = app[config_key]
    stats = app[observability_key].realtime
    info = request_info(request)
    info.capability = "asr"
    intent = request.query.get("intent")
    if intent not in (None, "", "transcription"):
        raise Malformed(
            f"This server serves transcription sessions only (intent=transcription), not {intent[:40]!r}.",
            param="intent", code="unsupported_intent",
        )
    _check_origin(request, config)
    ws = web.WebSocketResponse(
        protocols=("realtime",), heartbeat=config.ws_heartbeat_s or None, max_msg_size=MAX_MESSAGE_BYTES,
    )
    if not ws.can_prepare(request).ok:
        raise Malformed(
            "GET /v1/realtime is a WebSocket endpoint: connect with a WebSocket client "
            "(the openai package's client.realtime.connect, or a browser WebSocket).",
            status=426, headers={"Upgrade": "websocket"}, code="websocket_required",
        )
    # The default model, checked before the upgrade: with no ASR backend at all this is a plain 503.
    entry = await asyncio.to_thread(app[registry_key].resolve_asr, AUTO_ALIAS, None)
    if stats.active >= config.realtime_max_sessions:  # no await between this check and session_opened
        stats.refused += 1
        raise Network(
            f"{stats.active} realtime sessions are open, the most this server allows "
            f"(AISTACK_REALTIME_MAX_SESSIONS={config.realtime_max_sessions}); retry after {RETRY_AFTER_S} s.",
            code="too_many_sessions", headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    beta = "realtime=v1" in request.headers.get("OpenAI-Beta", "").replace(" ", "")
    stats.session_opened()
    try:
        await ws.prepare(request)
        await RealtimeSession(request, ws, entry, beta).run()
    except asyncio.CancelledError:
        # A server that cancels handlers on connection loss (aiohttp's handler_cancellation)
        # does so when the client hangs up: for a session that is its normal end, not a failure.
        task = asyncio.current_task()
        if not client_gone(request) or task is None:
            raise
        task.uncancel()
    finally:
        stats.session_closed()
    return ws


def setup(app: web.Application) -> None:
    app.router.add_get("/v1/realtime", get_realtime)
