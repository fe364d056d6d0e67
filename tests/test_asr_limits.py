"""Audio a hostile client might send: refused cheaply, or transcribed in bounded memory, and cancellable.

Every file is generated here and small on the wire: a WAV header that
claims 1 Hz or 255 channels, FLAC files whose STREAMINFO states (or hides)
hours of audio, three hours of silence.  Requests go over real HTTP; memory
is read from /proc.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from pathlib import Path

import aiohttp
import av
import numpy as np
import pytest

import aistack_plugins.faster_whisper as faster_whisper_plugin
from aistack_core.app import create_app
from aistack_core.context import slot_key

from .test_core import assert_envelope, form
from .upstreams import serve

WHISPER = {"faster_whisper": faster_whisper_plugin}


def wav_claiming(path: Path, sample_rate: int, channels: int, data_bytes: int) -> Path:
    """A PCM WAV whose header says ``sample_rate`` and ``channels``, followed by zeros."""
    block_align = channels * 2
    header = (
        b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE"
        + b"fmt " + struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * block_align, block_align, 16)
        + b"data" + struct.pack("<I", data_bytes)
    )
    path.write_bytes(header + bytes(data_bytes))
    return path


def silent_flac(path: Path, seconds: float, rate: int = 16000) -> Path:
    """``seconds`` of digital silence as FLAC (a few bytes per frame)."""
    with av.open(str(path), "w", format="flac") as out:
        stream = out.add_stream("flac", rate=rate, layout="mono")
        block = np.zeros((1, rate * 10), dtype=np.int16)
        for index in range(int(seconds // 10)):
            frame = av.AudioFrame.from_ndarray(block, format="s16", layout="mono")
            frame.sample_rate, frame.pts = rate, index * block.shape[1]
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def set_flac_total_samples(path: Path, total: int) -> Path:
    """Rewrite the 36-bit total-samples field of STREAMINFO (0 means "unknown", as a streamed FLAC writes)."""
    data = bytearray(path.read_bytes())
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # the first metadata block is STREAMINFO
    field = 8 + 13  # after "fLaC", the block header and 13 bytes of STREAMINFO
    data[field] = (data[field] & 0xF0) | ((total >> 32) & 0x0F)
    data[field + 1:field + 5] = struct.pack(">I", total & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def three_hours(tmp_path_factory) -> Path:
    path = silent_flac(tmp_path_factory.mktemp("long") / "three_hours.flac", 3 * 3600)
    assert path.stat().st_size < 3_000_000
    return path


async def post(client, path: Path, **fields):
    return await client.post("/v1/audio/transcriptions", data=form(path, model="whisper-1", **fields))


@pytest.fixture
async def whisper_client(make_client):
    return await make_client(plugins=WHISPER)


async def test_a_one_hertz_header_is_refused_before_decoding(whisper_client, tmp_path, base_config):
    path = wav_claiming(tmp_path / "one_hz.wav", 1, 1, 2_000_000)  # "11 days" of audio in 2 MB
    started = time.monotonic()
    response = await post(whisper_client, path)
    assert response.status == 400
    body = await response.json()
    assert_envelope(body, "malformed")
    assert body["error"]["param"] == "file" and "1 Hz" in body["error"]["message"]
    assert time.monotonic() - started < 2.0
    assert list(base_config.upload_dir.iterdir()) == []


@pytest.mark.parametrize("rate, channels", [(500_000, 1), (16000, 255), (16000, 33)])
async def test_rates_and_channel_counts_no_speech_has_are_400(whisper_client, tmp_path, rate, channels):
    path = wav_claiming(tmp_path / "odd.wav", rate, channels, channels * 2 * 1600)
    response = await post(whisper_client, path)
    assert response.status == 400, await response.text()
    body = await response.json()
    assert_envelope(body, "malformed")
    assert body["error"]["param"] == "file"


async def test_many_channels_within_the_bound_still_transcribe(whisper_client, tmp_path):
    path = wav_claiming(tmp_path / "eight.wav", 16000, 8, 8 * 2 * 16000)
    response = await post(whisper_client, path)
    assert response.status == 200, await response.text()
    assert (await response.json())["text"] == ""


async def test_stated_length_over_the_limit_is_413_at_once(whisper_client, tmp_path):
    # Ten seconds of FLAC whose STREAMINFO claims five hours: decided from the metadata alone.
    path = set_flac_total_samples(silent_flac(tmp_path / "claims.flac", 10), 5 * 3600 * 16000)
    started = time.monotonic()
    response = await post(whisper_client, path)
    assert response.status == 413
    body = await response.json()
    assert_envelope(body, "overflow")
    assert body["error"]["param"] == "file" and "AISTACK_MAX_AUDIO_MIN" in body["error"]["message"]
    assert time.monotonic() - started < 2.0


async def test_unstated_length_is_counted_only_up_to_the_limit(make_client, tmp_path):
    client = await make_client(plugins=WHISPER, max_audio_min=1.0)
    path = set_flac_total_samples(silent_flac(tmp_path / "streamed.flac", 150), 0)
    response = await post(client, path)
    assert response.status == 413
    assert_envelope(await response.json(), "overflow")
    fits = set_flac_total_samples(silent_flac(tmp_path / "short.flac", 50), 0)
    assert (await post(client, fits)).status == 200


def _peak_rss_resettable() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


async def test_three_hours_of_silence_in_bounded_memory(whisper_client, three_hours, sentences_wav):
    warm = await post(whisper_client, sentences_wav[0][1])  # the model loads outside the measurement
    assert warm.status == 200
    resettable = _peak_rss_resettable()
    before = _kib("VmRSS")
    response = await post(whisper_client, three_hours, response_format="verbose_json")
    assert response.status == 200, await response.text()
    body = await response.json()
    assert body["text"] == "" and body["duration"] == pytest.approx(3 * 3600, abs=1)
    if resettable:
        grown_mib = (_kib("VmHWM") - before) / 1024
        # Whole, this file is 660 MB of float samples; windows hold about 4 MB at a time.
        assert grown_mib < 300, f"peak RSS grew by {grown_mib:.0f} MiB"


async def test_hanging_up_during_a_long_decode_frees_the_slot_within_a_second(
    plugin_set, base_config, three_hours
):
    plugin_set.register(faster_whisper_plugin, name="faster_whisper")
    base_config.upload_dir.mkdir(parents=True)
    app = create_app(base_config, plugins=plugin_set)
    slot = app[slot_key]
    # Served as `aistack serve` serves it: only the gateway's disconnect watch notices the hang-up.
    async with serve(app) as base_url, aiohttp.ClientSession() as session:
        call = asyncio.create_task(
            session.post(base_url + "/v1/audio/transcriptions", data=form(three_hours, model="whisper-1"))
        )
        deadline = time.monotonic() + 30
        while slot.is_free and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert not slot.is_free
        await asyncio.sleep(1.5)  # well into the decode of the first pieces
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call
        hung_up = time.monotonic()
        while not slot.is_free and time.monotonic() - hung_up < 10:
            await asyncio.sleep(0.01)
        latency = time.monotonic() - hung_up
        assert slot.is_free and latency < 1.2, f"slot freed {latency:.2f} s after the hang-up"
        assert list(base_config.upload_dir.iterdir()) == []


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf", "four hours"])
def test_the_length_limit_must_be_a_positive_number(value):
    from aistack_core.config import Config

    with pytest.raises(ValueError, match="AISTACK_MAX_AUDIO_MIN"):
        Config.from_env({"AISTACK_MAX_AUDIO_MIN": value})
    assert Config.from_env({}).max_audio_min == 240
    assert Config.from_env({"AISTACK_MAX_AUDIO_MIN": "30"}).max_audio_min == 30
