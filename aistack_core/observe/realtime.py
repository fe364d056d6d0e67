"""Live-transcription figures: sessions, utterances, decode and end-of-speech-to-final latency.

A realtime session is one long request, so the per-request metrics see it
once, when it ends.  What an operator of live captions wants (how long the
text takes after the speaker stops, how many utterances were dropped because
the slot was busy) is kept here, per utterance, as the session runs; the
JSON metrics view lists the recent utterances and Prometheus gets the
counters and two histograms.  Written on the event loop only.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Iterator

import attrs

from .metrics import LATENCY_BUCKETS_S, Histogram, _add, _scaled, iso_utc, percentiles

RECENT_UTTERANCES = 100


@attrs.frozen
class UtteranceRecord:
    """One finished (or dropped, or failed) utterance."""

    at: float  # time.time()
    session: str  # the session's request id
    item_id: str
    model: str | None
    audio_s: float
    outcome: str  # "completed" | "failed" | "dropped"
    slot_wait_s: float | None = None
    decode_s: float | None = None
    final_latency_s: float | None = None  # end of speech (stop detected or commit) -> completed sent
    partials: int = 0
    early_final: bool = False  # the text came from a decode made during the closing pause

    def to_json(self) -> dict[str, Any]:
        return {
            "ts": iso_utc(self.at), "session": self.session, "item_id": self.item_id, "model": self.model,
            "audio_s": round(self.audio_s, 3), "outcome": self.outcome,
            "slot_wait_ms": None if self.slot_wait_s is None else round(self.slot_wait_s * 1000, 3),
            "decode_ms": None if self.decode_s is None else round(self.decode_s * 1000, 3),
            "final_latency_ms": None if self.final_latency_s is None else round(self.final_latency_s * 1000, 3),
            "partials": self.partials, "early_final": self.early_final,
        }


class RealtimeStats:
    def __init__(self) -> None:
        self.active = 0
        self.sessions = 0
        self.refused = 0
        self.by_outcome: dict[str, int] = {}
        self.partials = 0
        self.decode = Histogram(LATENCY_BUCKETS_S)
        self.final_latency = Histogram(LATENCY_BUCKETS_S)
        self._decode_buckets: dict[int, int] = {}
        self._final_buckets: dict[int, int] = {}
        self.recent: deque[UtteranceRecord] = deque(maxlen=RECENT_UTTERANCES)

    def session_opened(self) -> None:
        self.active += 1
        self.sessions += 1

    def session_closed(self) -> None:
        self.active -= 1

    def decoded(self, seconds: float, partial: bool) -> None:
        """Every decode, partial or final: the time the slot was held for it."""
        self.decode.observe(seconds)
        _add(self._decode_buckets, seconds)
        if partial:
            self.partials += 1

    def utterance(self, record: UtteranceRecord) -> None:
        self.by_outcome[record.outcome] = self.by_outcome.get(record.outcome, 0) + 1
        if record.final_latency_s is not None:
            self.final_latency.observe(record.final_latency_s)
            _add(self._final_buckets, record.final_latency_s)
        self.recent.append(record)

    def snapshot(self, recent: int = 20) -> dict[str, Any]:
        recent = max(0, min(recent, RECENT_UTTERANCES))
        return {
            "sessions_active": self.active,
            "sessions_total": self.sessions,
            "sessions_refused": self.refused,
            "utterances": dict(self.by_outcome),
            "partial_decodes": self.partials,
            "decode_ms": _scaled(percentiles(self._decode_buckets), 1000),
            "final_latency_ms": _scaled(percentiles(self._final_buckets), 1000),
            "recent_utterances": [r.to_json() for r in list(self.recent)[-recent:]][::-1] if recent else [],
        }


class RealtimeCollector:
    """The Prometheus side (registered next to the request collector)."""

    def __init__(self, stats: RealtimeStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        stats = self._stats
        yield GaugeMetricFamily("aistack_realtime_sessions_active", "Open live-transcription sessions.",
                                value=stats.active)
        yield CounterMetricFamily("aistack_realtime_sessions", "Live-transcription sessions opened.",
                                  value=stats.sessions)
        yield CounterMetricFamily("aistack_realtime_sessions_refused",
                                  "Session upgrades refused because AISTACK_REALTIME_MAX_SESSIONS were open.",
                                  value=stats.refused)
        utterances = CounterMetricFamily("aistack_realtime_utterances",
                                         "Utterances by outcome (completed, failed, dropped = slot busy too long).",
                                         labels=["outcome"])
        for outcome, count in stats.by_outcome.items():
            utterances.add_metric([outcome], count)
        yield utterances
        yield CounterMetricFamily("aistack_realtime_partial_decodes", "Decodes of an utterance still being spoken.",
                                  value=stats.partials)
        decode = HistogramMetricFamily("aistack_realtime_decode_seconds",
                                       "GPU-slot time per realtime decode (partials included).")
        decode.add_metric([], stats.decode.cumulative(), stats.decode.total)
        yield decode
        final = HistogramMetricFamily("aistack_realtime_final_latency_seconds",
                                      "End of speech (detected stop or commit) to the completed transcript.")
        final.add_metric([], stats.final_latency.cumulative(), stats.final_latency.total)
        yield final

