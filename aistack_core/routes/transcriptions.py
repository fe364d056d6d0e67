"""``POST /v1/audio/transcriptions`` and ``/v1/audio/translations``: OpenAI's speech-to-text API.

read the form (the file spools to disk) → resolve the backend → probe the
audio → run inside the inference context (slot, cancel, cached model) →
answer in the requested format, or as SSE.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from typing import Any, AsyncIterator

import attrs
from aiohttp import web
from aiohttp_sse import EventSourceResponse

from ..backends import DiarizationOptions, Segment, SpeakerTurn, Transcription, TranscriptionOptions, VadSettings, Word
from ..context import config_key, registry_key
from ..errors import AistackError, Malformed, Unknown
from ..forms import Field, Form, defer_continue, read_form, upload_policy
from ..inference import Inference, inference
from ..media.audio import DecodedAudio
from ..media.diarize import (
    SPEAKER_FIELDS, SPEAKER_TEXT_LIMITS, KnownSpeaker, SpeakerSegment, assign_speakers, check_known_names,
    check_speaker_counts, diarized_segment_json, read_known_speakers, speaker_options, turns_in_slot, voice_tagged,
)
from ..media.transcript import TextJoiner, duration_usage, join_text, regroup, segment_json, to_srt, to_vtt, word_json
from ..observe.record import request_info
from ..helpers import normalize_language
from ..registry import DIARIZE_ALIAS, is_auto

log = logging.getLogger("aistack.routes.transcriptions")

RESPONSE_FORMATS = ("json", "verbose_json", "text", "srt", "vtt", "diarized_json")
GRANULARITIES = ("sentence", "subtitle")

FIELDS = (
    Field("model", "str", default=""),
    Field("language", "str"),
    Field("prompt", "str", strip=False),
    Field("response_format", "enum", default="json", choices=RESPONSE_FORMATS),
    Field("temperature", "float", minimum=0.0, maximum=1.0),
    Field("timestamp_granularities", "list", choices=("word", "segment")),
    Field("stream", "bool", default=False),
    Field("translate", "bool", default=False),
    Field("segment_granularity", "enum", default="sentence", choices=GRANULARITIES),
    Field("include", "list", choices=("logprobs",)),
    Field("chunking_strategy", "json"),
)
CHUNKING_PARAM = "chunking_strategy"


def _wants_logprobs(form: Form) -> bool:
    return "logprobs" in (form["include"] or ())


def _chunking(form: Form) -> VadSettings | None:
    """OpenAI's ``chunking_strategy``: ``"auto"`` or a ``server_vad`` object.

    The openai client sends the object as bracketed form fields
    (``chunking_strategy[type]=server_vad``); a JSON text works as well.
    """
    value = form[CHUNKING_PARAM]
    prefix = CHUNKING_PARAM + "["
    bracketed = {
        name[len(prefix):-1]: raw for name, raw in form.raw_values.items()
        if name.startswith(prefix) and name.endswith("]")
    }
    if value is None and bracketed:
        value = bracketed
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() == "auto":
        return VadSettings()
    if not isinstance(value, dict) or str(value.get("type", "")).lower() != "server_vad":
        raise Malformed(
            f"{CHUNKING_PARAM} must be \"auto\" or an object {{\"type\": \"server_vad\", \"threshold\": 0.5, "
            f"\"prefix_padding_ms\": 300, \"silence_duration_ms\": 200}}.",
            param=CHUNKING_PARAM, code="invalid_chunking_strategy",
        )
    unknown = sorted(set(value) - {"type", "threshold", "prefix_padding_ms", "silence_duration_ms"})
    if unknown:
        raise Malformed(
            f"{CHUNKING_PARAM} has unknown keys: {', '.join(unknown)}.",
            param=CHUNKING_PARAM, code="invalid_chunking_strategy",
        )
    defaults = VadSettings()
    return VadSettings(
        threshold=_vad_number(value, "threshold", defaults.threshold, float, 0.0, 1.0),
        prefix_padding_ms=_vad_number(value, "prefix_padding_ms", defaults.prefix_padding_ms, int, 0, 60_000),
        silence_duration_ms=_vad_number(value, "silence_duration_ms", defaults.silence_duration_ms, int, 0, 60_000),
    )


def _vad_number(value: dict, key: str, default, kind, low, high):
    raw = value.get(key)
    if raw is None or raw == "":
        return default
    try:
        if isinstance(raw, bool):
            raise ValueError
        number = kind(float(raw)) if kind is float else int(str(raw).strip())
    except (TypeError, ValueError, OverflowError):
        number = None
    if number is None or not (low <= number <= high) or (kind is float and not math.isfinite(number)):
        raise Malformed(
            f"{CHUNKING_PARAM}.{key} must be {'a number' if kind is float else 'a whole number'} "
            f"between {low:g} and {high:g}, got {raw!r}.",
            param=CHUNKING_PARAM, code="invalid_chunking_strategy",
        )
    return number


def _word_timestamps(form: Form) -> bool:
    """Word alignment costs time: ask for it only when the answer uses words."""
    granularities = form["timestamp_granularities"]
    if (form["segment_granularity"] == "subtitle" or form["response_format"] in ("srt", "vtt")
            or _wants_logprobs(form)):
        return True
    if granularities is not None and form.sent("timestamp_granularities"):
        return "word" in granularities
    # Not given: our contract lists words in verbose_json whenever the backend has them.
    return form["response_format"] == "verbose_json" and not form["stream"]


def _wants_words(form: Form) -> bool:
    granularities = form["timestamp_granularities"]
    if form.sent("timestamp_granularities"):
        return "word" in granularities
    return True


def _options(form: Form, translate: bool) -> TranscriptionOptions:
    return TranscriptionOptions(
        language=form["language"],
        translate=translate,
        prompt=form["prompt"],
        temperature=form["temperature"],
        word_timestamps=_word_timestamps(form),
        stream=form["stream"],
        vad=_chunking(form),
    )


def _speaks(card, language: str | None) -> bool:
    lang = normalize_language(language)
    return lang is None or card.languages is None or lang in card.languages


def logprobs_json(words) -> list[dict[str, Any]]:
    """OpenAI's logprobs entries from the word probabilities a backend measured.

    Each word is one entry; words without a probability are left out, never
    given an invented one.
    """
    entries = []
    for word in words:
        if word.probability is None:
            continue
        entries.append({
            "token": word.word,
            "logprob": round(math.log(max(word.probability, 1e-12)), 6),
            "bytes": list(word.word.encode("utf-8")),
        })
    return entries


def _add_logprobs(body: dict[str, Any], form: Form, words: list[Word]) -> None:
    if not _wants_logprobs(form):
        return
    entries = logprobs_json(words)
    if entries:
        body["logprobs"] = entries


# --- answering ------------------------------------------------------------------


def render(result: Transcription, segments: list[Segment], form: Form, translate: bool) -> web.Response:
    text = join_text(segments)
    response_format = form["response_format"]
    all_words = [w for s in segments for w in s.words]
    if response_format == "json":
        body_json: dict[str, Any] = {"text": text}
        _add_logprobs(body_json, form, all_words)
        body_json["usage"] = duration_usage(result.duration)
        return web.json_response(body_json)
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
    if _wants_words(form):
        words = [word_json(w) for s in segments for w in s.words]
        if words:
            body["words"] = words
    _add_logprobs(body, form, all_words)
    body["usage"] = duration_usage(result.duration)
    body.update(result.extra)
    return web.json_response(body)


def _transcribe_all(run: Inference, audio: DecodedAudio, options: TranscriptionOptions):
    """Worker-thread body of a non-streamed request."""
    run.cancel.raise_if_cancelled()
    result = run.entry.backend.transcribe(run.model, audio, options, run.cancel)
    segments: list[Segment] = []
    for segment in result.segments:
        segments.append(segment)
        run.cancel.raise_if_cancelled()
    return result, segments


def _checked(segments, cancel):
    for segment in segments:
        cancel.raise_if_cancelled()
        yield segment


async def _respond_whole(run: Inference, audio: DecodedAudio, form: Form, translate: bool) -> web.Response:
    result, segments = await run.in_thread(_transcribe_all, run, audio, _options(form, translate))
    segments = regroup(segments, form["segment_granularity"], 0)
    run.info.language = result.language
    response = render(result, segments, form, translate)
    _describe(response, run, result.language)
    return response


def _describe(response: web.StreamResponse, run: Inference, language: str | None) -> None:
    response.headers["X-Aistack-Model"] = run.entry.card.id
    if language:
        response.headers["X-Aistack-Language"] = language


async def _respond_stream(run: Inference, audio: DecodedAudio, form: Form, translate: bool) -> web.StreamResponse:
    request, card = run.request, run.entry.card
    result: Transcription = await run.in_thread(
        run.entry.backend.transcribe, run.model, audio, _options(form, translate), run.cancel
    )
    run.info.language = result.language
    with_words = _word_timestamps(form)
    stream = EventSourceResponse(sep="\n", allow_all_methods=True)
    _describe(stream, run, result.language)
    await stream.prepare(request)
    joiner = TextJoiner()
    seen_words: list[Word] = []

    async def send_delta(cues: list[Segment]) -> None:
        delta = "".join(joiner.add(cue.text) for cue in cues)
        first, last = cues[0], cues[-1]
        segment: dict[str, Any] = {"id": first.id, "start": round(first.start, 3), "end": round(last.end, 3)}
        words = [w for s in cues for w in s.words]
        seen_words.extend(words)
        if with_words and _wants_words(form):
            segment["words"] = [word_json(w) for w in words]
        segment.update(first.extra)
        event: dict[str, Any] = {"type": "transcript.text.delta", "delta": delta}
        _add_logprobs(event, form, words)
        event["segment"] = segment
        await stream.send(json.dumps(event))

    async with _failures_in_band(stream, "transcription"):
        if card.supports_streaming:
            next_id = 0
            async for segment in run.iterate(lambda: _checked(result.segments, run.cancel)):
                for cue in regroup([segment], form["segment_granularity"], next_id):
                    next_id += 1
                    await send_delta([cue])
        else:
            await stream.send(json.dumps({
                "type": "warning",
                "code": "streaming_not_supported",
                "model": card.id,
                "message": f"{card.id} does not stream; the whole transcription follows as one delta.",
            }))
            segments = await run.in_thread(lambda: list(_checked(result.segments, run.cancel)))
            cues = regroup(segments, form["segment_granularity"], 0)
            if cues:
                await send_delta(cues)
        done: dict[str, Any] = {
            "type": "transcript.text.done",
            "text": joiner.text,
            "language": result.language,
            "duration": round(result.duration, 3),
        }
        _add_logprobs(done, form, seen_words)
        done["usage"] = duration_usage(result.duration)
        await stream.send(json.dumps(done))
    # The end of the stream goes out once the slot is free (see _serve).
    return stream


@contextlib.asynccontextmanager
async def _failures_in_band(stream: EventSourceResponse, what: str) -> AsyncIterator[None]:
    """A failure after the SSE headers went out: say why in an ``error`` event, then re-raise,
    so the error middleware aborts the connection and the stream never looks complete."""
    try:
        yield
    except AistackError as exc:
        if exc.kind != "cancelled":
            await _send_error(stream, exc)
        raise
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception as exc:
        log.exception("%s failed mid-stream", what)
        await _send_error(stream, Unknown(f"Transcription failed: {type(exc).__name__}: {exc}"))
        raise


async def _send_error(stream: EventSourceResponse, exc: AistackError) -> None:
    try:
        await stream.send(json.dumps({"type": "error", **exc.envelope()["error"]}))
    except ConnectionError:
        pass


# --- speakers (diarization) ---------------------------------------------------------
# model=gpt-4o-transcribe-diarize, diarize=true or response_format=diarized_json:
# the diarizer runs first, in the same slot hold, then the words are given to its turns.

DIARIZE_FIELDS = (Field("diarize", "bool", default=False), *SPEAKER_FIELDS)


@attrs.frozen
class DiarizationPlan:
    diarizer: Any  # the registry's Registered for the diarization backend
    options: DiarizationOptions
    known: list[KnownSpeaker]


async def _diarization_plan(request: web.Request, form: Form) -> DiarizationPlan | None:
    """What the request asks of a diarizer, checked before the slot is taken; None without diarization."""
    form.take(DIARIZE_FIELDS)
    wanted = (form["diarize"] or form["response_format"] == "diarized_json"
              or form["model"].strip().lower() == DIARIZE_ALIAS)
    names, references = form["known_speaker_names"], form["known_speaker_references"]
    if not wanted:
        for name in ("known_speaker_names", "known_speaker_references", "num_speakers", "min_speakers",
                     "max_speakers"):
            if form.sent(name):
                raise Malformed(
                    f"{name} applies to diarized transcriptions: add diarize=true or "
                    f"response_format=diarized_json.", param=name,
                )
        return None
    check_known_names(names, references)
    diarizer = await asyncio.to_thread(request.app[registry_key].resolve_diarization)
    options = speaker_options(form)
    check_speaker_counts(options, diarizer.backend.max_speakers)
    known = await asyncio.to_thread(read_known_speakers, form, request.app[config_key].upload_dir)
    return DiarizationPlan(diarizer, options, known)


def _render_with_speakers(
    result: Transcription, spoken: list[SpeakerSegment], form: Form, translate: bool
) -> web.Response:
    response_format = form["response_format"]
    if response_format in ("srt", "vtt"):
        tagged = voice_tagged(spoken)
        if response_format == "srt":
            return web.Response(text=to_srt(tagged), content_type="application/x-subrip")
        return web.Response(text=to_vtt(tagged), content_type="text/vtt")
    if response_format == "diarized_json":
        return web.json_response({
            "task": "translate" if translate else "transcribe",
            "duration": round(result.duration, 3),
            "text": join_text(s.segment for s in spoken),
            "segments": [diarized_segment_json(s) for s in spoken],
            "usage": duration_usage(result.duration),
        })
    # json, text and verbose_json as without speakers; verbose_json segments name theirs.
    segments = [attrs.evolve(s.segment, extra={**s.segment.extra, "speaker": s.speaker}) for s in spoken]
    return render(result, segments, form, translate)


def _cued(spoken: list[SpeakerSegment], granularity: str, first_id: int = 0) -> list[SpeakerSegment]:
    """``segment_granularity=subtitle`` within each speaker's segment: a cue never mixes two voices."""
    if granularity != "subtitle":
        return spoken
    cues: list[SpeakerSegment] = []
    for piece in spoken:
        cues.extend(SpeakerSegment(piece.speaker, cue)
                    for cue in regroup([piece.segment], granularity, first_id + len(cues)))
    return cues


def _speaker_options(form: Form, translate: bool) -> TranscriptionOptions:
    # Words are what get assigned to speakers, so ask for their times whatever the format.
    return attrs.evolve(_options(form, translate), word_timestamps=True)


async def _respond_with_speakers(
    run: Inference, plan: DiarizationPlan, audio: DecodedAudio, form: Form, translate: bool
) -> web.StreamResponse:
    turns = await turns_in_slot(run, plan.diarizer, audio, plan.options, plan.known)
    if form["stream"]:
        return await _stream_with_speakers(run, plan, turns, audio, form, translate)
    result, segments = await run.in_thread(_transcribe_all, run, audio, _speaker_options(form, translate))
    run.info.language = result.language
    spoken = _cued(assign_speakers(segments, turns), form["segment_granularity"])
    response = _render_with_speakers(result, spoken, form, translate)
    _describe(response, run, result.language)
    response.headers["X-Aistack-Diarizer"] = plan.diarizer.card.id
    return response


async def _stream_with_speakers(
    run: Inference, plan: DiarizationPlan, turns: list[SpeakerTurn], audio: DecodedAudio, form: Form,
    translate: bool,
) -> web.StreamResponse:
    """``transcript.text.segment`` events as the words arrive, then ``transcript.text.done``."""
    result: Transcription = await run.in_thread(
        run.entry.backend.transcribe, run.model, audio, _speaker_options(form, translate), run.cancel
    )
    run.info.language = result.language
    stream = EventSourceResponse(sep="\n", allow_all_methods=True)
    _describe(stream, run, result.language)
    stream.headers["X-Aistack-Diarizer"] = plan.diarizer.card.id
    await stream.prepare(run.request)
    joiner = TextJoiner()
    next_id = 0
    async with _failures_in_band(stream, "diarized transcription"):
        async for segment in run.iterate(lambda: _checked(result.segments, run.cancel)):
            for spoken in _cued(assign_speakers([segment], turns, next_id), form["segment_granularity"], next_id):
                next_id += 1
                joiner.add(spoken.segment.text)
                await stream.send(json.dumps(diarized_segment_json(spoken)))
        await stream.send(json.dumps({
            "type": "transcript.text.done",
            "text": joiner.text,
            "usage": duration_usage(result.duration),
        }))
    await stream.write_eof()
    return stream


# --- the handlers -----------------------------------------------------------------


def _resolve(registry, model: str, language: str | None, translate: bool):
    """The backend for the request (blocking: ``auto`` checks model files on disk)."""
    entry = registry.resolve_asr(model, language)
    if translate and is_auto(model) and not entry.card.can_translate:
        # `auto` for a translation: the best model that can translate, if one can serve.
        ranked = sorted(registry.serving("asr"), key=lambda e: (e.card.auto_priority, e.card.id))
        entry = next((e for e in ranked if e.card.can_translate), entry)
    return entry


def _translators(app: web.Application) -> list[str]:
    entries = sorted(app[registry_key].asr.values(), key=lambda e: (e.card.auto_priority, e.card.id))
    return [e.card.id for e in entries if e.card.can_translate]


async def _serve(request: web.Request, translate_route: bool) -> web.StreamResponse:
    app = request.app
    config = app[config_key]
    info = request_info(request)
    info.capability = "asr"
    form = await read_form(
        request, FIELDS,
        uploads=upload_policy(config),
        file_fields=("file",),
        long_text_fields=SPEAKER_TEXT_LIMITS,
    )
    try:
        upload = form.require_file("file")
        translate = translate_route or form["translate"]
        info.requested_model = form["model"] or None
        # One spelling for every backend: names and region forms become the code.
        form.values["language"] = normalize_language(form["language"], strict=True)
        _chunking(form)  # a bad chunking_strategy is refused before the slot is taken
        info.stream, info.response_format = form["stream"], form["response_format"]
        # resolve_asr checks model files on disk (for `auto`), so off the event loop.
        entry = await asyncio.to_thread(_resolve, app[registry_key], form["model"], form["language"], translate)
        card = entry.card
        if is_auto(form["model"]) and not _speaks(card, form["language"]):
            # `auto` fell back to a model without this language: the hint is only a hint,
            # so let the model detect (or assume) its own language rather than refuse.
            form.values["language"] = None
        if translate and not card.can_translate:
            raise Malformed(
                f"{card.id} cannot translate. Translations need a model that can: "
                f"{', '.join(_translators(app)) or 'none is installed'}.",
                provider=card.provider, param="model", code="translation_not_supported",
            )
        speakers = await _diarization_plan(request, form)
        audio = await asyncio.to_thread(DecodedAudio.open, upload.path, config.max_audio_min * 60)
        info.audio_sec = round(audio.duration, 3)
        async with inference(request, "asr", entry) as run:
            run.audio_seconds = audio.duration
            if speakers is not None:
                return await _respond_with_speakers(run, speakers, audio, form, translate)
            if form["stream"]:
                response = await _respond_stream(run, audio, form, translate)
            else:
                response = await _respond_whole(run, audio, form, translate)
        if response.prepared:
            # A client that has read the done event may send its next request at
            # once: the slot is released before the stream ends.
            await response.write_eof()
        return response
    finally:
        form.discard()


async def post_transcriptions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, translate_route=False)


async def post_translations(request: web.Request) -> web.StreamResponse:
    return await _serve(request, translate_route=True)


def setup(app: web.Application) -> None:
    app.router.add_route("POST", "/v1/audio/transcriptions", post_transcriptions, expect_handler=defer_continue)
    app.router.add_route("POST", "/v1/audio/translations", post_translations, expect_handler=defer_continue)
