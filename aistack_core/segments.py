"""Grouping word timestamps into sentences and subtitle cues (provisional; see helper-3)."""

from __future__ import annotations

from typing import Sequence

from .backends import Segment, Word

_SENTENCE_END = (".", "!", "?", "。", "！", "？")


def _join(words: Sequence[Word]) -> str:
    return " ".join(w.word.strip() for w in words).strip()


def sentence_segments(words: Sequence[Word], *, start_id: int = 0) -> list[Segment]:
    segments, current = [], []
    for word in words:
        if current and word.start - current[-1].end > 1.5:
            segments.append(current)
            current = []
        current.append(word)
        if word.word.strip().endswith(_SENTENCE_END):
            segments.append(current)
            current = []
    if current:
        segments.append(current)
    return [Segment(id=start_id + i, start=g[0].start, end=g[-1].end, text=_join(g), words=tuple(g))
            for i, g in enumerate(segments)]


def subtitle_cues(words: Sequence[Word], *, max_chars: int = 70, min_s: float = 1.0, max_s: float = 7.0,
                  start_id: int = 0) -> list[Segment]:
    cues, current = [], []
    for word in words:
        candidate = current + [word]
        if current and (len(_join(candidate)) > max_chars or word.end - current[0].start > max_s):
            cues.append(current)
            current = [word]
        else:
            current = candidate
    if current:
        cues.append(current)
    return [Segment(id=start_id + i, start=g[0].start, end=g[-1].end, text=_join(g), words=tuple(g))
            for i, g in enumerate(cues)]


def clamp_words(words: Sequence[Word], duration: float) -> list[Word]:
    out, last = [], 0.0
    for w in words:
        start = min(max(w.start, last), duration)
        end = min(max(w.end, start), duration)
        out.append(Word(start, end, w.word, w.probability))
        last = start
    return out
