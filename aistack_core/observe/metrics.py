"""Request metrics: running totals, a rolling window, and two ways to read them.

Recording happens on the event loop for every request, so it is kept to a
few dict updates and a ``bisect`` per histogram; nothing here formats text
or takes a lock on that path.  The expensive parts (percentiles over the
window, the Prometheus exposition) run only when someone reads
``/admin/api/metrics`` or scrapes ``/metrics``.

One :class:`Metrics` per application, and one ``CollectorRegistry`` per
application for Prometheus, so several apps in one process never share
counters.  ``prometheus-client`` is optional: without it only the
Prometheus text is unavailable.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections import deque
from typing import Any, Callable, Iterable, Iterator, Mapping

import attrs

from .record import RequestOutcome, iso_utc  # noqa: F401 - iso_utc re-exported for the sinks

# Seconds.  Wide on purpose: /health answers in microseconds, a long
# transcription takes minutes.
LATENCY_BUCKETS_S = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)
SLOT_WAIT_BUCKETS_S = (0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Processing time / audio time: below 1 is faster than real time.
RTF_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0)

# Labels are registered model ids (an upstream's listing included), so the set
# is small; the cap only guards against an upstream that lists thousands.
MAX_MODELS_PER_CAPABILITY = 64
UNKNOWN_MODEL_LABEL = "unknown"
OVERFLOW_MODEL_LABEL = "other"
RECENT_REQUESTS = 100


class Histogram:
    """Fixed buckets, Prometheus style (each bucket counts values <= its bound)."""

    __slots__ = ("bounds", "counts", "total", "count")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, float]]:
        running = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip((*self.bounds, math.inf), self.counts):
            running += count
            buckets.append(("+Inf" if bound == math.inf else repr(float(bound)), float(running)))
        return buckets


# --- the rolling window -----------------------------------------------------------
#
# Per series, one slot per minute, each holding sparse log-scale histograms.
# Recording is a dict increment whatever the request rate, memory does not
# grow with traffic, and nothing per request lingers for the garbage
# collector to walk.  Percentiles read from these buckets are within about
# 2 % of the exact value (each bucket spans a factor of 1.04).

WINDOW_BUCKET_RATIO = 1.04
_LOG_RATIO = math.log(WINDOW_BUCKET_RATIO)
_SMALLEST_VALUE = 1e-6


def log_bucket(value: float) -> int:
    if value <= _SMALLEST_VALUE:
        return 0
    return int(math.log(value / _SMALLEST_VALUE) / _LOG_RATIO) + 1


def log_bucket_value(index: int) -> float:
    """The geometric middle of a bucket: what a percentile falling in it reports."""
    if index <= 0:
        return 0.0
    return _SMALLEST_VALUE * WINDOW_BUCKET_RATIO ** (index - 0.5)


def percentiles(counts: Mapping[int, int], wanted: Iterable[int] = (50, 95, 99)) -> dict[str, float | None]:
    """Nearest-rank percentiles from log-bucket counts; ``None`` when empty."""
    total = sum(counts.values())
    if not total:
        return {f"p{p}": None for p in wanted}
    ordered = sorted(counts.items())
    result: dict[str, float | None] = {}
    for p in wanted:
        rank = max(1, math.ceil(p / 100 * total))
        running = 0
        for index, count in ordered:
            running += count
            if running >= rank:
                result[f"p{p}"] = log_bucket_value(index)
                break
    return result


class _MinuteSlot:
    __slots__ = ("minute", "by_class", "latency", "slot_wait", "rtf", "audio_sec")

    def __init__(self, minute: int) -> None:
        self.minute = minute
        self.by_class: dict[str, int] = {}
        self.latency: dict[int, int] = {}
        self.slot_wait: dict[int, int] = {}
        self.rtf: dict[int, int] = {}
        self.audio_sec = 0.0


def _add(counts: dict[int, int], value: float) -> None:
    index = log_bucket(value)
    counts[index] = counts.get(index, 0) + 1


def _merge(into: dict, counts: Mapping) -> None:
    for key, count in counts.items():
        into[key] = into.get(key, 0) + count


class SeriesTotals:
    """One (capability, model): totals since the app started, and its minute slots."""

    __slots__ = ("by_class", "latency", "slot_wait", "rtf", "audio_sec", "bytes_in", "bytes_out", "minutes")

    def __init__(self, window_minutes: int) -> None:
        self.by_class: dict[str, int] = {}
        self.latency = Histogram(LATENCY_BUCKETS_S)
        self.slot_wait = Histogram(SLOT_WAIT_BUCKETS_S)
        self.rtf = Histogram(RTF_BUCKETS)
        self.audio_sec = 0.0
        self.bytes_in = 0
        self.bytes_out = 0
        self.minutes: deque[_MinuteSlot] = deque(maxlen=window_minutes + 1)

    def slot(self, minute: int) -> _MinuteSlot:
        minutes = self.minutes
        if minutes and minutes[-1].minute == minute:
            return minutes[-1]
        slot = _MinuteSlot(minute)
        minutes.append(slot)
        return slot


class Metrics:
    """Per-app request metrics.  Call :meth:`record` on the event loop only."""

    def __init__(self, window_s: float = 3600.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._window_minutes = max(1, math.ceil(window_s / 60))
        self._clock = clock
        self.started = clock()
        self.series: dict[tuple[str, str], SeriesTotals] = {}
        self._models_seen: dict[str, set[str]] = {}
        # The last requests as rows, not RequestOutcome objects: the garbage
        # collector stops tracking a tuple of plain values, while a hundred
        # live records would be walked again at every collection.
        self._recent_rows: deque[tuple] = deque(maxlen=RECENT_REQUESTS)

    def _model_label(self, capability: str, model: str) -> str:
        seen = self._models_seen.setdefault(capability, set())
        if model in seen:
            return model
        if len(seen) >= MAX_MODELS_PER_CAPABILITY:
            return OVERFLOW_MODEL_LABEL
        seen.add(model)
        return model

    def record(self, outcome: RequestOutcome, row: tuple | None = None) -> None:
        """Count a finished request; ``row`` is ``outcome.to_row()`` when the caller has it already."""
        capability = outcome.capability
        # Only registered model ids become labels; whatever else a client sent is one value.
        key = (capability, outcome.model or UNKNOWN_MODEL_LABEL)
        totals = self.series.get(key)
        if totals is None:
            key = (capability, self._model_label(capability, key[1]))
            totals = self.series.get(key)
            if totals is None:
                totals = self.series[key] = SeriesTotals(self._window_minutes)
        minute = int(self._clock() // 60)
        minutes = totals.minutes
        slot = minutes[-1] if minutes and minutes[-1].minute == minute else totals.slot(minute)
        outcome_class = outcome.outcome_class
        totals.by_class[outcome_class] = totals.by_class.get(outcome_class, 0) + 1
        slot.by_class[outcome_class] = slot.by_class.get(outcome_class, 0) + 1
        latency = outcome.latency_s
        totals.latency.observe(latency)
        index = log_bucket(latency)
        slot.latency[index] = slot.latency.get(index, 0) + 1
        slot_wait = outcome.slot_wait_s
        if slot_wait is not None:
            totals.slot_wait.observe(slot_wait)
            _add(slot.slot_wait, slot_wait)
        # Audio counts only when it was served: a busy or failed request may
        # know its upload's length but processed none of it.
        if outcome_class == "2xx":
            measured = outcome.measured
            audio_sec = measured.audio_sec
            if audio_sec is not None:
                totals.audio_sec += audio_sec
                slot.audio_sec += audio_sec
            rtf = measured.rtf
            if rtf is not None:
                totals.rtf.observe(rtf)
                _add(slot.rtf, rtf)
        totals.bytes_in += outcome.bytes_in
        totals.bytes_out += outcome.bytes_out
        self._recent_rows.append(outcome.to_row() if row is None else row)

    # --- reading ----------------------------------------------------------------

    def recent(self, count: int = RECENT_REQUESTS) -> list[RequestOutcome]:
        """The last ``count`` requests recorded, newest first."""
        rows = list(self._recent_rows)[-count:] if count > 0 else []
        return [RequestOutcome.from_row(row) for row in reversed(rows)]

    def _window_slots(self, totals: SeriesTotals) -> list[_MinuteSlot]:
        # A slot counts while any part of its minute lies inside the window.
        first_minute = (self._clock() - self.window_s) // 60
        return [slot for slot in totals.minutes if slot.minute >= first_minute]

    @staticmethod
    def _summarize(slots: list[_MinuteSlot]) -> dict[str, Any]:
        by_class: dict[str, int] = {}
        latency: dict[int, int] = {}
        slot_wait: dict[int, int] = {}
        rtf: dict[int, int] = {}
        audio_sec = 0.0
        for slot in slots:
            _merge(by_class, slot.by_class)
            _merge(latency, slot.latency)
            _merge(slot_wait, slot.slot_wait)
            _merge(rtf, slot.rtf)
            audio_sec += slot.audio_sec
        summary: dict[str, Any] = {
            "requests": sum(by_class.values()),
            "by_class": by_class,
            "latency_ms": _scaled(percentiles(latency), 1000),
            "slot_wait_ms": _scaled(percentiles(slot_wait), 1000),
        }
        if rtf:
            summary["rtf"] = _scaled(percentiles(rtf), 1)
        if audio_sec:
            summary["audio_sec"] = round(audio_sec, 3)
        return summary

    def snapshot(self, recent: int = 20) -> dict[str, Any]:
        """The JSON view: totals since start, the rolling window, the last requests."""
        capabilities: dict[str, Any] = {}
        capability_slots: dict[str, list[_MinuteSlot]] = {}
        for (capability, model), totals in sorted(self.series.items()):
            entry = capabilities.setdefault(capability, {"totals": {"by_class": {}}, "window": None, "models": {}})
            slots = self._window_slots(totals)
            capability_slots.setdefault(capability, []).extend(slots)
            entry["models"][model] = {
                "totals": {
                    "by_class": dict(totals.by_class),
                    "audio_sec": round(totals.audio_sec, 3),
                    "bytes_in": totals.bytes_in,
                    "bytes_out": totals.bytes_out,
                },
                "window": self._summarize(slots),
            }
            _merge(entry["totals"]["by_class"], totals.by_class)
        for capability, entry in capabilities.items():
            entry["window"] = self._summarize(capability_slots[capability])
        recent = max(0, min(recent, RECENT_REQUESTS))
        return {
            "window_min": self.window_s / 60,
            "uptime_s": round(self._clock() - self.started, 3),
            "capabilities": capabilities,
            "recent": [outcome.to_record() for outcome in self.recent(recent)],
        }


def _scaled(values: dict[str, float | None], factor: float) -> dict[str, float | None]:
    return {key: None if value is None else round(value * factor, 3) for key, value in values.items()}


# --- Prometheus -------------------------------------------------------------------


@attrs.frozen
class LiveState:
    """Gauges read at scrape time from the running app (never kept in sync by hand)."""

    slot: Mapping[str, Any]  # GpuSlot.status()
    busy_rejections: int
    loaded_models: list[Mapping[str, Any]]  # ModelCache.loaded()
    # name -> (help, value) for the sinks' own counters (records written, dropped, ...)
    counters: Mapping[str, tuple[str, float]] = attrs.field(factory=dict)
    devices: list[Mapping[str, Any]] = attrs.field(factory=list)  # device_report(): slot and models per device


class PrometheusUnavailable(RuntimeError):
    """prometheus-client is not installed."""


def prometheus_registry(metrics: Metrics, live_state: Callable[[], LiveState]) -> Any:
    """A fresh ``CollectorRegistry`` exposing ``metrics`` and the live gauges.

    Raises :class:`PrometheusUnavailable` when prometheus-client is missing.
    """
    try:
        from prometheus_client import CollectorRegistry
        from prometheus_client.process_collector import ProcessCollector
    except ImportError as exc:
        raise PrometheusUnavailable(str(exc)) from None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_AistackCollector(metrics, live_state))
    ProcessCollector(registry=registry)
    return registry


def prometheus_text(registry: Any) -> tuple[bytes, str]:
    """The exposition and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(registry), CONTENT_TYPE_LATEST


class _AistackCollector:
    def __init__(self, metrics: Metrics, live_state: Callable[[], LiveState]) -> None:
        self._metrics = metrics
        self._live_state = live_state

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        labels = ["capability", "model"]
        requests = CounterMetricFamily(
            "aistack_requests", "Finished requests by capability, model and class "
            "(2xx, 4xx, 5xx, 503-busy = slot load shedding, client-disconnect).",
            labels=[*labels, "class"],
        )
        latency = HistogramMetricFamily(
            "aistack_request_duration_seconds", "Time from arrival to the last byte sent.", labels=labels
        )
        slot_wait = HistogramMetricFamily(
            "aistack_slot_wait_seconds", "Time spent waiting for the GPU slot.", labels=labels
        )
        rtf = HistogramMetricFamily(
            "aistack_realtime_factor", "Processing time divided by audio duration (ASR, in-process TTS).",
            labels=labels,
        )
        audio = CounterMetricFamily("aistack_audio_seconds", "Seconds of audio transcribed or synthesized.", labels=labels)
        bytes_in = CounterMetricFamily(
            "aistack_request_bytes", "Request body bytes received (relayed upstream for proxied models).",
            labels=labels,
        )
        bytes_out = CounterMetricFamily(
            "aistack_response_bytes", "Response bytes sent (relayed from upstream for proxied models).",
            labels=labels,
        )
        for (capability, model), totals in self._metrics.series.items():
            values = [capability, model]
            for outcome_class, count in totals.by_class.items():
                requests.add_metric([*values, outcome_class], count)
            latency.add_metric(values, totals.latency.cumulative(), totals.latency.total)
            if totals.slot_wait.count:
                slot_wait.add_metric(values, totals.slot_wait.cumulative(), totals.slot_wait.total)
            if totals.rtf.count:
                rtf.add_metric(values, totals.rtf.cumulative(), totals.rtf.total)
            if totals.audio_sec:
                audio.add_metric(values, totals.audio_sec)
            bytes_in.add_metric(values, totals.bytes_in)
            bytes_out.add_metric(values, totals.bytes_out)
        yield from (requests, latency, slot_wait, rtf, audio, bytes_in, bytes_out)

        state = self._live_state()
        loaded = GaugeMetricFamily("aistack_model_loaded", "1 for each model held in memory.", labels=["model", "category"])
        for entry in state.loaded_models:
            loaded.add_metric([str(entry.get("model", "")), str(entry.get("category", ""))], 1)
        yield loaded
        yield GaugeMetricFamily("aistack_models_loaded", "Models held in memory.", value=len(state.loaded_models))
        busy = bool(state.slot.get("busy"))
        yield GaugeMetricFamily("aistack_slot_busy", "1 while every device's slot is held (a new inference gets 503).", value=int(busy))
        holder = GaugeMetricFamily(
            "aistack_slot_holder", "The capability and model holding the GPU slot (1 while held).",
            labels=["capability", "model"],
        )
        if busy:
            holder.add_metric([str(state.slot.get("capability", "")), str(state.slot.get("model", ""))], 1)
        yield holder
        yield GaugeMetricFamily(
            "aistack_slot_held_seconds", "How long the current holder has had the slot.",
            value=float(state.slot.get("held_s", 0.0)) if busy else 0.0,
        )
        device_busy = GaugeMetricFamily(
            "aistack_device_busy", "1 while an inference holds this device's slot.", labels=["device"]
        )
        device_models = GaugeMetricFamily(
            "aistack_device_models_loaded", "Models resident on this device.", labels=["device"]
        )
        device_inferences = CounterMetricFamily(
            "aistack_device_inferences", "Slots taken on this device since start.", labels=["device"]
        )
        for device in state.devices:
            name = str(device.get("device", ""))
            device_busy.add_metric([name], int(bool(device.get("busy"))))
            device_models.add_metric([name], len(device.get("models", ())))
            device_inferences.add_metric([name], float(device.get("inferences", 0)))
        yield from (device_busy, device_models, device_inferences)
        yield CounterMetricFamily(
            "aistack_slot_busy_rejections", "Requests answered 503 + Retry-After because the slot was taken.",
            value=state.busy_rejections,
        )
        for name, (help_text, value) in state.counters.items():
            yield CounterMetricFamily(name, help_text, value=value)
