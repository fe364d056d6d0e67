"""Transcripts as clients read them: joined text, OpenAI's JSON shapes, SRT and WebVTT.

Used by every route that answers with text from speech (transcriptions,
translations, realtime), so a streamed transcript and a whole one are
joined by the same rule: deltas concatenated exactly as sent read as the
final text, and scripts written without spaces (Chinese, Japanese) are
not given any between segments.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import attrs

from ..backends import Segment, Word
from .segments import _is_unspaced_script, subtitle_cues


def needs_space(before: str, after: str) -> bool:
    """Whether two pieces of transcript text joined together need a space between them."""
    if not before or not after:
        return False
    last, first = before[-1], after[0]
    if last.isspace() or first.isspace():
        return False
    return not (_is_unspaced_script(last) or _is_unspaced_script(first))


class TextJoiner:
    """Joins segment texts one at a time; ``add`` returns the delta to send."""

    def __init__(self) -> None:
        self.text = ""

    def add(self, piece: str) -> str:
        piece = piece.strip()
        if not piece:
            return ""
        delta = (" " + piece) if needs_space(self.text, piece) else piece
        self.text += delta
        return delta


def join_text(segments: Iterable[Segment]) -> str:
    joiner = TextJoiner()
    for segment in segments:
        joiner.add(segment.text)
    return joiner.text


def regroup(segments: Sequence[Segment], granularity: str, first_id: int) -> list[Segment]:
    """Apply ``segment_granularity``; backends deliver sentence-like segments.

    Subtitle cues are cut from the words of consecutive segments together,
    so short sentences can share a cue; segments without words stay whole.
    """
    if granularity != "subtitle":
        return [attrs.evolve(segment, id=first_id + i) for i, segment in enumerate(segments)]
    cues: list[Segment] = []
    pending_words: list[Word] = []

    def flush() -> None:
        if pending_words:
            cues.extend(subtitle_cues(pending_words, start_id=first_id + len(cues)))
            pending_words.clear()

    for segment in segments:
        if segment.words:
            pending_words.extend(segment.words)
        else:
            flush()
            cues.append(attrs.evolve(segment, id=first_id + len(cues)))
    flush()
    return cues


def segment_json(segment: Segment) -> dict[str, Any]:
    """OpenAI's TranscriptionSegment, with what the backend truly has.

    ``seek`` and ``tokens`` are required by OpenAI's schema; Whisper
    backends fill them in, others get seek from the start time and an
    empty token list rather than invented values.
    """
    entry: dict[str, Any] = {
        "id": segment.id,
        "seek": segment.seek if segment.seek is not None else int(round(segment.start * 100)),
        "start": round(segment.start, 3),
        "end": round(segment.end, 3),
        "text": segment.text,
        "tokens": list(segment.tokens),
    }
    for name in ("temperature", "avg_logprob", "compression_ratio", "no_speech_prob"):
        value = getattr(segment, name)
        if value is not None:
            entry[name] = value
    entry.update(segment.extra)
    return entry


def word_json(word: Word) -> dict[str, Any]:
    return {"word": word.word, "start": round(word.start, 3), "end": round(word.end, 3)}


def _timestamp(seconds: float, separator: str) -> str:
    millis = max(0, int(round(seconds * 1000)))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def to_srt(segments: Sequence[Segment]) -> str:
    blocks = [
        f"{i}\n{_timestamp(s.start, ',')} --> {_timestamp(s.end, ',')}\n{s.text.strip()}\n"
        for i, s in enumerate(segments, start=1)
    ]
    return "\n".join(blocks)


def to_vtt(segments: Sequence[Segment]) -> str:
    blocks = [f"{_timestamp(s.start, '.')} --> {_timestamp(s.end, '.')}\n{s.text.strip()}\n" for s in segments]
    return "WEBVTT\n\n" + "\n".join(blocks)


def duration_usage(seconds: float) -> dict[str, Any]:
    """OpenAI's usage object for audio billed by duration."""
    return {"type": "duration", "seconds": round(max(0.0, seconds), 3)}
