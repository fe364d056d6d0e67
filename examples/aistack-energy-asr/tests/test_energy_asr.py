"""energy-vad behind the real gateway, tested with aistack_core.testing."""

import aistack_energy_asr
from aistack_core.testing import FakeAudio, serve, tone, tone_wav, transcribe, upload


async def test_speech_span_over_http(tmp_path):
    async with serve(plugins=[aistack_energy_asr]) as client:
        wav = tone_wav(tmp_path / "span.wav", seconds=1.0, silence_s=1.0)
        response = await client.post("/v1/audio/transcriptions", data=upload(wav, model="energy-vad",
                                                                            response_format="verbose_json"))
        assert response.status == 200, await response.text()
        segments = (await response.json())["segments"]
        assert [s["text"] for s in segments] == ["[speech]"]
        assert abs(segments[0]["start"] - 1.0) < 0.1 and abs(segments[0]["end"] - 2.0) < 0.1


def test_two_bursts_are_two_segments():
    import numpy as np

    silence = np.zeros(8000, dtype=np.float32)
    audio = FakeAudio(np.concatenate([silence, tone(0.5), silence, tone(0.5), silence]))
    _, segments = transcribe(aistack_energy_asr.EnergyAsr(), audio)
    assert len(segments) == 2 and segments[0].end < segments[1].start
