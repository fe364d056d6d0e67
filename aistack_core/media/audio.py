"""Audio in and out, through PyAV only.

Speech-to-text needs the upload checked and turned into mono float samples;
text-to-speech needs int16 chunks turned into the format the client asked
for, either all at once or as a stream.  Both go through FFmpeg's libraries
as bundled by PyAV, so no ``ffmpeg`` binary has to be installed.

Every function here blocks (decoding, encoding, filtering) and is meant to
run in a worker thread, never on the event loop.
"""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import math
import os
import struct
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import attrs
import av
import av.filter
import numpy as np

from ..errors import Malformed, Overflow

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..backends import CancelToken

ACCEPTED_UPLOADS = "Send WAV, MP3, M4A, FLAC, OGG, WebM or MP4 audio."

CONTENT_TYPES: dict[str, str] = {
    "mp3": "audio/mpeg",
    "opus": "audio/opus",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}

# The speed range OpenAI's /v1/audio/speech accepts; atempo itself goes wider
# but sounds worse the further one instance has to stretch.
MIN_SPEED = 0.25
MAX_SPEED = 4.0

# A decoder that has swallowed this many packets without producing a single
# frame is fed garbage; stop there instead of walking a huge file.
_PACKETS_BEFORE_FIRST_FRAME = 500

# How much audio probe() decodes even when the container states a duration.
_SECONDS_DECODED_BY_PROBE = 0.5

# What a recording of speech can plausibly be.  Outside these bounds a
# header is either broken or built to make the resampler allocate without
# end (a "1 Hz" WAV turns every byte into 16,000 output samples), so the
# file is refused before a single frame is decoded.
MIN_SAMPLE_RATE = 1000
MAX_SAMPLE_RATE = 384_000
MAX_CHANNELS = 32

# The decoder looks at the cancel token every this many frames (a few
# milliseconds of work each), so a long decode stops well within a second.
_FRAMES_BETWEEN_CANCEL_CHECKS = 64


def _not_audio(detail: str) -> Malformed:
    return Malformed(
        f"The uploaded file could not be decoded as audio ({detail}). {ACCEPTED_UPLOADS}", param="file", code="invalid_audio"
    )


def _ffmpeg_detail(exc: Exception) -> str:
    # str(FFmpegError) repeats the temporary upload path, which means nothing
    # to the client; the errno text alone says what went wrong.
    return getattr(exc, "strerror", None) or type(exc).__name__


# --- reading ------------------------------------------------------------------


@attrs.frozen
class AudioProbe:
    """What an upload holds, as far as speech-to-text cares.

    ``sample_rate`` and ``channels`` are those of the decoded audio, which
    can differ from the header (Opus always decodes at 48 kHz).
    """

    duration: float
    sample_rate: int
    channels: int
    codec: str
    container: str


def _check_shape(sample_rate: int, channels: int) -> None:
    """Refuse sample rates and channel counts no speech recording has (a 400, not a resampler crash)."""
    if sample_rate and not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise Malformed(
            f"The uploaded audio claims a sample rate of {sample_rate} Hz; speech audio lies between "
            f"{MIN_SAMPLE_RATE} and {MAX_SAMPLE_RATE} Hz. {ACCEPTED_UPLOADS}",
            param="file", code="invalid_audio",
        )
    if channels > MAX_CHANNELS:
        raise Malformed(
            f"The uploaded audio has {channels} channels; at most {MAX_CHANNELS} are accepted. {ACCEPTED_UPLOADS}",
            param="file", code="invalid_audio",
        )


def _too_long(seconds: float, max_seconds: float) -> Overflow:
    return Overflow(
        f"The audio lasts {seconds / 60:.1f} minutes or more; this server transcribes at most "
        f"{max_seconds / 60:g} minutes per request (AISTACK_MAX_AUDIO_MIN). Split the recording.",
        param="file", code="audio_too_long",
    )


def _open_input(path: Path) -> Any:
    try:
        return av.open(str(path), mode="r")
    except av.FFmpegError as exc:
        raise _not_audio(_ffmpeg_detail(exc)) from exc


def _first_audio_stream(container: Any) -> Any:
    """The first audio track, its header checked against the speech bounds."""
    if not container.streams.audio:
        raise _not_audio(f"the {container.format.name} container has no audio track")
    stream = container.streams.audio[0]
    context = stream.codec_context
    _check_shape(context.sample_rate or 0, context.channels or 0)
    return stream


def _decoded_frames(
    container: Any, stream: Any, max_seconds: float | None = None, cancel: "CancelToken | None" = None
) -> Iterator[Any]:
    """Frames of ``stream``; a demux or decode failure becomes ``Malformed``.

    One failure is forgiven: the last packet of a file that was cut short
    (an interrupted recording or upload) is usually a partial frame.  Like
    the ffmpeg command line, we drop it and keep the audio before it.

    Every frame's rate and layout is checked (a stream may change them
    midway), and the audio is counted as it comes: past ``max_seconds`` the
    decode stops with ``Overflow``, whatever the header said.  ``cancel`` is
    looked at every few frames.
    """
    packets_without_frame = 0
    seen_frame = False
    frame_count = 0
    samples_per_rate: dict[int, int] = {}
    seconds_before = 0.0  # audio at rates no longer in use
    try:
        packets = container.demux(stream)
        packet = next(packets, None)
        while packet is not None:
            following = next(packets, None)
            try:
                frames = packet.decode()
            except av.InvalidDataError:
                # PyAV ends the demux with an empty packet that flushes the
                # decoder; a packet followed by nothing else is the last one.
                if not (packet.size and (following is None or not following.size)):
                    raise
                frames = []
            if frames:
                seen_frame = True
            elif not seen_frame and packet.size:
                packets_without_frame += 1
                if packets_without_frame > _PACKETS_BEFORE_FIRST_FRAME:
                    raise _not_audio("no decodable audio in the first packets")
            for frame in frames:
                _check_shape(frame.sample_rate, frame.layout.nb_channels)
                frame_count += 1
                if cancel is not None and frame_count % _FRAMES_BETWEEN_CANCEL_CHECKS == 0:
                    cancel.raise_if_cancelled()
                if max_seconds is not None:
                    samples_per_rate[frame.sample_rate] = samples_per_rate.get(frame.sample_rate, 0) + frame.samples
                    if len(samples_per_rate) > 1:  # fold rates no longer in use into seconds
                        for rate in [r for r in samples_per_rate if r != frame.sample_rate]:
                            seconds_before += samples_per_rate.pop(rate) / rate
                    seconds = seconds_before + samples_per_rate[frame.sample_rate] / frame.sample_rate
                    if seconds > max_seconds:
                        raise _too_long(seconds, max_seconds)
                yield frame
            packet = following
    except av.FFmpegError as exc:
        raise _not_audio(_ffmpeg_detail(exc)) from exc


# Demuxers whose format has no length field, so FFmpeg's duration is a guess
# from the first packets' bit rate (ADTS AAC: off by several percent).
_DURATION_IS_GUESSED = frozenset({"aac"})


def _metadata_duration(container: Any, stream: Any) -> float | None:
    """The duration the container states, or None when it states none.

    The stream's own figure comes first: in a file with video the container
    duration may be the video's.  FFmpeg already estimates from the file
    size when a WAV header carries the 0xFFFFFFFF "unknown size" marker,
    which is exact for PCM.
    """
    if container.format.name in _DURATION_IS_GUESSED:
        return None
    if stream.duration and stream.time_base and stream.duration > 0:
        return float(stream.duration * stream.time_base)
    if container.duration and container.duration > 0:
        return container.duration / av.time_base
    return None


def _decode_head(frames: Iterator[Any]) -> list[Any]:
    """The first frames, up to ``_SECONDS_DECODED_BY_PROBE`` of audio.

    One frame is not proof: noise in a file named ``.mp3`` can hold a
    chance MP3 sync word and decode once before the next packet fails.
    """
    head: list[Any] = []
    seconds = 0.0
    for frame in frames:
        head.append(frame)
        seconds += frame.samples / frame.sample_rate
        if seconds >= _SECONDS_DECODED_BY_PROBE:
            break
    return head


def _counted_duration(frames: Iterable[Any]) -> float:
    # Counting whole samples per rate keeps the sum exact; adding up
    # per-frame seconds drifts (2.9999999999999987 for a 3 s file).
    samples_per_rate: dict[int, int] = {}
    for frame in frames:
        samples_per_rate[frame.sample_rate] = samples_per_rate.get(frame.sample_rate, 0) + frame.samples
    return sum(count / rate for rate, count in samples_per_rate.items())


def probe(path: str | os.PathLike[str], max_seconds: float | None = None) -> AudioProbe:
    """Check that ``path`` is decodable audio and describe it.

    Decodes only the first half second when the container states a
    duration, so a long upload is cheap to check; decodes everything
    (counting samples) when it states none, as with a streamed FLAC or a
    browser's WebM recording, or when its figure is a guess (ADTS AAC).
    Raises ``Malformed`` for anything a client could fix by sending a
    different file, and ``Overflow`` for audio longer than ``max_seconds``
    (from the stated duration before decoding, else while counting).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise _not_audio(f"cannot read it: {exc.strerror}") from exc
    if size == 0:
        raise _not_audio("the file is empty")
    with _open_input(path) as container:
        stream = _first_audio_stream(container)
        stated = _metadata_duration(container, stream)
        if stated is not None and max_seconds is not None and stated > max_seconds:
            raise _too_long(stated, max_seconds)
        with contextlib.closing(_decoded_frames(container, stream, max_seconds)) as frames:
            head = _decode_head(frames)
            if not head:
                raise _not_audio("the audio track holds no samples")
            first = head[0]
            duration = stated if stated is not None else _counted_duration(itertools.chain(head, frames))
        if duration <= 0:
            raise _not_audio("the audio track holds no samples")
        return AudioProbe(
            duration=duration,
            sample_rate=first.sample_rate,
            channels=first.layout.nb_channels,
            codec=stream.codec_context.name,
            container=container.format.name,
        )


class _MonoResampler:
    """Frames in, mono float32 arrays at one rate out.

    Some streams change rate or layout midway (chained Ogg, HE-AAC
    switching); a PyAV resampler is built for one input shape, so it is
    drained and replaced when the shape changes.
    """

    def __init__(self, sample_rate: int) -> None:
        self._rate = sample_rate
        self._resampler: Any = None
        self._shape: tuple | None = None

    def feed(self, frame: Any) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        shape = (frame.format.name, frame.layout.name, frame.sample_rate)
        if shape != self._shape:
            out = self.drain()
            self._resampler = av.AudioResampler(format="flt", layout="mono", rate=self._rate)
            self._shape = shape
        try:
            out.extend(_plane(piece) for piece in self._resampler.resample(frame))
        except (av.FFmpegError, ValueError) as exc:
            # A layout FFmpeg cannot downmix (odd channel orders) is the file's fault.
            raise _not_audio(f"cannot convert its {frame.layout.name} audio to mono: {_ffmpeg_detail(exc)}") from exc
        return out

    def drain(self) -> list[np.ndarray]:
        if self._resampler is None:
            return []
        return [_plane(piece) for piece in self._resampler.resample(None)]


def _clipped(chunks: list[np.ndarray]) -> np.ndarray:
    if not chunks:
        return np.zeros(0, dtype=np.float32)
    # Resampling filters can overshoot full scale by a hair.
    return np.clip(np.concatenate(chunks), -1.0, 1.0, dtype=np.float32)


@attrs.frozen
class DecodedAudio:
    """An upload that passed ``probe``; satisfies ``backends.AudioInput``.

    Samples are decoded on each ``samples()`` or ``windows()`` call rather
    than kept, so a backend that reads the file itself pays nothing for
    them, and one that reads windows holds one window at a time.  Every
    decode stops with ``Overflow`` past ``max_seconds``.
    """

    path: Path
    duration: float
    info: AudioProbe
    max_seconds: float | None = None

    @classmethod
    def open(cls, path: str | os.PathLike[str], max_seconds: float | None = None) -> "DecodedAudio":
        info = probe(path, max_seconds)
        return cls(path=Path(path), duration=info.duration, info=info, max_seconds=max_seconds)

    def _mono(self, sample_rate: int, cancel: "CancelToken | None") -> Iterator[np.ndarray]:
        with _open_input(self.path) as container:
            stream = _first_audio_stream(container)
            resampler = _MonoResampler(sample_rate)
            with contextlib.closing(_decoded_frames(container, stream, self.max_seconds, cancel)) as frames:
                for frame in frames:
                    yield from resampler.feed(frame)
            yield from resampler.drain()

    def samples(self, sample_rate: int = 16000, cancel: "CancelToken | None" = None) -> np.ndarray:
        """Mono float32 in [-1, 1] at ``sample_rate``, decoded frame by frame."""
        return _clipped(list(self._mono(sample_rate, cancel)))

    def windows(
        self, sample_rate: int = 16000, seconds: float = 600.0, cancel: "CancelToken | None" = None
    ) -> Iterator[tuple[float, np.ndarray]]:
        """``(offset_s, samples)`` for consecutive windows of ``seconds`` (the last may be shorter).

        Decoding runs only as far as the window being built, so memory
        stays at one window however long the file is.
        """
        size = max(1, int(round(seconds * sample_rate)))
        pending: list[np.ndarray] = []
        pending_len = 0
        emitted = 0
        with contextlib.closing(self._mono(sample_rate, cancel)) as pieces:
            for piece in pieces:
                pending.append(piece)
                pending_len += piece.size
                while pending_len >= size:
                    joined = np.concatenate(pending)
                    window, rest = joined[:size], joined[size:]
                    pending, pending_len = ([rest] if rest.size else []), rest.size
                    yield emitted / sample_rate, _clipped([window])
                    emitted += size
        if pending_len:
            yield emitted / sample_rate, _clipped(pending)


def _plane(frame: Any) -> np.ndarray:
    return frame.to_ndarray().reshape(-1)


# --- sample conversions -------------------------------------------------------


def float_to_int16(samples: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] to int16, clipping whatever lies outside."""
    clipped = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
    return np.round(clipped * 32767.0).astype(np.int16)


def _mono_int16(pcm: np.ndarray) -> np.ndarray:
    pcm = np.asarray(pcm)
    if pcm.ndim == 2 and 1 in pcm.shape:
        pcm = pcm.reshape(-1)
    if pcm.ndim != 1:
        raise ValueError(f"expected mono samples (a 1-D array), got shape {pcm.shape}")
    if np.issubdtype(pcm.dtype, np.floating):
        return float_to_int16(pcm)
    if pcm.dtype != np.int16:
        raise ValueError(f"expected int16 samples, got {pcm.dtype}")
    return pcm


def _int16_frame(pcm: np.ndarray, sample_rate: int, pts: int) -> av.AudioFrame:
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm).reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = sample_rate
    frame.time_base = Fraction(1, sample_rate)
    frame.pts = pts
    return frame


# --- writing ------------------------------------------------------------------


def _wav_header(sample_rate: int, channels: int, bits: int, data_size: int, riff_size: int) -> bytes:
    block_align = channels * bits // 8
    return (
        b"RIFF"
        + struct.pack("<I", riff_size)
        + b"WAVE"
        + b"fmt "
        + struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * block_align, block_align, bits)
        + b"data"
        + struct.pack("<I", data_size)
    )


def wav_stream_header(sample_rate: int, channels: int = 1, bits: int = 16) -> bytes:
    """A 44-byte WAV header for audio of unknown length.

    Both size fields hold 0xFFFFFFFF, which players and FFmpeg read as
    "until the end of the stream".
    """
    return _wav_header(sample_rate, channels, bits, data_size=0xFFFFFFFF, riff_size=0xFFFFFFFF)


@attrs.frozen
class _CodecFormat:
    container: str
    encoders: tuple[str, ...]  # first one this PyAV build has wins
    bit_rate: int | None
    # Muxer options for streaming: Ogg holds up to a second of audio per page
    # by default, which would delay every chunk that long.
    stream_options: dict[str, str] = attrs.field(factory=dict)


# Bit rates suit mono speech at TTS sample rates (16-24 kHz), not music.
_CODEC_FORMATS: dict[str, _CodecFormat] = {
    "mp3": _CodecFormat("mp3", ("libmp3lame", "mp3"), 64_000),
    "opus": _CodecFormat("ogg", ("libopus", "opus"), 32_000, {"page_duration": "100000"}),
    "aac": _CodecFormat("adts", ("aac", "libfdk_aac"), 64_000),
    "flac": _CodecFormat("flac", ("flac",), None),
}


@functools.cache
def _encoder(fmt: str) -> av.Codec | None:
    for name in _CODEC_FORMATS[fmt].encoders:
        try:
            return av.Codec(name, "w")
        except av.FFmpegError:
            continue
    return None


def encodable_formats() -> tuple[str, ...]:
    """The ``CONTENT_TYPES`` keys this PyAV build can actually produce."""
    return tuple(fmt for fmt in CONTENT_TYPES if fmt not in _CODEC_FORMATS or _encoder(fmt) is not None)


def _check_format(fmt: str) -> None:
    if fmt not in CONTENT_TYPES:
        raise ValueError(f"unknown audio format {fmt!r}; expected one of {', '.join(CONTENT_TYPES)}")
    if fmt in _CODEC_FORMATS and _encoder(fmt) is None:
        raise Malformed(
            f"This aistack cannot encode {fmt}: its PyAV build has no {_CODEC_FORMATS[fmt].encoders[0]} encoder. "
            f"Ask for one of: {', '.join(encodable_formats())}.",
            param="response_format", code="unsupported_value",
        )


def _encoder_rate(codec: av.Codec, sample_rate: int) -> int:
    """The input rate if the encoder takes it, else the nearest rate above it.

    Opus only takes 8/12/16/24/48 kHz, so Piper's 22050 becomes 24000.
    """
    rates = codec.audio_rates
    if not rates or sample_rate in rates:
        return sample_rate
    higher = [rate for rate in rates if rate >= sample_rate]
    return min(higher) if higher else max(rates)


class _ChunkSink:
    """A write-only file for PyAV that hands back what was written so far.

    Having no ``seek`` tells FFmpeg the output is a pipe, so muxers never go
    back to patch bytes that already left.
    """

    def __init__(self) -> None:
        self._chunks: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._chunks.append(bytes(data))
        return len(data)

    def drain(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data


class _CodecWriter:
    """One PyAV output container with one mono audio stream."""

    def __init__(self, fmt: str, sample_rate: int, sink: Any, options: dict[str, str]) -> None:
        spec = _CODEC_FORMATS[fmt]
        codec = _encoder(fmt)
        assert codec is not None  # _check_format ran first
        self._sample_rate = sample_rate
        self._samples_written = 0
        self._container = av.open(sink, mode="w", format=spec.container, options=options)
        # The stream encoder converts sample format and rate and cuts frames
        # to the codec's frame size on its own, so frames go in as they come.
        self._stream = self._container.add_stream(codec.name, rate=_encoder_rate(codec, sample_rate), layout="mono")
        if spec.bit_rate:
            self._stream.bit_rate = spec.bit_rate

    def start(self) -> None:
        self._container.start_encoding()

    def write(self, pcm: np.ndarray) -> None:
        if pcm.size == 0:
            return
        frame = _int16_frame(pcm, self._sample_rate, self._samples_written)
        self._samples_written += pcm.size
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def finish(self) -> None:
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()


def encode(pcm: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """Mono int16 ``pcm`` as a complete file in ``fmt`` (a ``CONTENT_TYPES`` key).

    Unlike ``StreamEncoder`` this writes to a seekable buffer, so muxers can
    fill in lengths at the end (MP3's Xing frame, FLAC's STREAMINFO) and
    players see the exact duration.
    """
    _check_format(fmt)
    pcm = _mono_int16(pcm)
    if fmt == "pcm":
        return pcm.astype("<i2", copy=False).tobytes()
    if fmt == "wav":
        data = pcm.astype("<i2", copy=False).tobytes()
        return _wav_header(sample_rate, 1, 16, data_size=len(data), riff_size=36 + len(data)) + data
    buffer = io.BytesIO()
    writer = _CodecWriter(fmt, sample_rate, buffer, options={})
    writer.start()  # so that even no audio at all gives a well-formed file
    writer.write(pcm)
    writer.finish()
    return buffer.getvalue()


class StreamEncoder:
    """Encode audio chunk by chunk for a streamed HTTP response.

    Call ``header()`` once, ``feed()`` per chunk and ``close()`` at the end,
    sending every returned ``bytes`` in order.  The header is produced
    exactly once: if ``header()`` is skipped, the first ``feed()`` or
    ``close()`` carries it.  Encoders keep a little audio back (MP3 and
    Opus look ahead), so a ``feed()`` may return less than was fed, even
    nothing; ``close()`` returns the rest.
    """

    def __init__(self, fmt: str, sample_rate: int) -> None:
        _check_format(fmt)
        self.fmt = fmt
        self.sample_rate = sample_rate
        self.content_type = CONTENT_TYPES[fmt]
        self._header_sent = False
        self._closed = False
        self._sink: _ChunkSink | None = None
        self._writer: _CodecWriter | None = None
        if fmt in _CODEC_FORMATS:
            self._sink = _ChunkSink()
            # flush_packets pushes each packet past FFmpeg's 32 KiB I/O buffer
            # so it reaches the client now rather than kilobytes later.
            options = {"flush_packets": "1", **_CODEC_FORMATS[fmt].stream_options}
            self._writer = _CodecWriter(fmt, sample_rate, self._sink, options)

    def header(self) -> bytes:
        if self._header_sent:
            return b""
        self._header_sent = True
        if self.fmt == "wav":
            return wav_stream_header(self.sample_rate)
        if self._writer is None or self._sink is None:
            return b""
        self._writer.start()
        return self._sink.drain()

    def feed(self, pcm: np.ndarray) -> bytes:
        if self._closed:
            raise ValueError("StreamEncoder.feed() after close()")
        head = self.header()
        pcm = _mono_int16(pcm)
        if self._writer is None or self._sink is None:
            return head + pcm.astype("<i2", copy=False).tobytes()
        self._writer.write(pcm)
        return head + self._sink.drain()

    def close(self) -> bytes:
        if self._closed:
            return b""
        head = self.header()
        self._closed = True
        if self._writer is None or self._sink is None:
            return head
        self._writer.finish()
        return head + self._sink.drain()


# --- speed --------------------------------------------------------------------


def _atempo_factors(speed: float) -> list[float]:
    """Split ``speed`` into equal factors that each stay within [0.5, 2.0]."""
    count = max(1, math.ceil(abs(math.log2(speed)) - 1e-9))
    return [speed ** (1.0 / count)] * count


def time_stretch(pcm: np.ndarray, sample_rate: int, speed: float) -> np.ndarray:
    """Play mono int16 ``pcm`` ``speed`` times faster, keeping the pitch.

    Uses FFmpeg's ``atempo`` (WSOLA), chained when one instance would have
    to leave its best range.  ``speed`` must lie in [0.25, 4.0]; the HTTP
    layer is expected to have rejected anything else with ``Malformed``.
    """
    if speed == 1.0:
        return pcm
    if not MIN_SPEED <= speed <= MAX_SPEED:
        raise ValueError(f"speed must be between {MIN_SPEED} and {MAX_SPEED}, got {speed}")
    pcm = _mono_int16(pcm)
    if pcm.size == 0:
        return pcm
    graph = av.filter.Graph()
    nodes = [graph.add_abuffer(sample_rate=sample_rate, format="s16", layout="mono", time_base=Fraction(1, sample_rate))]
    nodes += [graph.add("atempo", tempo=f"{factor:.6f}") for factor in _atempo_factors(speed)]
    nodes.append(graph.add("aformat", sample_fmts="s16", channel_layouts="mono"))
    nodes.append(graph.add("abuffersink"))
    graph.link_nodes(*nodes).configure()
    graph.push(_int16_frame(pcm, sample_rate, 0))
    graph.push(None)
    stretched: list[np.ndarray] = []
    while True:
        try:
            stretched.append(_plane(graph.pull()))
        except (av.EOFError, av.BlockingIOError):
            break
    if not stretched:
        return np.zeros(0, dtype=np.int16)
    return np.concatenate(stretched).astype(np.int16, copy=False)


# --- OpenAI's pcm -------------------------------------------------------------

# OpenAI's ``pcm`` speech format (and its client's player) is 24 kHz 16-bit mono.
OPENAI_PCM_RATE = 24000


class Int16Resampler:
    """Mono int16 chunks from ``from_rate`` to ``to_rate``, chunk by chunk.

    FFmpeg's resampler keeps its filter state between calls, so chunk
    boundaries leave no clicks; ``flush()`` returns the samples it still
    holds back at the end.
    """

    def __init__(self, from_rate: int, to_rate: int) -> None:
        self.from_rate, self.to_rate = from_rate, to_rate
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=to_rate) if from_rate != to_rate else None
        self._pts = 0

    def feed(self, pcm: np.ndarray) -> np.ndarray:
        pcm = _mono_int16(pcm)
        if self._resampler is None or pcm.size == 0:
            return pcm
        frame = _int16_frame(pcm, self.from_rate, self._pts)
        self._pts += pcm.size
        return self._joined(self._resampler.resample(frame))

    def flush(self) -> np.ndarray:
        if self._resampler is None:
            return np.zeros(0, dtype=np.int16)
        return self._joined(self._resampler.resample(None))

    @staticmethod
    def _joined(frames: list[Any]) -> np.ndarray:
        if not frames:
            return np.zeros(0, dtype=np.int16)
        return np.concatenate([_plane(frame) for frame in frames]).astype(np.int16, copy=False)


# --- long audio in windows cut at pauses -----------------------------------------------

# Where a window may end: the quietest 50 ms frame of the last 8 s before its nominal end.
QUIET_CUT_SEARCH_S = 8.0
QUIET_CUT_FRAME_S = 0.05


def _quiet_cut(samples: np.ndarray, window: int, sample_rate: int) -> int:
    """Where to end a window that starts at ``samples[0]``: at most ``window`` samples in."""
    frame = max(1, int(QUIET_CUT_FRAME_S * sample_rate))
    search = min(int(QUIET_CUT_SEARCH_S * sample_rate), window // 2)
    low = max(1, window - search)
    region = samples[low:window]
    frames = len(region) // frame
    if frames <= 0:
        return window
    energy = np.square(region[: frames * frame].astype(np.float64)).reshape(frames, frame).sum(axis=1)
    # The latest of the quietest frames, cut in its middle.
    quietest = frames - 1 - int(np.argmin(energy[::-1]))
    return low + quietest * frame + frame // 2


def quiet_windows(
    pieces: Iterable[tuple[float, np.ndarray]], window_s: float, sample_rate: int = 16000
) -> Iterator[tuple[int, np.ndarray]]:
    """``(start_sample, samples)`` windows of at most ``window_s``, each cut in a pause.

    ``pieces`` is what :meth:`AudioInput.windows` yields (any piece size):
    they are read only as far as the next window needs, so a backend that
    decodes long audio window by window holds a few windows at most (the
    one it decodes, the pieces of the next and, for a moment, their joined
    copy), never the file.  Each cut lands on the quietest 50 ms in the last few seconds
    before the nominal end, so a word is rarely split between two windows.
    """
    window = max(1, int(window_s * sample_rate))
    pending: list[np.ndarray] = []
    pending_len = 0
    start = 0
    for _, piece in pieces:
        pending.append(piece)
        pending_len += piece.size
        while pending_len > window:
            joined = np.concatenate(pending) if len(pending) > 1 else pending[0]
            cut = _quiet_cut(joined, window, sample_rate)
            rest = joined[cut:].copy()  # a copy, so the joined buffer goes with the window
            yield start, joined[:cut]
            start += cut
            pending, pending_len = ([rest] if rest.size else []), rest.size
    if pending_len:
        yield start, np.concatenate(pending) if len(pending) > 1 else pending[0]
