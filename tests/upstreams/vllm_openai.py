"""An emulator of vLLM's OpenAI-compatible server (``vllm serve <model>``), the parts aistack relays.

Shapes follow vLLM's ``vllm/entrypoints/openai`` (protocol.py, serving_*.py,
api_server.py):

* ``GET /health``: 200 with an empty body once the engine is up.
* ``GET /v1/models``: ``{"object": "list", "data": [{id, object: "model",
  created, owned_by: "vllm", root, parent: null, max_model_len,
  permission: [{id, object: "model_permission", ...}]}]}``.
* ``POST /v1/chat/completions``: a ``chat.completion`` (message with
  ``reasoning_content`` and ``tool_calls``, ``stop_reason``, usage with
  ``prompt_tokens_details``); with ``stream: true``, SSE frames ``data:
  {chat.completion.chunk}``: first the role, then one token each at
  ``token_interval_s``, a last chunk with ``finish_reason``, a usage chunk
  when ``stream_options.include_usage``, then ``data: [DONE]``.
* ``POST /v1/completions``: a ``text_completion`` (``choices[].text``).
* ``POST /v1/embeddings``: ``{id: "embd-...", object: "list", created,
  model, data: [{index, object: "embedding", embedding}], usage}``.
* Errors: ``ErrorResponse`` — since vLLM 0.10 ``{"error": {"message",
  "type", "param", "code"}}`` with ``code`` the HTTP status and ``type``
  the exception name (``BadRequestError``, ``NotFoundError``); older
  releases wrote the same fields flat with ``"object": "error"``
  (``error_style="flat"``).  An unknown model is 404 ``The model `x` does
  not exist.``  With ``--api-key``, every ``/v1`` path without the right
  ``Authorization: Bearer`` is 401 ``{"error": "Unauthorized"}``.

Replies are deterministic: a fixed word sequence, ``max_tokens`` long when
given (finish_reason ``length``), else ``reply_tokens``.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import struct
import time
from typing import Any, Iterator

from aiohttp import web

from . import FAULTS_KEY, RECEIVED_KEY, Faults, RecordingEmulator

WORDS = ("Paris", " is", " the", " capital", " of", " France", ".")
MAX_MODEL_LEN = 4096


def embedding_of(text: str, dimensions: int = 8) -> list[float]:
    digest = hashlib.blake2b(text.encode(), digest_size=4 * dimensions).digest()
    return [round(v / 2**31, 6) for v in struct.unpack(f">{dimensions}i", digest)]


class VllmOpenAIEmulator(RecordingEmulator):
    def __init__(self, models: tuple[str, ...] = ("Qwen/Qwen2.5-1.5B-Instruct",), *, api_key: str | None = None,
                 error_style: str = "nested") -> None:
        super().__init__()
        self.models = list(models)
        self.api_key = api_key
        self.error_style = error_style  # "nested" (vLLM >= 0.10) or "flat" (older releases)
        self.token_interval_s = 0.005
        self.reply_tokens = 7
        self.created = int(time.time())

    def make_app(self) -> web.Application:
        app = self.install(web.Application(middlewares=[self.record, self.check_key]))
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        return app

    # --- errors and auth ------------------------------------------------------

    def error(self, status: int, message: str, error_type: str, param: str | None = None) -> web.Response:
        fields = {"message": message, "type": error_type, "param": param, "code": status}
        body = {"error": fields} if self.error_style == "nested" else {"object": "error", **fields}
        return web.json_response(body, status=status)

    @web.middleware
    async def check_key(self, request: web.Request, handler) -> web.StreamResponse:
        # vLLM's api-key middleware guards only the /v1 routes.
        if self.api_key and request.path.startswith("/v1"):
            if request.headers.get("Authorization") != f"Bearer {self.api_key}":
                return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)

    def _body(self, request: web.Request) -> dict[str, Any] | web.Response:
        try:
            body = json.loads(request[RECEIVED_KEY].body)
        except ValueError as exc:
            return self.error(400, f"JSON decode error: {exc}", "BadRequestError")
        if not isinstance(body, dict):
            return self.error(400, "Input should be a valid dictionary", "BadRequestError")
        model = body.get("model")
        if model not in self.models:
            return self.error(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        return body

    # --- routes ---------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response({
            "object": "list",
            "data": [
                {
                    "id": model, "object": "model", "created": self.created, "owned_by": "vllm",
                    "root": model, "parent": None, "max_model_len": MAX_MODEL_LEN,
                    "permission": [{
                        "id": f"modelperm-{secrets.token_hex(8)}", "object": "model_permission",
                        "created": self.created, "allow_create_engine": False, "allow_sampling": True,
                        "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                        "allow_fine_tuning": False, "organization": "*", "group": None, "is_blocking": False,
                    }],
                }
                for model in self.models
            ],
        })

    def _tokens(self, body: dict[str, Any]) -> tuple[list[str], str]:
        max_tokens = body.get("max_tokens")
        limited = isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > 0
        count = max_tokens if limited else self.reply_tokens
        return [WORDS[i % len(WORDS)] for i in range(count)], "length" if limited else "stop"

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = self._body(request)
        if isinstance(body, web.Response):
            return body
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return self.error(400, "Field required: messages", "BadRequestError", "messages")
        tokens, finish = self._tokens(body)
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages if isinstance(m, dict)) + 5
        usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + len(tokens),
                 "completion_tokens": len(tokens), "prompt_tokens_details": None}
        base = {"id": f"chatcmpl-{secrets.token_hex(16)}", "created": int(time.time()), "model": body["model"]}
        if not body.get("stream"):
            return web.json_response({
                **base, "object": "chat.completion",
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "reasoning_content": None, "content": "".join(tokens),
                                "tool_calls": []},
                    "logprobs": None, "finish_reason": finish, "stop_reason": None,
                }],
                "usage": usage, "prompt_logprobs": None,
            })

        def chunk(delta: dict[str, Any], finish_reason: str | None) -> bytes:
            frame = {**base, "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
            return b"data: " + json.dumps(frame).encode() + b"\n\n"

        def frames() -> Iterator[bytes]:
            yield chunk({"role": "assistant", "content": ""}, None)
            for token in tokens:
                yield chunk({"content": token}, None)
            yield chunk({"content": ""}, finish)
            if (body.get("stream_options") or {}).get("include_usage"):
                frame = {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}
                yield b"data: " + json.dumps(frame).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"

        return await self._stream(request, frames())

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = self._body(request)
        if isinstance(body, web.Response):
            return body
        prompt = body.get("prompt")
        if not isinstance(prompt, (str, list)):
            return self.error(400, "Field required: prompt", "BadRequestError", "prompt")
        tokens, finish = self._tokens(body)
        base = {"id": f"cmpl-{secrets.token_hex(16)}", "created": int(time.time()), "model": body["model"]}
        if not body.get("stream"):
            prompt_tokens = len(str(prompt).split())
            return web.json_response({
                **base, "object": "text_completion",
                "choices": [{"index": 0, "text": "".join(tokens), "logprobs": None, "finish_reason": finish,
                             "stop_reason": None, "prompt_logprobs": None}],
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + len(tokens),
                          "completion_tokens": len(tokens), "prompt_tokens_details": None},
            })

        def frames() -> Iterator[bytes]:
            for i, token in enumerate(tokens):
                last = i == len(tokens) - 1
                frame = {**base, "object": "text_completion",
                         "choices": [{"index": 0, "text": token, "logprobs": None,
                                      "finish_reason": finish if last else None, "stop_reason": None}]}
                yield b"data: " + json.dumps(frame).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"

        return await self._stream(request, frames())

    async def embeddings(self, request: web.Request) -> web.Response:
        body = self._body(request)
        if isinstance(body, web.Response):
            return body
        inputs = body.get("input")
        if inputs is None:
            return self.error(400, "Field required: input", "BadRequestError", "input")
        texts = [inputs] if isinstance(inputs, str) else [str(item) for item in inputs]
        tokens = sum(len(text.split()) for text in texts)
        return web.json_response({
            "id": f"embd-{secrets.token_hex(16)}", "object": "list", "created": int(time.time()),
            "model": body["model"],
            "data": [{"index": i, "object": "embedding", "embedding": embedding_of(text)} for i, text in enumerate(texts)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                      "prompt_tokens_details": None},
        })

    async def _stream(self, request: web.Request, frames: Iterator[bytes]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        faults: Faults = request[FAULTS_KEY]
        interval = self.token_interval_s if faults.token_interval_s is None else faults.token_interval_s
        await self.write_body(request, response, frames, trickle_s=interval)
        return response


if __name__ == "__main__":
    from . import run_standalone

    run_standalone(VllmOpenAIEmulator(), "vLLM OpenAI-server emulator")
