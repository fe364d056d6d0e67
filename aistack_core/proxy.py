"""The streaming reverse proxy that every upstream (Qwen3-TTS, Ollama) goes through.

``forward`` relays one HTTP exchange and ``forward_websocket`` one WebSocket
session.  Both are transparent: the request and the answer pass byte for
byte, minus the hop-by-hop headers that describe only one leg of the trip.
Bodies stream in both directions; nothing is buffered whole, so a 500 MB
answer costs the gateway a few chunks of memory.

What the proxy adds is only what a gateway must own:

* path safety: only the upstream's declared routes reach it, and a path
  that could be read as another one (dot segments, encoded slashes,
  backslashes, doubled slashes) is refused before anything is sent;
* error mapping into the envelope for failures *of the trip* (nothing
  listening, reset, timeout, an answer that is not HTTP).  The upstream's
  own HTTP errors are answers, and pass through untouched;
* credentials and browser policy: the gateway's own key never travels
  upstream (an upstream that needs a key gets its own from its plugin), and
  the upstream's CORS and cookie headers never reach the client — the
  gateway's CORS policy alone speaks to browsers;
* replicas: an upstream with several URLs is reached at the first one that
  accepts the connection (upstreams.py knows which are down);
* client disconnect: :func:`relay` runs the trip inside the inference
  context, whose watcher cancels the upstream call as soon as the client
  goes away, which frees the GPU slot and lets the upstream abort its
  generation.
"""

from __future__ import annotations

import asyncio
import logging
import re
import urllib.parse
from typing import Any, Callable, Iterable, Mapping

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, MultiMapping
from yarl import URL

from .backends import Upstream
from .context import config_key, upstream_devices_key, upstream_sessions_key
from .errors import AistackError, BadGateway, Cancelled, GatewayTimeout, Malformed, Network
from .forms import bounded_stream, broken_body, is_compressed, send_continue
from .inference import client_gone, inference
from .observe.capture import redact_query, upstream_body
from .observe.record import RequestInfo, request_info
from .upstreams import probes_key

log = logging.getLogger("aistack.proxy")

# RFC 9110 section 7.6.1 plus the legacy names still seen in the wild.
# Any header starting with "proxy-" and any header named by Connection are
# dropped as well.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "te", "trailer", "trailers", "transfer-encoding", "upgrade"}
)
# Our own server already answered Expect: 100-continue; Host names us, not the upstream.
_REQUEST_ONLY = frozenset({"host", "expect"})
_WEBSOCKET_HANDSHAKE = frozenset(
    {"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-protocol"}
)
# aiohttp's client adds these when absent; a transparent proxy must not
# (an invented Accept-Encoding would let the upstream compress an answer
# the client never asked to be compressed).
_CLIENT_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")

# Percent-encoded ".", "/", "\", NUL and "%" itself: any of them lets a path
# that looks harmless here mean another path once the upstream decodes it.
_ENCODED_TRICKS = re.compile(r"%(?:2e|2f|5c|00|25)", re.IGNORECASE)

# Upstream WebSocket messages can carry a reference voice (vLLM-Omni allows
# 4 MiB for session.config); keep headroom without being unbounded.
WEBSOCKET_MAX_MESSAGE = 16 * 1024 * 1024


# --- headers ------------------------------------------------------------------


def _connection_named(headers: MultiMapping[str]) -> set[str]:
    named: set[str] = set()
    for value in headers.getall("Connection", ()):
        named.update(token.strip().lower() for token in value.split(",") if token.strip())
    return named


def end_to_end_headers(headers: MultiMapping[str], also_drop: Iterable[str] = ()) -> CIMultiDict[str]:
    """``headers`` without the hop-by-hop ones (repeated headers keep their order)."""
    drop = HOP_BY_HOP | _connection_named(headers) | set(also_drop)
    kept: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in drop or lowered.startswith("proxy-"):
            continue
        kept.add(name, value)
    return kept


# The upstream speaks to us, not to the client's browser: the gateway's own CORS
# policy decides what a page may read, and the gateway sets no cookies.
_UPSTREAM_ONLY_RESPONSE_HEADERS = frozenset({"set-cookie", "set-cookie2"})


def response_headers(headers: MultiMapping[str]) -> CIMultiDict[str]:
    kept = end_to_end_headers(headers, _UPSTREAM_ONLY_RESPONSE_HEADERS)
    for name in [name for name in kept if name.lower().startswith("access-control-")]:
        kept.popall(name, None)
    return kept


def _without_gateway_credentials(request: web.Request, headers: CIMultiDict[str], upstream: Upstream) -> None:
    """Drop the client's credentials for the gateway; add the upstream's own."""
    headers.popall("Authorization", None)
    headers.popall("X-Api-Key", None)
    headers.popall("Cookie", None)
    for name, value in upstream.headers:
        headers[name] = value


def _target_without_key(target: str, request: web.Request) -> str:
    """The gateway key, if a client put it in the query string, stays here too."""
    key = request.app[config_key].api_key
    path, question, query = target.partition("?")
    if not key or not question:
        return target
    kept = [pair for pair in query.split("&") if urllib.parse.unquote_plus(pair.partition("=")[2]) != key]
    return path + ("?" + "&".join(kept) if kept else "")


def _for_log(target: str) -> str:
    """A request target fit for the server log: credential-looking query values redacted."""
    path, question, query = target.partition("?")
    return path + "?" + redact_query(query) if question else path


def _request_only(request: web.Request, replacing_body: bool) -> frozenset[str]:
    """Request headers that describe the body as it reached *us*, not as we send it."""
    drop = _REQUEST_ONLY
    if is_compressed(request):
        # aiohttp's server already decompressed the body we read or stream on.
        drop = drop | {"content-encoding", "content-length"}
    if replacing_body:
        drop = drop | {"content-length"}  # aiohttp sets the new body's own
    return drop


def _auto_headers_to_skip(headers: Mapping[str, str]) -> tuple[str, ...]:
    return tuple(name for name in _CLIENT_AUTO_HEADERS if name not in headers)


# --- paths --------------------------------------------------------------------


def _route_allows(route: str, path: str) -> bool:
    if route.endswith("*"):
        prefix = route[:-1]
        return path.startswith(prefix) and len(path) > len(prefix)
    return path == route


def checked_target(raw_target: str, upstream: Upstream) -> str:
    """The request target to send upstream, or :class:`Malformed` when unsafe.

    ``raw_target`` is the path and query exactly as the client sent them
    (still percent-encoded): the check must see what the upstream will see.
    """
    path, _, _query = raw_target.partition("?")
    unsafe = (
        not path.startswith("/")
        or "//" in path
        or "\\" in path
        or _ENCODED_TRICKS.search(path) is not None
        or any(segment in (".", "..") for segment in path.split("/"))
        or any(ord(char) < 0x20 or ord(char) == 0x7F for char in path)
    )
    if unsafe:
        raise Malformed(
            f"Refusing to forward path {path!r}: dot segments, encoded dots or slashes, backslashes "
            f"and empty segments are not allowed in proxied paths.",
            code="unsafe_path",
        )
    if not any(_route_allows(route, path) for route in upstream.routes):
        raise Malformed(
            f"Path {path!r} is not one the {upstream.provider} upstream serves through aistack "
            f"(allowed: {', '.join(upstream.routes)}).",
            status=404, code="not_found",
        )
    return raw_target


def upstream_url(base_url: str, target: str) -> URL:
    # encoded=True: the target is already in wire form and must not be re-quoted.
    return URL(base_url.rstrip("/") + target, encoded=True)


# --- replicas -------------------------------------------------------------------


def _refused(exc: BaseException) -> bool:
    """A failure to connect: nothing was sent, so another replica may be tried with the same body."""
    return isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError))


class _TripFailed(Exception):
    """A failure of the trip and the replica it happened at."""

    def __init__(self, cause: BaseException, base_url: str) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.base_url = base_url


async def _connect_first_reachable(request: web.Request, upstream: Upstream, target: str, connect):
    """``await connect(base_url)`` on each replica in turn until one connects.

    A replica that refuses (or times out connecting) is marked down and the
    next one is tried; any other failure, or the last refusal, raises
    :class:`_TripFailed`.
    """
    probes = request.app[probes_key]
    candidates = probes.candidates(upstream)
    for position, base_url in enumerate(candidates):
        try:
            connected = await connect(base_url)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            if _refused(exc):
                probes.mark_down(upstream, base_url, f"{type(exc).__name__}: {exc}")
                if position + 1 < len(candidates):
                    log.info("%s -> %s at %s refused; trying %s", _for_log(target), upstream.name, base_url,
                             candidates[position + 1])
                    continue
            raise _TripFailed(exc, base_url) from exc
        probes.mark_up(upstream, base_url)
        return connected
    raise AssertionError("an upstream always has at least one URL")


# --- HTTP -----------------------------------------------------------------------


def _trip_error(exc: BaseException, upstream: Upstream, base_url: str) -> AistackError:
    """A failure before the upstream's answer started, as an envelope error."""
    cause = f"{type(exc).__name__}: {exc}".rstrip(": ")
    if _refused(exc):
        tried = f"; every replica ({', '.join(upstream.urls)}) refused" if len(upstream.urls) > 1 else ""
        return Network(f"{upstream.unreachable_hint} ({cause}{tried})", code="upstream_unreachable")
    if isinstance(exc, asyncio.TimeoutError):
        message = (
            f"{upstream.provider} did not answer within {upstream.read_timeout:g} s at {base_url} "
            f"({cause})."
        )
        error_class = GatewayTimeout if upstream.timeout_status == 504 else BadGateway
        return error_class(message, provider=upstream.provider, status=upstream.timeout_status, code="upstream_timeout")
    if isinstance(exc, aiohttp.ClientResponseError):
        return BadGateway(
            f"{upstream.provider} at {base_url} answered with something that is not valid HTTP "
            f"({cause}).",
            provider=upstream.provider,
        )
    return BadGateway(
        f"The connection to {upstream.provider} at {base_url} failed before it answered ({cause}).",
        provider=upstream.provider,
    )


class _UpstreamBroke(Exception):
    """The upstream failed after its answer started (reset, timeout, short body)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def _read_upstream(read) -> bytes:
    # Upstream read failures are told apart from client write failures here:
    # some aiohttp client errors are also ConnectionErrors.
    try:
        return await read()
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise _UpstreamBroke(f"{type(exc).__name__}: {exc}") from exc


def _abort_client(request: web.Request) -> None:
    """Close the client connection so it sees a truncated body, never a complete-looking one."""
    transport = request.transport
    if transport is not None:
        transport.close()


async def forward(
    request: web.Request,
    upstream: Upstream,
    session: aiohttp.ClientSession,
    *,
    body: bytes | None = None,
    path: str | None = None,
    served_model: str | None = None,
) -> web.StreamResponse:
    """Relay ``request`` to ``upstream`` and stream its answer back.

    :param body: send these bytes instead of the client's body (a rewritten
        JSON document); by default the client's body streams through.
    :param path: the request target (path and query, percent-encoded) to
        send instead of the client's own.

    Raises typed errors only before the answer's headers go out.  After
    that, an upstream failure closes the client connection (the client sees
    a truncated body) and a client that leaves makes this return; either
    way the upstream connection is closed and the caller's slot released.
    """
    info = request_info(request)
    target = _target_without_key(checked_target(path if path is not None else request.raw_path, upstream), request)
    headers = end_to_end_headers(request.headers, _request_only(request, body is not None))
    _without_gateway_credentials(request, headers, upstream)
    if body is not None:
        data: object = body
    elif request.body_exists:
        await send_continue(request)  # the checks passed: now the client may send the body
        # The client's stream (teed into a capture when on); a stall ends it (408).
        data = bounded_stream(request, upstream_body(request))
    else:
        data = None

    upstream_response: aiohttp.ClientResponse | None = None
    response: web.StreamResponse | None = None
    relayed = 0
    finished = False
    try:
        def send(base_url: str):
            return session.request(
                request.method,
                upstream_url(base_url, target),
                headers=headers,
                data=data,
                skip_auto_headers=_auto_headers_to_skip(headers),
                allow_redirects=False,
            )

        try:
            upstream_response = await _connect_first_reachable(request, upstream, target, send)
        except _TripFailed as failed:
            exc = failed.cause
            if client_gone(request):
                raise _note_client_left(info, "while sending the request upstream") from None
            own = _raised_by_our_body(exc)
            if own is not None:  # the client's body stalled while we streamed it
                raise own from None
            if request.content.exception() is not None:  # the client's body broke, not the upstream
                raise broken_body(request, Malformed(
                    f"The request body could not be read to forward it ({_body_failure(request)}).",
                    code="invalid_body",
                )) from None
            error = _trip_error(exc, upstream, failed.base_url)
            log.warning("%s %s -> %s failed: %s", request.method, _for_log(target), upstream.name, error.message)
            raise error from None

        response = web.StreamResponse(
            status=upstream_response.status,
            reason=upstream_response.reason,
            headers=response_headers(upstream_response.headers),
        )
        if served_model and "X-Aistack-Model" not in response.headers:
            response.headers["X-Aistack-Model"] = served_model
        read = upstream_response.content.readany
        try:
            await response.prepare(request)
            # Bound after prepare: payload capture may wrap write() while preparing.
            write = response.write
            # The hot path: one read, one write per chunk as it arrives.
            while chunk := await _read_upstream(read):
                await write(chunk)
                relayed += len(chunk)
            await response.write_eof()
        except ConnectionError:  # a write to a client that is gone
            _note_client_left(info, f"after {relayed} bytes")
            return response
        except _UpstreamBroke as broke:
            log.warning(
                "%s %s: %s failed after %d bytes were relayed (%s); closing the client connection",
                request.method, _for_log(target), upstream.name, relayed, broke.reason,
            )
            info.upstream_error = broke.reason
            _abort_client(request)
            return response
        finished = True
        return response
    finally:
        info.bytes_out = relayed
        if upstream_response is not None:
            if finished:
                upstream_response.release()  # body fully read: the connection may be reused
            else:
                upstream_response.close()  # the upstream sees the disconnect now


def _raised_by_our_body(exc: BaseException) -> AistackError | None:
    """The gateway's own error (a stalled client body), if aiohttp's client wrapped one."""
    seen = 0
    cause: BaseException | None = exc
    while cause is not None and seen < 8:
        if isinstance(cause, AistackError):
            return cause
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return None


def _body_failure(request: web.Request) -> str:
    cause = request.content.exception()
    if is_compressed(request):
        return f"it does not decompress as {request.headers['Content-Encoding']!r}"
    return type(cause).__name__


def _note_client_left(info: RequestInfo, when: str) -> Cancelled:
    info.client_disconnected = True
    log.info("client of request %s went away %s; upstream call closed", info.request_id, when)
    return Cancelled(f"Client disconnected {when}.")


# --- WebSocket ------------------------------------------------------------------

# Close codes an endpoint may not send itself; they only describe what happened.
_RESERVED_CLOSE_CODES = {1005, 1006, 1015}


def _sendable(code: int | None, fallback: int) -> int:
    if code is None or code in _RESERVED_CLOSE_CODES:
        return fallback
    return code


async def _pump(source, sink, activity: "_Activity", counter: list[int] | None = None) -> None:
    """Copy text and binary messages from ``source`` to ``sink`` until ``source`` closes."""
    async for message in source:
        try:
            if message.type is aiohttp.WSMsgType.TEXT:
                await sink.send_str(message.data)
                size = len(message.data)
            elif message.type is aiohttp.WSMsgType.BINARY:
                await sink.send_bytes(message.data)
                size = len(message.data)
            else:  # ERROR: the connection is broken; pings are answered by aiohttp
                break
        except ConnectionError:
            break
        activity.touch()
        if counter is not None:
            counter[0] += size


class _Activity:
    """When a message last went either way, for the idle limit."""

    def __init__(self) -> None:
        self.last = asyncio.get_running_loop().time()

    def touch(self) -> None:
        self.last = asyncio.get_running_loop().time()

    async def wait_idle(self, limit_s: float) -> None:
        """Return once nothing has moved for ``limit_s`` seconds."""
        loop = asyncio.get_running_loop()
        while True:
            remaining = self.last + limit_s - loop.time()
            if remaining <= 0:
                return
            await asyncio.sleep(remaining)


async def forward_websocket(
    request: web.Request,
    upstream: Upstream,
    session: aiohttp.ClientSession,
    *,
    path: str | None = None,
) -> web.WebSocketResponse:
    """Relay a WebSocket session between the client and ``upstream``.

    The upstream is connected first, so an unreachable upstream is still a
    plain HTTP 503 envelope (the client's upgrade is never accepted).
    Messages flow both ways unchanged; when one side closes, the other is
    closed with the same code.  The client is pinged (``AISTACK_WS_HEARTBEAT_S``):
    a peer that stops answering is closed, and so is a session in which no
    message went either way for ``AISTACK_WS_IDLE_TIMEOUT_S`` — either way
    the slot the session holds is freed.
    """
    info = request_info(request)
    config = request.app[config_key]
    target = _target_without_key(checked_target(path if path is not None else request.raw_path, upstream), request)
    headers = end_to_end_headers(request.headers, _REQUEST_ONLY | _WEBSOCKET_HANDSHAKE | {"content-length"})
    _without_gateway_credentials(request, headers, upstream)
    protocols = [
        token.strip() for token in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if token.strip()
    ]

    def open_websocket(base_url: str):
        return session.ws_connect(
            upstream_url(base_url, target),
            headers=headers,
            protocols=protocols,
            max_msg_size=WEBSOCKET_MAX_MESSAGE,
            heartbeat=config.ws_heartbeat_s or None,
        )

    try:
        upstream_ws = await _connect_first_reachable(request, upstream, target, open_websocket)
    except _TripFailed as failed:
        exc = failed.cause
        if isinstance(exc, aiohttp.WSServerHandshakeError):
            raise BadGateway(
                f"{upstream.provider} refused the WebSocket upgrade on {target.partition('?')[0]} "
                f"(status {exc.status}: {exc.message}).",
                provider=upstream.provider, code="websocket_refused",
            ) from None
        error = _trip_error(exc, upstream, failed.base_url)
        log.warning("WebSocket %s -> %s failed: %s", _for_log(target), upstream.name, error.message)
        raise error from None

    sent_to_client = [0]
    client_ws = web.WebSocketResponse(
        protocols=(upstream_ws.protocol,) if upstream_ws.protocol else (),
        max_msg_size=WEBSOCKET_MAX_MESSAGE,
        heartbeat=config.ws_heartbeat_s or None,
    )
    try:
        await client_ws.prepare(request)
        activity = _Activity()
        to_upstream = asyncio.create_task(_pump(client_ws, upstream_ws, activity))
        to_client = asyncio.create_task(_pump(upstream_ws, client_ws, activity, sent_to_client))
        idle = asyncio.create_task(activity.wait_idle(config.ws_idle_timeout_s)) if config.ws_idle_timeout_s > 0 \
            else asyncio.create_task(asyncio.Event().wait())
        try:
            done, _ = await asyncio.wait({to_upstream, to_client, idle}, return_when=asyncio.FIRST_COMPLETED)
            if idle in done:
                log.info("WebSocket %s idle for %g s; closing it", _for_log(target), config.ws_idle_timeout_s)
                await client_ws.close(code=aiohttp.WSCloseCode.POLICY_VIOLATION, message=b"idle timeout")
                await upstream_ws.close(code=aiohttp.WSCloseCode.GOING_AWAY)
            elif to_upstream in done:
                # The client closed (or vanished: 1006 becomes "going away").
                if client_ws.close_code in (None, 1006):
                    info.client_disconnected = True
                await upstream_ws.close(code=_sendable(client_ws.close_code, aiohttp.WSCloseCode.GOING_AWAY))
                await client_ws.close(code=_sendable(client_ws.close_code, aiohttp.WSCloseCode.OK))
            else:
                # The upstream closed (or dropped): hand its code to the client.
                await client_ws.close(code=_sendable(upstream_ws.close_code, aiohttp.WSCloseCode.INTERNAL_ERROR))
                await upstream_ws.close()
        finally:
            for task in (to_upstream, to_client, idle):
                task.cancel()
            await asyncio.gather(to_upstream, to_client, idle, return_exceptions=True)
        return client_ws
    finally:
        info.bytes_out = sent_to_client[0]
        if not upstream_ws.closed:
            # Also reached when the handler is cancelled (servers started with
            # handler_cancellation): still tell the upstream why, if we know.
            await upstream_ws.close(code=_sendable(client_ws.close_code, aiohttp.WSCloseCode.GOING_AWAY))


# --- the trip, inside the inference context --------------------------------------------


async def relay(
    request: web.Request,
    capability: str,
    entry: Any,
    *,
    body: bytes | None = None,
    model_id: str | None = None,
    on_slot: Callable[[Any], Any] | None = None,
    served_model: str | None = None,
) -> web.StreamResponse:
    """Send ``request`` to the upstream ``entry`` serves, holding the slot, and stream back.

    :param body: the bytes to send instead of the client's own body.
    :param model_id: the registered model id the request is for (metrics), if known.
    :param served_model: the model the request names, sent back as ``X-Aistack-Model``.
    """
    upstream: Upstream = entry.backend
    session = request.app[upstream_sessions_key][upstream.name]
    is_websocket = request.headers.get("Upgrade", "").lower() == "websocket"
    # The slot of one of the devices its engine works on; none for an engine on another machine.
    devices = request.app[upstream_devices_key].get(upstream.name, ())
    async with inference(
        request, capability, entry, model_id=model_id, provider=upstream.provider, load=False,
        hold_slot=bool(devices), devices=devices, watch_disconnect=not is_websocket, on_slot=on_slot,
    ):
        if is_websocket:
            return await forward_websocket(request, upstream, session)
        return await forward(request, upstream, session, body=body, served_model=served_model)
