"""An emulator of the Ollama daemon's HTTP surface that aistack uses.

Shapes follow Ollama's own code (openai/openai.go, middleware/openai.go,
server/routes.go):

* ``GET /api/tags``: ``{"models": [{name, model, modified_at, size,
  digest, details{parent_model, format, family, families, parameter_size,
  quantization_level}}]}``.
* ``POST /v1/chat/completions``: a ``chat.completion`` object with
  ``system_fingerprint: "fp_ollama"`` and usage; with ``stream: true``,
  ``data: {chat.completion.chunk}`` frames, one token each at
  ``token_interval_s``, a last chunk carrying ``finish_reason``, a usage
  chunk when ``stream_options.include_usage``, then ``data: [DONE]``.
* ``POST /v1/embeddings``: ``{"object": "list", "data": [{"object":
  "embedding", "embedding": [...], "index"}], "model", "usage"}``.
* ``GET /api/ps``: the models in memory, ``{"models": [{name, model, size,
  digest, details, expires_at, size_vram, context_length}]}``; a chat or
  embeddings request puts its model there (for its ``keep_alive``, none
  when ``0``), as Ollama's scheduler does.
* ``POST /api/generate`` without a prompt: with ``keep_alive`` 0 the model
  is unloaded (``{"model", "created_at", "response": "", "done": true,
  "done_reason": "unload"}``), otherwise loaded (``done_reason: "load"``).
  The native API's errors are ``{"error": "..."}``: 400 without a model,
  404 ``model "x" not found, try pulling it first``.
* Errors as Ollama's OpenAI layer writes them: ``{"error": {"message",
  "type", "param": null, "code": null}}`` with ``invalid_request_error``
  for 400, ``not_found_error`` for 404 (``model "x" not found, try pulling
  it first``), ``api_error`` otherwise.

Replies are deterministic: a chat answer is a fixed word sequence whose
length is ``max_tokens`` when given (finish_reason ``length``), else
``reply_tokens``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import time
from typing import Any, Iterator

from aiohttp import web

from . import FAULTS_KEY, RECEIVED_KEY, Faults, RecordingEmulator

WORDS = ("The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ".")


def tag(name: str, family: str, parameter_size: str, quantization: str = "Q4_K_M", size: int = 2_500_000_000) -> dict:
    return {
        "name": name,
        "model": name,
        "modified_at": "2025-05-01T10:12:31.084629917+02:00",
        "size": size,
        "digest": hashlib.sha256(name.encode()).hexdigest(),
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": family,
            "families": [family],
            "parameter_size": parameter_size,
            "quantization_level": quantization,
        },
    }


DEFAULT_MODELS = (
    tag("qwen3:4b", "qwen3", "4.0B"),
    tag("llama3.2:1b", "llama", "1.2B", "Q8_0", 1_321_098_329),
    tag("nomic-embed-text:latest", "nomic-bert", "137M", "F16", 274_302_450),
)


def ollama_error(status: int, message: str) -> web.Response:
    error_type = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    # Go's json.Encoder ends the document with a newline.
    body = json.dumps({"error": {"message": message, "type": error_type, "param": None, "code": None}}) + "\n"
    return web.Response(status=status, text=body, content_type="application/json")


def unloads(keep_alive: Any) -> bool:
    """Whether a ``keep_alive`` value means "unload now": a zero number of seconds or a zero duration."""
    if isinstance(keep_alive, (int, float)) and not isinstance(keep_alive, bool):
        return keep_alive == 0
    return isinstance(keep_alive, str) and keep_alive.strip() in ("0", "0s", "0m", "0h")


def native_error(status: int, message: str) -> web.Response:
    """An error of Ollama's own API (not its OpenAI layer): ``{"error": "..."}``."""
    return web.Response(status=status, text=json.dumps({"error": message}) + "\n", content_type="application/json")


def embedding_of(text: str, dimensions: int = 16) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest() * 4
    return [round(v / 2**31, 6) for v in struct.unpack(f">{dimensions}i", digest[: 4 * dimensions])]


class OllamaEmulator(RecordingEmulator):
    def __init__(self, models: tuple[dict, ...] = DEFAULT_MODELS) -> None:
        super().__init__()
        self.models = list(models)
        self.tags_delay_s = 0.0  # > 0: /api/tags hangs this long
        self.token_interval_s = 0.005  # pause between streamed tokens
        self.reply_tokens = 12
        self._ids = 0
        # What /api/ps lists, by name; the share of each model held in GPU memory.
        self.in_memory: dict[str, dict] = {}
        self.vram_share = 1.0

    def make_app(self) -> web.Application:
        app = self.install(web.Application(middlewares=[self.record]))
        app.router.add_get("/", self.root)
        app.router.add_get("/api/tags", self.tags)
        app.router.add_get("/api/ps", self.ps)
        app.router.add_post("/api/generate", self.generate)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/embeddings", self.embeddings)
        return app

    def _known(self, name: str) -> bool:
        names = {m["name"] for m in self.models}
        return name in names or f"{name}:latest" in names

    async def root(self, request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")

    async def tags(self, request: web.Request) -> web.Response:
        if self.tags_delay_s:
            await self.pause(request, self.tags_delay_s)
        return web.json_response({"models": self.models})

    def _tag(self, name: str) -> dict | None:
        return next((m for m in self.models if m["name"] in (name, f"{name}:latest")), None)

    def load_model(self, name: str, keep_alive: Any = "5m") -> None:
        """Put ``name`` in memory as Ollama does when a request uses it (``keep_alive`` 0: not kept)."""
        tag_entry = self._tag(name)
        if tag_entry is None or unloads(keep_alive):
            self.in_memory.pop(tag_entry["name"] if tag_entry else name, None)
            return
        self.in_memory[tag_entry["name"]] = {
            "name": tag_entry["name"], "model": tag_entry["model"], "size": tag_entry["size"],
            "digest": tag_entry["digest"], "details": tag_entry["details"],
            "expires_at": "2030-01-01T00:05:00.000000000Z",
            "size_vram": int(tag_entry["size"] * self.vram_share), "context_length": 4096,
        }

    async def ps(self, request: web.Request) -> web.Response:
        return web.json_response({"models": list(self.in_memory.values())})

    async def generate(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(request[RECEIVED_KEY].body)
        except ValueError as exc:
            return native_error(400, str(exc))
        if not isinstance(body, dict) or not body.get("model"):
            return native_error(400, "model is required")
        name = str(body["model"])
        tag_entry = self._tag(name)
        if tag_entry is None:
            return native_error(404, f'model "{name}" not found, try pulling it first')
        if body.get("prompt"):
            return native_error(501, "the emulator answers only load and unload requests on /api/generate")
        keep_alive = body.get("keep_alive", "5m")
        self.load_model(name, keep_alive)
        unloading = unloads(keep_alive)
        return web.json_response({
            "model": name, "created_at": "2025-05-01T10:12:31.084629917Z", "response": "", "done": True,
            "done_reason": "unload" if unloading else "load",
        })

    def _body(self, request: web.Request) -> dict[str, Any] | web.Response:
        try:
            body = json.loads(request[RECEIVED_KEY].body)
        except ValueError as exc:
            return ollama_error(400, str(exc))
        if not isinstance(body, dict):
            return ollama_error(400, "json: cannot unmarshal into Go value of type openai.ChatCompletionRequest")
        return body

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = self._body(request)
        if isinstance(body, web.Response):
            return body
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return ollama_error(400, "[] is too short - 'messages'")
        model = body.get("model") or ""
        if not self._known(model):
            return ollama_error(404, f'model "{model}" not found, try pulling it first')

        self.load_model(model, body.get("keep_alive", "5m"))
        self._ids += 1
        completion_id = f"chatcmpl-{self._ids % 999}"
        created = int(time.time())
        max_tokens = body.get("max_tokens")
        count = max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else self.reply_tokens
        finish = "length" if isinstance(max_tokens, int) and max_tokens > 0 else "stop"
        tokens = [WORDS[i % len(WORDS)] for i in range(count)]
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages if isinstance(m, dict)) + 8
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": count, "total_tokens": prompt_tokens + count}
        base = {"id": completion_id, "created": created, "model": model, "system_fingerprint": "fp_ollama"}

        if not body.get("stream"):
            return web.json_response({
                **base, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(tokens)},
                             "finish_reason": finish}],
                "usage": usage,
            })

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        def chunk(delta_content: str, finish_reason: str | None) -> bytes:
            frame = {**base, "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": {"role": "assistant", "content": delta_content},
                                  "finish_reason": finish_reason}]}
            return b"data: " + json.dumps(frame).encode() + b"\n\n"

        def frames() -> Iterator[bytes]:
            for token in tokens:
                yield chunk(token, None)
            yield chunk("", finish)
            if include_usage:
                frame = {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}
                yield b"data: " + json.dumps(frame).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"

        def stamped(source: Iterator[bytes]) -> Iterator[bytes]:
            # An SSE comment line clients ignore; benchmarks read the send time from it.
            for frame in source:
                yield b": sent=%.6f\n" % time.monotonic() + frame

        faults: Faults = request[FAULTS_KEY]
        interval = self.token_interval_s if faults.token_interval_s is None else faults.token_interval_s
        await self.write_body(request, response, stamped(frames()) if faults.stamp else frames(), trickle_s=interval)
        return response

    async def embeddings(self, request: web.Request) -> web.Response:
        body = self._body(request)
        if isinstance(body, web.Response):
            return body
        encoding = body.get("encoding_format")
        if encoding and encoding.lower() not in ("float", "base64"):
            return ollama_error(400, f"Invalid value for 'encoding_format' = {encoding}. "
                                     "Supported values: ['float', 'base64'].")
        inputs = body.get("input")
        if inputs == "":
            inputs = [""]
        if inputs is None or (isinstance(inputs, list) and not inputs):
            return ollama_error(400, "invalid input")
        model = body.get("model") or ""
        if not self._known(model):
            return ollama_error(404, f'model "{model}" not found, try pulling it first')
        self.load_model(model, body.get("keep_alive", "5m"))
        texts = [inputs] if isinstance(inputs, str) else [str(item) for item in inputs]
        as_base64 = bool(encoding) and encoding.lower() == "base64"

        def encode(vector: list[float]) -> list[float] | str:
            # Ollama packs little-endian float32 when asked for base64.
            if not as_base64:
                return vector
            return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()

        tokens = sum(len(text.split()) for text in texts)
        return web.json_response({
            "object": "list",
            "data": [
                {"object": "embedding", "embedding": encode(embedding_of(text)), "index": i}
                for i, text in enumerate(texts)
            ],
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        })


if __name__ == "__main__":
    from . import run_standalone

    run_standalone(OllamaEmulator(), "Ollama emulator")
