"""OpenAI's audio contract, checked with the official ``openai`` package and OpenAI's component schemas.

Speech is made with Piper, transcribed by the real faster-whisper plugin
(the bundled tiny.en); upstreams are the loopback emulators.  Every body a
client parses is validated against the schemas in ``openai_schemas``.
"""

from __future__ import annotations

import asyncio
import io
import json
import wave
from pathlib import Path

import av
import numpy as np
import openai
import pytest
from openai import AsyncOpenAI
from tokenizers import Tokenizer

import aistack_plugins.faster_whisper as faster_whisper_plugin
import aistack_plugins.ollama as ollama_plugin
import aistack_plugins.piper as piper_plugin
import aistack_plugins.qwen3_tts as qwen3_tts_plugin
from aistack_core import ModelCard, TranscriptionOptions, VadSettings, hookimpl
from aistack_core.backends import Segment
from aistack_core.context import slot_key
from aistack_core.media.transcript import TextJoiner, join_text

from . import openai_schemas as schemas
from .helpers import SENTENCES, BackendPlugin, SlowAsr, sse_events, synthesize_pcm, write_wav, word_error_rate
from .test_core import form
from .upstreams import refused_url
from .upstreams.ollama import OllamaEmulator

WHISPER = {"faster_whisper": faster_whisper_plugin}
PIPER = {"piper": piper_plugin}
PARAGRAPH = (
    "Morning light spilled across the harbour. Fishing boats rocked gently at their moorings. "
    "A gull cried twice and wheeled away over the water. The baker on the corner pulled the first loaves "
    "from his oven. Children ran past with their satchels bouncing. An old man fed pigeons on the bench. "
    "Somewhere a radio played a slow waltz. Then the church bell rang eight times."
)


def client_for(test_client, **kwargs) -> AsyncOpenAI:
    return AsyncOpenAI(
        base_url=f"http://{test_client.server.host}:{test_client.server.port}/v1",
        api_key=kwargs.pop("api_key", "unused"), max_retries=0, timeout=120, **kwargs,
    )


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> tuple[str, Path]:
    """Two sentences of Piper speech with a pause between them."""
    folder = tmp_path_factory.mktemp("contract")
    text = f"{SENTENCES[1]} {SENTENCES[3]}"
    first, rate = synthesize_pcm(SENTENCES[1])
    second, _ = synthesize_pcm(SENTENCES[3])
    pause = np.zeros(int(rate * 0.8), dtype=np.int16)
    return text, write_wav(folder / "two.wav", np.concatenate([pause, first, pause, second, pause]), rate)


@pytest.fixture
async def whisper(make_client):
    return await make_client(plugins=WHISPER)


@pytest.fixture
async def everything(make_client):
    """Whisper, Piper and a test ASR backend that cannot translate (and has no VAD)."""
    return await make_client(plugins={**WHISPER, **PIPER, "slow": BackendPlugin(SlowAsr(steps=2, step_s=0.01))})


def whisper_tokenizer() -> Tokenizer:
    folder = faster_whisper_plugin.bundled_model_dir()
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def error_body(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()
    schemas.validate(body, schemas.ERROR_RESPONSE)
    return body["error"]


# --- translations --------------------------------------------------------------------


async def test_translations_in_every_format_on_whisper(whisper, speech):
    text, path = speech
    client = client_for(whisper)
    raw = await client.audio.translations.with_raw_response.create(
        model="whisper-1", file=path, prompt="A station.", temperature=0.0
    )
    assert raw.headers["X-Aistack-Model"] == "whisper-tiny.en"
    body = json.loads(raw.content)
    schemas.validate(body, schemas.TRANSLATION_JSON)
    assert word_error_rate(text, raw.parse().text) < 0.25

    verbose = await client.audio.translations.create(model="whisper-1", file=path, response_format="verbose_json")
    schemas.validate(verbose.model_dump(), schemas.TRANSLATION_VERBOSE_JSON)
    assert verbose.language == "en" and verbose.duration > 3
    for fmt, needle in (("text", "station"), ("srt", "-->"), ("vtt", "WEBVTT")):
        answer = await client.audio.translations.create(model="whisper-1", file=path, response_format=fmt)
        assert needle in (answer if isinstance(answer, str) else answer.text), fmt


async def test_translations_on_a_backend_that_cannot_translate_are_400(everything, speech):
    client = client_for(everything)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.audio.translations.create(model="slow-asr", file=speech[1])
    error = error_body(caught.value)
    assert caught.value.code == "translation_not_supported" and error["param"] == "model"
    assert "whisper-tiny.en" in error["message"]  # names a model that can
    assert everything.app[slot_key].is_free


async def test_translate_on_an_english_only_model_is_its_transcription(whisper, speech):
    client = client_for(whisper)
    plain = await client.audio.transcriptions.create(model="whisper-tiny.en", file=speech[1])
    translated = await client.audio.transcriptions.create(
        model="whisper-tiny.en", file=speech[1], extra_body={"translate": "true"}
    )
    assert translated.text == plain.text and word_error_rate(speech[0], plain.text) < 0.25


# --- transcription bodies ---------------------------------------------------------------


async def test_verbose_json_segments_carry_real_seek_and_tokens(whisper, speech):
    client = client_for(whisper)
    verbose = await client.audio.transcriptions.create(
        model="whisper-1", file=speech[1], response_format="verbose_json",
        timestamp_granularities=["word", "segment"],
    )
    body = verbose.model_dump()
    schemas.validate(body, schemas.TRANSCRIPTION_VERBOSE_JSON)
    assert body["usage"] == {"type": "duration", "seconds": pytest.approx(body["duration"], abs=0.01)}
    tokenizer = whisper_tokenizer()
    end_of_text = tokenizer.token_to_id("<|endoftext|>")
    for segment in body["segments"]:
        assert segment["seek"] == 0  # a file this short is one 30 s window
        # The tokens are the ones the text was decoded from (timestamp tokens lie above the text vocabulary).
        text_tokens = [token for token in segment["tokens"] if token < end_of_text]
        assert text_tokens and tokenizer.decode(text_tokens).strip() == segment["text"]
    assert body["words"] and all(w["start"] <= w["end"] for w in body["words"])


async def test_other_backends_send_only_what_they_have(everything, speech):
    client = client_for(everything)
    verbose = await client.audio.transcriptions.create(model="slow-asr", file=speech[1], response_format="verbose_json")
    body = verbose.model_dump(exclude_unset=True)
    schemas.validate(body, schemas.verbose_json(schemas.SEGMENT_WITHOUT_SCORES))
    for segment in body["segments"]:
        assert segment["tokens"] == [] and "avg_logprob" not in segment and "no_speech_prob" not in segment


async def test_timestamp_granularities_decide_the_words(whisper, speech):
    client = client_for(whisper)
    segments_only = await client.audio.transcriptions.create(
        model="whisper-1", file=speech[1], response_format="verbose_json", timestamp_granularities=["segment"]
    )
    assert segments_only.words is None and segments_only.segments
    unspecified = await client.audio.transcriptions.create(model="whisper-1", file=speech[1], response_format="verbose_json")
    assert unspecified.words  # our contract: words whenever the backend has them


async def test_streamed_deltas_concatenate_to_the_done_text(whisper, speech):
    client = client_for(whisper)
    stream = await client.audio.transcriptions.create(model="whisper-1", file=speech[1], stream=True)
    deltas, done = [], None
    async for event in stream:
        data = event.model_dump(exclude_unset=True)
        if data["type"] == "transcript.text.delta":
            schemas.validate(data, schemas.TEXT_DELTA_EVENT)
            deltas.append(data["delta"])
        else:
            schemas.validate(data, schemas.TEXT_DONE_EVENT)
            done = data
    assert done is not None and len(deltas) >= 2
    assert "".join(deltas) == done["text"] and word_error_rate(speech[0], done["text"]) < 0.25
    assert done["usage"]["type"] == "duration" and done["usage"]["seconds"] > 3


def test_scripts_without_spaces_are_joined_without_them():
    pieces = ["你好。", "今天天气很好。", "Hello there.", "Bye."]
    joiner = TextJoiner()
    deltas = [joiner.add(piece) for piece in pieces]
    assert "".join(deltas) == joiner.text == "你好。今天天气很好。Hello there. Bye."
    segments = [Segment(id=i, start=i, end=i + 1, text=p) for i, p in enumerate(pieces)]
    assert join_text(segments) == joiner.text


# --- OpenAI's newer ids, logprobs, chunking ------------------------------------------------


@pytest.mark.parametrize("model", ["gpt-4o-transcribe", "gpt-4o-mini-transcribe"])
async def test_gpt_4o_ids_are_auto_with_logprobs(whisper, speech, model):
    client = client_for(whisper)
    raw = await client.audio.transcriptions.with_raw_response.create(
        model=model, file=speech[1], include=["logprobs"], chunking_strategy="auto"
    )
    assert raw.headers["X-Aistack-Model"] == "whisper-tiny.en" and raw.headers["X-Aistack-Language"] == "en"
    body = json.loads(raw.content)
    schemas.validate(body, schemas.TRANSCRIPTION_JSON)
    logprobs = raw.parse().logprobs
    assert logprobs and len(logprobs) >= 10
    for entry in logprobs:
        assert entry.logprob <= 0 and bytes(int(b) for b in entry.bytes).decode() == entry.token
    assert " ".join(e.token for e in logprobs).lower().count("station") == 1


async def test_chunking_strategy_server_vad_reaches_the_decoder(whisper, speech):
    client = client_for(whisper)
    result = await client.audio.transcriptions.create(
        model="gpt-4o-transcribe", file=speech[1], response_format="verbose_json",
        chunking_strategy={"type": "server_vad", "threshold": 0.4, "prefix_padding_ms": 200, "silence_duration_ms": 500},
    )
    assert word_error_rate(speech[0], result.text) < 0.25
    # VAD cuts the pauses but the timestamps stay those of the file (speech starts after 0.8 s of silence).
    assert result.segments[0].start >= 0.5
    for bad in ({"type": "client_vad"}, {"type": "server_vad", "threshold": 7}, "sometimes"):
        with pytest.raises(openai.BadRequestError) as caught:
            await client.audio.transcriptions.create(model="whisper-1", file=speech[1], chunking_strategy=bad)
        assert caught.value.code == "invalid_chunking_strategy" and error_body(caught.value)["param"] == "chunking_strategy"


def test_vad_settings_become_faster_whisper_parameters():
    options = TranscriptionOptions(vad=VadSettings(threshold=0.3, prefix_padding_ms=150, silence_duration_ms=700))
    settings = faster_whisper_plugin.transcribe_settings(options, "en", "transcribe", batched=False)
    assert settings["vad_filter"] is True
    assert settings["vad_parameters"] == {"threshold": 0.3, "min_silence_duration_ms": 700, "speech_pad_ms": 150}
    default = faster_whisper_plugin.transcribe_settings(TranscriptionOptions(), "en", "transcribe", False)
    assert default["vad_parameters"] is faster_whisper_plugin.VAD_OPTIONS  # the plugin's own unless the client asks


async def test_a_backend_without_vad_ignores_chunking(everything, speech):
    client = client_for(everything)
    result = await client.audio.transcriptions.create(
        model="slow-asr", file=speech[1], chunking_strategy={"type": "server_vad"}
    )
    assert result.text == "part 0. part 1."


# --- languages -----------------------------------------------------------------------------


async def test_language_names_and_region_forms(whisper, speech):
    client = client_for(whisper)
    for language in ("english", "English", "en-US", "en_GB"):
        raw = await client.audio.transcriptions.with_raw_response.create(
            model="whisper-tiny.en", file=speech[1], language=language
        )
        assert raw.status_code == 200 and raw.headers["X-Aistack-Language"] == "en", language
    with pytest.raises(openai.BadRequestError) as caught:
        await client.audio.transcriptions.create(model="whisper-1", file=speech[1], language="klingon")
    error = error_body(caught.value)
    assert caught.value.code == "unsupported_language" and error["param"] == "language"
    assert "'klingon'" in error["message"] and "en-US" in error["message"] and "english" in error["message"]
    with pytest.raises(openai.BadRequestError) as caught:  # a known language the English-only model cannot do
        await client.audio.transcriptions.create(model="whisper-tiny.en", file=speech[1], language="german")
    assert caught.value.code == "unsupported_language"


# --- errors ------------------------------------------------------------------------------------


def test_a_model_of_a_plugin_that_is_not_here_is_a_permanent_400():
    # Entry points as installed, with only faster_whisper allowed: parakeet's manifest still names its ids.
    from aistack_core import Config, Malformed
    from aistack_core.plugins import load_plugins
    from aistack_core.registry import Registry

    registry = Registry.from_plugins(load_plugins(allow=["faster_whisper"]), Config())
    with pytest.raises(Malformed) as caught:
        registry.resolve_asr("parakeet", None)
    assert caught.value.status == 400 and caught.value.code == "model_not_installed"
    assert caught.value.param == "model" and "parakeet" in caught.value.message


async def test_every_gateway_error_has_a_stable_code(make_client, tmp_path, speech):
    client = await make_client(plugins=WHISPER, max_upload_mb=1)
    big = tmp_path / "big.wav"
    big.write_bytes(b"\0" * (2 * 1024 * 1024))
    sdk = client_for(client)
    cases = [
        (sdk.audio.transcriptions.create(model="no-such-model", file=speech[1]), 400, "model_not_found", "model"),
        (sdk.audio.transcriptions.create(model="whisper-large-v3", file=speech[1]), 400, "model_not_installed", "model"),
        (sdk.audio.transcriptions.create(model="whisper-1", file=big), 413, "upload_too_large", None),
        (sdk.audio.transcriptions.create(model="whisper-1", file=speech[1], response_format="xml"), 400,
         "unsupported_value", "response_format"),
        (sdk.audio.speech.create(model="whisper-1", voice="alloy", input="Hi."), 400, "wrong_capability", "model"),
        (sdk.models.retrieve("nothing-here"), 404, "model_not_found", "model"),
    ]
    for call, status, code, param in cases:
        with pytest.raises(openai.APIStatusError) as caught:
            await call
        assert caught.value.status_code == status, (code, caught.value.response.text)
        error = error_body(caught.value)
        assert caught.value.code == code and error["param"] == param, error
        if code == "model_not_installed":  # says what to do: install, or allow the download
            assert "pip install 'aistack[" in error["message"] or "AISTACK_ALLOW_DOWNLOADS" in error["message"]
    not_found = await client.get("/v1/no/such/route")
    body = await not_found.json()
    schemas.validate(body, schemas.ERROR_RESPONSE)
    assert body["error"]["code"] == "not_found"


async def test_invalid_api_key_and_busy_codes(make_client, speech):
    client = await make_client(plugins={"slow": BackendPlugin(SlowAsr(steps=20, step_s=0.05))}, api_key="sekrit")
    with pytest.raises(openai.AuthenticationError) as caught:
        await client_for(client, api_key="wrong").models.list()
    assert caught.value.code == "invalid_api_key"
    error_body(caught.value)
    sdk = client_for(client, api_key="sekrit")
    first = asyncio.create_task(sdk.audio.transcriptions.create(model="slow-asr", file=speech[1]))
    while client.app[slot_key].is_free:
        await asyncio.sleep(0.01)
    with pytest.raises(openai.InternalServerError) as caught:
        await sdk.audio.transcriptions.create(model="slow-asr", file=speech[1])
    assert caught.value.status_code == 503 and caught.value.code == "gpu_busy"
    assert caught.value.response.headers["Retry-After"] == "5"
    error_body(caught.value)
    await first


# --- text to speech ----------------------------------------------------------------------------


async def test_speech_streams_by_default_in_every_format(make_client):
    client = await make_client(plugins=PIPER, tts_cache_ttl_min=0)
    sdk = client_for(client)
    for fmt in ("mp3", "opus", "aac", "flac", "wav", "pcm"):
        async with sdk.audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input=PARAGRAPH, response_format=fmt
        ) as response:
            assert response.headers["Transfer-Encoding"] == "chunked", fmt
            assert response.headers["X-Aistack-Model"] == "piper-en_US-joe-medium"
            chunks = response.iter_bytes()
            first = await chunks.__anext__()
            # Audio is here while the rest of the paragraph is still being synthesized.
            assert first and not client.app[slot_key].is_free, fmt
            data = first + b"".join([chunk async for chunk in chunks])
        seconds = len(data) / 2 / 24000 if fmt == "pcm" else decoded_seconds(data)
        assert 15 < seconds < 40, (fmt, seconds)


def decoded_seconds(data: bytes) -> float:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        return sum(frame.samples for frame in container.decode(stream)) / stream.codec_context.sample_rate


async def test_pcm_is_24_khz_like_openai(make_client):
    # A deterministic voice (Piper's durations vary a little from run to run):
    # 1.5 s of a 300 Hz tone at 16 kHz.
    client = await make_client(plugins={"float": FloatVoicePlugin()}, tts_cache_ttl_min=0)
    sdk = client_for(client)
    for stream in (True, False):
        pcm = (await sdk.audio.speech.create(
            model="float-voice", voice="sine", input="Hum.", response_format="pcm", extra_body={"stream": stream}
        )).content
        samples = np.frombuffer(pcm, dtype="<i2")
        assert abs(len(samples) - 36000) <= 2, (stream, len(samples))
        spectrum = np.abs(np.fft.rfft(samples[2000:34000]))
        assert float(np.argmax(spectrum)) * 24000 / 32000 == pytest.approx(300, abs=2)


async def test_cached_sse_answer_has_the_shape_of_a_miss(make_client):
    client = await make_client(plugins=PIPER)
    body = {"model": "tts-1", "voice": "alloy", "input": SENTENCES[4], "response_format": "wav", "stream_format": "sse"}
    shapes = []
    for expected in ("MISS", "HIT"):
        response = await client.post("/v1/audio/speech", json=body)
        assert response.headers["X-Cache"] == expected and response.content_type == "text/event-stream"
        events = await sse_events(response)
        assert [e["type"] for e in events][-1] == "speech.audio.done"
        audio_bytes = b"".join(__import__("base64").b64decode(e["audio"]) for e in events[:-1])
        shapes.append((audio_bytes, {e["type"] for e in events[:-1]}))
    assert shapes[0] == shapes[1] and shapes[0][1] == {"speech.audio.delta"}
    assert decoded_seconds(shapes[0][0]) > 2


class FloatVoice:
    """A TTS backend that yields float32 chunks in [-1, 1], as backends.py allows."""

    card = ModelCard(id="float-voice", capabilities=("tts",), owned_by="tests", provider="FloatVoice")
    voices = ("sine",)
    default_voice = "sine"
    sample_rate = 16000
    native_speed = False

    def load(self):
        return object()

    def synthesize(self, model, options, cancel):
        t = np.arange(8000) / self.sample_rate
        for _ in range(3):
            yield (0.5 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)


class FloatVoicePlugin:
    @hookimpl
    def register_tts_backends(self, register, config):
        register(FloatVoice())


async def test_float_chunks_and_speech_errors(make_client):
    client = await make_client(plugins={"float": FloatVoicePlugin()}, tts_cache_ttl_min=0)
    sdk = client_for(client)
    speech = await sdk.audio.speech.create(model="float-voice", voice="sine", input="Hum.", response_format="wav")
    with wave.open(io.BytesIO(speech.content)) as reader:
        samples = np.frombuffer(reader.readframes(reader.getnframes()), dtype="<i2")
    assert abs(int(samples.max()) - 16384) < 200  # 0.5 full scale, not silence
    broken = await client.post("/v1/audio/speech", data=b"{not json", headers={"Content-Type": "application/json"})
    assert broken.status == 400 and (await broken.json())["error"]["code"] == "invalid_json"
    assert client.app[slot_key].is_free


async def test_unknown_speech_model_with_the_upstream_down_lists_local_models(base_config, plugin_set):
    import attrs

    from aistack_core.app import create_app
    from .upstreams import run_gateway

    plugin_set.register(piper_plugin, name="piper")
    plugin_set.register(qwen3_tts_plugin, name="qwen3_tts")
    config = attrs.evolve(base_config, env={"AISTACK_QWEN3_TTS_URL": refused_url()})
    async with run_gateway(create_app(config, plugins=plugin_set)) as gateway:
        sdk = AsyncOpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError) as caught:
            await sdk.audio.speech.create(model="someone-elses-voice", voice="alloy", input="Hello?")
        assert caught.value.status_code == 503 and caught.value.code == "upstream_unreachable"
        assert "piper-en_US-joe-medium" in error_body(caught.value)["message"]


async def test_voices_show_what_openai_names_map_to(make_client):
    client = await make_client(plugins=PIPER)
    voices = await (await client.get("/v1/voices")).json()
    assert voices["openai_voices"] and all(v == "en_US-joe-medium" for v in voices["openai_voices"].values())


async def test_chat_proxy_names_the_model(base_config, plugin_set):
    import attrs

    from aistack_core.app import create_app
    from .upstreams import run_gateway

    emulator = OllamaEmulator()
    async with emulator.running():
        plugin_set.register(ollama_plugin, name="ollama")
        config = attrs.evolve(base_config, env={"AISTACK_OLLAMA_URL": emulator.url})
        async with run_gateway(create_app(config, plugins=plugin_set)) as gateway:
            sdk = AsyncOpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
            model = (await sdk.models.list()).data[0].id
            raw = await sdk.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": "Hi"}]
            )
            assert raw.headers["X-Aistack-Model"] == model


# --- models ----------------------------------------------------------------------------------------


async def test_openai_ids_are_listed_as_routing_aliases(everything):
    sdk = client_for(everything)
    raw = await sdk.models.with_raw_response.list()
    body = json.loads(raw.content)
    schemas.validate(body, schemas.LIST_MODELS_RESPONSE)
    by_id = {entry["id"]: entry for entry in body["data"]}
    expected = {
        "whisper-1": "whisper-tiny.en", "gpt-4o-transcribe": "whisper-tiny.en",
        "gpt-4o-mini-transcribe": "whisper-tiny.en", "tts-1": "piper-en_US-joe-medium",
        "tts-1-hd": "piper-en_US-joe-medium", "gpt-4o-mini-tts": "piper-en_US-joe-medium",
    }
    for alias, target in expected.items():
        entry = by_id[alias]
        assert entry["is_routing_alias"] is True and entry["resolves_to"] == target, entry
        assert entry["capabilities"] == [by_id[target]["capabilities"][0]]
    assert by_id["auto"]["is_routing_alias"] is True and "resolves_to" not in by_id["auto"]
    assert by_id["whisper-tiny.en"]["is_routing_alias"] is False
    # Retrieving an OpenAI id answers with what it stands for.
    assert (await sdk.models.retrieve("whisper-1")).id == "whisper-tiny.en"
    assert (await sdk.models.retrieve("gpt-4o-transcribe")).id == "gpt-4o-transcribe"


def test_sentences_cut_from_a_batched_chunk_get_their_own_tokens():
    from faster_whisper.transcribe import Segment as FwSegment, Word as FwWord

    from aistack_core import CancelToken

    words = [FwWord(0.0, 0.4, " Hello", 0.9), FwWord(0.4, 0.8, " there.", 0.8),
             FwWord(1.0, 1.4, " Good", 0.7), FwWord(1.4, 1.9, " night.", 0.95)]
    chunk = FwSegment(id=1, seek=3000, start=30.0, end=31.9, text=" Hello there. Good night.", tokens=[1, 2, 3, 4],
                      avg_logprob=-0.2, compression_ratio=1.1, no_speech_prob=0.01, words=words, temperature=0.0)
    tokenizer = whisper_tokenizer()

    def tokens_of(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    pieces = list(faster_whisper_plugin.aistack_segments([chunk], CancelToken(), split_sentences=True, tokens_of=tokens_of))
    assert [p.text for p in pieces] == ["Hello there.", "Good night."]
    assert all(p.seek == 3000 for p in pieces)
    assert [tokenizer.decode(list(p.tokens)).strip() for p in pieces] == ["Hello there.", "Good night."]
    whole = next(iter(faster_whisper_plugin.aistack_segments([chunk], CancelToken())))
    assert whole.tokens == (1, 2, 3, 4) and whole.seek == 3000


async def test_hostile_chunking_language_and_include_values_are_400s(make_client, speech):
    client = await make_client(plugins={"slow": BackendPlugin(SlowAsr(steps=1, step_s=0.01))})
    cases = [
        ({"chunking_strategy[type]": "server_vad", "chunking_strategy[threshold]": "abc"}, "chunking_strategy"),
        ({"chunking_strategy[type]": "server_vad", "chunking_strategy[evil]": "1"}, "chunking_strategy"),
        ({"chunking_strategy": '{"type": "server_vad", "threshold": 1e999}'}, "chunking_strategy"),
        ({"chunking_strategy": '{"type": "server_vad", "silence_duration_ms": true}'}, "chunking_strategy"),
        ({"chunking_strategy": "[1, 2]"}, "chunking_strategy"),
        ({"language": "x" * 200}, "language"),
        ({"language": "-"}, "language"),
        ({"include[]": "tokens"}, "include"),
    ]
    for fields, param in cases:
        response = await client.post("/v1/audio/transcriptions", data=form(speech[1], model="slow-asr", **fields))
        assert response.status == 400, (fields, await response.text())
        body = await response.json()
        schemas.validate(body, schemas.ERROR_RESPONSE)
        assert body["error"]["param"] == param, (fields, body)
    assert client.app[slot_key].is_free
    ok = await client.post("/v1/audio/transcriptions", data=form(
        speech[1], model="slow-asr", language="zh-Hant-TW", **{"chunking_strategy[type]": "server_vad"}))
    assert ok.status == 200, await ok.text()
