"""``POST /v1/audio/transcriptions`` and ``/v1/audio/translations``: OpenAI's speech-to-text API.

read the form (the file spools to disk) → resolve the backend → probe the
audio → run inside the inference context (slot, cancel, cached model) →
answer in the requested format, or as SSE.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import attrs
from aiohttp import web
from aiohttp_sse import EventSourceResponse

from ..backends import DiarizationOptions, Segment, SpeakerTurn, Transcription, TranscriptionOptions
from ..context import config_key, registry_key
from ..errors import AistackError, Malformed, Unknown
from ..forms import Field, Form, UploadPolicy, defer_continue, read_form
from ..inference import Inference, inference
from ..media.audio import DecodedAudio
from ..media.diarize import (
    MAX_REFERENCE_BYTES, SPEAKER_FIELDS, KnownSpeaker, SpeakerSegment, assign_speakers, check_known_names,
    check_speaker_counts, diarized_segment_json, read_known_speakers, speaker_options, turns_in_slot, voice_tagged,
)
from ..media.transcript import TextJoiner, duration_usage, join_text, regroup, segment_json, to_srt, to_vtt, word_json
from ..observe.record import request_info
from ..helpers import normalize_language
from ..registry import AUTO_ALIAS, DIARIZE_ALIAS

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
    Field("include", "list"),
    Field("chunking_strategy", "json"),
)


def _word_timestamps(form: Form) -> bool:
    """Word alignment costs time: ask for it only when the answer uses words."""
    granularities = form["timestamp_granularities"]
    if form["segment_granularity"] == "subtitle" or form["response_format"] in ("srt", "vtt"):
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
    )


def _speaks(card, language: str | None) -> bool:
    lang = normalize_language(language)
    return lang is None or card.languages is None or lang in card.languages


# --- answering ------------------------------------------------------------------


def render(result: Transcription, segments: list[Segment], form: Form, translate: bool) -> web.Response:
    text = join_text(segments)
    response_format = form["response_format"]
    if response_format == "json":
        return web.json_response({"text": text, "usage": duration_usage(result.duration)})
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

    async def send_delta(cues: list[Segment]) -> None:
        delta = "".join(joiner.add(cue.text) for cue in cues)
        first, last = cues[0], cues[-1]
        segment: dict[str, Any] = {"id": first.id, "start": round(first.start, 3), "end": round(last.end, 3)}
        if with_words:
            segment["words"] = [word_json(w) for s in cues for w in s.words]
        segment.update(first.extra)
        await stream.send(json.dumps({"type": "transcript.text.delta", "delta": delta, "segment": segment}))

    try:
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
        await stream.send(json.dumps({
            "type": "transcript.text.done",
            "text": joiner.text,
            "language": result.language,
            "duration": round(result.duration, 3),
            "usage": duration_usage(result.duration),
        }))
    except AistackError as exc:
        if exc.kind != "cancelled":
            await _send_error(stream, exc)
        raise  # the error middleware aborts the connection: a failed stream never looks complete
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception as exc:
        log.exception("transcription failed mid-stream")
        await _send_error(stream, Unknown(f"Transcription failed: {type(exc).__name__}: {exc}"))
        raise
    await stream.write_eof()
    return stream


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
    try:
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
    except AistackError as exc:
        if exc.kind != "cancelled":
            await _send_error(stream, exc)
        raise  # the error middleware aborts the connection: a failed stream never looks complete
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception as exc:
        log.exception("diarized transcription failed mid-stream")
        await _send_error(stream, Unknown(f"Transcription failed: {type(exc).__name__}: {exc}"))
        raise
    await stream.write_eof()
    return stream


# --- the handlers -----------------------------------------------------------------


async def _serve(request: web.Request, translate_route: bool) -> web.StreamResponse:
    app = request.app
    config = app[config_key]
    info = request_info(request)
    info.capability = "asr"
    form = await read_form(
        request, FIELDS,
        uploads=UploadPolicy(config.upload_dir, config.max_upload_mb * 1024 * 1024),
        file_fields=("file",),
        long_text_fields={"known_speaker_references": MAX_REFERENCE_BYTES * 4 // 3 + 1024},
    )
    try:
        upload = form.file("file")
        if upload is None:
            raise Malformed("No audio: add a 'file' field with the recording (multipart/form-data).", param="file")
        translate = translate_route or form["translate"]
        info.requested_model = form["model"] or None
        info.stream, info.response_format = form["stream"], form["response_format"]
        # resolve_asr checks model files on disk (for `auto`), so off the event loop.
        entry = await asyncio.to_thread(app[registry_key].resolve_asr, form["model"], form["language"])
        card = entry.card
        if form["model"].lower() in ("", AUTO_ALIAS) and not _speaks(card, form["language"]):
            # `auto` fell back to a model without this language: the hint is only a hint,
            # so let the model detect (or assume) its own language rather than refuse.
            form.values["language"] = None
        if translate and not card.can_translate:
            raise Malformed(
                f"Translation needs a Whisper model; {card.id} cannot translate.",
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
                return await _respond_stream(run, audio, form, translate)
            return await _respond_whole(run, audio, form, translate)
    finally:
        form.discard()


async def post_transcriptions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, translate_route=False)


async def post_translations(request: web.Request) -> web.StreamResponse:
    return await _serve(request, translate_route=True)


def setup(app: web.Application) -> None:
    app.router.add_route("POST", "/v1/audio/transcriptions", post_transcriptions, expect_handler=defer_continue)
    app.router.add_route("POST", "/v1/audio/translations", post_translations, expect_handler=defer_continue)
