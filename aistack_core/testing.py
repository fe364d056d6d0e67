"""Helpers for testing an aistack plugin against the real gateway.

A third-party plugin's test is three lines::

    from aistack_core.testing import serve, tone_wav, upload

    async def test_my_backend(tmp_path):
        async with serve(plugins=[my_plugin]) as client:
            response = await client.post("/v1/audio/transcriptions", data=upload(tone_wav(tmp_path / "a.wav")))
            assert response.status == 200

``serve`` builds the same application ``aistack serve`` runs (every
middleware, the slot, the model cache, the error envelope), with only the
given plugins, and answers over real HTTP on a loopback port.  The audio
helpers need numpy, which every in-process backend has anyway.
"""

from __future__ import annotations

import contextlib
import tempfile
import wave
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterable, Mapping

import aiohttp
import attrs
from aiohttp.test_utils import TestClient, TestServer

from .backends import CancelToken, Segment, SpeechOptions, Transcription, TranscriptionOptions
from .config import Config
from .plugins import MANIFEST_ATTRIBUTE, PluginSet, load_plugins

if TYPE_CHECKING:  # pragma: no cover - typing only
    import numpy

__all__ = ["serve", "plugin_set", "FakeAudio", "tone", "tone_wav", "write_wav", "upload", "transcribe", "synthesize"]


def _plugin_name(plugin: object) -> str:
    manifest = getattr(plugin, MANIFEST_ATTRIBUTE, None)
    if manifest is not None:
        return manifest.name
    name = getattr(plugin, "__name__", None) or type(plugin).__name__
    return name.rsplit(".", 1)[-1]


def plugin_set(plugins: Mapping[str, object] | Iterable[object] = ()) -> PluginSet:
    """A plugin set holding exactly ``plugins`` (modules or objects), no entry points.

    A list names each plugin after its manifest (``AISTACK_MANIFEST``), else
    its module or class; pass a mapping to choose the names.
    """
    named = dict(plugins) if isinstance(plugins, Mapping) else {_plugin_name(p): p for p in plugins}
    result = load_plugins(load_entrypoints=False)
    for name, plugin in named.items():
        result.register(plugin, name=name)
    return result


@contextlib.asynccontextmanager
async def serve(
    plugins: Mapping[str, object] | Iterable[object] = (),
    *,
    settings: Mapping[str, str] | None = None,
    **config: Any,
) -> AsyncIterator[TestClient]:
    """Run the gateway with ``plugins`` and yield an aiohttp test client for it.

    :param plugins: plugin modules or objects (see :func:`plugin_set`).
    :param settings: environment variables the plugins read
        (``{"AISTACK_TINY_TTS_PITCH_HZ": "180"}``); the real environment is
        not consulted, so tests do not depend on the machine they run on.
    :param config: gateway settings, as ``Config`` fields (``slot_wait_s=1``).
        Upload, cache and log folders default to a temporary folder removed
        afterwards; the access log is off unless asked for.

    ``client.get("/v1/models")`` and friends speak real HTTP to the server;
    ``client.app`` is the application.
    """
    from .app import create_app  # the app pulls in the audio stack; only when serving

    with tempfile.TemporaryDirectory(prefix="aistack-test-") as scratch:
        root = Path(scratch)
        defaults = {
            "upload_dir": root / "uploads",
            "tts_cache_dir": root / "tts-cache",
            "obs_log_dir": root / "logs",
            "obs_payload_dir": root / "payloads",
            "obs_access_log": False,
        }
        options = Config(**{**defaults, **config})
        options = attrs.evolve(options, env={**options.env, **(settings or {})})
        options.upload_dir.mkdir(parents=True, exist_ok=True)
        client = TestClient(TestServer(create_app(options, plugins=plugin_set(plugins))))
        await client.start_server()
        try:
            yield client
        finally:
            await client.close()


# --- audio --------------------------------------------------------------------------


def tone(seconds: float = 1.0, freq: float = 440.0, sample_rate: int = 16000, level: float = 0.3) -> "numpy.ndarray":
    """A sine tone as mono float32 samples in [-1, 1]."""
    import numpy as np

    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    return (level * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_wav(path: Path, samples: "numpy.ndarray", sample_rate: int = 16000) -> Path:
    """Write mono samples (float in [-1, 1] or int16) as a 16-bit WAV file."""
    import numpy as np

    data = np.asarray(samples)
    if data.dtype != np.int16:
        data = (np.clip(data.astype(np.float64), -1.0, 1.0) * 32767).astype(np.int16)
    path = Path(path)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(data.tobytes())
    return path


def tone_wav(path: Path, seconds: float = 1.0, freq: float = 440.0, sample_rate: int = 16000,
             silence_s: float = 0.0) -> Path:
    """A WAV file of a tone, with ``silence_s`` of silence before and after."""
    import numpy as np

    pad = np.zeros(int(round(silence_s * sample_rate)), dtype=np.float32)
    return write_wav(path, np.concatenate([pad, tone(seconds, freq, sample_rate), pad]), sample_rate)


def upload(path: Path, **fields: Any) -> aiohttp.FormData:
    """A multipart body for ``/v1/audio/transcriptions``: the file plus form fields."""
    path = Path(path)
    data = aiohttp.FormData()
    data.add_field("file", path.read_bytes(), filename=path.name, content_type="audio/wav")
    for name, value in fields.items():
        data.add_field(name, str(value).lower() if isinstance(value, bool) else str(value))
    return data


@attrs.define
class FakeAudio:
    """An ``AudioInput`` made from samples, for calling a backend directly.

    ``samples(rate)`` resamples linearly when asked for another rate; the
    gateway's own decoder does better, but a backend's logic does not care.
    ``path`` is a real WAV file of the same samples (for backends that read
    the file themselves); it lives in ``directory`` or a temporary folder.
    """

    data: Any
    sample_rate: int = 16000
    directory: Path | None = None
    path: Path = attrs.field(init=False)
    duration: float = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        import numpy as np

        self.data = np.asarray(self.data, dtype=np.float32).reshape(-1)
        self.duration = len(self.data) / self.sample_rate
        folder = Path(self.directory) if self.directory else Path(tempfile.mkdtemp(prefix="aistack-audio-"))
        self.path = write_wav(folder / "audio.wav", self.data, self.sample_rate)

    def samples(self, sample_rate: int = 16000) -> "numpy.ndarray":
        import numpy as np

        if sample_rate == self.sample_rate or len(self.data) == 0:
            return self.data.copy()
        count = int(round(len(self.data) * sample_rate / self.sample_rate))
        positions = np.arange(count) * (self.sample_rate / sample_rate)
        return np.interp(positions, np.arange(len(self.data)), self.data).astype(np.float32)


# --- driving a backend as the core does ---------------------------------------------------


def transcribe(backend: Any, audio: Any, options: TranscriptionOptions | None = None,
               cancel: CancelToken | None = None) -> tuple[Transcription, list[Segment]]:
    """``load``, ``transcribe`` and pull every segment, as the gateway's worker thread does."""
    cancel = cancel or CancelToken()
    result = backend.transcribe(backend.load(), audio, options or TranscriptionOptions(), cancel)
    segments = []
    iterator = iter(result.segments)
    try:
        for segment in iterator:
            segments.append(segment)
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
    return result, segments


def synthesize(backend: Any, text: str, voice: str | None = None, cancel: CancelToken | None = None,
               **options: Any) -> "numpy.ndarray":
    """``load`` and ``synthesize``; every chunk joined into one int16 array."""
    import numpy as np

    speech = SpeechOptions(text=text, voice=voice or backend.default_voice, **options)
    chunks = [np.asarray(chunk, dtype=np.int16) for chunk in backend.synthesize(backend.load(), speech, cancel or CancelToken())]
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)
