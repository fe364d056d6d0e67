"""aistack_core.audio: probing and decoding uploads, encoding and stretching TTS output.

Every file here is made on the spot, with numpy and PyAV, and read back
through the real FFmpeg libraries; nothing is mocked.
"""

from __future__ import annotations

import os
import struct
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from aistack_core.media import audio
from aistack_core.errors import Cancelled, Malformed, Overflow

TTS_RATE = 22050  # Piper's rate, which Opus cannot take as it is


def tone(seconds: float, sample_rate: int = TTS_RATE, freq: float = 440.0, amplitude: float = 0.4) -> np.ndarray:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    return audio.float_to_int16(amplitude * np.sin(2 * np.pi * freq * t))


def chirp(seconds: float, sample_rate: int = TTS_RATE) -> np.ndarray:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    return audio.float_to_int16(0.4 * np.sin(2 * np.pi * (200 * t + 400 * t * t / seconds)))


def dominant_frequency(samples: np.ndarray, sample_rate: int) -> float:
    x = samples.astype(np.float64) * np.hanning(len(samples))
    spectrum = np.abs(np.fft.rfft(x))
    return float(np.argmax(spectrum)) * sample_rate / len(samples)


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# --- encode, then decode back -------------------------------------------------

# Opus always decodes at 48 kHz whatever went in.
DECODED_RATE = {"mp3": TTS_RATE, "opus": 48000, "aac": TTS_RATE, "flac": TTS_RATE, "wav": TTS_RATE}


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "wav"])
def test_encoded_file_decodes_back_to_the_same_tone(tmp_path, fmt):
    pcm = tone(1.5)
    path = write(tmp_path, f"speech.{fmt}", audio.encode(pcm, TTS_RATE, fmt))

    decoded = audio.DecodedAudio.open(path)

    assert decoded.path == path
    assert decoded.duration == pytest.approx(1.5, abs=0.08)
    assert decoded.info.sample_rate == DECODED_RATE[fmt]
    assert decoded.info.channels == 1
    samples = decoded.samples(16000)
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert len(samples) == pytest.approx(1.5 * 16000, abs=0.08 * 16000)
    assert dominant_frequency(samples, 16000) == pytest.approx(440, rel=0.01)


def test_lossless_formats_keep_exact_duration_and_samples(tmp_path):
    pcm = chirp(2.0)
    for fmt in ("wav", "flac"):
        decoded = audio.DecodedAudio.open(write(tmp_path, f"x.{fmt}", audio.encode(pcm, TTS_RATE, fmt)))
        assert decoded.duration == 2.0
        # Same rate: the resampler only converts int16 to float.
        np.testing.assert_allclose(decoded.samples(TTS_RATE), pcm / 32768.0, atol=1e-6)


def test_pcm_is_raw_little_endian_int16():
    pcm = chirp(0.5)
    data = audio.encode(pcm, TTS_RATE, "pcm")
    assert len(data) == 2 * len(pcm)
    assert np.array_equal(np.frombuffer(data, dtype="<i2"), pcm)


def test_wav_header_carries_the_real_sizes():
    pcm = tone(0.25)
    data = audio.encode(pcm, TTS_RATE, "wav")
    assert len(data) == 44 + 2 * len(pcm)
    riff, riff_size, wave = struct.unpack("<4sI4s", data[:12])
    assert (riff, wave) == (b"RIFF", b"WAVE")
    assert riff_size == len(data) - 8
    assert data[36:40] == b"data"
    assert struct.unpack("<I", data[40:44])[0] == 2 * len(pcm)


def test_float_samples_are_accepted_and_converted():
    floats = np.array([0.0, 0.5, -0.5], dtype=np.float32)
    data = audio.encode(floats, TTS_RATE, "pcm")
    assert np.frombuffer(data, dtype="<i2").tolist() == [0, 16384, -16384]


def test_unknown_format_is_a_value_error():
    with pytest.raises(ValueError, match="ogg"):
        audio.encode(tone(0.1), TTS_RATE, "ogg")
    with pytest.raises(ValueError):
        audio.StreamEncoder("ogg", TTS_RATE)


def test_content_types_cover_every_format_and_all_are_encodable_here():
    assert audio.CONTENT_TYPES == {
        "mp3": "audio/mpeg",
        "opus": "audio/opus",
        "aac": "audio/aac",
        "flac": "audio/flac",
        "wav": "audio/wav",
        "pcm": "audio/pcm",
    }
    assert set(audio.encodable_formats()) == set(audio.CONTENT_TYPES)


def test_float_to_int16_clips_then_scales():
    out = audio.float_to_int16(np.array([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0]))
    assert out.dtype == np.int16
    assert out.tolist() == [-32767, -32767, 0, 16384, 32767, 32767]


# --- probe: what gets rejected ------------------------------------------------


def assert_rejected(path: Path) -> Malformed:
    with pytest.raises(Malformed) as caught:
        audio.probe(path)
    assert "could not be decoded as audio" in caught.value.message
    assert "Send WAV, MP3" in caught.value.message
    assert str(path) not in caught.value.message  # the temp path means nothing to a client
    return caught.value


def test_probe_rejects_random_bytes(tmp_path):
    # Seed 1 under an .mp3 name holds a chance MP3 frame that decodes once;
    # probe must look further than the first frame to turn it away.
    assert_rejected(write(tmp_path, "noise.mp3", np.random.default_rng(1).bytes(200_000)))


def test_probe_rejects_an_empty_file(tmp_path):
    assert "empty" in assert_rejected(write(tmp_path, "empty.wav", b"")).message


def test_probe_rejects_a_text_file(tmp_path):
    assert_rejected(write(tmp_path, "notes.txt", b"Meeting notes\nnothing to hear here\n" * 50))


def test_probe_rejects_a_video_without_audio(tmp_path):
    path = tmp_path / "silent.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for index in range(5):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), index * 40, dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    assert "no audio track" in assert_rejected(path).message


def test_probe_rejects_a_wav_with_no_samples(tmp_path):
    assert_rejected(write(tmp_path, "nothing.wav", audio.encode(np.zeros(0, np.int16), TTS_RATE, "wav")))


def test_probe_fails_fast_on_a_large_garbage_file(tmp_path):
    path = tmp_path / "huge.m4a"
    with path.open("wb") as out:
        for _ in range(8):
            out.write(os.urandom(4_000_000))
    started = time.perf_counter()
    assert_rejected(path)
    assert time.perf_counter() - started < 1.0


def test_corruption_in_the_middle_is_malformed(tmp_path):
    data = bytearray(audio.encode(tone(4.0, 16000), 16000, "mp3"))
    middle = len(data) // 2
    data[middle : middle + 2000] = np.random.default_rng(0).bytes(2000)
    decoded = audio.DecodedAudio.open(write(tmp_path, "broken.mp3", bytes(data)))  # the start is fine
    with pytest.raises(Malformed, match="could not be decoded"):
        decoded.samples()


def test_a_file_cut_short_keeps_the_audio_before_the_cut(tmp_path):
    data = audio.encode(tone(4.0, 16000), 16000, "flac")
    decoded = audio.DecodedAudio.open(write(tmp_path, "cut.flac", data[: len(data) * 2 // 3]))
    seconds = len(decoded.samples()) / 16000
    assert 2.0 < seconds < 2.8


# --- probe: durations ---------------------------------------------------------


def test_duration_of_a_streamed_wav_with_unknown_sizes(tmp_path):
    pcm = tone(1.25)
    path = write(tmp_path, "live.wav", audio.wav_stream_header(TTS_RATE) + pcm.tobytes())
    assert audio.probe(path).duration == pytest.approx(1.25, abs=1e-3)


def test_duration_is_counted_when_the_container_states_none(tmp_path):
    # A streamed FLAC cannot go back to fill in STREAMINFO's sample count.
    encoder = audio.StreamEncoder("flac", TTS_RATE)
    data = encoder.header() + encoder.feed(tone(1.7)) + encoder.close()
    path = write(tmp_path, "live.flac", data)
    with av.open(str(path)) as container:
        assert not container.streams.audio[0].duration and not container.duration
    assert audio.probe(path).duration == pytest.approx(1.7, abs=1e-6)


def test_adts_duration_is_counted_not_guessed_from_bit_rate(tmp_path):
    path = write(tmp_path, "speech.aac", audio.encode(tone(3.0), TTS_RATE, "aac"))
    with av.open(str(path)) as container:
        decoded_seconds = sum(frame.samples for frame in container.decode(audio=0)) / TTS_RATE
    assert audio.probe(path).duration == pytest.approx(decoded_seconds, abs=1e-6)


# --- samples ------------------------------------------------------------------


def test_samples_mixes_44k_stereo_down_to_16k_mono(tmp_path):
    seconds, rate = 2.0, 44100
    t = np.arange(int(seconds * rate)) / rate
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 440 * t + 0.3)]) * 0.5
    path = tmp_path / "stereo.flac"
    # Written with PyAV directly so this test does not lean on audio.encode.
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("flac", rate=rate, layout="stereo")
        frame = av.AudioFrame.from_ndarray(
            audio.float_to_int16(stereo).T.reshape(1, -1).copy(), format="s16", layout="stereo"
        )
        frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)

    decoded = audio.DecodedAudio.open(path)
    assert (decoded.info.sample_rate, decoded.info.channels) == (44100, 2)
    samples = decoded.samples(16000)

    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(len(samples) - 32000) <= 16
    assert -1.0 <= samples.min() and samples.max() <= 1.0
    assert np.abs(samples).max() > 0.3
    assert dominant_frequency(samples, 16000) == pytest.approx(440, rel=0.01)


# --- streaming ----------------------------------------------------------------


def test_wav_stream_header_bytes():
    header = audio.wav_stream_header(24000)
    assert len(header) == 44
    assert header == (
        b"RIFF" + b"\xff\xff\xff\xff" + b"WAVE"
        + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, 24000, 48000, 2, 16)
        + b"data" + b"\xff\xff\xff\xff"
    )
    assert audio.wav_stream_header(48000, channels=2, bits=16)[22:36] == struct.pack("<HIIHH", 2, 48000, 192000, 4, 16)


def test_stream_encoder_wav_concatenation_is_playable(tmp_path):
    encoder = audio.StreamEncoder("wav", TTS_RATE)
    chunks = [chirp(0.4), tone(0.3), chirp(0.5)]
    parts = [encoder.header()] + [encoder.feed(chunk) for chunk in chunks] + [encoder.close()]
    assert parts[0] == audio.wav_stream_header(TTS_RATE)
    assert [len(part) for part in parts[1:-1]] == [2 * len(chunk) for chunk in chunks]
    assert parts[-1] == b""

    decoded = audio.DecodedAudio.open(write(tmp_path, "streamed.wav", b"".join(parts)))
    assert decoded.duration == pytest.approx(1.2, abs=1e-3)
    np.testing.assert_allclose(decoded.samples(TTS_RATE), np.concatenate(chunks) / 32768.0, atol=1e-6)


def test_stream_encoder_pcm_has_no_header():
    encoder = audio.StreamEncoder("pcm", 24000)
    pcm = tone(0.2, 24000)
    assert encoder.header() == b""
    assert encoder.feed(pcm) == pcm.tobytes()
    assert encoder.close() == b""


def test_stream_encoder_sends_the_header_once_even_when_header_is_skipped():
    encoder = audio.StreamEncoder("wav", 16000)
    first = encoder.feed(tone(0.1, 16000))
    assert first[:44] == audio.wav_stream_header(16000) and len(first) == 44 + 3200
    assert encoder.header() == b""
    assert len(encoder.feed(tone(0.1, 16000))) == 3200


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac"])
def test_stream_encoder_codecs_emit_as_they_go_and_decode_whole(tmp_path, fmt):
    encoder = audio.StreamEncoder(fmt, TTS_RATE)
    pcm = tone(2.0)
    step = TTS_RATE // 2
    parts = [encoder.header()] + [encoder.feed(pcm[i : i + step]) for i in range(0, len(pcm), step)]
    parts.append(encoder.close())

    # Bytes leave with each feed, not only at close: that is what streaming is for.
    assert sum(len(part) for part in parts[1:-1]) > 0.5 * sum(len(part) for part in parts)
    assert encoder.close() == b""
    with pytest.raises(ValueError):
        encoder.feed(pcm)

    decoded = audio.DecodedAudio.open(write(tmp_path, f"streamed.{fmt}", b"".join(parts)))
    assert decoded.duration == pytest.approx(2.0, abs=0.1)
    assert decoded.info.sample_rate == DECODED_RATE[fmt]
    assert dominant_frequency(decoded.samples(16000), 16000) == pytest.approx(440, rel=0.01)


# --- time_stretch -------------------------------------------------------------


@pytest.mark.parametrize("speed", [0.25, 0.5, 1.5, 2.0, 4.0])
def test_time_stretch_changes_duration_but_not_pitch(speed):
    pcm = tone(2.0)
    stretched = audio.time_stretch(pcm, TTS_RATE, speed)
    assert stretched.dtype == np.int16 and stretched.ndim == 1
    assert len(stretched) == pytest.approx(len(pcm) / speed, rel=0.05)
    assert dominant_frequency(stretched, TTS_RATE) == pytest.approx(440, rel=0.03)


def test_time_stretch_at_normal_speed_is_the_input():
    pcm = tone(0.5)
    assert audio.time_stretch(pcm, TTS_RATE, 1.0) is pcm


def test_time_stretch_rejects_speeds_outside_the_api_range():
    for speed in (0.2, 4.5, 0.0, -1.0):
        with pytest.raises(ValueError):
            audio.time_stretch(tone(0.1), TTS_RATE, speed)


# --- bounds and windows (speech-to-text input) ------------------------------------


def _tone_wav(path: Path, seconds: float, rate: int = 22050) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.3 * 32767 * np.sin(2 * np.pi * 330.0 * t)).astype(np.int16)
    path.write_bytes(audio.encode(pcm, rate, "wav"))
    return path


def test_windows_cover_the_file_exactly_and_say_where_they_start(tmp_path):
    decoded = audio.DecodedAudio.open(_tone_wav(tmp_path / "tone.wav", 7.3))
    whole = decoded.samples(16000)
    windows = list(decoded.windows(16000, 2.0))
    assert [offset for offset, _ in windows] == [0.0, 2.0, 4.0, 6.0]
    assert [piece.size for _, piece in windows[:-1]] == [32000] * 3
    assert np.array_equal(np.concatenate([piece for _, piece in windows]), whole)
    assert all(piece.dtype == np.float32 for _, piece in windows)


def test_decoding_stops_at_the_length_limit_whatever_the_header_says(tmp_path):
    path = _tone_wav(tmp_path / "tone.wav", 5.0)
    with pytest.raises(Overflow) as refused:
        audio.DecodedAudio.open(path, max_seconds=3.0)
    assert refused.value.param == "file"
    # A header that understates the length is caught while decoding.
    lying = audio.DecodedAudio(path=path, duration=1.0, info=audio.probe(path), max_seconds=3.0)
    with pytest.raises(Overflow):
        lying.samples(16000)
    with pytest.raises(Overflow):
        list(lying.windows(16000, 1.0))


def test_a_cancelled_decode_stops(tmp_path):
    from aistack_core import CancelToken

    decoded = audio.DecodedAudio.open(_tone_wav(tmp_path / "tone.wav", 20.0))
    cancel = CancelToken()
    windows = decoded.windows(16000, 1.0, cancel)
    next(windows)
    cancel.cancel("client disconnected")
    with pytest.raises(Cancelled):
        list(windows)
    with pytest.raises(Cancelled):
        decoded.samples(16000, cancel)


@pytest.mark.parametrize("rate, channels, bounded", [(999, 1, "sample rate"), (384_001, 1, "sample rate"), (16000, 33, "channels")])
def test_implausible_headers_are_malformed_before_decoding(tmp_path, rate, channels, bounded):
    block = channels * 2
    header = (
        b"RIFF" + struct.pack("<I", 36 + 4000) + b"WAVE" + b"fmt "
        + struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * block, block, 16) + b"data" + struct.pack("<I", 4000)
    )
    path = tmp_path / "odd.wav"
    path.write_bytes(header + bytes(4000))
    with pytest.raises(Malformed, match=bounded) as refused:
        audio.probe(path)
    assert refused.value.param == "file"


# --- long audio in windows cut at pauses ----------------------------------------------


def plan_windows(samples, window_s, piece_s=0.7):
    """``quiet_windows`` fed in pieces as a file is read, as sample ranges."""
    size = int(piece_s * 16000)
    pieces = [(start / 16000, samples[start:start + size]) for start in range(0, len(samples), size)]
    return [(start, start + len(window)) for start, window in audio.quiet_windows(pieces, window_s)]


def test_windows_are_cut_in_quiet_places():
    rng = np.random.default_rng(1)
    samples = (rng.standard_normal(16000 * 10) * 0.3).astype(np.float32)
    quiet = [(2.6, 2.8), (5.3, 5.5), (8.1, 8.3)]
    for start, end in quiet:
        samples[int(start * 16000) : int(end * 16000)] *= 0.001
    windows = plan_windows(samples, window_s=3.0)
    assert windows[0][0] == 0 and windows[-1][1] == len(samples)
    assert all(a[1] == b[0] for a, b in zip(windows, windows[1:]))
    assert all(0 < end - start <= 3 * 16000 for start, end in windows)
    for (_, cut), (quiet_start, quiet_end) in zip(windows, quiet):
        assert quiet_start * 16000 <= cut <= quiet_end * 16000
    assert plan_windows(samples[:16000], window_s=3.0) == [(0, 16000)]
    # The same cuts whatever the piece size the file is read in (one piece: the whole file).
    assert plan_windows(samples, window_s=3.0, piece_s=10.0) == windows == plan_windows(samples, 3.0, piece_s=0.05)
