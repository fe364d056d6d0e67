"""``/v1/audio/*`` except transcriptions: in-process speech, else the TTS upstream.

``POST /v1/audio/speech`` (and ``/speech/stream`` over plain HTTP) is served
here when ``model`` names an in-process TTS model, or one of OpenAI's ids
(``tts-1``, ``tts-1-hd``, ``gpt-4o-mini-tts``) mapped to the default voice
model.  Everything else under ``/v1/audio/`` is forwarded untouched to the
registered TTS upstream (Qwen3-TTS in vLLM-Omni).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.parser
import email.policy
import json
import re
import logging
import time
import urllib.parse
from typing import Any

import attrs
import numpy as np
from aiohttp import web
from aiohttp_sse import EventSourceResponse

from . import audio, proxy
from .backends import CancelToken, SpeechOptions
from .config import Config
from .context import config_key, model_cache_key, registry_key, slot_key, upstream_sessions_key
from .errors import AistackError, Malformed, Network, Overflow
from .observe import request_info
from .registry import Registered, Registry
from .streaming import cancel_on_disconnect, finish_in_thread, iterate_in_thread
from .tts_cache import TtsCache

log = logging.getLogger("aistack.tts")

OPENAI_VOICES = (
    "alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse", "marin", "cedar",
)
CLONING_FIELDS = ("ref_audio", "audio_sample", "custom_voice_file", "speaker_wav")
MAX_INPUT_CHARS = 4096
_UNSPEAKABLE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")
SPEECH_TAILS = ("speech", "speech/stream")

tts_cache_key = web.AppKey("tts_cache", TtsCache)


@attrs.frozen
class SpeechRequest:
    entry: Registered
    options: SpeechOptions
    response_format: str
    stream: bool
    stream_format: str
    use_cache: bool


# --- reading the request --------------------------------------------------------


def _form_fields(body: bytes, content_type: str) -> dict[str, Any]:
    """Text fields of a multipart body (file parts are reported by name only)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    fields: dict[str, Any] = {}
    if not message.is_multipart():
        return fields
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        if part.get_filename() is not None:
            fields[name] = b"<file>"
        else:
            payload = part.get_payload(decode=True) or b""
            fields[name] = payload.decode("utf-8", errors="replace")
    return fields


def read_fields(body: bytes, content_type: str) -> dict[str, Any] | None:
    """The request's fields, or None when the body is neither JSON nor a form.

    :param content_type: the whole Content-Type header (a form's boundary is a parameter).
    """
    if content_type.startswith("multipart/form-data"):
        return _form_fields(body, content_type)
    content_type = content_type.split(";")[0].strip().lower()
    if content_type == "application/x-www-form-urlencoded":
        return dict(urllib.parse.parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True))
    try:
        fields = json.loads(body or b"null")
    except (ValueError, RecursionError):  # bad JSON or UTF-8, absurd numbers, deep nesting
        return None
    return fields if isinstance(fields, dict) else None


def _pick_backend(registry: Registry, model: str, voice: str | None) -> Registered | None:
    entry = registry.resolve_tts(model)
    if entry is None or not voice or model.lower() == entry.card.id.lower():
        return entry
    # An OpenAI model id with a voice that another in-process model owns: use that model.
    for other in registry.tts.values():
        if _match_voice(other.backend, voice) is not None:
            return other
    return entry


def _match_voice(backend, name: str) -> str | None:
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
        raise Malformed("'voice' must be a string naming a voice.")
    own = _match_voice(backend, requested)
    if own is not None:
        return own
    if requested.lower() in OPENAI_VOICES:
        mapped = _match_voice(backend, config.tts_voice_map.get(requested.lower(), ""))
        return mapped or backend.default_voice
    valid = ", ".join((*backend.voices, *OPENAI_VOICES))
    raise Malformed(f"Unknown voice {requested!r} for {entry.card.id}. Valid voices: {valid}.", provider=entry.card.provider)


def _flag(fields: dict[str, Any], name: str, default: bool) -> bool:
    value = fields.get(name, default)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
        return value.strip().lower() in ("true", "1", "yes", "on")
    raise Malformed(f"'{name}' must be true or false, got {value!r}.")


def parse_speech(fields: dict[str, Any], entry: Registered, request: web.Request, config: Config, tail: str) -> SpeechRequest:
    text = fields.get("input")
    if not isinstance(text, str) or not text.strip():
        raise Malformed("'input' is required: the text to speak, as a non-empty string.")
    if len(text) > MAX_INPUT_CHARS:
        raise Overflow(f"'input' has {len(text)} characters; the limit is {MAX_INPUT_CHARS}. Split the text.")
    if _UNSPEAKABLE.search(text):
        raise Malformed("'input' contains control characters or invalid Unicode (lone surrogates); send plain text.")
    for field in CLONING_FIELDS:
        if fields.get(field) not in (None, "", b""):
            raise Malformed(
                f"{entry.card.id} cannot clone voices ('{field}' was sent). Voice cloning needs the Qwen3-TTS "
                f"Base model (Qwen/Qwen3-TTS-12Hz-0.6B-Base) behind the TTS upstream.",
                provider=entry.card.provider,
            )
    response_format = str(fields.get("response_format") or "mp3").lower()
    if response_format not in audio.CONTENT_TYPES:
        raise Malformed(
            f"Unsupported response_format {response_format!r}; use one of {', '.join(audio.CONTENT_TYPES)}."
        )
    try:
        speed = float(fields.get("speed", 1.0))
    except (TypeError, ValueError):
        raise Malformed(f"'speed' must be a number between 0.25 and 4.0, got {fields.get('speed')!r}.") from None
    if not audio.MIN_SPEED <= speed <= audio.MAX_SPEED:
        raise Malformed(f"'speed' must be between 0.25 and 4.0, got {speed}.")
    stream_format = str(fields.get("stream_format") or "audio").lower()
    if stream_format not in ("audio", "sse"):
        raise Malformed(f"Unsupported stream_format {stream_format!r}; use 'audio' or 'sse'.")
    # As in OpenAI's API, asking for SSE events is asking for a stream.
    stream = tail == "speech/stream" or stream_format == "sse" or _flag(fields, "stream", False)
    cache_control = request.headers.get("Cache-Control", "").lower()
    use_cache = _flag(fields, "cache", True) and "no-cache" not in cache_control and "no-store" not in cache_control
    options = SpeechOptions(
        text=text,
        voice=_voice(entry, fields.get("voice"), config),
        speed=speed,
        language=fields.get("language") or None,
        instructions=fields.get("instructions") or None,
    )
    return SpeechRequest(entry, options, response_format, stream, stream_format, use_cache)


# --- synthesis ----------------------------------------------------------------


def _synthesize(entry: Registered, model: Any, options: SpeechOptions, cancel: CancelToken):
    """Worker-thread generator: one int16 chunk per piece the engine yields."""
    backend = entry.backend
    native = backend.native_speed
    engine_options = options if native else attrs.evolve(options, speed=1.0)
    for chunk in backend.synthesize(model, engine_options, cancel):
        cancel.raise_if_cancelled()
        pcm = np.asarray(chunk, dtype=np.int16)
        if not native and options.speed != 1.0:
            pcm = audio.time_stretch(pcm, backend.sample_rate, options.speed)
        yield pcm


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
    card = speech.entry.card
    info.capability, info.model, info.provider = "tts", card.id, card.provider
    info.extras.update(stream=speech.stream, response_format=speech.response_format)
    cache = app[tts_cache_key]
    content_type = "text/event-stream" if speech.stream and speech.stream_format == "sse" else audio.CONTENT_TYPES[speech.response_format]
    key = None
    if not cache.enabled:
        cache_state = "DISABLED"
    elif not speech.use_cache:
        cache_state = "BYPASS"
    else:
        key = _cache_key(cache, speech)
        hit = await asyncio.to_thread(cache.get, key)
        if hit is not None:
            info.extras["cache"] = "HIT"
            return web.Response(body=hit.data, content_type=hit.content_type, headers={"X-Cache": "HIT"})
        cache_state = "MISS"
    info.extras["cache"] = cache_state
    headers = {"X-Cache": cache_state}

    async with app[slot_key].acquire_or_busy("tts", card.id, info.request_id) as waited:
        info.slot_wait_s = waited
        async with cancel_on_disconnect(request) as cancel:
            async with app[model_cache_key].use(card.id, "tts", speech.entry.backend.load) as model:
                started = time.monotonic()  # real-time factor of inference, model load excluded
                if speech.stream:
                    response, body, samples = await _stream(request, speech, model, cancel, content_type, headers)
                else:
                    body, samples = await finish_in_thread(_synthesize_whole, speech, model, cancel, cancel=cancel)
                    response = web.Response(body=body, content_type=content_type, headers=headers)
    seconds = samples / speech.entry.backend.sample_rate
    info.extras["audio_sec"] = round(seconds, 3)
    if seconds > 0:
        info.extras["rtf"] = round((time.monotonic() - started) / seconds, 4)
    if key is not None and body is not None:
        await asyncio.to_thread(cache.put, key, body, content_type)
    return response


def _synthesize_whole(speech: SpeechRequest, model: Any, cancel: CancelToken) -> tuple[bytes, int]:
    backend = speech.entry.backend
    chunks = list(_synthesize(speech.entry, model, speech.options, cancel))
    pcm = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)
    if pcm.size == 0:
        raise Malformed(
            f"Nothing in 'input' can be spoken (it produced no audio): send words, not only punctuation or symbols.",
            provider=speech.entry.card.provider,
        )
    return audio.encode(pcm, backend.sample_rate, speech.response_format), int(pcm.size)


async def _stream(request, speech: SpeechRequest, model, cancel, content_type, headers):
    """Send audio as each sentence is synthesized.  Returns (response, all bytes or None, samples)."""
    backend = speech.entry.backend
    encoder = audio.StreamEncoder(speech.response_format, backend.sample_rate)
    sent: list[bytes] = []
    samples = 0
    as_sse = speech.stream_format == "sse"
    if as_sse:
        response = EventSourceResponse(sep="\n", headers=headers, allow_all_methods=True)
    else:
        response = web.StreamResponse(headers={**headers, "Content-Type": content_type})
    await response.prepare(request)

    async def send(data: bytes) -> None:
        if not data:
            return
        sent.append(data)
        if as_sse:
            await response.send(json.dumps({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()}))
        else:
            await response.write(data)

    completed = False
    try:
        await send(await asyncio.to_thread(encoder.header))
        async for pcm in iterate_in_thread(lambda: _synthesize(speech.entry, model, speech.options, cancel), cancel):
            samples += int(pcm.size)
            await send(await asyncio.to_thread(encoder.feed, pcm))
        await send(await asyncio.to_thread(encoder.close))
        completed = True
        if as_sse:
            await response.send(json.dumps({"type": "speech.audio.done", "usage": None}))
    except (ConnectionResetError, asyncio.CancelledError):
        cancel.cancel("client disconnected")
        request_info(request).client_disconnected = True
        raise
    except AistackError as exc:
        if exc.kind == "cancelled":
            request_info(request).client_disconnected = True
        elif as_sse:
            await response.send(json.dumps({"type": "speech.audio.error", **exc.envelope()["error"]}))
        else:
            log.warning("speech stream failed after headers were sent: %s", exc)
    finally:
        if as_sse:
            response.stop_streaming()
            await response.wait()
        elif completed:
            await response.write_eof()
    return response, (b"".join(sent) if completed else None), samples


# --- routing ------------------------------------------------------------------


async def _proxy(request: web.Request, tail: str, body: bytes | None, model: str | None) -> web.StreamResponse:
    app = request.app
    entry = app[registry_key].upstream_for("tts")
    if entry is None:
        raise Network(
            "No text-to-speech upstream is installed and no in-process voice matches this request. "
            "Use model 'tts-1' with the piper extra (pip install 'aistack[piper]') or enable the qwen3_tts plugin."
        )
    upstream = entry.backend
    info = request_info(request)
    info.capability, info.model, info.provider = "tts", model or f"/v1/audio/{tail}", upstream.provider
    session = app[upstream_sessions_key][upstream.name]
    async with app[slot_key].acquire_or_busy("tts", info.model, info.request_id) as waited:
        info.slot_wait_s = waited
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await proxy.forward_websocket(request, upstream, session)
        return await proxy.forward(request, upstream, session, body=body)


async def audio_route(request: web.Request) -> web.StreamResponse:
    tail = request.match_info["tail"]
    if tail.rstrip("/") == "transcriptions":
        raise Malformed(f"Method {request.method} is not allowed on /v1/audio/transcriptions; use POST.", status=405)
    is_websocket = request.headers.get("Upgrade", "").lower() == "websocket"
    if request.method != "POST" or tail not in SPEECH_TAILS or is_websocket:
        return await _proxy(request, tail, None, None)
    body = await request.read()
    fields = read_fields(body, request.headers.get("Content-Type", ""))
    if fields is None:
        if request.app[registry_key].upstream_for("tts") is None:
            raise Malformed("Send the speech request as a JSON object (or multipart/form-data).")
        return await _proxy(request, tail, body, None)
    model = str(fields.get("model") or "")
    entry = _pick_backend(request.app[registry_key], model, fields.get("voice"))
    if entry is None:
        return await _proxy(request, tail, body, model)
    speech = parse_speech(fields, entry, request, request.app[config_key], tail)
    return await _serve_in_process(request, speech)


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
    return web.json_response({
        "object": "list",
        "default_model": registry.tts_default,
        "openai_voices": {name: config.tts_voice_map.get(name) for name in OPENAI_VOICES},
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
    app.router.add_route("*", "/v1/audio/{tail:.*}", audio_route)
