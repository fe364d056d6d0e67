"""The SenseVoice plugin on real FunASR code, with tiny models built at test time.

The tiny SenseVoice (tests/fixtures/tiny_sensevoice.py) hears a 300 Hz tone
as "hello" and a 3000 Hz tone as "world"; the tiny fsmn-vad finds the loud
stretches.  Also here: the ``auto`` routing between SenseVoice, Parakeet and
Whisper, which needs both tiny models.  No weights are downloaded.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import attrs
import numpy as np
import pytest

pytestmark = pytest.mark.heavy
sensevoice = pytest.importorskip("aistack_plugins.sensevoice", reason="needs the sensevoice extra (funasr)")

from aistack_core import CancelToken, Cancelled, Config, Malformed, Network, TranscriptionOptions  # noqa: E402
from aistack_core.media.audio import DecodedAudio  # noqa: E402
from aistack_core.cli import main as cli_main  # noqa: E402
from aistack_core.context import model_cache_key, registry_key, slot_key  # noqa: E402
from aistack_core.plugins import load_plugins  # noqa: E402
from aistack_core.registry import Registry  # noqa: E402

from .fixtures.tiny_sensevoice import HELLO_HZ, WORLD_HZ, build_tiny_sensevoice, silence, tone  # noqa: E402
from .helpers import sse_events, write_wav  # noqa: E402
from .test_core import assert_envelope, form  # noqa: E402

MODEL_ID = "iic/SenseVoiceSmall"
PARAKEET_ID = "nvidia/parakeet-tdt-0.6b-v3"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return build_tiny_sensevoice(tmp_path_factory.mktemp("tiny-sensevoice"))


def tiny_config(tiny, base: Config | None = None) -> Config:
    base = base or Config()
    return attrs.evolve(base, env={**base.env, **tiny_env(tiny)})


def tiny_env(tiny, **overrides: str) -> dict[str, str]:
    """The plugin's settings pointing at the tiny models (``model=``, ``vad_model=`` override)."""
    return {
        "AISTACK_SENSEVOICE_MODEL": overrides.get("model", str(tiny.model_dir)),
        "AISTACK_SENSEVOICE_VAD_MODEL": overrides.get("vad_model", str(tiny.vad_dir)),
    }


@pytest.fixture(scope="module")
def backend(tiny):
    return sensevoice.SenseVoiceBackend(tiny_config(tiny))


@pytest.fixture(scope="module")
def loaded(backend):
    return backend.load()


def wav_of(path: Path, *pieces: np.ndarray) -> Path:
    samples = np.concatenate(pieces)
    return write_wav(path, np.round(samples * 32767).astype(np.int16), 16000)


@pytest.fixture(scope="module")
def two_stretches(tmp_path_factory) -> Path:
    """"hello world" from 0.5 to 1.7 s, "world" from 4.2 to 4.8 s; 5.3 s in all."""
    return wav_of(
        tmp_path_factory.mktemp("sv-audio") / "two.wav",
        silence(0.5), tone(HELLO_HZ, 0.6), tone(WORLD_HZ, 0.6), silence(2.5), tone(WORLD_HZ, 0.6), silence(0.5),
    )


def many_stretches(path: Path, count: int) -> Path:
    pieces = [silence(0.3)]
    for i in range(count):
        pieces += [tone(HELLO_HZ if i % 2 == 0 else WORLD_HZ, 0.4), silence(2.5)]
    return wav_of(path, *pieces)


def run(backend, loaded, path: Path, **options):
    cancel = options.pop("cancel", None) or CancelToken()
    result = backend.transcribe(loaded, DecodedAudio.open(path), TranscriptionOptions(**options), cancel)
    return result, list(result.segments)


# --- the card, the tags and the weights ---------------------------------------------


def test_card_and_registration(tiny):
    registered = []
    sensevoice.register_asr_backends(registered.append, tiny_config(tiny))
    (backend,) = registered
    card = backend.card
    assert (card.id, card.aliases, card.owned_by, card.provider) == (MODEL_ID, ("sensevoice",), "alibaba", "SenseVoice")
    assert card.languages == ("zh", "yue", "en", "ja", "ko") and card.supports_streaming is True
    assert set(card.auto_languages) == {"zh", "yue", "ja", "ko"} and card.auto_priority == 10
    assert card.can_translate is False


@pytest.mark.parametrize(
    "raw, text, extra",
    [
        ("<|en|><|NEUTRAL|><|Speech|><|withitn|>Hello there.", "Hello there.",
         {"language": "en", "emotion": "neutral", "event": "speech"}),
        ("<|zh|><|HAPPY|><|BGM|><|woitn|>欢迎<|Laughter|>大家", "欢迎大家",
         {"language": "zh", "emotion": "happy", "event": "bgm"}),
        ("<|ja|><|EMO_UNKNOWN|><|Event_UNK|><|withitn|> こんにちは", "こんにちは", {"language": "ja"}),
        ("<|nospeech|><|EMO_UNKNOWN|><|Event_UNK|><|woitn|>", "", {}),
        ("plain text", "plain text", {}),
    ],
)
def test_rich_transcription_tags(raw, text, extra):
    rich = sensevoice.RichText.parse(raw)
    assert rich.text == text and rich.extra() == extra


def modelscope_cache(root: Path, tiny) -> Path:
    """A ModelScope cache holding the tiny models under the real ids."""
    shutil.copytree(tiny.model_dir, root / "models" / "iic" / "SenseVoiceSmall")
    shutil.copytree(tiny.vad_dir, root / "models" / "iic" / "speech_fsmn_vad_zh-cn-16k-common-pytorch")
    return root


def test_weights_come_from_the_modelscope_cache(tiny, two_stretches, tmp_path, monkeypatch):
    monkeypatch.setenv("MODELSCOPE_CACHE", str(modelscope_cache(tmp_path / "ms", tiny)))
    backend = sensevoice.SenseVoiceBackend(Config())  # the default ids
    loaded = backend.load()
    assert " ".join(s.text for s in run(backend, loaded, two_stretches)[1]) == "hello world world"


def test_missing_weights_are_a_network_error_not_a_download(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "empty"))
    with pytest.raises(Network) as caught:
        sensevoice.SenseVoiceBackend(Config()).load()
    assert "not available locally" in caught.value.message and caught.value.provider == "SenseVoice"
    config = Config(env=tiny_env(tiny, vad_model=str(tmp_path / "no-vad")))
    with pytest.raises(Network, match="AISTACK_SENSEVOICE_VAD_MODEL"):
        sensevoice.SenseVoiceBackend(config).load()
    broken = shutil.copytree(tiny.model_dir, tmp_path / "broken")
    (broken / "model.pt").write_bytes(b"not a checkpoint")
    config = Config(env=tiny_env(tiny, model=str(broken)))
    with pytest.raises(Network, match="Could not load SenseVoice"):
        sensevoice.SenseVoiceBackend(config).load()


# --- transcription ----------------------------------------------------------------


def test_one_segment_per_speech_stretch(backend, loaded, two_stretches):
    result, segments = run(backend, loaded, two_stretches)
    assert result.language == "en" and result.duration == pytest.approx(5.3)
    assert [(s.id, s.text) for s in segments] == [(0, "hello world"), (1, "world")]
    (first_start, first_end), (second_start, second_end) = [(s.start, s.end) for s in segments]
    # The VAD pads each stretch by a few hundred milliseconds.
    assert 0.0 <= first_start <= 0.5 and 1.7 <= first_end <= 2.2
    assert 3.7 <= second_start <= 4.2 and 4.8 <= second_end <= 5.3
    for segment in segments:
        assert segment.extra == {"language": "en", "emotion": "neutral", "event": "speech"}
        assert segment.words == ()


def test_language_hint_steers_the_model(backend, loaded, two_stretches):
    for hint, expected in (("zh-CN", "zh"), ("yue", "yue"), ("KO", "ko"), ("auto", "en")):
        result, segments = run(backend, loaded, two_stretches, language=hint)
        assert result.language == expected and {s.extra["language"] for s in segments} == {expected}


def test_refusals(backend, loaded, two_stretches):
    with pytest.raises(Malformed, match="translate") as caught:
        run(backend, loaded, two_stretches, translate=True)
    assert caught.value.provider == "SenseVoice"
    with pytest.raises(Malformed, match="'de'"):
        run(backend, loaded, two_stretches, language="de")


def test_silence_is_an_empty_transcript(backend, loaded, tmp_path):
    result, segments = run(backend, loaded, wav_of(tmp_path / "quiet.wav", silence(2.0)))
    assert segments == [] and result.language == "unknown" and result.duration == pytest.approx(2.0)
    assert run(backend, loaded, wav_of(tmp_path / "quiet.wav", silence(2.0)), language="ko")[0].language == "ko"


def test_stretches_are_decoded_lazily_and_cancel_between_them(backend, loaded, tmp_path):
    wav = many_stretches(tmp_path / "six.wav", 6)
    cancel = CancelToken()
    before = loaded.stretches_decoded
    result = backend.transcribe(loaded, DecodedAudio.open(wav), TranscriptionOptions(), cancel)
    assert loaded.stretches_decoded - before == 1  # the first, for the language
    segments = iter(result.segments)
    assert next(segments).text == "hello" and next(segments).text == "world"
    assert loaded.stretches_decoded - before == 2
    cancel.cancel("test")
    with pytest.raises(Cancelled):
        next(segments)
    assert loaded.stretches_decoded - before == 2

    result, segments = run(backend, loaded, wav)
    assert [s.text for s in segments] == ["hello", "world"] * 3
    starts = [s.start for s in segments]
    assert starts == sorted(starts) and all(s.start < s.end <= result.duration for s in segments)


def test_long_audio_is_searched_for_speech_one_window_at_a_time(backend, loaded, tmp_path, monkeypatch):
    wav = many_stretches(tmp_path / "six.wav", 6)  # 0.3 s + 6 x (0.4 s tone + 2.5 s pause) = 17.7 s
    _, whole = run(backend, loaded, wav)
    seen = []
    speech_spans = type(loaded).speech_spans
    monkeypatch.setattr(type(loaded), "speech_spans",
                        lambda self, window: seen.append(len(window)) or speech_spans(self, window))
    monkeypatch.setattr(sensevoice, "WINDOW_S", 6.0)
    monkeypatch.setattr(sensevoice, "PIECE_S", 1.0)
    _, windowed = run(backend, loaded, wav)
    # Three windows of at most 6 s, cut in the pauses: the same stretches, in file time.
    assert len(seen) == 3 and max(seen) <= 6 * 16000 and sum(seen) == round(17.7 * 16000)
    assert [s.text for s in windowed] == [s.text for s in whole] == ["hello", "world"] * 3
    # A stretch just after a cut loses the part of the VAD's padding that lay before it (<= 0.3 s).
    assert [s.start for s in windowed] == pytest.approx([s.start for s in whole], abs=0.3)
    assert all(w.start <= tone_start for w, tone_start in zip(windowed, (0.3 + i * 2.9 for i in range(6))))
    assert [s.id for s in windowed] == list(range(6))


# --- over HTTP ----------------------------------------------------------------------


@pytest.fixture
async def client(make_client, tiny):
    return await make_client(
        plugins={"sensevoice": sensevoice}, env=tiny_env(tiny)
    )


async def test_every_response_format(client, two_stretches):
    post = lambda fmt, **extra: client.post(  # noqa: E731
        "/v1/audio/transcriptions", data=form(two_stretches, model="sensevoice", response_format=fmt, **extra)
    )
    assert await (await post("json")).json() == {"text": "hello world world", "usage": {"type": "duration", "seconds": 5.3}}

    verbose = await (await post("verbose_json")).json()
    assert (verbose["language"], verbose["duration"], verbose["text"]) == ("en", 5.3, "hello world world")
    assert "words" not in verbose
    segments = verbose["segments"]
    assert [(s["id"], s["text"], s["language"], s["emotion"], s["event"]) for s in segments] == [
        (0, "hello world", "en", "neutral", "speech"), (1, "world", "en", "neutral", "speech"),
    ]
    assert segments[0]["start"] < segments[0]["end"] < segments[1]["start"] < segments[1]["end"] <= 5.3

    plain = await post("text")
    assert plain.content_type == "text/plain" and await plain.text() == "hello world world\n"
    srt = await (await post("srt")).text()
    blocks = srt.strip().split("\n\n")
    assert len(blocks) == 2 and blocks[0].startswith("1\n00:00:00,") and blocks[1].endswith("\nworld")
    vtt = await (await post("vtt")).text()
    assert vtt.startswith("WEBVTT\n\n00:00:00.") and vtt.rstrip().endswith("world")

    zh = await (await post("verbose_json", language="zh")).json()
    assert zh["language"] == "zh" and {s["language"] for s in zh["segments"]} == {"zh"}


async def test_streams_one_delta_per_speech_stretch(client, two_stretches):
    response = await client.post("/v1/audio/transcriptions", data=form(two_stretches, model="sensevoice", stream="true"))
    assert response.status == 200 and response.content_type == "text/event-stream"
    events = await sse_events(response)
    assert [e["type"] for e in events] == ["transcript.text.delta"] * 2 + ["transcript.text.done"]
    # Concatenated as sent, the deltas read as the final text.
    assert [e["delta"] for e in events[:2]] == ["hello world", " world"]
    for event in events[:2]:
        segment = event["segment"]
        assert segment["start"] < segment["end"] and "words" not in segment
        assert (segment["language"], segment["emotion"], segment["event"]) == ("en", "neutral", "speech")
    assert events[0]["segment"]["end"] < events[1]["segment"]["start"]
    assert events[2]["text"] == "hello world world" and events[2]["language"] == "en" and events[2]["duration"] == 5.3


async def test_silence_over_http(client, tmp_path):
    wav = wav_of(tmp_path / "quiet.wav", silence(1.5))
    response = await client.post("/v1/audio/transcriptions", data=form(wav, model="sensevoice", response_format="verbose_json"))
    body = await response.json()
    assert response.status == 200 and body["text"] == "" and body["segments"] == []


async def test_disconnect_mid_stream_stops_decoding_and_frees_the_slot(client, tmp_path):
    app = client.app
    wav = many_stretches(tmp_path / "many.wav", 100)
    response = await client.post("/v1/audio/transcriptions", data=form(wav, model="sensevoice", stream="true"))
    first = await response.content.readline()
    assert first.startswith(b"data:") and json.loads(first[5:])["type"] == "transcript.text.delta"
    response.close()  # hang up after the first delta
    hung_up = time.monotonic()
    slot = app[slot_key]
    while not slot.is_free and time.monotonic() - hung_up < 5:
        await asyncio.sleep(0.02)
    assert slot.is_free and time.monotonic() - hung_up < 1.0
    async with app[model_cache_key].use(("asr", MODEL_ID), "asr", lambda: None) as loaded:
        # The worker stops too, after at most the stretch it was decoding.
        decoded = loaded.stretches_decoded
        await asyncio.sleep(0.5)
        settled = loaded.stretches_decoded
        await asyncio.sleep(0.3)
        assert loaded.stretches_decoded == settled <= decoded + 1 and settled < 100
    assert list((tmp_path / "uploads").iterdir()) == []


# --- auto routing across the three families ---------------------------------------


@pytest.fixture(scope="module")
def tiny_nemo(tmp_path_factory):
    pytest.importorskip("aistack_plugins.parakeet", reason="needs the parakeet extra")
    from .fixtures.tiny_parakeet import build_tiny_parakeet

    return build_tiny_parakeet(tmp_path_factory.mktemp("tiny-parakeet-routing"))


def registry_of(*names: str, config: Config) -> Registry:
    plugins = load_plugins(load_entrypoints=True, allow=list(names))
    return Registry.from_plugins(plugins, config)


@pytest.mark.parametrize(
    "installed, routes",
    [
        (("parakeet", "sensevoice", "faster_whisper"),
         {"ja": MODEL_ID, "zh": MODEL_ID, "ko": MODEL_ID, "yue": MODEL_ID, "de": PARAKEET_ID, "fr": PARAKEET_ID,
          "es": PARAKEET_ID, "en": PARAKEET_ID, "pt-BR": PARAKEET_ID, "ar": "whisper", None: "whisper"}),
        (("parakeet", "faster_whisper"),
         {"ja": "whisper", "zh": "whisper", "de": PARAKEET_ID, "en": PARAKEET_ID, None: "whisper"}),
        (("sensevoice", "faster_whisper"),
         {"ja": MODEL_ID, "yue": MODEL_ID, "de": "whisper", "en": "whisper", None: "whisper"}),
        (("parakeet", "sensevoice"), {"ja": MODEL_ID, "de": PARAKEET_ID, "ar": MODEL_ID}),
    ],
)
def test_auto_routing_and_fallback(installed, routes, tiny, tiny_nemo):
    pytest.importorskip("aistack_plugins.faster_whisper", reason="needs the whisper extra")
    registry = registry_of(*installed, config=tiny_config(tiny, Config(env={"AISTACK_PARAKEET_MODEL": str(tiny_nemo)})))
    for language, expected in routes.items():
        chosen = registry.resolve_asr("auto", language).card.id
        assert chosen.startswith("whisper-") if expected == "whisper" else chosen == expected, (language, chosen)


async def test_auto_over_http(make_client, tiny, tiny_nemo, tmp_path, two_stretches):
    import aistack_plugins.parakeet as parakeet

    client = await make_client(
        plugins={"parakeet": parakeet, "sensevoice": sensevoice},
        env={"AISTACK_PARAKEET_MODEL": str(tiny_nemo), **tiny_env(tiny)},
    )
    texts = {}
    for language in ("ja", "de", "en", "yue"):
        response = await client.post(
            "/v1/audio/transcriptions", data=form(two_stretches, model="auto", language=language)
        )
        assert response.status == 200, await response.text()
        texts[language] = (await response.json())["text"]
    assert texts["ja"] == texts["yue"] == "hello world world"  # SenseVoice
    assert texts["de"] == texts["en"] and texts["de"].startswith("Hello world. How are you?")  # Parakeet
    models = {m["id"]: m for m in (await (await client.get("/v1/models")).json())["data"]}
    assert {MODEL_ID, PARAKEET_ID} <= set(models) and models["auto"]["supports_streaming"] is False


async def test_auto_falls_back_when_the_preferred_backend_is_missing(make_client, tiny, two_stretches):
    client = await make_client(
        plugins={"sensevoice": sensevoice}, env=tiny_env(tiny)
    )
    assert client.app[registry_key].resolve_asr("auto", "de").card.id == MODEL_ID
    response = await client.post(
        "/v1/audio/transcriptions", data=form(two_stretches, model="auto", language="de", response_format="verbose_json")
    )
    assert response.status == 200, await response.text()
    assert (await response.json())["text"] == "hello world world"
    models = {m["id"]: m for m in (await (await client.get("/v1/models")).json())["data"]}
    assert models["auto"]["supports_streaming"] is True  # SenseVoice alone streams
    refused = await client.post(
        "/v1/audio/transcriptions", data=form(two_stretches, model="sensevoice", translate="true")
    )
    assert refused.status == 400 and assert_envelope(await refused.json(), "malformed")["provider"] == "SenseVoice"


# --- plugin listing -------------------------------------------------------------------


def test_listed_by_the_plugins_command(monkeypatch, capsys):
    monkeypatch.setenv("AISTACK_LOAD_PLUGINS", "sensevoice")
    assert cli_main(["plugins", "--json"]) == 0
    listing = {item["name"]: item for item in json.loads(capsys.readouterr().out)}
    assert listing["sensevoice"]["status"] == "loaded"
    assert listing["sensevoice"]["registered"] == [f"asr:{MODEL_ID}"]


def test_absent_with_the_reason_when_funasr_does_not_import():
    from .test_parakeet import run_without

    models, listing = run_without("funasr", "sensevoice")
    assert MODEL_ID not in models and "auto" not in models
    record = listing["sensevoice"]
    assert record["status"] == "skipped" and "funasr" in record["error"] and record["registered"] == []
