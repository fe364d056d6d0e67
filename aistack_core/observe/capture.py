"""Payload capture: what exactly went in and out of a request, for debugging.

Off unless ``AISTACK_OBS_PAYLOAD=on``.  Each request gets a folder
``<payload dir>/<UTC date>/<request id>/`` holding

- ``meta.json``: route, headers (credentials redacted), status, timing,
  content types, byte counts and truncation flags;
- ``req.bin`` and ``resp.bin``: the bodies, each cut at the per-request cap.

Nothing is written on the event loop: the loop hands byte chunks to an
:class:`~aistack_core.observe.writer.OffLoopWriter` thread, bounded by the bytes
it may hold, and a chunk that does not fit is dropped and the capture
flagged incomplete.  Streamed responses are teed chunk by chunk as they
are written to the client, so capture never holds a response back.  The
same thread sweeps the store (at start, every few minutes, and whenever a
share of the size limit was written): folders past the age limit go
first, then the oldest until the total fits.

Request bodies: one the handler read whole (``request.read()``, ``json()``,
``post()`` for url-encoded forms) is picked up after the handler from
aiohttp's cache.  Code that streams a body itself (multipart uploads, proxy
pass-through) calls :func:`tee_request_body` with each raw chunk, or
forwards :func:`upstream_body` instead of ``request.content``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import time
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterable

from aiohttp import web

from .record import RequestInfo, RequestOutcome, iso_utc
from .writer import OffLoopWriter

if TYPE_CHECKING:  # pragma: no cover - typing only
    from aiohttp import StreamReader

log = logging.getLogger("aistack.capture")

# Credentials never reach the disk.  Set-Cookie is not in the contract's list
# but carries session secrets just the same.
REDACTED_HEADERS = frozenset({"authorization", "cookie", "x-api-key", "proxy-authorization", "set-cookie"})
REDACTED = "[redacted]"

DEFAULT_MAX_PENDING_BYTES = 64 * 1024 * 1024
MAX_PENDING_OPERATIONS = 100_000
DEFAULT_SWEEP_EVERY_S = 300.0
# A request body the handler left unread is read after it, briefly; a client
# waiting for "100 Continue" would otherwise hold the request open.
UNREAD_BODY_TIMEOUT_S = 1.0


# Names that look like they carry a credential, in a header or a query parameter
# (``?api_key=``, ``X-Auth-Token``, ``access_token``, ``sig``...).
_CREDENTIAL_NAME = re.compile(r"key|token|secret|passw|auth|session|cookie|signature|^sig$|credential", re.IGNORECASE)


def looks_like_credential(name: str) -> bool:
    return name.lower() in REDACTED_HEADERS or _CREDENTIAL_NAME.search(name) is not None


def redact_query(query: str) -> str:
    """The query string with the values of credential-looking parameters replaced."""
    if not query:
        return query
    parts = []
    for pair in query.split("&"):
        name, equals, _value = pair.partition("=")
        if equals and looks_like_credential(urllib.parse.unquote_plus(name)):
            pair = f"{name}={REDACTED}"
        parts.append(pair)
    return "&".join(parts)


def redact_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str | list[str]]:
    """Headers as a JSON object (repeated names become lists), credentials replaced."""
    result: dict[str, str | list[str]] = {}
    for name, value in headers:
        shown = REDACTED if looks_like_credential(name) else value
        previous = result.get(name)
        if previous is None:
            result[name] = shown
        elif isinstance(previous, list):
            previous.append(shown)
        else:
            result[name] = [previous, shown]
    return result


def _folder_name(request_id: str) -> str:
    # Request ids are [A-Za-z0-9-_:.]{1,128}: only a leading dot ("..", ".")
    # could escape the date folder or hide the capture.
    return "_" + request_id if request_id.startswith(".") else request_id


class RequestCapture:
    """One request's capture; fed on the event loop, written by the store's thread."""

    def __init__(self, store: "PayloadStore", request_id: str, started_at: float) -> None:
        self.store = store
        self.request_id = request_id
        self.started_at = started_at
        self.date = time.strftime("%Y-%m-%d", time.gmtime(started_at))
        self.folder: Path | None = None  # chosen by the writer thread
        self.abandoned = False  # the folder could not be queued or created
        self.req_seen = self.req_kept = 0
        self.resp_seen = self.resp_kept = 0
        self.lost_bytes = 0
        self.response_note: str | None = None
        self.response_headers: dict[str, Any] | None = None
        self.response_content_type: str | None = None
        self.finished = False

    @property
    def cap(self) -> int:
        return self.store.request_cap_bytes

    def add_request(self, chunk: bytes | bytearray | memoryview) -> None:
        self.req_seen, self.req_kept = self._add("req.bin", chunk, self.req_seen, self.req_kept)

    def add_response(self, chunk: bytes | bytearray | memoryview) -> None:
        self.resp_seen, self.resp_kept = self._add("resp.bin", chunk, self.resp_seen, self.resp_kept)

    def _add(self, file_name: str, chunk: bytes | bytearray | memoryview, seen: int, kept: int) -> tuple[int, int]:
        size = len(chunk)
        room = self.cap - kept
        if room > 0 and size and not self.abandoned and not self.finished:
            # Copy: the caller may reuse its buffer once the write returns.
            piece = bytes(chunk[:room]) if size > room else bytes(chunk)
            if self.store.queue_bytes(self, file_name, piece):
                kept += len(piece)
            else:
                self.lost_bytes += len(piece)
                self.store.note_dropped_chunk()
        return seen + size, kept

    def finish(self, request: web.BaseRequest, outcome: RequestOutcome) -> None:
        if self.finished:
            return
        self.finished = True
        if self.abandoned:
            return
        route = None
        match_info = request.match_info
        if match_info is not None and match_info.route is not None and match_info.route.resource is not None:
            route = match_info.route.resource.canonical
        meta = {
            "request_id": self.request_id,
            "started": iso_utc(self.started_at),
            "method": request.method,
            "path": request.path,
            "query": redact_query(request.query_string),
            "route": route,
            "client": outcome.client,
            "capability": outcome.capability,
            "model": outcome.model or None,
            "provider": outcome.provider,
            "status": outcome.status,
            "class": outcome.outcome_class,
            "timing": {
                "latency_ms": round(outcome.latency_s * 1000, 3),
                "headers_ms": None if outcome.headers_s is None else round(outcome.headers_s * 1000, 3),
                "slot_wait_ms": None if outcome.slot_wait_s is None else round(outcome.slot_wait_s * 1000, 3),
            },
            "request": {
                "headers": redact_headers(request.headers.items()),
                "content_type": request.headers.get("Content-Type"),
                "bytes": self.req_seen or request.content_length or 0,
                "captured_bytes": self.req_kept,
                "truncated": self.req_seen > self.cap,
                # A body aiohttp could not hand back and nobody teed (e.g. a
                # streamed multipart the handler consumed) is marked so.
                "body_captured": self.req_seen > 0 or not request.body_exists,
            },
            "response": {
                "headers": self.response_headers,
                "content_type": self.response_content_type,
                "bytes": self.resp_seen,
                "captured_bytes": self.resp_kept,
                "truncated": self.resp_seen > self.cap,
                "note": self.response_note,
            },
            "cap_bytes": self.cap,
            "incomplete": self.lost_bytes > 0,
            "lost_bytes": self.lost_bytes,
            "outcome": outcome.to_record(),
        }
        if not self.store.writer.offer(("meta", self, meta)):
            self.store.dropped_captures += 1


def _body_bytes(op: tuple[str, Any, Any]) -> int:
    """What a queued operation holds in memory, for the writer's budget: an append's chunk."""
    kind, _, payload = op
    return len(payload[1]) if kind == "append" else 0


class PayloadStore:
    """The capture folder tree, its writer thread and its limits."""

    def __init__(
        self,
        root: Path,
        *,
        max_bytes: int,
        max_age_s: float,
        request_cap_bytes: int,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        sweep_every_s: float = DEFAULT_SWEEP_EVERY_S,
        wake_every_s: float = 0.25,
    ) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.request_cap_bytes = request_cap_bytes
        self.sweep_every_s = sweep_every_s
        self.captures = 0
        self.dropped_captures = 0
        self.dropped_chunks = 0
        self.failed_writes = 0
        self.swept_folders = 0
        self._open_folders: set[Path] = set()
        self._written_since_sweep = 0
        self._last_sweep = 0.0
        self._warned_full = False
        self._warned_failed = False
        # Body chunks count against the writer's size budget; the small
        # open/meta records only against its count.
        self.writer: OffLoopWriter[tuple[str, Any, Any]] = OffLoopWriter(
            "aistack-payload-capture", self._run_ops, max_pending=MAX_PENDING_OPERATIONS,
            wake_every_s=wake_every_s, on_tick=self._sweep_if_due,
            size_of=_body_bytes, max_pending_size=max_pending_bytes,
        )

    # --- event loop side ----------------------------------------------------------

    def begin(self, request_id: str, started_at: float) -> RequestCapture:
        capture = RequestCapture(self, request_id, started_at)
        if self.writer.offer(("open", capture, None)):
            self.captures += 1
        else:
            capture.abandoned = True
            self.dropped_captures += 1
        return capture

    def queue_bytes(self, capture: RequestCapture, file_name: str, data: bytes) -> bool:
        """Queue a body chunk for writing unless the bytes in flight would pass the budget."""
        return self.writer.offer(("append", capture, (file_name, data)))

    def note_dropped_chunk(self) -> None:
        self.dropped_chunks += 1
        if not self._warned_full:
            self._warned_full = True
            log.warning("payload capture is behind the disk; dropping body chunks (captures are flagged incomplete)")

    def start(self) -> None:
        self.writer.offer(("sweep", None, None))
        self.writer.start()

    def stop(self, timeout_s: float = 5.0) -> bool:
        return self.writer.stop(timeout_s)

    def counters(self) -> dict[str, tuple[str, float]]:
        return {
            "aistack_payload_captures": ("Requests whose payload capture was started.", self.captures),
            "aistack_payload_dropped_chunks": ("Body chunks not captured because the writer was behind.",
                                               self.dropped_chunks),
            "aistack_payload_failed_writes": ("Payload-capture writes that failed.", self.failed_writes),
            "aistack_payload_swept_folders": ("Capture folders removed by the age and size limits.",
                                              self.swept_folders),
        }

    def status(self) -> dict[str, Any]:
        return {
            "directory": str(self.root),
            "captures": self.captures,
            "dropped_chunks": self.dropped_chunks,
            "dropped_captures": self.dropped_captures,
            "failed_writes": self.failed_writes,
            "swept_folders": self.swept_folders,
            "max_mb": self.max_bytes / (1024 * 1024),
            "max_age_h": self.max_age_s / 3600,
            "request_cap_kb": self.request_cap_bytes / 1024,
        }

    # --- writer thread ------------------------------------------------------------

    def _run_ops(self, ops: list[tuple[str, Any, Any]]) -> None:
        for kind, capture, payload in ops:
            try:
                if kind == "open":
                    self._open(capture)
                elif kind == "append":
                    self._append(capture, *payload)
                elif kind == "meta":
                    self._write_meta(capture, payload)
                elif kind == "sweep":
                    self.sweep()
            except OSError as exc:
                self.failed_writes += 1
                if capture is not None and kind == "open":
                    capture.abandoned = True
                if not self._warned_failed:
                    self._warned_failed = True
                    log.warning("payload capture: cannot write under %s (%s)", self.root, exc)
        if self._written_since_sweep > self.max_bytes / 8:
            self.sweep()

    def _open(self, capture: RequestCapture) -> None:
        day = self.root / capture.date
        day.mkdir(parents=True, exist_ok=True)
        base = _folder_name(capture.request_id)
        folder, attempt = day / base, 1
        while True:  # a caller may reuse its X-Request-ID; never mix two requests
            try:
                folder.mkdir()
                break
            except FileExistsError:
                attempt += 1
                folder = day / f"{base}~{attempt}"
        for name in ("req.bin", "resp.bin"):
            (folder / name).touch()
        capture.folder = folder
        self._open_folders.add(folder)

    def _append(self, capture: RequestCapture, file_name: str, data: bytes) -> None:
        if capture.folder is None:
            return  # its folder could not be created
        with open(capture.folder / file_name, "ab") as stream:
            stream.write(data)
        self._written_since_sweep += len(data)

    def _write_meta(self, capture: RequestCapture, meta: dict) -> None:
        folder = capture.folder
        if folder is None:
            return
        self._open_folders.discard(folder)
        text = json.dumps(meta, ensure_ascii=False, indent=2, default=str)
        (folder / "meta.json").write_text(text, encoding="utf-8")
        self._written_since_sweep += len(text)

    def _sweep_if_due(self) -> None:
        if time.monotonic() - self._last_sweep >= self.sweep_every_s:
            self.sweep()

    def sweep(self, now: float | None = None) -> int:
        """Apply the age and size limits; returns how many folders were removed.

        Runs on the writer thread (or in tests with the thread stopped):
        folders of captures still in progress are counted but never removed.
        """
        now = time.time() if now is None else now
        self._last_sweep = time.monotonic()
        self._written_since_sweep = 0
        folders: list[tuple[float, int, Path]] = []  # (newest mtime, size, folder)
        in_progress_bytes = 0
        if not self.root.is_dir():
            return 0
        for day in self.root.iterdir():
            if not day.is_dir():
                continue
            for folder in day.iterdir():
                if not folder.is_dir():
                    continue
                newest, size = _newest_and_size(folder)
                if folder in self._open_folders:
                    in_progress_bytes += size
                else:
                    folders.append((newest, size, folder))
        removed = 0
        kept: list[tuple[float, int, Path]] = []
        for newest, size, folder in folders:
            if now - newest > self.max_age_s:
                removed += _remove(folder)
            else:
                kept.append((newest, size, folder))
        kept.sort()
        total = in_progress_bytes + sum(size for _, size, _ in kept)
        for newest, size, folder in kept:
            if total <= self.max_bytes:
                break
            removed += _remove(folder)
            total -= size
        for day in self.root.iterdir():
            if day.is_dir():
                try:
                    day.rmdir()  # only succeeds when empty
                except OSError:
                    pass
        self.swept_folders += removed
        if removed:
            log.info("payload capture: removed %d old folders under %s", removed, self.root)
        return removed


def _newest_and_size(folder: Path) -> tuple[float, int]:
    newest = folder.stat().st_mtime
    size = 0
    for entry in folder.iterdir():
        try:
            stat = entry.stat()
        except OSError:
            continue
        newest = max(newest, stat.st_mtime)
        size += stat.st_size
    return newest, size


def _remove(folder: Path) -> int:
    try:
        shutil.rmtree(folder)
    except OSError as exc:
        log.warning("payload capture: cannot remove %s: %s", folder, exc)
        return 0
    return 1


# --- glue used by observe.py and capability code --------------------------------

capture_key = web.RequestKey("aistack.capture", RequestCapture)


def tee_request_body(request: web.BaseRequest, chunk: bytes | bytearray | memoryview) -> None:
    """Capture one raw chunk of a request body that the caller streams itself.

    For handlers that consume the body chunk by chunk (multipart uploads,
    proxy pass-through) instead of ``await request.read()``.  Costs one
    dict lookup when capture is off.
    """
    capture = request.get(capture_key)
    if capture is not None:
        capture.add_request(chunk)


def upstream_body(request: web.BaseRequest) -> "StreamReader | AsyncIterator[bytes]":
    """The client's body to forward upstream: ``request.content`` itself, or,
    while capture is on, the same chunks teed into the capture as they pass."""
    capture = request.get(capture_key)
    if capture is None:
        return request.content
    return _teed_chunks(request.content, capture)


async def _teed_chunks(content: "StreamReader", capture: RequestCapture) -> AsyncIterator[bytes]:
    async for chunk in content.iter_any():
        capture.add_request(chunk)
        yield chunk


async def capture_read_body(request: web.BaseRequest, capture: RequestCapture) -> None:
    """After the handler: pick up a body it read whole (aiohttp keeps it), unless teed."""
    if capture.req_seen or not request.body_exists:
        return
    content = request.content
    length = request.content_length
    if not content.at_eof() and (length is None or length > capture.cap):
        return  # unread and large or of unknown size: reading it now would cost the client time
    try:
        body = await asyncio.wait_for(request.read(), UNREAD_BODY_TIMEOUT_S)
    except (web.HTTPException, ConnectionError, asyncio.TimeoutError):
        return
    if body:
        capture.add_request(body)


async def on_response_prepare(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """Signal: note the final headers and start teeing the response body."""
    capture = request.get(capture_key)
    if capture is None:
        return
    capture.response_headers = redact_headers(response.headers.items())
    capture.response_content_type = response.headers.get("Content-Type")
    if isinstance(response, web.WebSocketResponse):
        capture.response_note = "websocket: frames are not captured"
    elif isinstance(response, web.Response):
        body = response.body
        if isinstance(body, (bytes, bytearray)):
            capture.add_response(body)
        elif body is not None:
            capture.response_note = f"body object {type(body).__name__} is not captured"
    else:
        _tee_writes(response, capture)


def _tee_writes(response: web.StreamResponse, capture: RequestCapture) -> None:
    """Capture a streamed body as it is written, without holding any of it back.

    The response's own ``write``/``write_eof`` are shadowed on this one
    instance (public methods only, no subclass, no private attributes), so
    capability code streams exactly as it would without capture.
    """
    write = response.write
    write_eof = response.write_eof

    async def write_and_capture(data: bytes | bytearray | memoryview) -> None:
        await write(data)
        capture.add_response(data)

    async def write_eof_and_capture(data: bytes = b"") -> None:
        await write_eof(data)
        if data:
            capture.add_response(data)

    response.write = write_and_capture  # type: ignore[method-assign]
    response.write_eof = write_eof_and_capture  # type: ignore[method-assign]


def begin(store: PayloadStore, request: web.BaseRequest, info: RequestInfo, started_at: float) -> RequestCapture:
    capture = store.begin(info.request_id, started_at)
    request[capture_key] = capture
    return capture

