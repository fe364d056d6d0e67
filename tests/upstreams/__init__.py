"""Emulators of the HTTP services aistack proxies to, and what they share.

Each emulator is an aiohttp app that answers like the real service (shapes
checked against vLLM-Omni's and Ollama's own code) and remembers every
request it received: method, raw path, query, headers, body and its
sha256, and whether and when its client went away.  Failure modes are
switched per request with the ``X-Emulator-Fault`` header (which the
gateway forwards like any other header) or for every request through the
emulator's ``faults`` attribute.

``X-Emulator-Fault`` holds ``;``-separated settings::

    first-byte-delay=2.5   wait this long before answering
    trickle=0.05           pause between body chunks
    chunk-bytes=4096       body chunk size
    reset-after=10000      abort the connection after this many body bytes
    drop                   close the connection without answering
    not-http               answer bytes that are not HTTP, then close
    hop-headers            add hop-by-hop headers (and one end-to-end marker) to the answer
    token-interval=0.01    (Ollama) pause between streamed tokens
    stamp                  (Ollama, benchmarks) precede each SSE frame with ": sent=<monotonic>"
    audio-seconds=600      (TTS) length of the synthesized audio
    ws-close-code=4001     (TTS WebSocket) close with this code after session.done
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import time
from typing import AsyncIterator

import aiohttp
import attrs
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

FAULT_HEADER = "X-Emulator-Fault"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def refused_url() -> str:
    """A loopback URL with nothing listening: connecting is refused at once."""
    return f"http://127.0.0.1:{free_port()}"


@contextlib.asynccontextmanager
async def serve(app: web.Application, port: int = 0) -> AsyncIterator[str]:
    """Run ``app`` on loopback (a free port unless ``port`` is given); yields its base URL."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


class GatewayClient:
    """Talks to a gateway app served the way ``aistack serve`` serves it.

    pytest-aiohttp's ``aiohttp_client`` starts servers with
    ``handler_cancellation=True``, so aiohttp itself cancels a handler whose
    client left; ``web.run_app`` (production) does not.  Disconnect tests
    must see what production sees, hence this small client over a plain
    ``AppRunner``.
    """

    def __init__(self, app: web.Application, url: str, session: aiohttp.ClientSession) -> None:
        self.app = app
        self.url = url
        self.session = session

    @property
    def port(self) -> int:
        return URL(self.url).port or 80

    def make_url(self, path: str) -> URL:
        return URL(self.url + path)

    def request(self, method: str, path: str, **kwargs):
        return self.session.request(method, self.url + path, **kwargs)

    def get(self, path: str, **kwargs):
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs):
        return self.request("POST", path, **kwargs)

    def delete(self, path: str, **kwargs):
        return self.request("DELETE", path, **kwargs)

    def ws_connect(self, path: str, **kwargs):
        return self.session.ws_connect(self.url + path, **kwargs)


@contextlib.asynccontextmanager
async def run_gateway(app: web.Application) -> AsyncIterator[GatewayClient]:
    async with serve(app) as url:
        async with aiohttp.ClientSession() as session:
            yield GatewayClient(app, url, session)


@attrs.define
class Faults:
    first_byte_delay_s: float = 0.0
    trickle_s: float = 0.0
    chunk_bytes: int | None = None
    reset_after_bytes: int | None = None
    drop: bool = False
    not_http: bool = False
    audio_seconds: float | None = None
    ws_close_code: int | None = None
    hop_headers: bool = False
    token_interval_s: float | None = None
    stamp: bool = False

    _NAMES = {
        "first-byte-delay": ("first_byte_delay_s", float),
        "trickle": ("trickle_s", float),
        "chunk-bytes": ("chunk_bytes", int),
        "reset-after": ("reset_after_bytes", int),
        "audio-seconds": ("audio_seconds", float),
        "ws-close-code": ("ws_close_code", int),
        "token-interval": ("token_interval_s", float),
    }

    def merged_with(self, header: str | None) -> "Faults":
        if not header:
            return self
        changes: dict = {}
        for item in header.split(";"):
            name, _, value = item.strip().partition("=")
            if not name:
                continue
            if name in ("drop", "not-http", "hop-headers", "stamp"):
                changes[name.replace("-", "_")] = True
            elif name in self._NAMES:
                field, convert = self._NAMES[name]
                changes[field] = convert(value)
            else:
                raise ValueError(f"unknown emulator fault {name!r}")
        return attrs.evolve(self, **changes)


@attrs.define
class Received:
    """One request as the emulator saw it."""

    method: str
    path: str  # raw, still percent-encoded
    query: str
    headers: CIMultiDict[str]
    body: bytes
    started: float  # time.monotonic()
    client_gone_at: float | None = None
    finished_at: float | None = None
    fault_fired: bool = False
    ws_close_code: int | None = None  # the code the client closed a WebSocket with

    @property
    def body_sha256(self) -> str:
        return hashlib.sha256(self.body).hexdigest()


RECEIVED_KEY = web.RequestKey("emulator.received", Received)
FAULTS_KEY = web.RequestKey("emulator.faults", Faults)
RESPONSE_KEY = web.RequestKey("emulator.response", web.StreamResponse)
WATCH_INTERVAL_S = 0.02


class RecordingEmulator:
    """Base of the emulators: request log, fault switches, client-gone watch."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.faults = Faults()
        self.url = ""  # set by whoever serves it

    def make_app(self) -> web.Application:
        raise NotImplementedError

    @contextlib.asynccontextmanager
    async def running(self, port: int = 0) -> AsyncIterator["RecordingEmulator"]:
        """Serve the emulator on loopback (``self.url``; a free port unless given) for the ``async with``."""
        async with serve(self.make_app(), port) as url:
            self.url = url
            yield self

    def install(self, app: web.Application) -> web.Application:
        """Add the recording middleware's companion: hop-by-hop answer headers on demand."""
        app.on_response_prepare.append(self._add_hop_headers)
        return app

    @staticmethod
    async def _add_hop_headers(request: web.Request, response: web.StreamResponse) -> None:
        faults = request.get(FAULTS_KEY)
        if faults is not None and faults.hop_headers:
            response.headers["Connection"] = "keep-alive, X-Upstream-Hop"
            response.headers["X-Upstream-Hop"] = "only for the next hop"
            response.headers["Keep-Alive"] = "timeout=5, max=100"
            response.headers["Proxy-Authenticate"] = 'Basic realm="emulator"'
            response.headers["X-Upstream-End"] = "end to end"

    # -- inspection -------------------------------------------------------------

    def received(self, path: str | None = None, method: str | None = None) -> list[Received]:
        return [
            r for r in self.requests
            if (path is None or r.path == path) and (method is None or r.method == method)
        ]

    def last(self, path: str | None = None) -> Received:
        found = self.received(path)
        assert found, f"the emulator received no request{' for ' + path if path else ''}"
        return found[-1]

    async def wait_client_gone(self, received: Received, timeout_s: float = 2.0) -> float | None:
        deadline = time.monotonic() + timeout_s
        while received.client_gone_at is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return received.client_gone_at

    # -- plumbing used by handlers -----------------------------------------------

    @web.middleware
    async def record(self, request: web.Request, handler) -> web.StreamResponse:
        is_websocket = request.headers.get("Upgrade", "").lower() == "websocket"
        body = b"" if is_websocket else await request.read()
        raw_path, _, query = request.raw_path.partition("?")
        received = Received(
            method=request.method,
            path=raw_path,
            query=query,
            headers=CIMultiDict(request.headers),
            body=body,
            started=time.monotonic(),
        )
        self.requests.append(received)
        request[RECEIVED_KEY] = received
        request[FAULTS_KEY] = self.faults.merged_with(request.headers.get(FAULT_HEADER))
        watcher = asyncio.create_task(self._watch(request, received))
        try:
            faults: Faults = request[FAULTS_KEY]
            if faults.first_byte_delay_s:
                await self.pause(request, faults.first_byte_delay_s)
            if faults.drop:
                received.fault_fired = True
                request.transport.close()
                raise ConnectionResetError("emulator: dropped the connection on purpose")
            if faults.not_http:
                received.fault_fired = True
                request.transport.write(b"SSH-2.0-OpenSSH_9.6 this is not HTTP\r\n\r\n")
                request.transport.close()
                raise ConnectionResetError("emulator: answered garbage on purpose")
            return await handler(request)
        except ConnectionError:
            # The connection is gone (the client left, or a fault cut it):
            # nothing can be sent, so hand aiohttp whatever was started.
            if not received.fault_fired and received.client_gone_at is None:
                received.client_gone_at = time.monotonic()
            return request.get(RESPONSE_KEY) or web.Response(status=499)
        finally:
            received.finished_at = time.monotonic()
            watcher.cancel()

    async def _watch(self, request: web.Request, received: Received) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            transport = request.transport
            if (transport is None or transport.is_closing()) and not received.fault_fired:
                received.client_gone_at = time.monotonic()
                return

    async def pause(self, request: web.Request, seconds: float) -> None:
        """Sleep like a busy server, but stop as soon as the client is gone."""
        received: Received = request[RECEIVED_KEY]
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(left, WATCH_INTERVAL_S))
            transport = request.transport
            if transport is None or transport.is_closing():
                if received.client_gone_at is None:
                    received.client_gone_at = time.monotonic()
                raise ConnectionResetError("emulator: client went away while we were busy")

    async def write_body(
        self, request: web.Request, response: web.StreamResponse, chunks, trickle_s: float | None = None
    ) -> None:
        """Write ``chunks`` honouring trickle and reset faults; then end the body.

        ``trickle_s`` is the service's own pacing (token by token); the
        ``trickle`` fault overrides it.
        """
        faults: Faults = request[FAULTS_KEY]
        pause_s = faults.trickle_s or trickle_s or 0.0
        pause = self.pause if pause_s >= WATCH_INTERVAL_S else None
        received: Received = request[RECEIVED_KEY]
        request[RESPONSE_KEY] = response
        written = 0
        for chunk in chunks:
            if faults.reset_after_bytes is not None and written + len(chunk) > faults.reset_after_bytes:
                head = chunk[: max(0, faults.reset_after_bytes - written)]
                if head:
                    await response.write(head)
                received.fault_fired = True
                # Flush what was promised, then cut the connection mid-body.
                await asyncio.sleep(0.05)
                request.transport.abort()
                raise ConnectionResetError("emulator: reset mid-body on purpose")
            await response.write(chunk)
            written += len(chunk)
            if pause is not None:
                await pause(request, pause_s)
            elif pause_s:
                await asyncio.sleep(pause_s)  # too short to watch; a failed write notices a gone client
        await response.write_eof()


def run_standalone(emulator: RecordingEmulator, description: str) -> None:
    """``python -m tests.upstreams.<name> --port N``: serve an emulator by itself (benchmarks, manual tries)."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    web.run_app(emulator.make_app(), host=args.host, port=args.port, access_log=None, print=None)
