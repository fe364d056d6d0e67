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

import attrs
from aiohttp import web
from multidict import CIMultiDict

FAULT_HEADER = "X-Emulator-Fault"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def refused_url() -> str:
    """A loopback URL with nothing listening: connecting is refused at once."""
    return f"http://127.0.0.1:{free_port()}"


@contextlib.asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    """Run ``app`` on a free loopback port; yields its base URL."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


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

    _NAMES = {
        "first-byte-delay": ("first_byte_delay_s", float),
        "trickle": ("trickle_s", float),
        "chunk-bytes": ("chunk_bytes", int),
        "reset-after": ("reset_after_bytes", int),
        "audio-seconds": ("audio_seconds", float),
        "ws-close-code": ("ws_close_code", int),
    }

    def merged_with(self, header: str | None) -> "Faults":
        if not header:
            return self
        changes: dict = {}
        for item in header.split(";"):
            name, _, value = item.strip().partition("=")
            if not name:
                continue
            if name in ("drop", "not-http"):
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


RECEIVED_KEY = "emulator.received"
FAULTS_KEY = "emulator.faults"
RESPONSE_KEY = "emulator.response"
WATCH_INTERVAL_S = 0.02


class RecordingEmulator:
    """Base of the emulators: request log, fault switches, client-gone watch."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.faults = Faults()

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
        except ConnectionResetError:
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

    async def write_body(self, request: web.Request, response: web.StreamResponse, chunks) -> None:
        """Write ``chunks`` honouring trickle and reset faults; then end the body."""
        faults: Faults = request[FAULTS_KEY]
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
            if faults.trickle_s:
                await self.pause(request, faults.trickle_s)
        await response.write_eof()
