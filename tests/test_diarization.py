"""Who spoke when: the diarization hook, the core's word-to-speaker assignment, and both routes over real HTTP.

The conversation is made at test time (tests/fixtures/pitch_diarizer.py):
the Piper voice and the same voice pitch-shifted, alternating with pauses,
so the true speaker of every moment is known.  Words come from the real
faster-whisper plugin (bundled tiny.en); turns come from a deterministic
pitch diarizer, so these tests measure how the core assigns words to
speakers, labels them and answers, not a diarization model.  The Sortformer
plugin runs on a tiny model of the real NeMo class in the ``heavy`` tests
at the end.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
import wave

import aiohttp
import pytest

import aistack_plugins.faster_whisper as faster_whisper_plugin
from aistack_core import CancelToken, DiarizationOptions, Segment, SpeakerTurn, Word, hookimpl
from aistack_core.context import model_cache_key, slot_key
from aistack_core.media import diarize
from aistack_core.plugins import load_plugins
from aistack_core.registry import DIARIZE_ALIAS, Registry
from aistack_core.config import Config

from .fixtures.pitch_diarizer import DiarizerPlugin, Line, PitchDiarizer, build_conversation
from .helpers import BackendPlugin, SlowAsr, sse_events, tone_wav
from .test_core import assert_envelope, form

LINES = [
    Line(0, "Good morning, did you finish the report for the client?"),
    Line(1, "Almost, I still need to check the numbers in the last table."),
    Line(0, "Send it to me before lunch and I will read it on the train."),
    Line(1, "Sure, you will have it within the hour."),
    Line(0, "That helps me a lot, see you at the meeting then."),
]
LETTER = {0: "A", 1: "B"}


@pytest.fixture(scope="module")
def conversation():
    return build_conversation(LINES)


@pytest.fixture(scope="module")
def conversation_wav(conversation, tmp_path_factory):
    return conversation.write(tmp_path_factory.mktemp("conversation") / "conversation.wav")


@pytest.fixture
def diarizer():
    return PitchDiarizer()


@pytest.fixture
async def client(make_client, diarizer):
    return await make_client(plugins={"faster_whisper": faster_whisper_plugin, "pitch": DiarizerPlugin(diarizer)})


def data_url(samples, rate: int = 16000) -> str:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples.tobytes())
    return "data:audio/wav;base64," + base64.b64encode(buffer.getvalue()).decode()


def speakers_form(path, names=(), references=(), **fields) -> aiohttp.FormData:
    data = form(path, **fields)
    for name in names:
        data.add_field("known_speaker_names[]", name)
    for reference in references:
        data.add_field("known_speaker_references[]", reference)
    return data


def wrong_words(conversation, body) -> tuple[int, int]:
    """(words given to the wrong speaker, words) of a diarized verbose_json answer.

    A word's speaker is that of the segment holding it; its true speaker is
    the line it overlaps (or, for a word the ASR placed in a pause, the
    nearest line).
    """
    wrong = total = 0
    for word in body["words"]:
        middle = (word["start"] + word["end"]) / 2
        segment = next(s for s in body["segments"] if s["start"] <= middle <= s["end"])
        truth = conversation.speaker_at(word["start"], word["end"])
        if truth is None:
            truth = min(conversation.turns, key=lambda t: min(abs(t[0] - middle), abs(t[1] - middle)))[2]
        total += 1
        wrong += LETTER[truth] != segment["speaker"]
    return wrong, total


# --- the hook -----------------------------------------------------------------------------


def test_hook_register_diarization_backends():
    plugins = load_plugins(load_entrypoints=False)
    first, clash = PitchDiarizer("pitch-a"), PitchDiarizer("pitch-a")

    class NotABackend:
        @hookimpl
        def register_diarization_backends(self, register, config):
            register(object())

    # pluggy calls the last registered first, so "good", registered after "clashing", keeps the id.
    plugins.register(DiarizerPlugin(clash), name="clashing")
    plugins.register(DiarizerPlugin(first), name="good")
    plugins.register(NotABackend(), name="broken")
    registry = Registry.from_plugins(plugins, Config())
    assert registry.diarization["pitch-a"].backend is first
    assert plugins.record_for("good").registered == ["diarization:pitch-a"]
    assert plugins.record_for("good").status == "loaded"
    # A second plugin claiming the id, or registering something that is no diarizer, is skipped with the reason.
    assert plugins.record_for("clashing").status == "skipped" and "already registered" in plugins.record_for("clashing").error
    assert plugins.record_for("broken").status == "skipped" and "DiarizationBackend" in plugins.record_for("broken").error
    assert registry.resolve_diarization().backend is first
    assert registry.resolve_diarization(DIARIZE_ALIAS).backend is first


async def test_models_list_the_diarizer_and_the_alias(make_client):
    client = await make_client(plugins={"asr": BackendPlugin(SlowAsr()), "pitch": DiarizerPlugin(PitchDiarizer())})
    entries = {entry["id"]: entry for entry in (await (await client.get("/v1/models")).json())["data"]}
    assert entries["pitch-diarizer"]["capabilities"] == ["diarization"]
    alias = entries[DIARIZE_ALIAS]
    assert alias["is_routing_alias"] and alias["capabilities"] == ["asr", "diarization"]
    assert (await client.get(f"/v1/models/{DIARIZE_ALIAS}")).status == 200


async def test_no_alias_without_a_diarizer(make_client):
    client = await make_client(plugins={"asr": BackendPlugin(SlowAsr())})
    ids = [entry["id"] for entry in (await (await client.get("/v1/models")).json())["data"]]
    assert DIARIZE_ALIAS not in ids and "slow-asr" in ids


# --- the mechanism, without HTTP ---------------------------------------------------------


def test_words_are_cut_where_the_speaker_changes():
    turns = [SpeakerTurn(0.0, 1.0, "x"), SpeakerTurn(1.2, 2.0, "y"), SpeakerTurn(2.4, 3.0, "x")]
    words = (Word(0.1, 0.4, "Hi"), Word(0.5, 0.9, "there."), Word(1.25, 1.6, "Hello"), Word(1.6, 1.95, "you,"),
             Word(2.3, 2.6, "fine?"))
    segment = Segment(0, 0.1, 2.6, "Hi there. Hello you, fine?", words=words)
    spoken = diarize.assign_speakers([segment], diarize.relabel(turns), first_id=5)
    assert [(s.speaker, s.segment.text, s.segment.id) for s in spoken] == [
        ("A", "Hi there.", 5), ("B", "Hello you,", 6), ("A", "fine?", 7),
    ]
    assert spoken[1].segment.start == 1.25 and spoken[1].segment.end == 1.95


def test_segments_without_words_go_by_overlap_and_words_outside_turns_to_the_nearest():
    turns = diarize.relabel([SpeakerTurn(0.0, 2.0, "s1"), SpeakerTurn(2.0, 5.0, "s2")])
    plain = [Segment(0, 0.0, 1.5, "one"), Segment(1, 1.5, 4.0, "two"), Segment(2, 6.0, 7.0, "three")]
    assert [s.speaker for s in diarize.assign_speakers(plain, turns)] == ["A", "B", "B"]
    # No turns at all (silence): everything to the first speaker, nothing dropped.
    assert [s.speaker for s in diarize.assign_speakers(plain, [])] == ["A", "A", "A"]


def test_labels_known_names_and_letters():
    turns = [SpeakerTurn(0, 1, "7"), SpeakerTurn(1, 2, "3"), SpeakerTurn(2, 3, "7"), SpeakerTurn(3, 4, "9")]
    assert [t.speaker for t in diarize.relabel(turns)] == ["A", "B", "A", "C"]
    # A known speaker named "A" pushes the letters on, so no two speakers share a label.
    assert [t.speaker for t in diarize.relabel(turns, {"3": "A"})] == ["B", "A", "B", "C"]
    assert diarize.letter_label(25) == "Z" and diarize.letter_label(26) == "AA"


def test_matching_is_one_to_one_and_needs_similarity():
    speakers = {"0": (1.0, 0.0), "1": (0.9, 0.1), "2": (0.0, 1.0)}
    known = {"Ann": (1.0, 0.0), "Bo": (0.0, -1.0)}
    # Ann goes to the closer of the two alike speakers; nobody resembles Bo.
    assert diarize.match_known(speakers, known) == {"0": "Ann"}


def test_cap_speakers_gives_the_quiet_ones_to_their_neighbours():
    turns = [SpeakerTurn(0, 5, "a"), SpeakerTurn(5, 5.5, "c"), SpeakerTurn(6, 10, "b")]
    assert [t.speaker for t in diarize.cap_speakers(turns, 2)] == ["a", "a", "b"]


def test_rttm_lines():
    text = diarize.to_rttm([SpeakerTurn(0.5, 1.75, "A"), SpeakerTurn(2.0, 3.0, "Mary Ann")])
    assert text.splitlines() == [
        "SPEAKER audio 1 0.500 1.250 <NA> <NA> A <NA> <NA>",
        "SPEAKER audio 1 2.000 1.000 <NA> <NA> Mary_Ann <NA> <NA>",
    ]


def test_pitch_diarizer_finds_the_true_turns(conversation, conversation_wav):
    from aistack_core.media.audio import DecodedAudio

    turns = diarize.relabel(diarize.clean_turns(
        PitchDiarizer().diarize(None, DecodedAudio.open(conversation_wav), DiarizationOptions(), CancelToken()), None
    ))
    errors = diarization_errors(conversation, turns)
    # Never the wrong voice; what is missed is the short pauses inside a line (after commas),
    # which the diarizer rightly leaves out of its turns.
    assert errors["confusion"] == 0 and errors["false_alarm"] < 0.02 and errors["der"] < 0.12, errors


def diarization_errors(conversation, turns, step: float = 0.01) -> dict[str, float]:
    """Frame-level diarization error rate and its parts, over the speech of the built conversation.

    ``missed`` (speech with no speaker), ``false_alarm`` (a speaker in a pause)
    and ``confusion`` (the wrong speaker), each as a share of the true speech
    time; ``der`` is their sum.  Hypothesis letters map to true speakers by
    first appearance, the order both are labelled in.
    """
    mapping = {"A": 0, "B": 1}
    counts = {"missed": 0, "false_alarm": 0, "confusion": 0}
    speech = 0
    for index in range(int(conversation.duration / step)):
        t = index * step
        truth = conversation.speaker_at(t, t + step)
        active = [x for x in turns if x.start <= t + step / 2 < x.end]
        said = mapping.get(diarize.speaker_at(active, t, t + step), -1) if active else None
        if truth is not None:
            speech += 1
            if said is None:
                counts["missed"] += 1
            elif said != truth:
                counts["confusion"] += 1
        elif said is not None:
            counts["false_alarm"] += 1
    rates = {name: count / max(1, speech) for name, count in counts.items()}
    rates["der"] = sum(rates.values())
    return rates


# --- diarized transcriptions over HTTP -------------------------------------------------------


async def test_every_word_goes_to_its_speaker(client, conversation, conversation_wav, diarizer):
    response = await client.post("/v1/audio/transcriptions", data=form(
        conversation_wav, model="whisper-tiny.en", diarize="true", response_format="verbose_json"))
    assert response.status == 200, await response.text()
    assert response.headers["X-Aistack-Diarizer"] == "pitch-diarizer"
    body = await response.json()
    segments = body["segments"]
    wrong, total = wrong_words(conversation, body)
    assert total >= 40 and wrong == 0, (wrong, total, [(s["speaker"], s["text"]) for s in segments])
    # One speaker segment per line at least; the speakers alternate as the lines do.
    changes = [segments[0]["speaker"]] + [b["speaker"] for a, b in zip(segments, segments[1:]) if a["speaker"] != b["speaker"]]
    assert changes == ["A", "B", "A", "B", "A"]
    assert body["words"] and body["text"] and diarizer.calls == 1


async def test_diarized_json_shape(client, conversation_wav):
    response = await client.post("/v1/audio/transcriptions", data=form(
        conversation_wav, model=DIARIZE_ALIAS, response_format="diarized_json"))
    assert response.status == 200, await response.text()
    body = await response.json()
    assert set(body) == {"task", "duration", "text", "segments", "usage"}
    assert body["task"] == "transcribe" and body["usage"] == {"type": "duration", "seconds": body["duration"]}
    assert [s["id"] for s in body["segments"]] == [f"seg_{i}" for i in range(len(body["segments"]))]
    for segment in body["segments"]:
        assert set(segment) == {"type", "id", "start", "end", "text", "speaker"}
        assert segment["type"] == "transcript.text.segment" and segment["speaker"] in ("A", "B")
        assert segment["end"] >= segment["start"] and segment["text"]
    assert body["text"].startswith(body["segments"][0]["text"])
    # gpt-4o-transcribe-diarize is the best installed speech-to-text model plus the diarizer.
    assert response.headers["X-Aistack-Model"].startswith("whisper")


async def test_subtitles_carry_voice_tags(client, conversation_wav):
    vtt = await (await client.post("/v1/audio/transcriptions", data=form(
        conversation_wav, model="whisper-1", diarize="true", response_format="vtt"))).text()
    assert vtt.startswith("WEBVTT") and "<v A>" in vtt and "<v B>" in vtt
    srt = await (await client.post("/v1/audio/transcriptions", data=form(
        conversation_wav, model="whisper-1", diarize="true", response_format="srt"))).text()
    first_cue = srt.split("\n\n")[0].splitlines()
    assert first_cue[0] == "1" and "-->" in first_cue[1] and first_cue[2].startswith("<v A>")
    # Subtitle-sized cues are cut within each speaker's stretch, never across two voices.
    sentences = await (await client.post("/v1/audio/transcriptions", data=form(
        conversation_wav, model="whisper-1", diarize="true", response_format="verbose_json"))).json()
    cued = await (await client.post("/v1/audio/transcriptions", data=form(
        conversation_wav, model="whisper-1", diarize="true", response_format="verbose_json",
        segment_granularity="subtitle"))).json()
    assert len(cued["segments"]) >= len(sentences["segments"])
    assert [s["id"] for s in cued["segments"]] == list(range(len(cued["segments"])))
    for cue in cued["segments"]:
        owner = next(s for s in sentences["segments"] if s["start"] - 0.01 <= cue["start"] and cue["end"] <= s["end"] + 0.01)
        assert cue["speaker"] == owner["speaker"]


async def test_streamed_segments_match_the_whole_answer(client, conversation_wav):
    whole = await (await client.post("/v1/audio/transcriptions", data=form(
        conversation_wav, model="whisper-1", response_format="diarized_json"))).json()
    response = await client.post("/v1/audio/transcriptions", data=form(
        conversation_wav, model="whisper-1", response_format="diarized_json", stream="true"))
    assert response.status == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    events = await sse_events(response)
    assert [e["type"] for e in events] == ["transcript.text.segment"] * (len(events) - 1) + ["transcript.text.done"]
    assert events[:-1] == whole["segments"]
    assert events[-1]["text"] == whole["text"] and events[-1]["usage"] == whole["usage"]


async def test_known_speakers_named_from_references(client, conversation, conversation_wav):
    # References cut from the conversation itself: the second and the first line.
    bob = conversation.cut(*conversation.turns[1][:2])
    alice = conversation.cut(*conversation.turns[0][:2])
    response = await client.post("/v1/audio/transcriptions", data=speakers_form(
        conversation_wav, names=("Bob", "Alice"), references=(data_url(bob), data_url(alice)),
        model="whisper-1", response_format="diarized_json"))
    assert response.status == 200, await response.text()
    speakers = [s["speaker"] for s in (await response.json())["segments"]]
    assert set(speakers) == {"Alice", "Bob"} and speakers[0] == "Alice"
    # Four names, the most OpenAI allows (two clips of each voice): each voice takes its closest
    # name, one to one, so two of the names go unused.
    alice_again, bob_again = (conversation.cut(*conversation.turns[i][:2]) for i in (2, 3))
    response = await client.post("/v1/audio/transcriptions", data=speakers_form(
        conversation_wav, names=("Bob", "Alice", "Carol", "Dan"),
        references=tuple(data_url(c) for c in (bob, alice, alice_again, bob_again)),
        model="whisper-1", response_format="diarized_json"))
    assert response.status == 200, await response.text()
    named = [s["speaker"] for s in (await response.json())["segments"]]
    assert len(set(named)) == 2 and set(named) <= {"Alice", "Bob", "Carol", "Dan"}
    assert named[0] in ("Alice", "Carol") and named[-1] == named[0]
    # One name only: the other voice keeps a letter.
    response = await client.post("/v1/audio/transcriptions", data=speakers_form(
        conversation_wav, names=("Bob",), references=(data_url(bob),), model="whisper-1",
        response_format="diarized_json"))
    assert {s["speaker"] for s in (await response.json())["segments"]} == {"A", "Bob"}


# --- the diarization route --------------------------------------------------------------------


async def test_turns_as_json_and_rttm(client, conversation, conversation_wav):
    response = await client.post("/v1/audio/diarization", data=form(conversation_wav))
    assert response.status == 200, await response.text()
    turns = await response.json()
    assert isinstance(turns, list) and all(set(t) == {"speaker", "start", "end"} for t in turns)
    hypothesis = [SpeakerTurn(t["start"], t["end"], t["speaker"]) for t in turns]
    errors = diarization_errors(conversation, hypothesis)
    assert errors["confusion"] == 0 and errors["der"] < 0.12, errors

    rttm = await (await client.post("/v1/audio/diarization", data=form(conversation_wav, response_format="rttm"))).text()
    parsed = []
    for line in rttm.splitlines():
        fields = line.split()
        assert len(fields) == 10 and fields[0] == "SPEAKER" and fields[2] == "1"
        assert fields[5] == fields[6] == fields[8] == fields[9] == "<NA>"
        parsed.append((float(fields[3]), float(fields[3]) + float(fields[4]), fields[7]))
    assert [(round(s, 2), round(e, 2), k) for s, e, k in parsed] == [
        (round(t["start"], 2), round(t["end"], 2), t["speaker"]) for t in turns]


async def test_speaker_counts(client, conversation_wav):
    turns = await (await client.post("/v1/audio/diarization", data=form(conversation_wav, num_speakers=1))).json()
    assert {t["speaker"] for t in turns} == {"A"}
    turns = await (await client.post("/v1/audio/diarization", data=form(conversation_wav, max_speakers=2))).json()
    assert {t["speaker"] for t in turns} == {"A", "B"}
    for fields, param in (({"num_speakers": 5}, "num_speakers"), ({"min_speakers": 3, "max_speakers": 2}, "min_speakers"),
                          ({"num_speakers": 0}, "num_speakers"), ({"max_speakers": "many"}, "max_speakers")):
        response = await client.post("/v1/audio/diarization", data=form(conversation_wav, **fields))
        assert response.status == 400, fields
        assert assert_envelope(await response.json(), "malformed")["param"] == param


# --- errors ------------------------------------------------------------------------------


async def test_diarized_json_without_a_diarizer_names_the_extra(make_client, plugin_set, conversation_wav):
    from aistack_plugins.manifests import SORTFORMER

    # As on an installation without the diarize extra: the plugin's manifest is known, its module did not import.
    plugin_set.record_for("sortformer").manifest = SORTFORMER
    plugin_set.skip("sortformer", "ModuleNotFoundError: No module named 'nemo'")
    client = await make_client(plugins={"faster_whisper": faster_whisper_plugin})
    for fields in ({"response_format": "diarized_json"}, {"model": DIARIZE_ALIAS}, {"diarize": "true"}):
        response = await client.post("/v1/audio/transcriptions", data=form(conversation_wav, **fields))
        assert response.status == 400, fields
        error = assert_envelope(await response.json(), "malformed")
        assert "pip install 'aistack[diarize]'" in error["message"]
    response = await client.post("/v1/audio/diarization", data=form(conversation_wav))
    assert response.status == 400 and "aistack[diarize]" in (await response.json())["error"]["message"]


async def test_known_speaker_mistakes_name_the_field(client, conversation, conversation_wav, tmp_path):
    clip = data_url(conversation.cut(*conversation.turns[0][:2]))
    not_audio = "data:audio/wav;base64," + base64.b64encode(b"this is not a recording at all").decode()
    too_short = data_url(conversation.cut(1.0, 1.1))
    cases = [
        (dict(names=("a", "b", "c", "d", "e"), references=(clip,) * 5), "known_speaker_names"),
        (dict(names=("Ann",)), "known_speaker_references"),
        (dict(references=(clip,)), "known_speaker_names"),
        (dict(names=("Ann", "Bo"), references=(clip,)), "known_speaker_references"),
        (dict(names=("Ann",), references=("https://example.com/ann.wav",)), "known_speaker_references"),
        (dict(names=("Ann",), references=("data:audio/wav;base64,@@@@",)), "known_speaker_references"),
        (dict(names=("Ann",), references=(not_audio,)), "known_speaker_references"),
        (dict(names=("Ann",), references=(too_short,)), "known_speaker_references"),
        (dict(names=("<b>Ann</b>",), references=(clip,)), "known_speaker_names"),
        (dict(names=("Ann", "ann"), references=(clip, clip)), "known_speaker_names"),
    ]
    for case, param in cases:
        response = await client.post("/v1/audio/transcriptions", data=speakers_form(
            conversation_wav, response_format="diarized_json", model="whisper-1", **case))
        assert response.status == 400, (case, await response.text())
        error = assert_envelope(await response.json(), "malformed")
        assert error["param"] == param, (case, error)
        if len(case.get("names", ())) == 5:  # five fields of one name: read as five names, not nested lists
            assert "At most 4 known speakers" in error["message"], error
    # Known speakers on a request that does not diarize are a mistake too, not silently ignored.
    response = await client.post("/v1/audio/transcriptions", data=speakers_form(
        conversation_wav, names=("Ann",), references=(clip,), model="whisper-1"))
    assert response.status == 400 and (await response.json())["error"]["param"] == "known_speaker_names"
    # Nothing spooled is left behind.
    assert not list((tmp_path / "uploads").glob("reference-*"))


async def test_a_huge_reference_is_refused_without_decoding(client, conversation_wav):
    huge = "data:audio/wav;base64," + "A" * (diarize.MAX_REFERENCE_BYTES * 2)
    response = await client.post("/v1/audio/diarization", data=speakers_form(
        conversation_wav, names=("Ann",), references=(huge,)))
    assert response.status == 400
    # Refused by the body reader already, naming the field as sent.
    assert (await response.json())["error"]["param"].startswith("known_speaker_references")


# --- the slot, the model cache, cancellation ---------------------------------------------------


class SlowDiarizer(PitchDiarizer):
    """Diarizes by pitch after ``delay_s``, checking for cancellation meanwhile."""

    def __init__(self, delay_s: float) -> None:
        super().__init__("slow-diarizer")
        self.delay_s = delay_s
        self.cancelled = False

    def diarize(self, model, audio, options, cancel):
        deadline = time.monotonic() + self.delay_s
        while time.monotonic() < deadline:
            if cancel.cancelled:
                self.cancelled = True
                cancel.raise_if_cancelled()
            time.sleep(0.01)
        return super().diarize(model, audio, options, cancel)


async def test_diarization_holds_the_transcription_slot_and_is_cached(make_client, tmp_path):
    slow = SlowDiarizer(delay_s=0.6)
    asr = SlowAsr(steps=2, step_s=0.05)
    client = await make_client(plugins={"asr": BackendPlugin(asr), "slow": DiarizerPlugin(slow)})
    wav = tone_wav(tmp_path / "tone.wav", seconds=1.0, freq=150.0)
    first = asyncio.ensure_future(client.post("/v1/audio/transcriptions", data=form(
        wav, model="slow-asr", response_format="diarized_json")))
    await asyncio.sleep(0.3)
    holders = not client.app[slot_key].is_free
    # While the diarizer works, the slot is held by the transcription; a second request is turned away.
    busy = await client.post("/v1/audio/diarization", data=form(wav))
    assert busy.status == 503 and busy.headers["Retry-After"] == "5"
    response = await first
    assert response.status == 200, await response.text()
    assert [s["speaker"] for s in (await response.json())["segments"]] == ["A", "A"]
    assert holders and slow.loads == 1
    # The diarizer's model lives in the shared cache; the next request reuses it.
    assert ("diarization", "slow-diarizer") in client.app[model_cache_key]
    slow.delay_s = 0.0
    assert (await client.post("/v1/audio/diarization", data=form(wav))).status == 200
    assert slow.loads == 1


async def test_a_client_that_leaves_stops_the_diarizer(make_client, tmp_path):
    slow = SlowDiarizer(delay_s=30.0)
    client = await make_client(plugins={"asr": BackendPlugin(SlowAsr()), "slow": DiarizerPlugin(slow)})
    wav = tone_wav(tmp_path / "tone.wav", seconds=1.0)
    request = asyncio.ensure_future(client.post("/v1/audio/transcriptions", data=form(
        wav, response_format="diarized_json")))
    await asyncio.sleep(0.5)
    request.cancel()
    for _ in range(200):
        if slow.cancelled and client.app[slot_key].is_free:
            break
        await asyncio.sleep(0.02)
    assert slow.cancelled and client.app[slot_key].is_free


# --- Sortformer on a tiny model of the real class ------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sortformer(tmp_path_factory):
    pytest.importorskip("aistack_plugins.sortformer", reason="needs the diarize extra (nemo_toolkit[asr])")
    from .fixtures.tiny_sortformer import build_tiny_sortformer

    return build_tiny_sortformer(tmp_path_factory.mktemp("tiny-sortformer"))


@pytest.fixture
async def sortformer_client(make_client, tiny_sortformer):
    import aistack_plugins.sortformer as sortformer

    return await make_client(
        plugins={"faster_whisper": faster_whisper_plugin, "sortformer": sortformer},
        env={sortformer.MODEL_SETTING: str(tiny_sortformer), sortformer.WINDOW_SETTING: "10"},
    )


@pytest.mark.heavy
async def test_sortformer_end_to_end(sortformer_client, conversation, conversation_wav):
    import aistack_plugins.sortformer as sortformer

    models = {e["id"]: e for e in (await (await sortformer_client.get("/v1/models")).json())["data"]}
    assert models[sortformer.MODEL_ID]["capabilities"] == ["diarization"] and DIARIZE_ALIAS in models

    turns = await (await sortformer_client.post("/v1/audio/diarization", data=form(conversation_wav))).json()
    # The tiny model hears its first speaker throughout; read in 10 s windows, the windows'
    # speakers are matched by their encoder states and joined into one turn.
    assert [t["speaker"] for t in turns] == ["A"]
    assert turns[0]["start"] == 0.0 and abs(turns[0]["end"] - conversation.duration) < 0.1
    rttm = await (await sortformer_client.post(
        "/v1/audio/diarization", data=form(conversation_wav, response_format="rttm", model="sortformer"))).text()
    assert rttm.split()[:3] == ["SPEAKER", "audio", "1"] and rttm.split()[7] == "A"

    response = await sortformer_client.post("/v1/audio/transcriptions", data=form(
        conversation_wav, model=DIARIZE_ALIAS, response_format="diarized_json"))
    assert response.status == 200, await response.text()
    body = await response.json()
    assert body["segments"] and {s["speaker"] for s in body["segments"]} == {"A"}
    assert response.headers["X-Aistack-Diarizer"] == sortformer.MODEL_ID

    # Known speakers go through the model's own encoder states.
    clip = data_url(conversation.cut(*conversation.turns[0][:2]))
    response = await sortformer_client.post("/v1/audio/transcriptions", data=speakers_form(
        conversation_wav, names=("Alice",), references=(clip,), model=DIARIZE_ALIAS, response_format="diarized_json",
        stream="true"))
    events = await sse_events(response)
    assert events[-1]["type"] == "transcript.text.done"
    assert {e["speaker"] for e in events[:-1]} == {"Alice"}


@pytest.mark.heavy
async def test_sortformer_without_weights_is_hidden_and_explains(make_client, tmp_path, conversation_wav):
    sortformer = pytest.importorskip("aistack_plugins.sortformer")
    client = await make_client(plugins={"sortformer": sortformer},
                               env={sortformer.MODEL_SETTING: str(tmp_path / "missing.nemo")})
    ids = [e["id"] for e in (await (await client.get("/v1/models")).json())["data"]]
    assert sortformer.MODEL_ID not in ids
    response = await client.post("/v1/audio/diarization", data=form(conversation_wav))
    assert response.status == 503
    assert sortformer.MODEL_SETTING in assert_envelope(await response.json(), "network")["message"]
    [check] = sortformer.doctor_checks(Config(env={sortformer.MODEL_SETTING: str(tmp_path / "missing.nemo")}))
    assert check.status == "warn" and sortformer.MODEL_SETTING in check.fix
