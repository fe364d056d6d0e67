"""Sentences and subtitle cues from word timestamps (pure functions, no models)."""

from __future__ import annotations

import random

import pytest

from aistack_core import Word
from aistack_core.media.segments import (
    clamp_words,
    ends_sentence,
    join_words,
    sentence_segments,
    subtitle_cues,
)


def timed(text: str, start: float = 0.0, step: float = 0.3, gap: float = 0.05) -> list[Word]:
    """One Word per whitespace-separated token, ``step`` seconds each."""
    words, t = [], start
    for token in text.split():
        words.append(Word(start=round(t, 3), end=round(t + step - gap, 3), word=token))
        t += step
    return words


def spoken(words: list[Word]) -> list[str]:
    return [w.word for w in words]


# --- joining ------------------------------------------------------------------


@pytest.mark.parametrize(
    "tokens, text",
    [
        (["Hello", "world."], "Hello world."),
        (["Hello", ",", "world", "!"], "Hello, world!"),
        (["(see", "below)", "now", "?"], "(see below) now?"),
        (["你", "好", "世", "界", "。"], "你好世界。"),
        (["こんにちは", "、", "世界"], "こんにちは、世界"),
        (["안녕하세요", "여러분"], "안녕하세요 여러분"),  # Korean keeps its spaces
        (["Price", "is", "5", "%"], "Price is 5%"),
        ([" padded ", "", "words "], "padded words"),
        (["Er", "sagte", "„hallo“."], "Er sagte „hallo“."),
    ],
)
def test_join_words(tokens, text):
    assert join_words(tokens) == text


def test_sentence_end_detection():
    assert ends_sentence("done.") and ends_sentence("really?!") and ends_sentence('"Stop!"')
    assert ends_sentence("好。") and ends_sentence("なに？")
    assert not ends_sentence("Mr.") and not ends_sentence("e.g.") and not ends_sentence("well,")


# --- sentences ----------------------------------------------------------------


def test_sentences_split_at_punctuation_and_keep_their_words():
    words = timed("Hello world. How are you? I am fine!")
    segments = sentence_segments(words)
    assert [s.text for s in segments] == ["Hello world.", "How are you?", "I am fine!"]
    assert [s.id for s in segments] == [0, 1, 2]
    assert sum(len(s.words) for s in segments) == len(words)
    for segment in segments:
        assert segment.start == segment.words[0].start and segment.end == segment.words[-1].end


def test_sentences_split_on_long_pauses_only():
    words = timed("one two three") + timed("four five", start=3.0) + timed("six", start=4.2)
    segments = sentence_segments(words, start_id=7)
    assert [s.text for s in segments] == ["one two three", "four five six"]
    assert [s.id for s in segments] == [7, 8]


def test_sentences_of_cjk_characters_join_without_spaces():
    words = timed("今 天 天 气 很 好 。 我 们 走 吧 ！")
    assert [s.text for s in sentence_segments(words)] == ["今天天气很好。", "我们走吧！"]


def test_abbreviations_do_not_end_sentences():
    segments = sentence_segments(timed("Mr. Smith arrived. He sat."))
    assert [s.text for s in segments] == ["Mr. Smith arrived.", "He sat."]


def test_no_words_no_segments():
    assert sentence_segments([]) == [] and subtitle_cues([]) == []
    assert sentence_segments([Word(0, 1, "  ")]) == []


# --- subtitle cues ------------------------------------------------------------


def check_cues(cues, words, max_chars=70, max_s=7.0):
    assert [w for c in cues for w in c.words] == [w for w in words if w.word.strip()]
    for cue in cues:
        assert len(cue.text) <= max_chars or len(cue.words) == 1, cue.text
        assert cue.end - cue.start <= max_s + 1e-9 or len(cue.words) == 1
        assert cue.text == join_words(spoken(list(cue.words)))
        assert cue.start == cue.words[0].start and cue.end == cue.words[-1].end
    assert [c.id for c in cues] == list(range(cues[0].id, cues[0].id + len(cues)))
    starts = [c.start for c in cues]
    assert starts == sorted(starts)


def test_long_run_on_text_is_cut_within_limits():
    words = timed(" ".join(f"word{i}" for i in range(120)), step=0.25)
    cues = subtitle_cues(words)
    check_cues(cues, words)
    assert len(cues) > 5
    assert all(c.end - c.start >= 1.0 for c in cues[:-1])


def test_duration_limit_applies_to_slow_speech():
    words = timed(" ".join(["slow"] * 20), step=1.0)  # 20 s, only ~100 characters
    cues = subtitle_cues(words)
    check_cues(cues, words)
    assert max(c.end - c.start for c in cues) <= 7.0 and len(cues) >= 3


def test_cues_prefer_clause_and_sentence_boundaries():
    text = (
        "When the committee finally met on Tuesday afternoon, the chairman read the long report aloud "
        "and everyone listened carefully until the very end of it."
    )
    words = timed(text, step=0.2)
    cues = subtitle_cues(words)
    check_cues(cues, words)
    assert cues[0].text.endswith("afternoon,")


def test_sentence_ends_close_cues_once_they_last_a_second():
    words = timed("Good morning everyone. Today we talk about rivers. They are long.", step=0.35)
    cues = subtitle_cues(words)
    check_cues(cues, words)
    assert [c.text for c in cues] == ["Good morning everyone.", "Today we talk about rivers.", "They are long."]


def test_short_sentences_are_merged_into_a_neighbour():
    words = timed("Yes. No. Maybe so.", step=0.3)  # each sentence well under a second
    cues = subtitle_cues(words)
    check_cues(cues, words)
    assert len(cues) == 1 and cues[0].text == "Yes. No. Maybe so."


def test_short_trailing_cue_merges_only_when_limits_allow():
    # 69 characters in ~6.8 s: the short "Ok." that follows cannot join them.
    head = timed("aaaa bbbb cccc dddd eeee ffff gggg hhhh iiii jjjj kkkk llll mmmm nnnn.", step=0.49)
    tail = [Word(start=head[-1].end + 0.1, end=head[-1].end + 0.4, word="Ok.")]
    cues = subtitle_cues(head + tail)
    check_cues(cues, head + tail)
    assert [c.text for c in cues] == [join_words(spoken(head)), "Ok."]

    roomy = timed("aaaa bbbb cccc", step=0.5)
    tail = [Word(start=roomy[-1].end + 0.1, end=roomy[-1].end + 0.4, word="Ok.")]
    assert [c.text for c in subtitle_cues(roomy + tail)] == ["aaaa bbbb cccc Ok."]


def test_a_sentence_does_not_end_on_a_lone_flashing_word():
    # Mid-sentence, a full cue hands its last words to the short cue after it.
    head = timed("aaaa bbbb cccc dddd eeee ffff gggg hhhh iiii jjjj kkkk llll mmmm nnnn", step=0.49)
    tail = [Word(start=head[-1].end + 0.1, end=head[-1].end + 0.4, word="end.")]
    cues = subtitle_cues(head + tail)
    check_cues(cues, head + tail)
    assert len(cues) == 2 and cues[-1].text == "mmmm nnnn end."
    assert all(c.end - c.start >= 1.0 for c in cues)


def test_cues_never_span_a_long_pause():
    words = timed("before the pause") + timed("after it", start=5.0)
    cues = subtitle_cues(words)
    assert [c.text for c in cues] == ["before the pause", "after it"]


def test_a_word_longer_than_the_limit_gets_its_own_cue():
    words = [Word(0, 0.5, "short"), Word(0.6, 1.5, "x" * 90), Word(1.6, 2.6, "tail")]
    cues = subtitle_cues(words)
    check_cues(cues, words)
    assert [c.text for c in cues] == ["short", "x" * 90, "tail"]


def test_custom_limits_and_start_id():
    words = timed(" ".join(["abc"] * 30), step=0.2)
    cues = subtitle_cues(words, max_chars=20, max_s=3.0, min_s=0.5, start_id=4)
    check_cues(cues, words, max_chars=20, max_s=3.0)
    assert cues[0].id == 4


def test_random_word_streams_respect_the_limits():
    rng = random.Random(7)
    for _ in range(50):
        words, t = [], 0.0
        for _ in range(rng.randint(1, 80)):
            t += rng.choice([0.0, 0.05, 0.1, 0.4, 2.0])
            length = rng.uniform(0.1, 0.9)
            token = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 12)))
            token += rng.choice(["", "", "", ",", ".", "?"])
            words.append(Word(round(t, 3), round(t + length, 3), token))
            t += length
        check_cues(subtitle_cues(words), words)


# --- clamping -----------------------------------------------------------------


def test_clamp_keeps_times_inside_the_audio_and_in_order():
    words = [
        Word(-0.2, 0.3, "early"),
        Word(0.5, 0.4, "inverted"),
        Word(0.45, 0.9, "overlapping", probability=0.5),
        Word(2.9, 3.3, "late"),
        Word(3.2, 3.6, "beyond"),
    ]
    clamped = clamp_words(words, 3.0)
    assert spoken(clamped) == spoken(words)
    assert [(w.start, w.end) for w in clamped] == [(0.0, 0.3), (0.5, 0.5), (0.5, 0.9), (2.9, 3.0), (3.0, 3.0)]
    assert clamped[2].probability == 0.5
    starts = [w.start for w in clamped]
    assert starts == sorted(starts) and all(0 <= w.start <= w.end <= 3.0 for w in clamped)


def test_clamp_to_zero_duration_and_empty_input():
    assert clamp_words([], 5.0) == []
    assert [(w.start, w.end) for w in clamp_words([Word(0.1, 0.2, "a")], 0.0)] == [(0.0, 0.0)]
