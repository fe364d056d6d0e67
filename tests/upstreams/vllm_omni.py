"""An emulator of vLLM-Omni serving Qwen3-TTS-12Hz-0.6B-CustomVoice.

It follows the real server's surface (vllm_omni/entrypoints/openai:
api_server.py, serving_speech.py, serving_speech_stream.py and the
speech API docs):

* ``GET /health``: 200 with an empty body once the engine is up.
* ``POST /v1/audio/speech``: 24 kHz mono 16-bit WAV whatever
  ``response_format`` says (raw PCM for ``pcm``), with the
  ``x-vllm-omni-*-tokens`` usage headers.  ``stream_format="audio"``
  streams raw audio chunks (WAV with 0xFFFFFFFF size placeholders first);
  ``stream=true`` / ``stream_format="sse"`` streams ``event:``/``data:``
  pairs ``speech.audio.delta`` (base64 audio) and ``speech.audio.done``
  (usage).  Streaming needs ``pcm`` or ``wav`` and ``speed`` 1.0.
* ``POST /v1/audio/speech/batch``: 1–32 items, results as base64.
* ``GET|POST /v1/audio/voices``, ``DELETE /v1/audio/voices/{name}``
  (multipart upload of ``audio_sample``, ``name``, ``consent``, optional
  ``ref_text`` / ``speaker_description``; unknown voice on delete is 404
  ``{"success": false, "error": ...}`` as the real server answers).
* WebSocket ``/v1/audio/speech/stream``: ``session.config`` first, then
  ``input.text`` pieces and ``input.done`` per utterance; answers
  ``audio.start``, binary audio, ``audio.done``, ``session.done``;
  ``session.close`` ends the connection.
* Errors are OpenAI-shaped: ``{"error": {"message", "type", "param", "code"}}``.

The audio is a deterministic tone (its pitch hashed from voice and text)
whose length grows with the text, so tests can compare bytes exactly.
"""

from __future__ import annotations

import asyncio
import base64
import email.parser
import email.policy
import functools
import hashlib
import json
import math
import struct
import time
from typing import Any, Iterator

import numpy as np
from aiohttp import WSMsgType, web

from . import FAULTS_KEY, RECEIVED_KEY, Faults, Received, RecordingEmulator

SAMPLE_RATE = 24000
BYTES_PER_SECOND = SAMPLE_RATE * 2
SERVED_MODEL_NAMES = ("Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice", "qwen3-tts-12hz-0.6b-customvoice")
BUILTIN_VOICES = ("aiden", "dylan", "eric", "ono_anna", "ryan", "serena", "sohee", "uncle_fu", "vivian")
LANGUAGES = ("Auto", "Chinese", "English", "Japanese", "Korean", "German", "French", "Russian",
             "Portuguese", "Spanish", "Italian")
RESPONSE_FORMATS = ("wav", "pcm", "flac", "mp3", "aac", "opus")
MAX_BATCH_ITEMS = 32
MAX_VOICE_SAMPLE_BYTES = 10 * 1024 * 1024
DEFAULT_STREAM_CHUNK = BYTES_PER_SECOND // 5  # about one codec chunk: 0.2 s of audio
TONE_BLOCK_SECONDS = 2


def openai_error(message: str, status: int = 400, *, error_type: str = "BadRequestError",
                 param: str | None = None) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": error_type, "param": param, "code": status}}, status=status
    )


class EmulatorError(Exception):
    def __init__(self, response: web.Response) -> None:
        super().__init__("emulator error response")
        self.response = response


# --- audio --------------------------------------------------------------------


def tone_frequency(voice: str, text: str) -> int:
    digest = hashlib.sha256(f"{voice}\0{text}".encode()).digest()
    return 180 + int.from_bytes(digest[:2], "big") % 400


@functools.lru_cache(maxsize=64)
def tone_block(frequency: int) -> bytes:
    """Two seconds of the tone, twice over, so any window wraps seamlessly.

    An integer frequency repeats exactly every second at 24 kHz, so the
    block can be tiled forever without a click.
    """
    t = np.arange(SAMPLE_RATE * TONE_BLOCK_SECONDS) / SAMPLE_RATE
    samples = (0.3 * 32767 * np.sin(2 * math.pi * frequency * t)).astype("<i2").tobytes()
    return samples + samples


def speech_seconds(text: str) -> float:
    return max(0.5, 0.06 * len(text))


def pcm_chunks(frequency: int, total_bytes: int, chunk_bytes: int) -> Iterator[bytes]:
    block = memoryview(tone_block(frequency))
    period = len(block) // 2
    chunk_bytes = max(2, min(chunk_bytes - chunk_bytes % 2, period))
    offset = 0
    while offset < total_bytes:
        size = min(chunk_bytes, total_bytes - offset)
        start = offset % period
        yield bytes(block[start:start + size])
        offset += size


def wav_header(data_bytes: int | None) -> bytes:
    """A 44-byte PCM WAV header; ``None`` gives the streaming placeholders."""
    unknown = 0xFFFFFFFF
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF", unknown if data_bytes is None else 36 + data_bytes, b"WAVE",
        b"fmt ", 16, 1, 1, SAMPLE_RATE, BYTES_PER_SECOND, 2, 16,
        b"data", unknown if data_bytes is None else data_bytes,
    )


def synthesize(voice: str, text: str, seconds: float | None = None) -> bytes:
    """The whole clip as PCM (what a non-streaming request gets)."""
    total = int((seconds or speech_seconds(text)) * SAMPLE_RATE) * 2
    return b"".join(pcm_chunks(tone_frequency(voice, text), total, 1 << 20))


def usage(text: str, audio_bytes: int) -> dict[str, Any]:
    text_tokens = max(1, len(text.split()))
    output_tokens = max(1, round(audio_bytes / BYTES_PER_SECOND * 12))  # 12 Hz codec
    return {
        "input_tokens": text_tokens,
        "output_tokens": output_tokens,
        "total_tokens": text_tokens + output_tokens,
        "input_token_details": {"text_tokens": text_tokens, "audio_tokens": 0},
    }


# --- the emulator -----------------------------------------------------------------


class VllmOmniEmulator(RecordingEmulator):
    def __init__(self) -> None:
        super().__init__()
        self.healthy = True  # /health answers 200, else 503
        self.health_delay_s = 0.0  # > 0: /health hangs this long (an engine wedged mid cold start)
        self.uploaded_voices: dict[str, dict[str, Any]] = {}
        self.websocket_sessions: list[Received] = []

    def make_app(self) -> web.Application:
        app = self.install(web.Application(middlewares=[self.record], client_max_size=64 * 1024 * 1024))
        app.router.add_get("/health", self.health)
        app.router.add_post("/v1/audio/speech", self.speech)
        app.router.add_post("/v1/audio/speech/batch", self.speech_batch)
        app.router.add_get("/v1/audio/speech/stream", self.speech_stream_websocket)
        app.router.add_get("/v1/audio/voices", self.list_voices)
        app.router.add_post("/v1/audio/voices", self.upload_voice)
        app.router.add_delete("/v1/audio/voices/{name}", self.delete_voice)
        return app

    # -- health ----------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        if self.health_delay_s:
            await self.pause(request, self.health_delay_s)
        return web.Response(status=200 if self.healthy else 503)

    # -- validation (what the real server's request model enforces) ----------------

    def _speech_request(self, fields: Any) -> dict[str, Any]:
        if not isinstance(fields, dict):
            raise EmulatorError(openai_error("Request body must be a JSON object"))
        text = fields.get("input")
        if not isinstance(text, str):
            raise EmulatorError(openai_error("Field required: input", param="input"))
        if not text.strip():
            raise EmulatorError(openai_error("Input text cannot be empty"))
        model = fields.get("model")
        if model and model not in SERVED_MODEL_NAMES:
            raise EmulatorError(openai_error(f"The model `{model}` does not exist.", 404,
                                             error_type="NotFoundError", param="model"))
        voice = (fields.get("voice") or "vivian").lower()
        if voice not in BUILTIN_VOICES and voice not in self.uploaded_voices:
            supported = ", ".join(sorted((*BUILTIN_VOICES, *self.uploaded_voices)))
            raise EmulatorError(openai_error(f"Invalid speaker '{voice}'. Supported: {supported}"))
        response_format = fields.get("response_format") or "wav"
        if response_format not in RESPONSE_FORMATS:
            raise EmulatorError(openai_error(f"Invalid response_format '{response_format}'", param="response_format"))
        speed = fields.get("speed", 1.0)
        if not isinstance(speed, (int, float)) or not 0.25 <= speed <= 4.0:
            raise EmulatorError(openai_error("speed must be between 0.25 and 4.0", param="speed"))
        language = fields.get("language") or "Auto"
        if language not in LANGUAGES:
            raise EmulatorError(openai_error(f"Unsupported language '{language}'", param="language"))
        stream_format = fields.get("stream_format")
        if stream_format is None and fields.get("stream"):
            stream_format = "sse"
        if stream_format not in (None, "sse", "audio"):
            raise EmulatorError(openai_error(f"Invalid stream_format '{stream_format}'", param="stream_format"))
        if stream_format and (response_format not in ("pcm", "wav") or speed != 1.0):
            raise EmulatorError(openai_error(
                "Streaming requires response_format 'pcm' or 'wav' and speed 1.0"))
        return {"text": text, "voice": voice, "response_format": response_format, "stream_format": stream_format}

    # -- speech ------------------------------------------------------------------

    async def speech(self, request: web.Request) -> web.StreamResponse:
        try:
            fields = json.loads(request[RECEIVED_KEY].body or b"null")
        except ValueError as exc:
            return openai_error(f"Invalid JSON body: {exc}")
        try:
            spec = self._speech_request(fields)
        except EmulatorError as exc:
            return exc.response
        faults: Faults = request[FAULTS_KEY]
        seconds = faults.audio_seconds or speech_seconds(spec["text"])
        total = int(seconds * SAMPLE_RATE) * 2
        frequency = tone_frequency(spec["voice"], spec["text"])
        as_pcm = spec["response_format"] == "pcm"
        media_type = "audio/pcm" if as_pcm else "audio/wav"

        if spec["stream_format"] is None:
            chunk = faults.chunk_bytes or 1 << 20
            header = b"" if as_pcm else wav_header(total)
            response = web.StreamResponse(headers={
                "Content-Type": media_type,
                "Content-Length": str(len(header) + total),
                **{f"x-vllm-omni-{name.replace('_', '-')}": str(value)
                   for name, value in usage(spec["text"], total).items() if name != "input_token_details"},
            })
            await response.prepare(request)
            chunks = pcm_chunks(frequency, total, chunk)
            await self.write_body(request, response, _prefixed(header, chunks) if header else chunks)
            return response

        chunk = faults.chunk_bytes or DEFAULT_STREAM_CHUNK
        if spec["stream_format"] == "audio":
            response = web.StreamResponse(headers={"Content-Type": media_type})
            await response.prepare(request)
            chunks = pcm_chunks(frequency, total, chunk)
            await self.write_body(request, response, chunks if as_pcm else _prefixed(wav_header(None), chunks))
            return response

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        fmt = spec["response_format"]

        def events() -> Iterator[bytes]:
            first = True
            for piece in pcm_chunks(frequency, total, chunk):
                if first and fmt == "wav":
                    piece = wav_header(None) + piece
                first = False
                payload = {"type": "speech.audio.delta", "audio": base64.b64encode(piece).decode(), "response_format": fmt}
                yield b"event: speech.audio.delta\ndata: " + json.dumps(payload).encode() + b"\n\n"
            done = {"type": "speech.audio.done", "usage": usage(spec["text"], total)}
            yield b"event: speech.audio.done\ndata: " + json.dumps(done).encode() + b"\n\n"

        await self.write_body(request, response, events())
        return response

    async def speech_batch(self, request: web.Request) -> web.Response:
        try:
            fields = json.loads(request[RECEIVED_KEY].body or b"null")
        except ValueError as exc:
            return openai_error(f"Invalid JSON body: {exc}")
        items = fields.get("items") if isinstance(fields, dict) else None
        if not isinstance(items, list) or not 1 <= len(items) <= MAX_BATCH_ITEMS:
            return openai_error(f"items must contain between 1 and {MAX_BATCH_ITEMS} entries", param="items")
        defaults = {k: v for k, v in fields.items() if k != "items"}
        results = []
        for index, item in enumerate(items):
            merged = {**defaults, **{k: v for k, v in (item or {}).items() if v is not None}}
            merged.pop("stream", None)
            merged.pop("stream_format", None)
            try:
                spec = self._speech_request(merged)
            except EmulatorError as exc:
                results.append({"index": index, "status": "error",
                                 "error": json.loads(exc.response.body)["error"]["message"]})
                continue
            pcm = synthesize(spec["voice"], spec["text"])
            data = pcm if spec["response_format"] == "pcm" else wav_header(len(pcm)) + pcm
            results.append({
                "index": index, "status": "success", "audio_data": base64.b64encode(data).decode(),
                "media_type": "audio/pcm" if spec["response_format"] == "pcm" else "audio/wav",
                "usage": usage(spec["text"], len(pcm)),
            })
        succeeded = sum(1 for r in results if r["status"] == "success")
        return web.json_response({
            "id": "speech-batch-" + hashlib.sha256(request[RECEIVED_KEY].body).hexdigest()[:12],
            "results": results, "total": len(results), "succeeded": succeeded, "failed": len(results) - succeeded,
        })

    # -- voices -------------------------------------------------------------------

    async def list_voices(self, request: web.Request) -> web.Response:
        return web.json_response({
            "voices": sorted((*BUILTIN_VOICES, *self.uploaded_voices)),
            "uploaded_voices": list(self.uploaded_voices.values()),
        })

    async def upload_voice(self, request: web.Request) -> web.Response:
        received: Received = request[RECEIVED_KEY]
        fields, files = parse_multipart(received.body, request.headers.get("Content-Type", ""))
        for required in ("audio_sample", "consent", "name"):
            if required not in fields and required not in files:
                return openai_error(f"Field required: {required}", param=required)
        filename, mime_type, sample = files.get("audio_sample", ("", "", b""))
        if not sample:
            return openai_error("audio_sample must be a non-empty audio file", param="audio_sample")
        if len(sample) > MAX_VOICE_SAMPLE_BYTES:
            return openai_error("audio_sample exceeds the 10 MB limit", param="audio_sample")
        name = fields["name"].strip()
        if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
            return openai_error(f"Invalid voice name {fields['name']!r}: must be non-empty, no path separators or NUL")
        voice = {
            "name": name.lower(),
            "consent": fields["consent"],
            "created_at": int(time.time()),
            "mime_type": mime_type or "audio/wav",
            "file_size": len(sample),
        }
        for optional in ("ref_text", "speaker_description"):
            if fields.get(optional):
                voice[optional] = fields[optional]
        self.uploaded_voices[name.lower()] = voice
        return web.json_response({"success": True, "voice": voice})

    async def delete_voice(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if self.uploaded_voices.pop(name.lower(), None) is None:
            return web.json_response({"success": False, "error": f"Voice '{name}' not found"}, status=404)
        return web.json_response({"success": True, "message": f"Voice '{name}' deleted successfully"})

    # -- WebSocket streaming input --------------------------------------------------

    async def speech_stream_websocket(self, request: web.Request) -> web.WebSocketResponse:
        received: Received = request[RECEIVED_KEY]
        faults: Faults = request[FAULTS_KEY]
        self.websocket_sessions.append(received)
        ws = web.WebSocketResponse(max_msg_size=4 * 1024 * 1024)
        await ws.prepare(request)
        config: dict[str, Any] | None = None
        buffered: list[str] = []
        utterance = 0
        close_code: int | None = None
        try:
            while True:
                try:
                    message = await ws.receive(timeout=10.0 if config is None else 30.0)
                except asyncio.TimeoutError:
                    await ws.send_json({"type": "error", "message": "Timeout waiting for session.config"
                                        if config is None else "Idle timeout: no message received"})
                    break
                if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                    received.ws_close_code = ws.close_code
                    break
                if message.type is not WSMsgType.TEXT:
                    await ws.send_json({"type": "error", "message": "Expected a JSON text message"})
                    continue
                try:
                    msg = json.loads(message.data)
                except ValueError:
                    await ws.send_json({"type": "error", "message": "Invalid JSON message"})
                    if config is None:
                        break
                    continue
                kind = msg.get("type") if isinstance(msg, dict) else None
                if kind == "session.config":
                    try:
                        self._speech_request({"input": "ping", **{k: v for k, v in msg.items()
                                              if k not in ("type", "stream_audio", "split_granularity")}})
                    except EmulatorError as exc:
                        await ws.send_json({"type": "error", "message": "Invalid session config: "
                                            + json.loads(exc.response.body)["error"]["message"]})
                        if config is None:
                            break
                        continue
                    config = msg
                elif config is None:
                    await ws.send_json({"type": "error", "message": f"Expected session.config, got: {kind}"})
                    break
                elif kind == "input.text":
                    text = msg.get("text", "")
                    if not isinstance(text, str):
                        await ws.send_json({"type": "error", "message": "input.text requires a string value"})
                        continue
                    buffered.append(text)
                elif kind == "input.done":
                    text = "".join(buffered).strip()
                    buffered.clear()
                    total_sentences = 0
                    if text:
                        await self._send_utterance(ws, config, text, utterance)
                        total_sentences = 1
                    await ws.send_json({"type": "session.done", "utterance_index": utterance,
                                        "total_sentences": total_sentences})
                    utterance += 1
                    if faults.ws_close_code is not None:
                        close_code = faults.ws_close_code
                        break
                elif kind == "session.close":
                    break
                else:
                    await ws.send_json({"type": "error", "message": f"Unknown message type: {kind}"})
        except ConnectionResetError:
            pass
        if not ws.closed:
            await ws.close(code=close_code or 1000)
        if received.ws_close_code is None and ws.close_code is not None and close_code is None:
            received.ws_close_code = ws.close_code
        return ws

    async def _send_utterance(self, ws: web.WebSocketResponse, config: dict, text: str, utterance: int) -> None:
        fmt = config.get("response_format") or "wav"
        voice = (config.get("voice") or "vivian").lower()
        pcm = synthesize(voice, text)
        start = {"type": "audio.start", "utterance_index": utterance, "sentence_index": 0,
                 "sentence_text": text, "format": fmt}
        if config.get("stream_audio"):
            if fmt == "pcm":
                start.update(sample_rate=SAMPLE_RATE, channels=1)
            await ws.send_json(start)
            first = True
            for piece in pcm_chunks(tone_frequency(voice, text), len(pcm), DEFAULT_STREAM_CHUNK):
                await ws.send_bytes(wav_header(None) + piece if first and fmt == "wav" else piece)
                first = False
            total = len(pcm) + (0 if fmt == "pcm" else 44)
        else:
            await ws.send_json(start)
            data = pcm if fmt == "pcm" else wav_header(len(pcm)) + pcm
            await ws.send_bytes(data)
            total = len(data)
        await ws.send_json({"type": "audio.done", "utterance_index": utterance, "sentence_index": 0,
                            "total_bytes": total, "error": False})


def _prefixed(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest


def parse_multipart(body: bytes, content_type: str) -> tuple[dict[str, str], dict[str, tuple[str, str, bytes]]]:
    """Text fields and files of a multipart/form-data body."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    fields: dict[str, str] = {}
    files: dict[str, tuple[str, str, bytes]] = {}
    if not message.is_multipart():
        return fields, files
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        payload = part.get_payload(decode=True) or b""
        filename = part.get_filename()
        if filename is not None:
            files[name] = (filename, part.get_content_type(), payload)
        else:
            fields[name] = payload.decode("utf-8", errors="replace")
    return fields, files


if __name__ == "__main__":
    from . import run_standalone

    run_standalone(VllmOmniEmulator(), "vLLM-Omni Qwen3-TTS emulator")
