"""Turning word timestamps into sentences and subtitle cues.

Backends that know when each word was spoken (Parakeet, Whisper with word
timestamps) use :func:`sentence_segments` (or :func:`sentence_groups`, for
their own word objects) to build their segments, TTS backends use
:func:`split_sentences` to speak one sentence at a time, and the ASR
capability uses :func:`subtitle_cues` for ``segment_granularity=subtitle``.
Everything here is pure and fast: no audio, no models.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Protocol, Sequence, TypeVar

from ..backends import Segment, Word

SENTENCE_ENDS = (".", "!", "?", "…", "。", "！", "？", "．")
CLAUSE_ENDS = (",", ";", ":", "–", "—", "，", "、", "；", "：")
# A silence this long between two words ends a sentence even without punctuation.
SENTENCE_PAUSE_S = 1.5
# Closing quotes and brackets may follow the punctuation that ends a sentence.
_CLOSERS = "\"'”’»)]}」』）】"
_OPENERS = "\"'“‘«([{¿¡「『（【"
# Punctuation that hugs the word before it.
_ATTACH_LEFT = set(".,;:!?…%)]}»”’") | set("。，、；：！？）」』】．")
# Words ending in a period that rarely end a sentence.
_ABBREVIATIONS = {
    "mr.", "mrs.", "ms.", "dr.", "prof.", "st.", "jr.", "sr.", "vs.", "etc.", "e.g.", "i.e.", "no.", "approx.",
    "hr.", "fr.", "nr.", "z.b.", "bzw.", "ca.", "sra.", "sr.", "mme.", "m.",
}


def _is_unspaced_script(char: str) -> bool:
    """Scripts written without spaces between words: Han, kana, and their punctuation.

    Hangul is not among them: Korean puts spaces between words.
    """
    code = ord(char)
    return (
        0x3000 <= code <= 0x30FF  # CJK punctuation, hiragana, katakana
        or 0x3400 <= code <= 0x4DBF  # Han extension A
        or 0x4E00 <= code <= 0x9FFF  # Han
        or 0xF900 <= code <= 0xFAFF  # Han compatibility
        or 0xFF00 <= code <= 0xFF65  # full-width forms and punctuation
        or 0x20000 <= code <= 0x2FA1F  # Han extensions B onwards
    )


def _core(token: str) -> str:
    """The token without the closing quotes or brackets that may trail it."""
    return token.rstrip(_CLOSERS)


def ends_sentence(token: str) -> bool:
    core = _core(token.strip())
    if not core.endswith(SENTENCE_ENDS):
        return False
    return core.lower() not in _ABBREVIATIONS


def ends_clause(token: str) -> bool:
    return _core(token.strip()).endswith(CLAUSE_ENDS)


def join_words(tokens: Sequence[str]) -> str:
    """Join word strings the way they are written.

    One space between words, none before closing punctuation or after an
    opening bracket, and none between two words in a script that does not
    use spaces (Chinese, Japanese).
    """
    text = ""
    for raw in tokens:
        token = raw.strip()
        if not token:
            continue
        # Straight quotes can open or close, so they keep their spaces.
        after_opener = text[-1] in _OPENERS and text[-1] not in "\"'" if text else False
        if text and not (
            token[0] in _ATTACH_LEFT
            or after_opener
            or (_is_unspaced_script(text[-1]) and _is_unspaced_script(token[0]))
            or (_is_unspaced_script(token[0]) and unicodedata.category(token[0]).startswith("P"))
        ):
            text += " "
        text += token
    return text


def _segment(words: Sequence[Word], segment_id: int) -> Segment:
    return Segment(
        id=segment_id,
        start=words[0].start,
        end=words[-1].end,
        text=join_words([word.word for word in words]),
        words=tuple(words),
    )


class TimedWord(Protocol):
    start: float
    end: float
    word: str


TimedWordT = TypeVar("TimedWordT", bound=TimedWord)


def sentence_groups(words: Sequence[TimedWordT], *, pause_s: float = SENTENCE_PAUSE_S) -> list[list[TimedWordT]]:
    """Group timed words into sentences: a new one after ``. ! ?`` (and their
    CJK forms, not after common abbreviations) or after a silence longer than
    ``pause_s``.  Works on any objects with ``start``, ``end`` and ``word``,
    so a backend can keep its own word type; blank words are dropped."""
    groups: list[list[TimedWordT]] = []
    current: list[TimedWordT] = []
    for word in words:
        if not word.word.strip():
            continue
        if current and word.start - current[-1].end > pause_s:
            groups.append(current)
            current = []
        current.append(word)
        if ends_sentence(word.word):
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


def sentence_segments(
    words: Sequence[Word], *, start_id: int = 0, pause_s: float = SENTENCE_PAUSE_S
) -> list[Segment]:
    """:func:`sentence_groups` as segments numbered from ``start_id``."""
    return [_segment(group, start_id + i) for i, group in enumerate(sentence_groups(words, pause_s=pause_s))]


# Scripts written without spaces end a sentence mid-token ("你好。再见。").
_UNSPACED_SENTENCE_END = re.compile(r"([。！？])(?=\S)")


def split_sentences(text: str) -> list[str]:
    """Cut text into sentences for a TTS backend that speaks one at a time.

    The same sentence ends as for words (abbreviations such as "Dr." do not
    end one); whitespace inside a sentence becomes one space.
    """
    tokens = _UNSPACED_SENTENCE_END.sub(r"\1 ", text).split()
    sentences: list[str] = []
    current: list[str] = []
    for token in tokens:
        current.append(token)
        if ends_sentence(token):
            sentences.append(join_words(current))
            current = []
    if current:
        sentences.append(join_words(current))
    return sentences


# --- subtitle cues --------------------------------------------------------------


def _length(words: Sequence[Word]) -> int:
    return len(join_words([word.word for word in words]))


def _span(words: Sequence[Word]) -> float:
    return words[-1].end - words[0].start


def _fits(words: Sequence[Word], max_chars: int, max_s: float) -> bool:
    return _length(words) <= max_chars and _span(words) <= max_s


def _break_quality(words: Sequence[Word], index: int) -> int:
    """How good a cue break is after ``words[index]``: sentence end > clause end > pause > anywhere."""
    token = words[index].word
    if ends_sentence(token):
        return 3
    if ends_clause(token):
        return 2
    if index + 1 < len(words) and words[index + 1].start - words[index].end >= 0.3:
        return 1
    return 0


def _best_break(current: list[Word], max_chars: int, min_s: float) -> int:
    """Where to end the cue held in ``current`` now that the next word does not fit.

    Returns how many words the cue keeps.  An earlier break at punctuation
    wins over breaking mid-clause, provided the cue it leaves is not a stub
    (shorter than ``min_s`` and a third of ``max_chars``).
    """
    best, best_quality = len(current), _break_quality(current, len(current) - 1)
    for keep in range(len(current) - 1, 0, -1):
        quality = _break_quality(current, keep - 1)
        if quality <= best_quality:
            continue
        head = current[:keep]
        if _span(head) < min_s and _length(head) < max_chars / 3:
            continue
        best, best_quality = keep, quality
    return best


def _merge_short_cues(cues: list[list[Word]], max_chars: int, min_s: float, max_s: float, pause_s: float) -> None:
    """Fold cues shorter than ``min_s`` into a neighbour when the result still fits.

    When neither neighbour has room, a short cue that continues the previous
    cue's sentence takes that cue's last words instead, so a sentence does
    not end on a lone word flashing by.
    """
    index = 0
    while index < len(cues):
        cue = cues[index]
        if _span(cue) >= min_s or len(cues) == 1:
            index += 1
            continue
        previous = cues[index - 1] if index > 0 else None
        following = cues[index + 1] if index + 1 < len(cues) else None
        options = []
        if previous is not None and cue[0].start - previous[-1].end <= pause_s:
            options.append(("previous", previous + cue))
        if following is not None and following[0].start - cue[-1].end <= pause_s:
            options.append(("next", cue + following))
        # A cue that opens a sentence belongs with what follows it.
        if previous is not None and ends_sentence(previous[-1].word):
            options.reverse()
        for side, merged in options:
            if _fits(merged, max_chars, max_s):
                if side == "previous":
                    cues[index - 1 : index + 1] = [merged]
                    index -= 1
                else:
                    cues[index : index + 2] = [merged]
                break
        else:
            if options and options[0][0] == "previous" and not ends_sentence(previous[-1].word):
                _borrow_tail(previous, cue, max_chars, min_s, max_s)
            index += 1


def _borrow_tail(previous: list[Word], cue: list[Word], max_chars: int, min_s: float, max_s: float) -> None:
    """Move words from the end of ``previous`` to the front of ``cue`` until ``cue`` lasts ``min_s``."""
    while len(previous) > 1 and _span(cue) < min_s:
        word = previous[-1]
        if ends_sentence(word.word) or not _fits([word] + cue, max_chars, max_s):
            break
        if _span(previous[:-1]) < min_s:
            break
        cue.insert(0, previous.pop())


def subtitle_cues(
    words: Sequence[Word],
    *,
    max_chars: int = 70,
    min_s: float = 1.0,
    max_s: float = 7.0,
    start_id: int = 0,
    pause_s: float = SENTENCE_PAUSE_S,
) -> list[Segment]:
    """Cut words into subtitle cues of at most ``max_chars`` characters and
    ``max_s`` seconds, at least ``min_s`` seconds where the words allow.

    Cues end at sentence ends once they have lasted ``min_s``, never span a
    pause longer than ``pause_s``, and when a cue fills up it is cut at its
    last sentence or clause boundary rather than mid-phrase.  A single word
    too long for the limits gets a cue of its own.
    """
    cues: list[list[Word]] = []
    current: list[Word] = []
    for word in words:
        if not word.word.strip():
            continue
        if current and word.start - current[-1].end > pause_s:
            cues.append(current)
            current = []
        while current and not _fits(current + [word], max_chars, max_s):
            keep = _best_break(current, max_chars, min_s)
            cues.append(current[:keep])
            current = current[keep:]
        current.append(word)
        if ends_sentence(word.word) and _span(current) >= min_s:
            cues.append(current)
            current = []
    if current:
        cues.append(current)
    _merge_short_cues(cues, max_chars, min_s, max_s, pause_s)
    return [_segment(cue, start_id + i) for i, cue in enumerate(cues)]


# --- cleaning -------------------------------------------------------------------


def clamp_words(words: Sequence[Word], duration: float) -> list[Word]:
    """Keep word times inside ``[0, duration]`` and in order.

    Models can place the last word past the end of the audio (a TDT model
    adds the predicted duration of the last token) or, rarely, a word before
    the one it follows; both would break players and subtitle files.  Starts
    never decrease and every end is at or after its start.
    """
    limit = max(0.0, float(duration))
    clamped: list[Word] = []
    previous_start = 0.0
    for word in words:
        start = min(max(float(word.start), previous_start, 0.0), limit)
        end = min(max(float(word.end), start), limit)
        clamped.append(Word(start=start, end=end, word=word.word, probability=word.probability))
        previous_start = start
    return clamped
