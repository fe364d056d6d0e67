"""What observability keeps about a request: typed fields, never a dict of extras.

:class:`RequestInfo` is filled in while a request runs (by the inference
context, the routes and the proxy); when it is over the middleware freezes
it into a :class:`RequestOutcome`, which every sink reads.  Everything a
client controls (path, requested model) is data in a JSON string here,
never a metric label: labels come from registered model ids only.
"""

from __future__ import annotations

import contextvars
import functools
import json
import math
import operator
import re
import secrets
import time
from typing import Any, Callable

import attrs
from aiohttp import web

_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9\-_:.]{1,128}")

current_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("aistack_request_id", default="-")


def pick_request_id(supplied: str | None) -> str:
    """The caller's ``X-Request-ID`` when it is safe to reuse, else 16 fresh hex characters."""
    if supplied and _VALID_REQUEST_ID.fullmatch(supplied):
        return supplied
    return secrets.token_hex(8)


@attrs.define(kw_only=True, slots=True)
class Measured:
    """What the routes and the inference context measure, shared by the live
    :class:`RequestInfo` and the frozen :class:`RequestOutcome`."""

    requested_model: str | None = None
    model_load_s: float | None = None
    inference_s: float | None = None
    audio_sec: float | None = None
    rtf: float | None = None
    stream: bool | None = None
    response_format: str | None = None
    cache: str | None = None
    language: str | None = None
    upstream_error: str | None = None
    # A realtime session (one WebSocket): its counts and end-of-speech -> final-text latency
    utterances: int | None = None
    partials: int | None = None
    final_latency_p50_s: float | None = None
    final_latency_max_s: float | None = None
    device: str | None = None  # the device whose slot served it (AISTACK_DEVICES name)


MEASURED_FIELDS = tuple(field.name for field in attrs.fields(Measured))
# The measured values as one tuple, in MEASURED_FIELDS order (one C call).
measured_values: Callable[[Measured], tuple] = operator.attrgetter(*MEASURED_FIELDS)


@attrs.define
class RequestInfo(Measured):
    """Facts about one request, filled in by whoever serves it.

    ``model`` must be a registered model id (the inference context sets it
    from the resolved card); what the client asked for goes to
    ``requested_model`` and reaches only the access log.  ``slot_busy`` is
    set by the inference context when the slot itself turned the request
    away, so an upstream's own 503 is never counted as load shedding.
    """

    request_id: str
    started: float = attrs.field(factory=time.monotonic)
    capability: str | None = None
    model: str | None = None
    provider: str | None = None
    slot_wait_s: float | None = None
    slot_busy: bool = False
    bytes_in: int | None = None  # what a route counted itself (relayed, decompressed upload)
    bytes_out: int | None = None
    client_disconnected: bool = False
    # Set by the on_response_prepare signal: when headers went out, and the
    # response, so a failure after that point aborts it instead of answering twice.
    headers_sent_at: float | None = None
    prepared_response: web.StreamResponse | None = attrs.field(default=None, repr=False)


REQUEST_INFO = web.RequestKey("aistack.request", RequestInfo)


def request_info(request: web.BaseRequest) -> RequestInfo:
    info = request.get(REQUEST_INFO)
    if info is None:  # a request that bypassed the middleware (a bare test app)
        info = RequestInfo(secrets.token_hex(8))
        request[REQUEST_INFO] = info
    return info


def classify(status: int, *, busy: bool, disconnected: bool) -> str:
    """The class a finished request is counted under.

    ``503-busy`` is the gateway's own slot shedding load (not a failure);
    ``client-disconnect`` is a caller that went away.
    """
    if disconnected or status == 499:
        return "client-disconnect"
    if busy:
        return "503-busy"
    if status >= 500:
        return "5xx"
    if status >= 400:
        return "4xx"
    if status >= 300:
        return "3xx"
    return "2xx"


@attrs.define(slots=True)
class RequestOutcome:
    """A finished request, as the metrics, the access log and the capture see it."""

    started_at: float  # time.time() when the request arrived
    request_id: str
    method: str
    path: str
    status: int
    outcome_class: str
    capability: str
    model: str | None
    provider: str | None
    latency_s: float
    slot_wait_s: float | None
    client: str | None
    bytes_in: int
    bytes_out: int
    headers_s: float | None = None
    # What the routes and the inference context measured (the RequestInfo's
    # Measured fields, as they were when the request ended).
    measured: Measured = attrs.field(factory=Measured, repr=False)

    def to_row(self) -> tuple:
        """The outcome as plain values: its fields in order, the last one the
        measured values as a tuple.  The garbage collector stops tracking such
        a tuple, so rows are what the sinks keep while they hold requests."""
        return (*_outcome_values(self), measured_values(self.measured))

    @classmethod
    def from_row(cls, row: tuple) -> RequestOutcome:
        """The outcome a row holds (positional: a third of the cost of keywords)."""
        return cls(*row[:-1], Measured(**dict(zip(MEASURED_FIELDS, row[-1]))))

    def to_record(self) -> dict[str, Any]:
        """One flat object: the access-log line and the JSON metrics view's ``recent`` entries."""
        record: dict[str, Any] = {
            "ts": iso_utc(self.started_at),
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "class": self.outcome_class,
            "capability": self.capability,
            "model": self.model,
            "provider": self.provider,
            "latency_ms": round(self.latency_s * 1000, 3),
            "slot_wait_ms": _ms(self.slot_wait_s),
            "client": self.client,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "headers_ms": _ms(self.headers_s),
        }
        for name, value in zip(MEASURED_FIELDS, measured_values(self.measured)):
            if value is not None:
                if value.__class__ is float:
                    value = round(value, 4) if math.isfinite(value) else None
                record[name] = value
        return record

    def to_json_line(self) -> str:
        """The access-log line.  ASCII escapes keep any odd client text (lone
        surrogates, control characters) valid JSON that any file encoding can hold."""
        return _LINE_ENCODER.encode(self.to_record())


_outcome_values = operator.attrgetter(*(field.name for field in attrs.fields(RequestOutcome) if field.name != "measured"))

# Made once: json.dumps with options builds a new encoder on every call (~2 µs a line).
_LINE_ENCODER = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), allow_nan=False)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


@functools.lru_cache(maxsize=8)
def _utc_second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def iso_utc(epoch: float) -> str:
    """``2025-01-02T03:04:05.678Z``; the formatted second is cached (once per request adds up)."""
    second = math.floor(epoch)
    return f"{_utc_second(second)}.{int((epoch - second) * 1000):03d}Z"
