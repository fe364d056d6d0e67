"""Append-only text for one live utterance: partial decodes become deltas, the final decode completes them.

A realtime client appends every ``delta`` it gets and expects the
``completed`` transcript to be exactly what it assembled.  Partial decodes
of a growing utterance revise their last words as more audio arrives, so a
word is sent only once two consecutive partial decodes agree on it (the
"local agreement" policy of streaming Whisper).  The final decode of the
whole utterance is then aligned with the words already sent, and only what
follows them is sent; the completed transcript is the sent words plus that
rest, so deltas and the completed text always read as one.
"""

from __future__ import annotations

import difflib
import re

_NOT_WORD = re.compile(r"[^\w']+")


def _norm(word: str) -> str:
    return _NOT_WORD.sub("", word.lower())


def _resume_at(sent: list[str], words: list[str]) -> int:
    """Index in ``words`` of the first word after those already sent."""
    if not sent:
        return 0
    matcher = difflib.SequenceMatcher(a=[_norm(w) for w in sent], b=[_norm(w) for w in words], autojunk=False)
    last = -1
    for block in matcher.get_matching_blocks():
        if block.size:
            last = block.b + block.size - 1
    if last < 0:
        return min(len(sent), len(words))
    return last + 1


class LiveTranscript:
    def __init__(self) -> None:
        self.sent: list[str] = []
        self.text = ""
        self._previous: list[str] | None = None

    def _emit(self, words: list[str]) -> str:
        if not words:
            return ""
        piece = " ".join(words)
        delta = piece if not self.text else " " + piece
        self.sent.extend(words)
        self.text += delta
        return delta

    def partial(self, text: str) -> str:
        """The delta a partial decode justifies ('' when nothing is stable yet)."""
        words = text.split()
        new = words[_resume_at(self.sent, words):]
        previous = self._previous
        self._previous = words
        if previous is None:
            return ""
        before = previous[_resume_at(self.sent, previous):]
        agreed = 0
        while agreed < min(len(new), len(before)) and _norm(new[agreed]) == _norm(before[agreed]):
            agreed += 1
        return self._emit(new[:agreed])

    def final(self, text: str) -> str:
        """The last delta; afterwards ``self.text`` is the completed transcript."""
        words = text.split()
        return self._emit(words[_resume_at(self.sent, words):])
