"""``POST /v1/audio/speech`` (and ``/speech/stream``): in-process synthesis, else the TTS upstream.

Whether a request is served here or upstream is decided once, in
:func:`post_speech`: a ``model`` that names an in-process TTS model (or one
of OpenAI's ids mapped to the default voice model) is synthesized here;
anything else is forwarded untouched — the client's own bytes — to the TTS
upstream (Qwen3-TTS in vLLM-Omni).  A body that is not a JSON object or a
form is refused here, without holding the slot.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from typing import Any

import attrs
import numpy as np
from aiohttp import web
from aiohttp_sse import EventSourceResponse

from .. import proxy
from ..backends import CancelToken, SpeechOptions
from ..config import Config
from ..context import config_key, registry_key
from ..errors import AistackError, Malformed, Network, Overflow
from ..forms import Field, Form, defer_continue, read_form
from ..inference import Inference, inference
from ..media import audio
from ..media.tts_cache import TtsCache
from ..observe.record import request_info
from ..registry import OPENAI_TTS_IDS, Registered, Registry

log = logging.getLogger("aistack.routes.speech")

OPENAI_VOICES = (
    "alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse", "marin", "cedar",
)
CLONING_FIELDS = ("ref_audio", "audio_sample", "custom_voice_file", "speaker_wav")
MAX_INPUT_CHARS = 4096
# Speech requests are text: a megabyte is far beyond any input the limit above allows,
# but leaves room for a reference voice sent to the upstream.
MAX_SPEECH_BODY_BYTES = 16 * 1024 * 1024

tts_cache_key = web.AppKey("tts_cache", TtsCache)

ROUTING_FIELDS = (Field("model", "str", default=""), Field("voice", "json"))
SPEECH_FIELDS = (
    Field("input", "str", strip=False),
    Field("response_format", "enum", default="mp3", choices=tuple(audio.CONTENT_TYPES)),
    Field("speed", "float", default=1.0, minimum=audio.MIN_SPEED, maximum=audio.MAX_SPEED),
    # As OpenAI does, speech streams by default: audio leaves as it is synthesized.
    Field("stream", "bool", default=True),
    Field("stream_format", "enum", default="audio", choices=("audio", "sse")),
    Field("cache", "bool", default=True),
    Field("language", "str"),
    Field("instructions", "str"),
)


@attrs.frozen
class SpeechRequest:
    entry: Registered
    options: SpeechOptions
    response_format: str
    stream: bool
    stream_format: str
    use_cache: bool


# --- reading the request --------------------------------------------------------


def _pick_backend(registry: Registry, model: str, voice: Any) -> Registered | None:
    entry = registry.resolve_tts(model)
    if entry is None or not voice or model.lower() == entry.card.id.lower():
        return entry
    # An OpenAI model id with a voice that another in-process model owns: use that model.
    for other in registry.tts.values():
        if _match_voice(other.backend, voice) is not None:
            return other
    return entry


def _match_voice(backend, name: Any) -> str | None:
    """The backend's own spelling of ``name`` (voice names are case-insensitive)."""
    if not isinstance(name, str):
        return None
    lowered = name.lower()
    return next((voice for voice in backend.voices if voice.lower() == lowered), None)


def _voice(entry: Registered, requested: Any, config: Config) -> str:
    backend = entry.backend
    if requested in (None, ""):
        return backend.default_voice
    if not isinstance(requested, str):
        raise Malformed("'voice' must be a string naming a voice.", param="voice")
    own = _match_voice(backend, requested)
    if own is not None:
        return own
    if requested.lower() in OPENAI_VOICES:
        mapped = _match_voice(backend, config.tts_voice_map.get(requested.lower(), ""))
        return mapped or backend.default_voice
    valid = ", ".join((*backend.voices, *OPENAI_VOICES))
    raise Malformed(
        f"Unknown voice {requested!r} for {entry.card.id}. Valid voices: {valid}.",
        provider=entry.card.provider, param="voice", code="voice_not_found",
    )


def parse_speech(form: Form, entry: Registered, request: web.Request, config: Config) -> SpeechRequest:
    form.take(SPEECH_FIELDS)
    text = form["input"]
    if not isinstance(text, str) or not text.strip():
        raise Malformed(
            "'input' is required: the text to speak, as a non-empty string.", param="input", code="missing_input"
        )
    if len(text) > MAX_INPUT_CHARS:
        raise Overflow(
            f"'input' has {len(text)} characters; the limit is {MAX_INPUT_CHARS}. Split the text.",
            param="input", code="input_too_long",
        )
    for field in CLONING_FIELDS:
        if form.raw_values.get(field) not in (None, ""):
            raise Malformed(
                f"{entry.card.id} cannot clone voices ('{field}' was sent). Voice cloning needs a TTS upstream "
                f"model that clones; send the request with that model's id.",
                provider=entry.card.provider, param=field, code="voice_cloning_not_supported",
            )
    stream_format = form["stream_format"]
    # As in OpenAI's API, asking for SSE events is asking for a stream.
    stream = request.path.rstrip("/").endswith("/speech/stream") or stream_format == "sse" or form["stream"]
    cache_control = request.headers.get("Cache-Control", "").lower()
    use_cache = form["cache"] and "no-cache" not in cache_control and "no-store" not in cache_control
    options = SpeechOptions(
        text=text,
        voice=_voice(entry, form.raw_values.get("voice"), config),
        speed=form["speed"],
        language=form["language"] or None,
        instructions=form["instructions"] or None,
    )
    return SpeechRequest(entry, options, form["response_format"], stream, stream_format, use_cache)


# --- synthesis ----------------------------------------------------------------


def _as_int16(chunk: Any) -> np.ndarray:
    """Backends may yield int16 or float samples in [-1, 1]; the encoders take int16."""
    array = np.asarray(chunk)
    if array.dtype.kind == "f":
        return audio.float_to_int16(array)
    return array.astype(np.int16, copy=False)


def output_rate(speech: SpeechRequest) -> int:
    """The sample rate the client gets: OpenAI's 24 kHz for ``pcm``, else the voice's own."""
    return audio.OPENAI_PCM_RATE if speech.response_format == "pcm" else speech.entry.backend.sample_rate


def _synthesize(entry: Registered, model: Any, options: SpeechOptions, cancel: CancelToken, rate: int | None = None):
    """Worker-thread generator: one int16 chunk (at ``rate``) per piece the engine yields."""
    backend = entry.backend
    native = backend.native_speed
    engine_options = options if native else attrs.evolve(options, speed=1.0)
    resampler = audio.Int16Resampler(backend.sample_rate, rate) if rate and rate != backend.sample_rate else None
    for chunk in backend.synthesize(model, engine_options, cancel):
        cancel.raise_if_cancelled()
        pcm = _as_int16(chunk)
        if not native and options.speed != 1.0:
            pcm = audio.time_stretch(pcm, backend.sample_rate, options.speed)
        if resampler is not None:
            pcm = resampler.feed(pcm)
        if pcm.size:
            yield pcm
    if resampler is not None:
        tail = resampler.flush()
        if tail.size:
            yield tail


def _cache_key(cache: TtsCache, speech: SpeechRequest) -> str:
    o = speech.options
    return cache.key(
        model=speech.entry.card.id, voice=o.voice, speed=o.speed, format=speech.response_format,
        language=o.language, instructions=o.instructions, stream=speech.stream,
        stream_format=speech.stream_format if speech.stream else None, text=o.text,
    )


async def _serve_in_process(request: web.Request, speech: SpeechRequest) -> web.StreamResponse:
    app = request.app
    info = request_info(request)
    info.stream, info.response_format = speech.stream, speech.response_format
    cache = app[tts_cache_key]
    as_sse = speech.stream and speech.stream_format == "sse"
    content_type = audio.CONTENT_TYPES[speech.response_format]
    key = None
    if not cache.enabled:
        cache_state = "DISABLED"
    elif not speech.use_cache:
        cache_state = "BYPASS"
    else:
        key = _cache_key(cache, speech)
        hit = await asyncio.to_thread(cache.get, key)
        if hit is not None:
            info.capability, info.model, info.provider, info.cache = "tts", speech.entry.card.id, speech.entry.card.provider, "HIT"
            headers = {"X-Cache": "HIT", "X-Aistack-Model": speech.entry.card.id}
            if as_sse:
                return await _replay_sse(request, hit.data, headers)
            return web.Response(body=hit.data, content_type=content_type, headers=headers)
        cache_state = "MISS"
    info.cache = cache_state
    headers = {"X-Cache": cache_state, "X-Aistack-Model": speech.entry.card.id}

    async with inference(request, "tts", speech.entry) as run:
        if speech.stream:
            response, body, samples = await _stream(run, speech, content_type, headers)
        else:
            body, samples = await run.in_thread(_synthesize_whole, speech, run.model, run.cancel)
            response = web.Response(body=body, content_type=content_type, headers=headers)
        run.audio_seconds = samples / output_rate(speech)
    if key is not None and body is not None:
        await asyncio.to_thread(cache.put, key, body, content_type)
    if response.prepared:
        await response.write_eof()
    return response


def _nothing_to_say(speech: SpeechRequest) -> Malformed:
    return Malformed(
        "Nothing in 'input' can be spoken (it produced no audio): send words, not only punctuation or symbols.",
        provider=speech.entry.card.provider, param="input", code="nothing_to_speak",
    )


def _synthesize_whole(speech: SpeechRequest, model: Any, cancel: CancelToken) -> tuple[bytes, int]:
    rate = output_rate(speech)
    chunks = list(_synthesize(speech.entry, model, speech.options, cancel, rate))
    pcm = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)
    if pcm.size == 0:
        raise _nothing_to_say(speech)
    return audio.encode(pcm, rate, speech.response_format), int(pcm.size)


SSE_REPLAY_CHUNK = 32 * 1024


async def _replay_sse(request: web.Request, data: bytes, headers: dict) -> web.StreamResponse:
    """A cached SSE answer, sent in the same event shape as when it was synthesized."""
    response = EventSourceResponse(sep="\n", headers=headers, allow_all_methods=True)
    await response.prepare(request)
    for start in range(0, len(data), SSE_REPLAY_CHUNK):
        piece = data[start:start + SSE_REPLAY_CHUNK]
        await response.send(json.dumps({"type": "speech.audio.delta", "audio": base64.b64encode(piece).decode()}))
    await response.send(json.dumps({"type": "speech.audio.done", "usage": None}))
    await response.write_eof()
    return response


async def _stream(run: Inference, speech: SpeechRequest, content_type: str, headers: dict):
    """Send audio as each piece is synthesized.  Returns (response, all bytes, samples).

    A failure after the first byte is raised on: the error middleware then
    aborts the connection, so a broken stream never looks complete (an SSE
    stream first says why, in a ``speech.audio.error`` event).
    """
    rate = output_rate(speech)
    as_sse = speech.stream_format == "sse"
    pieces = run.iterate(lambda: _synthesize(speech.entry, run.model, speech.options, run.cancel, rate))
    try:
        # The first piece is awaited before the headers go out: input that
        # yields no audio at all is still a plain 400, not a broken stream.
        try:
            first = await pieces.__anext__()
        except StopAsyncIteration:
            raise _nothing_to_say(speech) from None
        if as_sse:
            response: web.StreamResponse = EventSourceResponse(sep="\n", headers=headers, allow_all_methods=True)
        else:
            response = web.StreamResponse(headers={**headers, "Content-Type": content_type})
        await response.prepare(run.request)
        sent: list[bytes] = []

        async def send(data: bytes) -> None:
            if not data:
                return
            sent.append(data)
            if as_sse:
                await response.send(json.dumps({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()}))
            else:
                await response.write(data)

        encoder = audio.StreamEncoder(speech.response_format, rate)
        samples = int(first.size)
        try:
            await send(await asyncio.to_thread(encoder.feed, first))
            async for pcm in pieces:
                samples += int(pcm.size)
                await send(await asyncio.to_thread(encoder.feed, pcm))
            await send(await asyncio.to_thread(encoder.close))
            if as_sse:
                await response.send(json.dumps({"type": "speech.audio.done", "usage": None}))
        except AistackError as exc:
            if as_sse and exc.kind != "cancelled":
                with contextlib.suppress(ConnectionError):
                    await response.send(json.dumps({"type": "speech.audio.error", **exc.envelope()["error"]}))
            raise
        # The end of the body is sent by the caller once the slot is free and the
        # cache holds the answer: a client that sees the end may ask again at once.
        return response, b"".join(sent), samples
    finally:
        await pieces.aclose()  # closes the engine's generator when the stream stops early


# --- the handler -------------------------------------------------------------------


async def post_speech(request: web.Request) -> web.StreamResponse:
    app = request.app
    info = request_info(request)
    info.capability = "tts"
    form = await read_form(request, ROUTING_FIELDS, keep_raw=True, max_body_bytes=MAX_SPEECH_BODY_BYTES)
    model = form["model"]
    info.requested_model = model or None
    registry = app[registry_key]
    entry = _pick_backend(registry, model, form.raw_values.get("voice"))
    if entry is not None:
        return await _serve_in_process(request, parse_speech(form, entry, request, app[config_key]))
    if registry.find_any(model) is not None:
        raise Malformed(
            f"Model {model!r} is not a text-to-speech model; GET /v1/models lists each model's capabilities.",
            param="model", code="wrong_capability",
        )
    upstream = registry.upstream_for("tts")
    if upstream is None:
        local = ", ".join(sorted(registry.tts)) or "none installed"
        raise Network(
            f"No text-to-speech upstream is installed and no in-process voice model is called {model!r}. "
            f"In-process speech models: {local} (or OpenAI's tts-1).",
            code="model_not_found",
        )
    try:
        return await proxy.relay(request, "tts", upstream, body=form.raw, model_id=None, served_model=model or None)
    except Network as exc:
        if exc.code != "upstream_unreachable":
            raise
        # Say what could answer instead while the container is down.
        local = ", ".join(sorted(registry.tts)) or "none installed"
        raise Network(
            f"{exc.message} In-process speech models that answer now: {local} (or OpenAI's tts-1, "
            f"tts-1-hd, gpt-4o-mini-tts for the default one).",
            provider=exc.provider, headers=exc.headers, code=exc.code,
        ) from None


async def list_voices(request: web.Request) -> web.Response:
    registry = request.app[registry_key]
    config = request.app[config_key]
    models = [
        {
            "model": entry.card.id,
            "provider": entry.card.provider,
            "voices": list(entry.backend.voices),
            "default_voice": entry.backend.default_voice,
            "sample_rate": entry.backend.sample_rate,
        }
        for entry in sorted(registry.tts.values(), key=lambda e: e.card.id)
    ]
    default = registry.tts.get(registry.tts_default) if registry.tts_default else None

    def mapped(name: str) -> str | None:
        if default is None:
            return None
        return _match_voice(default.backend, config.tts_voice_map.get(name, "")) or default.backend.default_voice

    return web.json_response({
        "object": "list",
        "default_model": registry.tts_default,
        "openai_voices": {name: mapped(name) for name in OPENAI_VOICES},
        "data": models,
    })


CACHE_SWEEP_INTERVAL_S = 600.0


async def _sweep_cache(app: web.Application):
    """Drop expired cache entries now and then, not only when they are asked for."""

    async def sweep_forever() -> None:
        while True:
            try:
                await asyncio.to_thread(app[tts_cache_key].sweep)
            except OSError as exc:
                log.warning("TTS cache sweep failed: %s", exc)
            await asyncio.sleep(CACHE_SWEEP_INTERVAL_S)

    task = asyncio.create_task(sweep_forever())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def setup(app: web.Application) -> None:
    config = app[config_key]
    app[tts_cache_key] = TtsCache(
        directory=config.tts_cache_dir,
        ttl_s=config.tts_cache_ttl_min * 60,
        max_bytes=config.tts_cache_max_mb * 1024 * 1024,
    )
    app.cleanup_ctx.append(_sweep_cache)
    app.router.add_get("/v1/voices", list_voices)
    for path in ("/v1/audio/speech", "/v1/audio/speech/stream"):
        app.router.add_route("POST", path, post_speech, expect_handler=defer_continue)
