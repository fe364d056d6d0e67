"""The Parakeet plugin on real NeMo code, with a tiny TDT model built at test time.

The model (tests/fixtures/tiny_parakeet.py) ignores the audio and repeats
"Hello world. How are you?", one token per 160 ms, so transcripts, word
times and sentence cuts are known exactly.  No weights are downloaded.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import attrs
import numpy as np
import pytest

pytestmark = pytest.mark.heavy
parakeet = pytest.importorskip("aistack_plugins.parakeet", reason="needs the parakeet extra (nemo_toolkit[asr])")

from aistack_core import CancelToken, Cancelled, Config, Malformed, Network, TranscriptionOptions, Word  # noqa: E402
from aistack_core.media.audio import DecodedAudio  # noqa: E402
from aistack_core.cli import main as cli_main  # noqa: E402
from aistack_core.context import model_cache_key, slot_key  # noqa: E402
from aistack_core.plugins import load_plugins  # noqa: E402
from aistack_core.registry import Registry  # noqa: E402
from aistack_core.media.segments import sentence_segments, subtitle_cues  # noqa: E402

from .fixtures.tiny_parakeet import PHRASE, build_tiny_parakeet, expected_words  # noqa: E402
from .helpers import sse_events, BackendPlugin, write_wav  # noqa: E402
from .test_core import assert_envelope, form  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL_ID = "nvidia/parakeet-tdt-0.6b-v3"


@pytest.fixture(scope="session")
def tiny_nemo(tmp_path_factory) -> Path:
    return build_tiny_parakeet(tmp_path_factory.mktemp("tiny-parakeet"))


@pytest.fixture(scope="module")
def backend(tiny_nemo) -> "parakeet.ParakeetBackend":
    return parakeet.ParakeetBackend(Config(env={"AISTACK_PARAKEET_MODEL": str(tiny_nemo)}))


@pytest.fixture(scope="module")
def loaded(backend) -> "parakeet.LoadedParakeet":
    return backend.load()


@pytest.fixture(scope="module")
def pieces(loaded) -> list[str]:
    return loaded.model.tokenizer.text_to_tokens(PHRASE)


def noise_wav(path: Path, seconds: float, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    pcm = np.clip(rng.standard_normal(int(round(seconds * 16000))) * 3000, -32768, 32767).astype(np.int16)
    return write_wav(path, pcm, 16000)


def spoken_words(pieces: list[str], seconds: float) -> list[tuple[str, float, float]]:
    """What the tiny model says for ``seconds`` of audio, clamped to the audio."""
    return [(w, round(s, 3), round(min(e, seconds), 3)) for w, s, e in expected_words(pieces, seconds) if s < seconds]


def as_tuples(words) -> list[tuple[str, float, float]]:
    return [(w.word, round(w.start, 3), round(w.end, 3)) for w in words]


def run(backend, loaded, path: Path, **options):
    cancel = options.pop("cancel", None) or CancelToken()
    result = backend.transcribe(loaded, DecodedAudio.open(path), TranscriptionOptions(**options), cancel)
    return result, list(result.segments)


# --- the card and the weights ---------------------------------------------------


def test_card_and_registration(tiny_nemo):
    registered = []
    parakeet.register_asr_backends(registered.append, Config(env={"AISTACK_PARAKEET_MODEL": str(tiny_nemo)}))
    (backend,) = registered
    card = backend.card
    assert (card.id, card.aliases, card.owned_by, card.provider) == (MODEL_ID, ("parakeet",), "nvidia", "Parakeet")
    assert len(card.languages) == 25 and {"en", "de", "fr", "es", "uk", "mt"} <= set(card.languages)
    assert card.supports_streaming is False and card.can_translate is False
    assert set(card.auto_languages) == set(card.languages) and card.auto_priority == 10
    assert card.to_openai()["languages"] == list(card.languages)


def fake_hf_cache(root: Path, nemo: Path) -> Path:
    """A Hugging Face cache holding the tiny model under Parakeet's real repository and file name."""
    repo = root / "models--nvidia--parakeet-tdt-0.6b-v3"
    snapshot = repo / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True)
    (snapshot / "parakeet-tdt-0.6b-v3.nemo").write_bytes(nemo.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef")
    return root


def test_weights_come_from_the_local_hugging_face_cache(tiny_nemo, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(fake_hf_cache(tmp_path / "hub", tiny_nemo)))
    source = parakeet.resolve_weights(Config())
    assert source.name == "parakeet-tdt-0.6b-v3.nemo" and source.is_file()
    loaded = parakeet.ParakeetBackend(Config()).load()  # the default id, read from the cache
    assert loaded.device == "cpu" and loaded.model.tokenizer.text_to_tokens(PHRASE)


def test_missing_weights_are_a_network_error_not_a_download(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    for config in (Config(), Config(allow_downloads=True)):  # HF_HUB_OFFLINE=1 vetoes the download
        with pytest.raises(Network) as caught:
            parakeet.ParakeetBackend(config).load()
        assert "not available locally" in caught.value.message and caught.value.provider == "Parakeet"
    with pytest.raises(Network, match="not a file"):
        parakeet.resolve_weights(Config(env={"AISTACK_PARAKEET_MODEL": str(tmp_path / "nowhere.nemo")}))
    broken = tmp_path / "broken.nemo"
    broken.write_bytes(b"not a tar archive")
    with pytest.raises(Network, match="Could not load Parakeet"):
        parakeet.ParakeetBackend(Config(env={"AISTACK_PARAKEET_MODEL": str(broken)})).load()


# --- transcription ----------------------------------------------------------------


def test_words_sentences_and_clamped_end(backend, loaded, pieces, tmp_path):
    result, segments = run(backend, loaded, noise_wav(tmp_path / "three.wav", 3.0))
    assert result.duration == pytest.approx(3.0) and result.language == "unknown"
    words = [w for s in segments for w in s.words]
    assert as_tuples(words) == spoken_words(pieces, 3.0)
    # The model's last word runs to 3.04 s; it is cut at the end of the audio.
    assert expected_words(pieces, 3.0)[-1][2] > 3.0 and words[-1].end == pytest.approx(3.0)
    assert [s.text for s in segments] == ["Hello world.", "How are you?"] * 2 + ["Hello world.", "How are"]
    assert [s.id for s in segments] == list(range(len(segments)))
    for segment in segments:
        assert (segment.start, segment.end) == (segment.words[0].start, segment.words[-1].end)
    starts = [w.start for w in words]
    assert starts == sorted(starts) and all(0 <= w.start <= w.end <= 3.0 for w in words)


def test_short_audio_keeps_true_timestamps(backend, loaded, pieces, tmp_path):
    # NeMo pads clips under a second on both sides; the plugin pads the end only.
    result, segments = run(backend, loaded, noise_wav(tmp_path / "short.wav", 0.4))
    words = [w for s in segments for w in s.words]
    assert as_tuples(words) == spoken_words(pieces, 0.4) == [("Hello", 0.0, 0.16), ("world.", 0.16, 0.32)]


def test_language_hint_translate_and_unknown_languages(backend, loaded, tmp_path):
    wav = noise_wav(tmp_path / "one.wav", 1.0)
    assert run(backend, loaded, wav, language="de-DE")[0].language == "de"
    with pytest.raises(Malformed, match="translate") as caught:
        run(backend, loaded, wav, translate=True)
    assert caught.value.provider == "Parakeet"
    with pytest.raises(Malformed, match="'ja'"):
        run(backend, loaded, wav, language="ja")


def test_local_attention_above_the_threshold_and_back(tiny_nemo, loaded, pieces, tmp_path):
    backend = parakeet.ParakeetBackend(Config(env={"AISTACK_PARAKEET_MODEL": str(tiny_nemo), "AISTACK_PARAKEET_LOCAL_ATTENTION_ABOVE_S": "2.0"}))
    encoder = loaded.model.encoder
    assert encoder.self_attention_model == "rel_pos" and not loaded.local_attention

    _, segments = run(backend, loaded, noise_wav(tmp_path / "long.wav", 3.0))
    assert loaded.local_attention and encoder.self_attention_model == "rel_pos_local_attn"
    assert list(encoder.att_context_size) == [128, 128]
    assert loaded.model.cfg.encoder.self_attention_model == "rel_pos_local_attn"
    assert "Longformer" in type(encoder.layers[0].self_attn).__name__
    assert as_tuples(w for s in segments for w in s.words) == spoken_words(pieces, 3.0)

    _, segments = run(backend, loaded, noise_wav(tmp_path / "short.wav", 1.5))
    assert not loaded.local_attention and encoder.self_attention_model == "rel_pos"
    assert list(encoder.att_context_size) == [-1, -1]
    assert "Longformer" not in type(encoder.layers[0].self_attn).__name__
    assert as_tuples(w for s in segments for w in s.words) == spoken_words(pieces, 1.5)


def test_long_audio_is_decoded_window_by_window_and_stops_when_cancelled(tiny_nemo, loaded, tmp_path):
    backend = parakeet.ParakeetBackend(Config(env={"AISTACK_PARAKEET_MODEL": str(tiny_nemo)}), window_s=1.0)
    wav = noise_wav(tmp_path / "four.wav", 4.0)
    before = loaded.windows_decoded
    result, segments = run(backend, loaded, wav)
    assert loaded.windows_decoded - before >= 4
    words = [w for s in segments for w in s.words]
    assert [s.id for s in segments] == list(range(len(segments)))
    assert [w.start for w in words] == sorted(w.start for w in words) and words[-1].end <= 4.0

    cancel = CancelToken()
    result = backend.transcribe(loaded, DecodedAudio.open(wav), TranscriptionOptions(), cancel)
    before = loaded.windows_decoded
    pulled = [next(iter(result.segments))]
    cancel.cancel("test")
    with pytest.raises(Cancelled):
        pulled.extend(result.segments)
    assert loaded.windows_decoded - before == 1 and len(pulled) <= 2  # only the first window ran

    cancelled = CancelToken()
    cancelled.cancel()
    with pytest.raises(Cancelled):
        run(backend, loaded, wav, cancel=cancelled)


# --- over HTTP ----------------------------------------------------------------------


@pytest.fixture
async def client(make_client, tiny_nemo):
    return await make_client(plugins={"parakeet": parakeet}, env={"AISTACK_PARAKEET_MODEL": str(tiny_nemo)})


async def test_every_response_format(client, pieces, tmp_path):
    wav = noise_wav(tmp_path / "three.wav", 3.0)
    post = lambda fmt, **extra: client.post(  # noqa: E731
        "/v1/audio/transcriptions", data=form(wav, model="parakeet", response_format=fmt, **extra)
    )
    text = "Hello world. How are you? Hello world. How are you? Hello world. How are"
    assert await (await post("json")).json() == {"text": text, "usage": {"type": "duration", "seconds": 3.0}}

    verbose = await (await post("verbose_json", language="fr")).json()
    assert (verbose["task"], verbose["language"], verbose["duration"], verbose["text"]) == ("transcribe", "fr", 3.0, text)
    assert [(w["word"], w["start"], w["end"]) for w in verbose["words"]] == spoken_words(pieces, 3.0)
    expected = sentence_segments([Word(s, e, w) for w, s, e in spoken_words(pieces, 3.0)])
    assert [(s["id"], s["start"], s["end"], s["text"]) for s in verbose["segments"]] == [
        (s.id, round(s.start, 3), round(s.end, 3), s.text) for s in expected
    ]

    plain = await post("text")
    assert plain.content_type == "text/plain" and await plain.text() == text + "\n"
    srt = await (await post("srt")).text()
    assert srt.startswith("1\n00:00:00,000 --> 00:00:00,320\nHello world.\n\n2\n00:00:00,480 --> 00:00:00,960\n")
    assert srt.rstrip().endswith("00:00:02,720 --> 00:00:03,000\nHow are")
    vtt = await (await post("vtt")).text()
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:00.320\nHello world.\n")


async def subtitles(client, seconds: float, tmp_path) -> dict:
    wav = noise_wav(tmp_path / "subtitles.wav", seconds)
    response = await client.post(
        "/v1/audio/transcriptions",
        data=form(wav, model="nvidia/parakeet-tdt-0.6b-v3", response_format="verbose_json",
                  segment_granularity="subtitle"),
    )
    assert response.status == 200
    return await response.json()


async def test_subtitle_cues_stay_within_limits(client, tmp_path):
    body = await subtitles(client, 12.0, tmp_path)
    cues = body["segments"]
    assert cues and [c["id"] for c in cues] == list(range(len(cues)))
    for cue in cues:
        assert len(cue["text"]) <= 70 and 0 < cue["end"] - cue["start"] <= 7.0
    assert " ".join(c["text"] for c in cues) == body["text"]
    assert [c["start"] for c in cues] == sorted(c["start"] for c in cues)


async def test_subtitle_cues_join_short_sentences(client, pieces, tmp_path):
    body = await subtitles(client, 12.0, tmp_path)
    expected = subtitle_cues([Word(s, e, w) for w, s, e in spoken_words(pieces, 12.0)])
    assert [(c["start"], c["end"], c["text"]) for c in body["segments"]] == [
        (round(c.start, 3), round(c.end, 3), c.text) for c in expected
    ]
    assert all(c["end"] - c["start"] >= 1.0 for c in body["segments"][:-1])


async def test_stream_request_gets_warning_then_one_delta(client, pieces, tmp_path):
    wav = noise_wav(tmp_path / "two.wav", 2.0)
    response = await client.post(
        "/v1/audio/transcriptions", data=form(wav, model="parakeet", stream="true", language="en", **{"timestamp_granularities[]": "word"})
    )
    assert response.status == 200 and response.content_type == "text/event-stream"
    events = await sse_events(response)
    assert [e["type"] for e in events] == ["warning", "transcript.text.delta", "transcript.text.done"]
    warning, delta, done = events
    assert warning["model"] == MODEL_ID and warning["code"] and warning["message"]
    assert delta["delta"] == "Hello world. How are you? Hello world. How are you"
    assert [(w["word"], w["start"], w["end"]) for w in delta["segment"]["words"]] == spoken_words(pieces, 2.0)
    assert (delta["segment"]["start"], delta["segment"]["end"]) == (0.0, 2.0)
    assert (done["text"], done["language"], done["duration"]) == (delta["delta"], "en", 2.0)


async def test_listed_in_models_and_refusals(client, tmp_path):
    models = {m["id"]: m for m in (await (await client.get("/v1/models")).json())["data"]}
    entry = models[MODEL_ID]
    assert entry["owned_by"] == "nvidia" and entry["capabilities"] == ["asr"]
    assert entry["supports_streaming"] is False and len(entry["languages"]) == 25
    assert models["auto"]["supports_streaming"] is False  # the pool includes a model that cannot stream

    wav = noise_wav(tmp_path / "one.wav", 1.0)
    response = await client.post("/v1/audio/transcriptions", data=form(wav, model="parakeet", translate="true"))
    assert response.status == 400
    assert assert_envelope(await response.json(), "malformed")["provider"] == "Parakeet"


async def test_missing_weights_answer_503(make_client, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    client = await make_client(plugins={"parakeet": parakeet})
    wav = noise_wav(tmp_path / "one.wav", 1.0)
    response = await client.post("/v1/audio/transcriptions", data=form(wav, model="parakeet"))
    assert response.status == 503
    error = assert_envelope(await response.json(), "network")
    assert error["provider"] == "Parakeet" and "AISTACK_PARAKEET_MODEL" in error["message"]
    assert client.app[slot_key].is_free


@pytest.mark.parametrize(
    "stream",
    [
        True,
        False,
    ],
)
async def test_disconnect_stops_decoding_and_frees_the_slot(make_client, base_config, tiny_nemo, tmp_path, stream):
    backend = parakeet.ParakeetBackend(attrs.evolve(base_config, env={"AISTACK_PARAKEET_MODEL": str(tiny_nemo)}), window_s=2.0)
    client = await make_client(plugins={"parakeet": BackendPlugin(backend)})
    app = client.app
    wav = noise_wav(tmp_path / "two-minutes.wav", 120.0)  # 60 windows
    data = form(wav, model="parakeet", stream=str(stream).lower())
    call = asyncio.create_task(client.post("/v1/audio/transcriptions", data=data))
    if stream:
        response = await call  # the SSE headers are out; the warning comes first
        assert json.loads((await response.content.readline())[5:])["type"] == "warning"
        hang_up = response.close
    else:
        hang_up = call.cancel
    loaded = None
    deadline = time.monotonic() + 30
    while loaded is None or loaded.windows_decoded < 2:
        assert time.monotonic() < deadline and (stream or not call.done())
        if ("asr", MODEL_ID) in app[model_cache_key]:
            async with app[model_cache_key].use(("asr", MODEL_ID), "asr", backend.load) as model:
                loaded = model
        await asyncio.sleep(0.02)
    hang_up()
    hung_up = time.monotonic()
    slot = app[slot_key]
    while not slot.is_free and time.monotonic() - hung_up < 5:
        await asyncio.sleep(0.02)
    assert slot.is_free and time.monotonic() - hung_up < 1.5
    # The worker stops too, after at most the window it was decoding.
    decoded = loaded.windows_decoded
    await asyncio.sleep(0.5)
    settled = loaded.windows_decoded
    await asyncio.sleep(0.3)
    assert loaded.windows_decoded == settled <= decoded + 1 and settled < 60
    assert list((tmp_path / "uploads").iterdir()) == []

    again = await client.post("/v1/audio/transcriptions", data=form(noise_wav(tmp_path / "one.wav", 1.0), model="parakeet"))
    assert again.status == 200


# --- plugin listing -------------------------------------------------------------------


def test_listed_by_the_plugins_command(monkeypatch, capsys):
    monkeypatch.setenv("AISTACK_LOAD_PLUGINS", "parakeet")
    assert cli_main(["plugins", "--json"]) == 0
    listing = {item["name"]: item for item in json.loads(capsys.readouterr().out)}
    assert listing["parakeet"]["status"] == "loaded"
    assert listing["parakeet"]["registered"] == [f"asr:{MODEL_ID}"]


BLOCKED_IMPORT = r"""
import asyncio, importlib.abc, json, sys

class Blocked(importlib.abc.MetaPathFinder):
    # Behaves as if the package were not installed.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == sys.argv[1]:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Blocked())

from aiohttp.test_utils import TestClient, TestServer
from aistack_core.app import create_app
from aistack_core.config import Config

async def models():
    app = create_app(Config(load_plugins=(sys.argv[2],), obs_access_log=False, obs_metrics=False))
    async with TestClient(TestServer(app)) as client:
        return [m["id"] for m in (await (await client.get("/v1/models")).json())["data"]]

ids = asyncio.run(models())
from aistack_core.cli import main
print(json.dumps({"models": ids}))
main(["plugins", "--json"])
"""


def run_without(package: str, plugin: str) -> tuple[list[str], dict]:
    """/v1/models and `aistack plugins` in a Python where ``package`` does not import."""
    env = {**os.environ, "AISTACK_LOAD_PLUGINS": plugin, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED_IMPORT, package, plugin],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    first, _, rest = done.stdout.partition("\n")
    listing = {item["name"]: item for item in json.loads(rest)}
    return json.loads(first)["models"], listing


def test_absent_with_the_reason_when_nemo_does_not_import():
    models, listing = run_without("nemo", "parakeet")
    assert MODEL_ID not in models and "auto" not in models
    record = listing["parakeet"]
    assert record["status"] == "skipped" and "nemo" in record["error"] and record["registered"] == []


def test_registry_entry_point_loads_the_plugin():
    plugins = load_plugins(load_entrypoints=True, allow=["parakeet"])
    registry = Registry.from_plugins(plugins, Config())
    assert registry.resolve_asr("parakeet", None).card.id == MODEL_ID
    assert registry.resolve_asr("auto", "de").card.id == MODEL_ID


async def test_without_local_weights_hidden_and_auto_falls_back(make_client, tmp_path, monkeypatch, sentences_wav):
    from huggingface_hub import constants

    import aistack_plugins.faster_whisper as faster_whisper_plugin

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    client = await make_client(plugins={"parakeet": parakeet, "faster_whisper": faster_whisper_plugin})
    ids = [m["id"] for m in (await (await client.get("/v1/models")).json())["data"]]
    assert "nvidia/parakeet-tdt-0.6b-v3" not in ids and "whisper-tiny.en" in ids
    for language in ("en", "fr"):
        response = await client.post("/v1/audio/transcriptions", data=form(sentences_wav[0][1], model="auto", language=language))
        assert response.status == 200, await response.text()
    explicit = await client.post("/v1/audio/transcriptions", data=form(sentences_wav[0][1], model="parakeet"))
    assert explicit.status == 503
    assert "AISTACK_PARAKEET_MODEL" in assert_envelope(await explicit.json(), "network")["message"]
