"""``POST /v1/audio/transcriptions``: OpenAI's transcription API on local backends.

parse multipart (the file streams to a temp file) → validate → resolve the
backend → probe the audio → hold the GPU slot → load (cached) and transcribe
in a worker thread → answer in the requested format, or as SSE.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, AsyncIterator

import attrs
from aiohttp import web
from aiohttp_sse import sse_response

from . import capture
from .audio import DecodedAudio
from .backends import CancelToken, Segment, Transcription, TranscriptionOptions
from .config import Config
from .context import config_key, model_cache_key, registry_key, slot_key
from .errors import AistackError, Cancelled, Malformed, Overflow, Unknown
from .observe import request_info
from .registry import AUTO_ALIAS, Registered, normalize_language
from .segments import subtitle_cues
from .streaming import cancel_on_disconnect, finish_in_thread, iterate_in_thread

log = logging.getLogger("aistack.asr")

RESPONSE_FORMATS = ("json", "verbose_json", "text", "srt", "vtt")
GRANULARITIES = ("sentence", "subtitle")
UPLOAD_CHUNK = 1 << 20
MAX_FIELD_BYTES = 64 * 1024
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


@attrs.define
class TranscriptionRequest:
    upload: Path | None = None
    filename: str | None = None
    model: str = ""
    language: str | None = None
    response_format: str = "json"
    translate: bool = False
    stream: bool = False
    segment_granularity: str = "sentence"
    prompt: str | None = None
    temperature: float | None = None
    timestamp_granularities: list[str] = attrs.field(factory=list)


# --- parsing ------------------------------------------------------------------


def _parse_bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise Malformed(f"Field {name!r} must be true or false, got {value!r}.")


async def _save_upload(request: web.Request, part, directory: Path, limit_bytes: int) -> Path:
    suffix = Path(part.filename or "").suffix[:16]
    handle, name = tempfile.mkstemp(prefix="aistack-upload-", suffix=suffix, dir=directory)
    path = Path(name)
    size = 0
    try:
        with os.fdopen(handle, "wb") as out:
            while chunk := await part.read_chunk(UPLOAD_CHUNK):
                size += len(chunk)
                if size > limit_bytes:
                    raise Overflow(
                        f"The uploaded file is larger than the {limit_bytes // (1024 * 1024)} MB limit "
                        f"(AISTACK_MAX_UPLOAD_MB). Split the audio or compress it."
                    )
                capture.tee_request_body(request, chunk)  # a no-op unless payload capture is on
                await asyncio.to_thread(out.write, chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


async def parse_request(request: web.Request, config: Config) -> TranscriptionRequest:
    """Read the multipart form; the caller must delete ``result.upload``."""
    limit = config.max_upload_mb * 1024 * 1024
    if request.content_length is not None and request.content_length > limit + MAX_FIELD_BYTES * 16:
        raise Overflow(
            f"The request body ({request.content_length / (1024 * 1024):.1f} MB) is larger than the "
            f"{config.max_upload_mb} MB upload limit (AISTACK_MAX_UPLOAD_MB)."
        )
    if not request.content_type.startswith("multipart/"):
        raise Malformed(
            "Send the audio as multipart/form-data with a 'file' field (as OpenAI's API does), "
            f"not {request.content_type or 'an empty body'}."
        )
    parsed = TranscriptionRequest()
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            name = part.name or ""
            if name == "file":
                if parsed.upload is not None:
                    raise Malformed("Send exactly one 'file' field.")
                parsed.filename = part.filename
                parsed.upload = await _save_upload(request, part, config.upload_dir, limit)
                continue
            raw = await part.read(decode=True)
            if len(raw) > MAX_FIELD_BYTES:
                raise Malformed(f"Field {name!r} is too long (max {MAX_FIELD_BYTES} bytes).")
            value = raw.decode("utf-8", errors="replace")
            _apply_field(parsed, name, value)
    except ValueError as exc:  # aiohttp's word for a broken multipart body
        if parsed.upload is not None:
            parsed.upload.unlink(missing_ok=True)
        raise Malformed(f"The multipart/form-data body could not be read ({exc}). Send a well-formed form.") from None
    except BaseException:
        if parsed.upload is not None:
            parsed.upload.unlink(missing_ok=True)
        raise
    return parsed


def _apply_field(parsed: TranscriptionRequest, name: str, value: str) -> None:
    if name == "model":
        parsed.model = value.strip()
    elif name == "language":
        parsed.language = value.strip() or None
    elif name == "response_format":
        parsed.response_format = value.strip().lower() or "json"
    elif name == "translate":
        parsed.translate = _parse_bool(name, value)
    elif name == "stream":
        parsed.stream = _parse_bool(name, value)
    elif name == "segment_granularity":
        parsed.segment_granularity = value.strip().lower() or "sentence"
    elif name == "prompt":
        parsed.prompt = value or None
    elif name == "temperature":
        if value.strip():
            try:
                parsed.temperature = float(value)
            except ValueError:
                raise Malformed(f"Field 'temperature' must be a number, got {value!r}.") from None
    elif name in ("timestamp_granularities[]", "timestamp_granularities"):
        parsed.timestamp_granularities.append(value.strip())
    # Unknown fields (e.g. OpenAI's 'include[]', 'chunking_strategy') are ignored, as OpenAI-shaped
    # clients may send them.


def validate(parsed: TranscriptionRequest) -> None:
    if parsed.upload is None:
        raise Malformed("No audio: add a 'file' field with the recording (multipart/form-data).")
    if parsed.response_format not in RESPONSE_FORMATS:
        raise Malformed(
            f"Unsupported response_format {parsed.response_format!r}; use one of {', '.join(RESPONSE_FORMATS)}."
        )
    if parsed.segment_granularity not in GRANULARITIES:
        raise Malformed(
            f"Unsupported segment_granularity {parsed.segment_granularity!r}; use 'sentence' or 'subtitle'."
        )
    for granularity in parsed.timestamp_granularities:
        if granularity not in ("word", "segment"):
            raise Malformed(f"timestamp_granularities[] takes 'word' or 'segment', got {granularity!r}.")
    if parsed.temperature is not None and not 0.0 <= parsed.temperature <= 1.0:
        raise Malformed("temperature must be between 0 and 1.")


# --- formatting ---------------------------------------------------------------


def regroup(segments: list[Segment], granularity: str, first_id: int) -> list[Segment]:
    """Apply ``segment_granularity``; backends deliver sentence-like segments.

    Subtitle cues are cut from the words of consecutive segments together,
    so short sentences can share a cue; segments without words stay whole.
    """
    if granularity != "subtitle":
        return [attrs.evolve(segment, id=first_id + i) for i, segment in enumerate(segments)]
    cues: list[Segment] = []
    pending_words: list = []

    def flush() -> None:
        if pending_words:
            cues.extend(subtitle_cues(pending_words, start_id=first_id + len(cues)))
            pending_words.clear()

    for segment in segments:
        if segment.words:
            pending_words.extend(segment.words)
        else:
            flush()
            cues.append(attrs.evolve(segment, id=first_id + len(cues)))
    flush()
    return cues


def join_text(segments: list[Segment]) -> str:
    return " ".join(text for segment in segments if (text := segment.text.strip())).strip()


def segment_json(segment: Segment) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": segment.id,
        "start": round(segment.start, 3),
        "end": round(segment.end, 3),
        "text": segment.text,
    }
    for name in ("avg_logprob", "no_speech_prob", "compression_ratio", "temperature"):
        value = getattr(segment, name)
        if value is not None:
            entry[name] = value
    entry.update(segment.extra)
    return entry


def word_json(word) -> dict[str, Any]:
    return {"start": round(word.start, 3), "end": round(word.end, 3), "word": word.word}


def _timestamp(seconds: float, separator: str) -> str:
    millis = max(0, int(round(seconds * 1000)))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def to_srt(segments: list[Segment]) -> str:
    blocks = [
        f"{i}\n{_timestamp(s.start, ',')} --> {_timestamp(s.end, ',')}\n{s.text.strip()}\n"
        for i, s in enumerate(segments, start=1)
    ]
    return "\n".join(blocks)


def to_vtt(segments: list[Segment]) -> str:
    blocks = [f"{_timestamp(s.start, '.')} --> {_timestamp(s.end, '.')}\n{s.text.strip()}\n" for s in segments]
    return "WEBVTT\n\n" + "\n".join(blocks)


def render(result: Transcription, segments: list[Segment], response_format: str, translate: bool) -> web.Response:
    text = join_text(segments)
    if response_format == "json":
        return web.json_response({"text": text})
    if response_format == "text":
        return web.Response(text=text + "\n" if text else "", content_type="text/plain")
    if response_format == "srt":
        return web.Response(text=to_srt(segments), content_type="application/x-subrip")
    if response_format == "vtt":
        return web.Response(text=to_vtt(segments), content_type="text/vtt")
    body: dict[str, Any] = {
        "task": "translate" if translate else "transcribe",
        "language": result.language,
        "duration": round(result.duration, 3),
        "text": text,
        "segments": [segment_json(s) for s in segments],
    }
    words = [word_json(w) for s in segments for w in s.words]
    if words:
        body["words"] = words
    body.update(result.extra)
    return web.json_response(body)


# --- running ------------------------------------------------------------------


def _speaks(card, language: str | None) -> bool:
    lang = normalize_language(language)
    return lang is None or card.languages is None or lang in card.languages


def _options(parsed: TranscriptionRequest) -> TranscriptionOptions:
    return TranscriptionOptions(
        language=parsed.language,
        translate=parsed.translate,
        prompt=parsed.prompt,
        temperature=parsed.temperature,
        word_timestamps=True,
        stream=parsed.stream,
    )


def _transcribe_all(entry: Registered, model: Any, audio: DecodedAudio, options, cancel: CancelToken):
    """Worker-thread body of a non-streamed request."""
    cancel.raise_if_cancelled()
    result = entry.backend.transcribe(model, audio, options, cancel)
    segments: list[Segment] = []
    for segment in result.segments:
        segments.append(segment)
        cancel.raise_if_cancelled()
    return result, segments


async def _respond_whole(request, entry, model, audio, parsed, cancel) -> web.Response:
    result, segments = await finish_in_thread(
        _transcribe_all, entry, model, audio, _options(parsed), cancel, cancel=cancel
    )
    segments = regroup(segments, parsed.segment_granularity, 0)
    return render(result, segments, parsed.response_format, parsed.translate)


async def _respond_stream(request, entry, model, audio, parsed, cancel) -> web.StreamResponse:
    card = entry.card
    result: Transcription = await finish_in_thread(
        entry.backend.transcribe, model, audio, _options(parsed), cancel, cancel=cancel
    )
    texts: list[str] = []
    async with sse_response(request, sep="\n", allow_all_methods=True) as stream:
        try:
            if card.supports_streaming:
                next_id = 0
                async for segment in iterate_in_thread(lambda: _checked(result.segments, cancel), cancel):
                    for cue in regroup([segment], parsed.segment_granularity, next_id):
                        next_id += 1
                        texts.append(cue.text.strip())
                        await _send_delta(stream, [cue])
            else:
                await stream.send(json.dumps({
                    "type": "warning",
                    "code": "streaming_not_supported",
                    "model": card.id,
                    "message": f"{card.id} does not stream; the whole transcription follows as one delta.",
                }))
                segments = await finish_in_thread(lambda: list(_checked(result.segments, cancel)), cancel=cancel)
                cues = regroup(segments, parsed.segment_granularity, 0)
                if cues:
                    texts.append(join_text(cues))
                    await _send_delta(stream, cues)
            await stream.send(json.dumps({
                "type": "transcript.text.done",
                "text": " ".join(t for t in texts if t),
                "language": result.language,
                "duration": round(result.duration, 3),
            }))
        except (ConnectionResetError, asyncio.CancelledError):
            cancel.cancel("client disconnected")
            request_info(request).client_disconnected = True
            raise
        except Cancelled:
            request_info(request).client_disconnected = True
        except AistackError as exc:
            await _send_error(stream, exc)
        except Exception as exc:  # noqa: BLE001 - reported in-band, logged with its traceback
            log.exception("transcription failed mid-stream")
            await _send_error(stream, Unknown(f"Transcription failed: {type(exc).__name__}: {exc}"))
    return stream


def _checked(segments, cancel: CancelToken):
    for segment in segments:
        cancel.raise_if_cancelled()
        yield segment


async def _send_delta(stream, segments: list[Segment]) -> None:
    first, last = segments[0], segments[-1]
    await stream.send(json.dumps({
        "type": "transcript.text.delta",
        "delta": join_text(segments),
        "segment": {
            "id": first.id,
            "start": round(first.start, 3),
            "end": round(last.end, 3),
            "words": [word_json(w) for s in segments for w in s.words],
            **first.extra,
        },
    }))


async def _send_error(stream, exc: AistackError) -> None:
    with contextlib.suppress(ConnectionResetError):
        await stream.send(json.dumps({"type": "error", **exc.envelope()["error"]}))


async def transcribe(request: web.Request) -> web.StreamResponse:
    app = request.app
    config = app[config_key]
    info = request_info(request)
    info.capability = "asr"
    parsed = await parse_request(request, config)
    try:
        validate(parsed)
        # resolve_asr checks model files on disk (for `auto`), so off the event loop.
        entry = await asyncio.to_thread(app[registry_key].resolve_asr, parsed.model, parsed.language)
        card = entry.card
        info.model, info.provider = card.id, card.provider
        info.extras.update(stream=parsed.stream, response_format=parsed.response_format)
        if parsed.model.lower() in ("", AUTO_ALIAS) and not _speaks(card, parsed.language):
            # `auto` fell back to a model without this language: the hint is only a hint,
            # so let the model detect (or assume) its own language rather than refuse.
            parsed.language = None
        if parsed.translate and not card.can_translate:
            raise Malformed(
                f"translate=true needs a multilingual Whisper model; {card.id} cannot translate.",
                provider=card.provider,
            )
        audio = await asyncio.to_thread(DecodedAudio.open, parsed.upload)
        info.extras["audio_sec"] = round(audio.duration, 3)
        async with app[slot_key].acquire_or_busy("asr", card.id, info.request_id) as waited:
            info.slot_wait_s = waited
            async with cancel_on_disconnect(request) as cancel:
                async with app[model_cache_key].use(card.id, "asr", entry.backend.load) as model:
                    started = time.monotonic()  # real-time factor of inference, model load excluded
                    try:
                        if parsed.stream:
                            response = await _respond_stream(request, entry, model, audio, parsed, cancel)
                        else:
                            response = await _respond_whole(request, entry, model, audio, parsed, cancel)
                    except Cancelled:
                        info.client_disconnected = True
                        raise
            if audio.duration > 0:
                info.extras["rtf"] = round((time.monotonic() - started) / audio.duration, 4)
            return response
    finally:
        if parsed.upload is not None:
            parsed.upload.unlink(missing_ok=True)


def setup(app: web.Application) -> None:
    app.router.add_post("/v1/audio/transcriptions", transcribe)
